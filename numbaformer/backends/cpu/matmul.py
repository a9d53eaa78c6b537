"""Quantized matrix products on the CPU: a fused dequantize-dot mat-vec (decode) and a tiled GEMM
(prefill) that dequantizes each weight block once per chunk of tokens.

Weights are raw GGUF rows: w (rows, row_bytes) uint8 of GGML type `qtype`, y = W @ x.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import prange

from ._jit import cpu_jit

from ...quants import DECODERS, GGML_TYPES, QK

ROW_TILE = 16          # weight rows dequantized together in the GEMM
TOKEN_TILE = 64        # tokens that reuse one dequantized weight tile while it is hot in L1/L2
FAST = {"reassoc", "contract", "nsz", "arcp"}


@functools.lru_cache(maxsize=None)
def _matvec_kernel(qtype: int):
    dot32 = DECODERS[qtype][1]
    chunk_bytes = GGML_TYPES[qtype].chunk_bytes
    cpb = GGML_TYPES[qtype].chunks_per_block

    @cpu_jit(parallel=True, fastmath=FAST)
    def kernel(w, x, out, h):
        # w (rows, row_bytes) u8, x (cols,) f32 -> out (rows,) f32; one weight row per iteration,
        # each 32-value chunk decoded and dotted in registers (the weights are read once). The
        # 16-value sums of x (for the min terms) are computed once, not per row.
        xs16 = np.empty(x.shape[0] // 16, dtype=np.float32)
        for k in range(xs16.shape[0]):
            s = np.float32(0)
            for i in range(16):
                s += x[16 * k + i]
            xs16[k] = s
        n_chunks = x.shape[0] // QK
        for r in prange(w.shape[0]):
            row = w[r]
            acc = np.float32(0)
            for c in range(n_chunks):
                acc += dot32(row, (c // cpb) * chunk_bytes, c % cpb, x, QK * c, h, xs16)
            out[r] = acc

    return kernel


@functools.lru_cache(maxsize=None)
def _gemm_kernel(qtype: int):
    dq32 = DECODERS[qtype][0]
    chunk_bytes = GGML_TYPES[qtype].chunk_bytes
    cpb = GGML_TYPES[qtype].chunks_per_block

    @cpu_jit(parallel=True, fastmath=FAST)
    def kernel(w, x, out, h):
        # w (rows, row_bytes) u8, x (n, cols) f32 -> out (n, rows) f32.
        # Each prange iteration owns ROW_TILE weight rows: it dequantizes them once into a
        # (ROW_TILE, cols) f32 tile, then for every token computes 4 dot products at a time so that
        # each x value loaded serves 4 rows.
        rows, cols = w.shape[0], x.shape[1]
        n_tiles = (rows + ROW_TILE - 1) // ROW_TILE
        n_chunks = cols // QK
        for tile in prange(n_tiles):
            r0 = tile * ROW_TILE
            nr = min(ROW_TILE, rows - r0)
            wt = np.zeros((ROW_TILE, cols), dtype=np.float32)
            for i in range(nr):
                for c in range(n_chunks):
                    dq32(w[r0 + i], (c // cpb) * chunk_bytes, c % cpb, wt[i], QK * c, h)
            for t0 in range(0, x.shape[0], TOKEN_TILE):
                for t in range(t0, min(t0 + TOKEN_TILE, x.shape[0])):
                    xt = x[t]
                    for i in range(0, nr, 4):
                        a0 = np.float32(0)
                        a1 = np.float32(0)
                        a2 = np.float32(0)
                        a3 = np.float32(0)
                        w0, w1, w2, w3 = wt[i], wt[i + 1], wt[i + 2], wt[i + 3]
                        for k in range(cols):
                            xv = xt[k]
                            a0 += xv * w0[k]
                            a1 += xv * w1[k]
                            a2 += xv * w2[k]
                            a3 += xv * w3[k]
                        out[t, r0 + i] = a0
                        if i + 1 < nr:
                            out[t, r0 + i + 1] = a1
                        if i + 2 < nr:
                            out[t, r0 + i + 2] = a2
                        if i + 3 < nr:
                            out[t, r0 + i + 3] = a3

    return kernel


@cpu_jit(parallel=True)
def _add_bias(out, bias):
    for t in prange(out.shape[0]):
        for r in range(out.shape[1]):
            out[t, r] += bias[r]


def gemm(out: np.ndarray, x: np.ndarray, w) -> None:
    """out (n, rows) f32 = x (n, cols) f32 @ W.T through the GEMM whatever n (a row's result
    does not depend on the others: a batched step's prompt rows)."""
    _gemm_kernel(w.qtype)(w.data, x, out, QK // 2)


def matmul(out: np.ndarray, x: np.ndarray, w, bias: np.ndarray | None = None) -> None:
    """out (n, rows) f32 = x (n, cols) f32 @ W.T (+ bias (rows,)); W a QTensor. n == 1: mat-vec."""
    if x.shape[0] == 1:
        _matvec_kernel(w.qtype)(w.data, x[0], out[0], QK // 2)
    else:
        _gemm_kernel(w.qtype)(w.data, x, out, QK // 2)
    if bias is not None:
        _add_bias(out, bias)
