"""Embedding lookup on the GPU from quantized rows (GPU layout), with the shared block decoders."""
from __future__ import annotations

import functools

from numba import cuda, uint8

from ...quants import GGML_TYPES, QK
from ._jit import cuda_kernel
from .decoders import DECODERS
from .layout import gather_block

EMBED_THREADS = 64


@functools.lru_cache(maxsize=None)
def _embed_kernel(qtype: int, threads: int):
    dq32 = DECODERS[qtype][0]
    chunk_bytes = GGML_TYPES[qtype].chunk_bytes
    cpb = GGML_TYPES[qtype].chunks_per_block
    gather = gather_block(qtype)

    @cuda_kernel
    def _embed(out, table, ids):
        """Block b decodes row ids[b] of the table; thread t gathers blocks t::threads of it into
        GGUF order (a local buffer) and decodes their 32-value chunks."""
        tok = cuda.blockIdx.x
        src = table[ids[tok]]
        dst = out[tok]
        buf = cuda.local.array(chunk_bytes, uint8)
        nb = out.shape[1] // QK // cpb
        for b in range(cuda.threadIdx.x, nb, threads):
            gather(src, nb, b, buf)
            for j in range(cpb):
                dq32(buf, 0, j, dst, QK * (b * cpb + j), 16)

    return _embed


def embed(out, table, ids, stream) -> None:
    """out (n, d) f32 = rows ids (n,) int32 of QTensor `table` (device data), dequantized."""
    _embed_kernel(table.qtype, EMBED_THREADS)[out.shape[0], EMBED_THREADS, stream](
        out, table.data, ids)
