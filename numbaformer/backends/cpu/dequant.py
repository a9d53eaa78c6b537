"""Dequantize GGML rows to float32 on the CPU (embedding rows, tests, the float64 reference's twin)."""
from __future__ import annotations

import functools

import numpy as np
from numba import prange

from ._jit import cpu_jit

from ...quants import DECODERS, GGML_TYPES, QK


@functools.lru_cache(maxsize=None)
def _dequantize_kernel(qtype: int):
    dq32 = DECODERS[qtype][0]
    chunk_bytes = GGML_TYPES[qtype].chunk_bytes
    chunks_per_block = GGML_TYPES[qtype].chunks_per_block

    @cpu_jit(parallel=True)
    def kernel(raw, out, h):
        # raw: (rows, row_bytes) uint8 -> out: (rows, n) float32; one row per prange iteration
        n_chunks = out.shape[1] // QK
        for r in prange(raw.shape[0]):
            src = raw[r]
            dst = out[r]
            for c in range(n_chunks):
                dq32(src, (c // chunks_per_block) * chunk_bytes, c % chunks_per_block, dst, QK * c, h)

    return kernel


def dequantize(raw: np.ndarray, qtype: int, n: int) -> np.ndarray:
    """raw (rows, row_bytes) uint8 of type `qtype` with n values per row -> (rows, n) float32."""
    t = GGML_TYPES[qtype]
    if n % QK or raw.ndim != 2 or raw.shape[1] != t.row_bytes(n):
        raise ValueError(f"dequantize: {t.name} rows of {n} values need {t.row_bytes(n)} bytes "
                         f"and n % {QK} == 0, got raw {raw.shape}")
    out = np.empty((raw.shape[0], n), dtype=np.float32)
    _dequantize_kernel(qtype)(raw, out, QK // 2)
    return out
