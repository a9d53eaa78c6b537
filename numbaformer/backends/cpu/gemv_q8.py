"""The fast decode mat-vecs on the CPU: packed weights (layout.py) against 8-bit activations.

Activations: x' (the input, or rmsnorm(x) * w when fused) is quantized per 32 values as llama.cpp's
q8_1: d = max|x'| / 127, q = rint(x' * (1 / d)) in float32 (compiled without fast math, so the
rounding is exactly that), with d (xd) and the sum of the quants (xsq) per block. Each kernel does
this serially, then splits the row groups of its matrices evenly into chunks, one prange iteration
each (as many as numba may have threads), and each group is one call of simd.dot_rows16.
Epilogues (residual add, SwiGLU) run on the 16 results of a group.

One dispatch and one prange launch per fused op of a decode step: norm + Q/K/V (three matrices in
one loop), output projection + residual, norm + gate/up + SwiGLU, down projection + residual,
norm + output head. The backend (CPUBackend) makes a `FastMatvec` once per set of matrices (the
kernels' arguments that do not change), and calls it. The kernels serve every packed kind.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import cpu_jit
from .norm import _rmsnorm_row
from .simd import KIND_ID, R, dot2_rows16, dot4_rows16, dot_rows16


@cpu_jit()
def quantize_q8(x, xq, xd, xsq):
    """x (cols,) f32 -> xq (cols,) int8, xd (cols/32,) f32, xsq (cols/32,) int32 (module doc)."""
    for b in range(xd.shape[0]):
        amax = np.float32(0)
        for i in range(32 * b, 32 * b + 32):
            amax = max(amax, abs(x[i]))
        d = amax / np.float32(127)
        inv = np.float32(1) / d if d > 0 else np.float32(0)
        s = 0
        for i in range(32 * b, 32 * b + 32):
            q = np.int32(np.rint(x[i] * inv))
            xq[i] = q
            s += q
        xd[b] = d
        xsq[b] = s


@cpu_jit()
def _prologue(x, norm_w, eps, xn, xq, xd, xsq):
    """xn = rmsnorm(x) * norm_w, quantized into xq/xd/xsq; without norm_w entries, x itself."""
    if norm_w.shape[0]:
        _rmsnorm_row(xn, x, norm_w, eps)
        quantize_q8(xn, xq, xd, xsq)
    else:
        quantize_q8(x, xq, xd, xsq)


# Both kernels take the prologue's arguments first: x (cols,), norm_w (cols,) or (0,), eps, xn
# (cols,) scratch, the q8 scratch xq, xd, xsq; then the kind (simd.KIND_ID) of their packed
# matrices; and last a scratch (chunks, 4, 16) f32: one chunk of the row groups per prange
# iteration, each with its 16 (or 2 x 16) results.

@cpu_jit(parallel=True)
def _matvec3(x, norm_w, eps, xn, xq, xd, xsq, kind, ws, outs, n_mats, residual, scratch):
    # ws: a tuple of 3 packed matrices (Packed.w); outs: 3 (rows_m,) f32. The first n_mats are
    # used (the rest repeat one of them). outs[m] = (or +=, residual) W_m @ x'.
    _prologue(x, norm_w, eps, xn, xq, xd, xsq)
    total = 0
    for mi in range(n_mats):
        total += ws[mi].shape[0]
    nc = scratch.shape[0]
    for c in prange(nc):
        res = scratch[c, 0]
        for t in range(c * total // nc, (c + 1) * total // nc):
            mi, g = 0, t
            while g >= ws[mi].shape[0]:
                g -= ws[mi].shape[0]
                mi += 1
            dot_rows16(kind, res, ws[mi], g, xq, xd, xsq)
            out = outs[mi]
            r0 = g * R
            for i in range(min(R, out.shape[0] - r0)):
                out[r0 + i] = out[r0 + i] + res[i] if residual else res[i]


@cpu_jit(parallel=True)
def _swiglu(x, norm_w, eps, xn, xq, xd, xsq, kind, wg, wu, out, scratch):
    # gate and up packed alike; out (n_ff,) = silu(Wg x') * (Wu x'), a group of both at a time
    _prologue(x, norm_w, eps, xn, xq, xd, xsq)
    total = wg.shape[0]
    nc = scratch.shape[0]
    for c in prange(nc):
        rg, ru = scratch[c, 0], scratch[c, 1]
        for g in range(c * total // nc, (c + 1) * total // nc):
            dot_rows16(kind, rg, wg, g, xq, xd, xsq)
            dot_rows16(kind, ru, wu, g, xq, xd, xsq)
            r0 = g * R
            for i in range(min(R, out.shape[0] - r0)):
                gv = rg[i]
                out[r0 + i] = gv / (np.float32(1.0) + np.exp(-gv)) * ru[i]


# The multi-row forms: the decode rows of a batched step (one token of each of several
# sequences). x, xn, xq (n, cols), xd, xsq (n, cols/32), outs (n, rows): each row's prologue,
# then per row group of the weights every row's dot (the group read from memory once, then from
# L1), each row's arithmetic that of the one-row kernels above: a row's results are the same bits
# alone, in any batch, or through the one-row kernel.

@cpu_jit()
def _prologue_rows(x, norm_w, eps, xn, xq, xd, xsq):
    # serially, as the one-row kernels do: one parallel launch per product
    for t in range(x.shape[0]):
        _prologue(x[t], norm_w, eps, xn[t], xq[t], xd[t], xsq[t])


@cpu_jit()
def _put(out, r0, res, residual):
    # the one-row kernels' epilogue: out[r0:r0 + 16] = (or +=) res
    for i in range(min(R, out.shape[0] - r0)):
        out[r0 + i] = out[r0 + i] + res[i] if residual else res[i]


@cpu_jit()
def _put_swiglu(out, r0, rg, ru):
    for i in range(min(R, out.shape[0] - r0)):
        gv = rg[i]
        out[r0 + i] = gv / (np.float32(1.0) + np.exp(-gv)) * ru[i]


@cpu_jit(parallel=True)
def _matvec3_rows(x, norm_w, eps, xn, xq, xd, xsq, kind, ws, outs, n_mats, residual, scratch):
    _prologue_rows(x, norm_w, eps, xn, xq, xd, xsq)
    n = xq.shape[0]
    total = 0
    for mi in range(n_mats):
        total += ws[mi].shape[0]
    nc = scratch.shape[0]
    for c in prange(nc):
        res4 = scratch[c]                                   # (4, 16)
        for u in range(c * total // nc, (c + 1) * total // nc):
            mi, g = 0, u
            while g >= ws[mi].shape[0]:
                g -= ws[mi].shape[0]
                mi += 1
            out, r0, t = outs[mi], g * R, 0
            while t + 3 < n:                                # four rows per weight pass
                dot4_rows16(kind, res4, ws[mi], g, xq, xd, xsq, t)
                for r in range(4):
                    _put(out[t + r], r0, res4[r], residual)
                t += 4
            if t + 1 < n:                                   # then two
                dot2_rows16(kind, res4[:2], ws[mi], g, xq, xd, xsq, t)
                _put(out[t], r0, res4[0], residual)
                _put(out[t + 1], r0, res4[1], residual)
                t += 2
            if t < n:
                dot_rows16(kind, res4[0], ws[mi], g, xq[t], xd[t], xsq[t])
                _put(out[t], r0, res4[0], residual)


@cpu_jit(parallel=True)
def _swiglu_rows(x, norm_w, eps, xn, xq, xd, xsq, kind, wg, wu, out, scratch):
    _prologue_rows(x, norm_w, eps, xn, xq, xd, xsq)
    n = xq.shape[0]
    total = wg.shape[0]
    nc = scratch.shape[0]
    for c in prange(nc):
        rg, ru = np.empty((4, R), np.float32), np.empty((4, R), np.float32)
        for g in range(c * total // nc, (c + 1) * total // nc):
            r0, t = g * R, 0
            while t + 3 < n:
                dot4_rows16(kind, rg, wg, g, xq, xd, xsq, t)
                dot4_rows16(kind, ru, wu, g, xq, xd, xsq, t)
                for r in range(4):
                    _put_swiglu(out[t + r], r0, rg[r], ru[r])
                t += 4
            if t + 1 < n:
                dot2_rows16(kind, rg, wg, g, xq, xd, xsq, t)
                dot2_rows16(kind, ru, wu, g, xq, xd, xsq, t)
                _put_swiglu(out[t], r0, rg[0], ru[0])
                _put_swiglu(out[t + 1], r0, rg[1], ru[1])
                t += 2
            if t < n:
                dot_rows16(kind, rg[0], wg, g, xq[t], xd[t], xsq[t])
                dot_rows16(kind, ru[0], wu, g, xq[t], xd[t], xsq[t])
                _put_swiglu(out[t], r0, rg[0], ru[0])


NO_NORM = np.zeros(0, np.float32)


class FastMatvec:
    """1 to 3 packed matrices of one kind (layout.Packed, the same width) and what their kernels
    take besides the activations: the q8 scratch (xq, xd, xsq) for the width and the chunk
    scratch (chunks, 4, 16) f32."""

    def __init__(self, packs, q8, chunks):
        self.kind = KIND_ID[packs[0].kind]
        self.n = len(packs)
        self.mats = tuple(p.w for p in packs) + (packs[0].w,) * (3 - self.n)
        self.q8, self.chunks = q8, chunks

    def matvec(self, outs, x, residual=False, norm=None) -> None:
        """outs[m] (rows_m,) f32 = (or +=, residual) W_m @ x' for each matrix; x (cols,) f32;
        x' = x, or rmsnorm(x) * norm_w with norm = (norm_w, eps, xn (cols,) scratch for x')."""
        norm_w, eps, xn = norm or (NO_NORM, 0.0, x)
        outs = tuple(outs) + (outs[0],) * (3 - len(outs))
        _matvec3(x, norm_w, eps, xn, *self.q8, self.kind, self.mats, outs, self.n, residual,
                 self.chunks)

    def matvec_rows(self, outs, x, q8, residual=False, norm=None) -> None:
        """matvec for each row of x (n, cols) f32: outs[m] (n, rows_m); q8 the scratch (xq (N,
        cols) int8, xd, xsq (N, cols/32)) for N >= n rows; norm's xn is (n, cols)."""
        n = x.shape[0]
        norm_w, eps, xn = norm or (NO_NORM, 0.0, x)
        xq, xd, xsq = (a[:n] for a in q8)
        outs = tuple(outs) + (outs[0],) * (3 - len(outs))
        _matvec3_rows(x, norm_w, eps, xn, xq, xd, xsq, self.kind, self.mats, outs, self.n,
                      residual, self.chunks)

    def swiglu_rows(self, out, x, q8, norm) -> None:
        """swiglu for each row of x (n, cols): out (n, n_ff); q8 and norm as in matvec_rows."""
        n = x.shape[0]
        xq, xd, xsq = (a[:n] for a in q8)
        _swiglu_rows(x, *norm, xq, xd, xsq, self.kind, self.mats[0], self.mats[1], out,
                     self.chunks)

    def swiglu(self, out, x, norm) -> None:
        """out (n_ff,) f32 = silu(W_0 @ x') * (W_1 @ x') (gate, up), x' = rmsnorm(x) * norm_w;
        norm as in matvec."""
        _swiglu(x, *norm, *self.q8, self.kind, self.mats[0], self.mats[1], out, self.chunks)
