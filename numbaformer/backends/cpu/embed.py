"""Embedding lookup on the CPU: dequantize the rows of the token ids."""
from __future__ import annotations

import functools

from ._jit import cpu_jit

from ...quants import DECODERS, GGML_TYPES, QK


@functools.lru_cache(maxsize=None)
def _embed_kernel(qtype: int):
    dq32 = DECODERS[qtype][0]
    chunk_bytes = GGML_TYPES[qtype].chunk_bytes
    cpb = GGML_TYPES[qtype].chunks_per_block

    @cpu_jit()
    def kernel(out, table, ids, h):
        # out (n, d) f32 <- table (n_vocab, row_bytes) u8 at rows ids (n,)
        for t in range(out.shape[0]):
            src = table[ids[t]]
            for c in range(out.shape[1] // QK):
                dq32(src, (c // cpb) * chunk_bytes, c % cpb, out[t], QK * c, h)

    return kernel


def embed(out, table, ids) -> None:
    """out (n, d) f32 = dequantized rows ids (n,) of QTensor `table`; ids already validated."""
    _embed_kernel(table.qtype)(out, table.data, ids, QK // 2)
