"""Embedding lookup on the GPU from quantized rows, with the shared block decoders."""
from __future__ import annotations

import functools

from numba import cuda

from ...quants import GGML_TYPES, QK
from ._jit import cuda_kernel
from .decoders import DECODERS

EMBED_THREADS = 64


@functools.lru_cache(maxsize=None)
def _embed_kernel(qtype: int, threads: int):
    dq32 = DECODERS[qtype][0]
    chunk_bytes = GGML_TYPES[qtype].chunk_bytes
    cpb = GGML_TYPES[qtype].chunks_per_block

    @cuda_kernel
    def _embed(out, table, ids):
        """Block b decodes row ids[b] of the table; thread t decodes 32-value chunks t::threads."""
        tok = cuda.blockIdx.x
        src = table[ids[tok]]
        dst = out[tok]
        for c in range(cuda.threadIdx.x, out.shape[1] // QK, threads):
            dq32(src, (c // cpb) * chunk_bytes, c % cpb, dst, QK * c, 16)

    return _embed


def embed(out, table, ids, stream) -> None:
    """out (n, d) f32 = rows ids (n,) int32 of QTensor `table` (device data), dequantized."""
    _embed_kernel(table.qtype, EMBED_THREADS)[out.shape[0], EMBED_THREADS, stream](
        out, table.data, ids)
