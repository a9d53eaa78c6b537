"""Dequantize GGML rows on the GPU (tests and tools; the model never materializes f32 weights)."""
from __future__ import annotations

import functools

from numba import cuda

from ...quants import GGML_TYPES, QK
from ._jit import cuda_kernel
from .decoders import DECODERS

DEQUANT_THREADS = 64


@functools.lru_cache(maxsize=None)
def _dequantize_kernel(qtype: int, threads: int):
    dq32 = DECODERS[qtype][0]
    chunk_bytes = GGML_TYPES[qtype].chunk_bytes
    cpb = GGML_TYPES[qtype].chunks_per_block

    @cuda_kernel
    def _dequantize(out, raw):
        """Block b decodes row b; thread t decodes its 32-value chunks t::threads."""
        r = cuda.blockIdx.x
        for c in range(cuda.threadIdx.x, out.shape[1] // QK, threads):
            dq32(raw[r], (c // cpb) * chunk_bytes, c % cpb, out[r], QK * c, 16)

    return _dequantize


def dequantize(out, raw, qtype: int, stream=0) -> None:
    """out (rows, n) f32 device array = raw (rows, row_bytes) uint8 device array of `qtype`."""
    _dequantize_kernel(qtype, DEQUANT_THREADS)[raw.shape[0], DEQUANT_THREADS, stream](out, raw)
