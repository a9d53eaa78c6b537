"""Decode mat-vecs (one token), fused with what surrounds them in the graph.

One kernel family, `_gemv_kernel(qtype, n_mat, norm, mode)`:
  prologue  x is staged in shared memory once per block (and its 16-value sums, for the K-quant
            min terms); with `norm`, staged as rmsnorm(x) * w (the block reduces x^2 itself), so
            a norm never costs a launch of its own;
  rows      up to three matrices of one type and width (Q, K, V) form one virtual range of row
            pairs; blocks are persistent (a grid of a few blocks per SM) and their warps walk the
            pairs with a grid stride, so the staging is paid a few times per SM, not per row;
  row dot   per type: Q4_K reads each 16-byte unit of nibbles straight into registers (one LDG.128,
            coalesced across the 8 lanes of a block) and both rows of a pair share the unit's
            activations (gemv_fast.py); every other type streams each row through a per-warp
            shared segment with 16-byte loads and dots its 32-value chunks with the type's dot32
            decoder from quants.py;
  epilogue  mode 0: store; 1: + bias; 2: + residual (out may be the residual); 3 (SwiGLU): the two
            matrices are gate and up, out[r] = silu(gate[r] . x) * (up[r] . x).
Weights: w32 (rows, pitch / 4) uint32 views of the raw GGUF rows, each padded to a 16-byte pitch.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, uint8, uint32

from ...quants import GGML_TYPES, Q4_K, QK, U
from ._jit import cuda_kernel
from .decoders import DECODERS
from .gemv_fast import q4k_pair_dot
from .intrinsics import load_u32x4, syncwarp
from .reduce import WARP, block_sum, warp_sum

GEMV_WARPS = 8
BLOCKS_PER_SM = 4
SEGMENT_BYTES = 1024     # weight bytes a warp stages per step (a LDG.128 per lane, or more)
FAST_PATHS = True        # register-direct rows where the format allows (Q4_K)
MODES = {"store": 0, "bias": 1, "residual": 2, "swiglu": 3}


def segment_blocks(qtype: int) -> int:
    """Blocks per staged segment: whole blocks (16-byte multiple), as many as fit SEGMENT_BYTES."""
    cb = GGML_TYPES[qtype].chunk_bytes
    k = 1
    while (k * cb) % 16:
        k += 1
    return k * max(1, SEGMENT_BYTES // (k * cb))


@cuda.jit(device=True, inline=True)
def _stage_load(regs, row, u0, lane, seg_units, row_units):
    """Issue this lane's 16-byte loads of the segment starting at unit u0 into regs."""
    for i in range(regs.shape[0] // 4):
        u = lane + i * WARP
        if u < seg_units and u0 + u < row_units:
            a0, a1, a2, a3 = load_u32x4(row, u0 + u)
            regs[4 * i] = a0
            regs[4 * i + 1] = a1
            regs[4 * i + 2] = a2
            regs[4 * i + 3] = a3


@functools.lru_cache(maxsize=None)
def _staged_row_dot(qtype: int, seg_blocks: int):
    """A device function (row, cols, xs, xsum, seg, regs, lane) -> this lane's partial dot."""
    dot32 = DECODERS[qtype][1]
    cb = GGML_TYPES[qtype].chunk_bytes
    cpb = GGML_TYPES[qtype].chunks_per_block
    seg_units = seg_blocks * cb // 16

    @cuda.jit(device=True)
    def row_dot(row, cols, xs, xsum, seg, regs, lane):
        """The row streams through the warp's segment `seg` seg_blocks blocks at a time: this
        lane's 16-byte units sit in regs (issued one segment ahead), are copied in, a syncwarp
        publishes them, the next loads are issued, the lane dots chunks lane, lane+32, .. of the
        segment, and a syncwarp frees the segment."""
        seg32 = seg.view(np.uint32)
        n_blocks = cols // QK // cpb
        row_units = row.shape[0] // 4
        acc = float32(0)
        _stage_load(regs, row, 0, lane, seg_units, row_units)
        for b0 in range(0, n_blocks, seg_blocks):
            for i in range(regs.shape[0] // 4):
                u = lane + i * WARP
                if u < seg_units:
                    for e in range(4):
                        seg32[4 * u + e] = regs[4 * i + e]
            syncwarp()                                  # segment visible to every lane
            if b0 + seg_blocks < n_blocks:              # the next segment's loads fly meanwhile
                _stage_load(regs, row, ((b0 + seg_blocks) * cb) // 16, lane, seg_units,
                            row_units)
            nc = min(seg_blocks, n_blocks - b0) * cpb
            for c in range(lane, nc, WARP):
                acc += dot32(seg, (c // cpb) * cb, c % cpb, xs, QK * (b0 * cpb + c), 16, xsum)
            syncwarp()                                  # segment consumed: free to refill
        return acc

    return row_dot


@functools.lru_cache(maxsize=None)
def _staged_pair_dot(qtype: int, seg_blocks: int):
    row_dot = _staged_row_dot(qtype, seg_blocks)

    @cuda.jit(device=True)
    def pair_dot(row_a, row_b, same, cols, xs, xsum, seg, regs, lane):
        """Partial dots of two rows, one after the other (row_b skipped when `same`)."""
        a = row_dot(row_a, cols, xs, xsum, seg, regs, lane)
        b = a if same else row_dot(row_b, cols, xs, xsum, seg, regs, lane)
        return a, b

    return pair_dot


@cuda.jit(device=True)
def _q4k_pair(row_a, row_b, same, cols, xs, xsum, seg, regs, lane):
    return q4k_pair_dot(row_a, row_b, cols, xs, xsum, lane)


def _pair_dot(qtype: int):
    """(device function pair_dot(row_a, row_b, same, cols, xs, xsum, seg, regs, lane) -> two
    partial dots, the staged segment's bytes)."""
    if qtype == Q4_K and FAST_PATHS:
        return _q4k_pair, 16
    sb = segment_blocks(qtype)
    return _staged_pair_dot(qtype, sb), sb * GGML_TYPES[qtype].chunk_bytes


@cuda.jit(device=True, inline=True)
def _store(o, e, r, acc, mode):
    """o[0, r] = acc (+ bias e[r] in mode 1, + residual e[0, r] in mode 2)."""
    if mode == 1:
        acc += e[r]
    elif mode == 2:
        acc += e[0, r]
    o[0, r] = acc


@functools.lru_cache(maxsize=None)
def _gemv_kernel(qtype: int, n_mat: int, norm: bool, mode: int, warps: int, fast: bool):
    pair_dot, seg_bytes = _pair_dot(qtype)
    seg_units = max(1, seg_bytes // 16)
    n_regs = 4 * ((seg_units + WARP - 1) // WARP)
    threads = warps * WARP

    @cuda_kernel
    def _gemv(o0, o1, o2, w0, w1, w2, e0, e1, e2, x, norm_w, eps):
        """Matrices w0..w{n_mat-1} (uint32 rows) share x (1, cols): out_m[0, r] = w_m[r] . x'
        (+ e_m per mode), x' = x or rmsnorm(x) * norm_w. Warps take row pairs: virtual pair p runs
        over w0's pairs (rows 2q, 2q+1), then w1's, then w2's, with a grid stride. SwiGLU: pair
        r is (gate[r], up[r]) and o0[0, r] = silu(gate[r] . x') * (up[r] . x')."""
        sm = cuda.shared.array(0, float32)
        segs = cuda.shared.array((warps, seg_bytes), uint8)
        red = cuda.shared.array(32, float32)
        regs = cuda.local.array(n_regs, uint32)
        tid = cuda.threadIdx.x
        cols = x.shape[1]
        xsum = sm[cols:]
        scale = float32(1)
        if norm:
            ss = float32(0)
            for i in range(tid, cols, threads):
                ss += x[0, i] * x[0, i]
            ss = block_sum(ss, red)
            scale = float32(1) / math.sqrt(ss / float32(cols) + eps)
        for i in range(tid, cols, threads):
            sm[i] = (x[0, i] * scale) * norm_w[i] if norm else x[0, i]
        cuda.syncthreads()                               # x' staged
        for g in range(tid, cols // 16, threads):
            s = float32(0)
            for i in range(16):
                s += sm[U(16 * g + i)]
            xsum[g] = s
        cuda.syncthreads()                               # 16-sums staged (the min terms)
        lane = tid % WARP
        wi = tid // WARP
        seg = segs[wi]
        if mode == 3:
            n_pairs = w0.shape[0]
            p0 = p1 = n_pairs
        else:
            p0 = (w0.shape[0] + 1) // 2
            p1 = p0 + ((w1.shape[0] + 1) // 2 if n_mat > 1 else 0)
            n_pairs = p1 + ((w2.shape[0] + 1) // 2 if n_mat > 2 else 0)
        for p in range(cuda.blockIdx.x * warps + wi, n_pairs, cuda.gridDim.x * warps):
            if mode == 3:
                a, b = pair_dot(w0[p], w1[p], False, cols, sm, xsum, seg, regs, lane)
                a = warp_sum(a)
                b = warp_sum(b)
                if lane == 0:
                    o0[0, p] = a / (float32(1) + math.exp(-a)) * b
            else:
                # which matrix the pair belongs to, and its first row there
                if p < p0:
                    w, o, e, r = w0, o0, e0, 2 * p
                elif p < p1:
                    w, o, e, r = w1, o1, e1, 2 * (p - p0)
                else:
                    w, o, e, r = w2, o2, e2, 2 * (p - p1)
                last = r + 1 >= w.shape[0]                  # an odd row count's last row
                a, b = pair_dot(w[r], w[r if last else r + 1], last, cols, sm, xsum, seg, regs,
                                lane)
                a = warp_sum(a)
                b = warp_sum(b)
                if lane == 0:
                    _store(o, e, r, a, mode)
                    if not last:
                        _store(o, e, r + 1, b, mode)

    return _gemv


@functools.lru_cache(maxsize=None)
def _n_sms() -> int:
    from numba.cuda.core import config
    if config.ENABLE_CUDASIM:
        return 1
    return cuda.get_current_device().MULTIPROCESSOR_COUNT


def gemv(outs, ws, x, stream, *, mode: str = "store", extras=None, norm_w=None, eps=0.0,
         opt_in=None) -> None:
    """Fused decode mat-vec: outs[m] (1, rows_m) f32 from QTensors ws[m] (same type and width) and
    x (1, cols) f32; see the module docstring for `mode`, extras (bias arrays or the residual) and
    norm_w (rmsnorm x with these weights first)."""
    n_mat, qtype, cols = len(ws), ws[0].qtype, ws[0].cols
    assert all(w.qtype == qtype and w.cols == cols for w in ws) and 1 <= n_mat <= 3
    m = MODES[mode]
    fast = qtype == Q4_K and FAST_PATHS
    k = _gemv_kernel(qtype, n_mat, norm_w is not None, m, GEMV_WARPS, fast)
    o = list(outs) + [outs[0]] * (3 - len(outs))
    w32 = [w.data.view(np.uint32) for w in ws]
    w32 += [w32[0]] * (3 - n_mat)
    e = list(extras) if extras else []
    e += [o[0] if m == 2 else x[0]] * (3 - len(e))
    args = (*o, *w32, *e, x, x[0] if norm_w is None else norm_w, np.float32(eps))
    smem = 4 * (cols + cols // 16)
    if opt_in is not None:
        opt_in(k, smem, *args)
    pairs = ws[0].rows if m == 3 else sum((w.rows + 1) // 2 for w in ws)
    grid = max(1, min((pairs + GEMV_WARPS - 1) // GEMV_WARPS, _n_sms() * BLOCKS_PER_SM))
    k[grid, GEMV_WARPS * WARP, stream, smem](*args)
