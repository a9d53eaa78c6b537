"""Dequantize GGML rows on the GPU (tests and tools; the model never materializes f32 weights):
the embedding kernel, gathering every row in order."""
from __future__ import annotations

import numpy as np
from numba import cuda

from .embed import EMBED_THREADS, _embed_kernel


def dequantize(out, raw, qtype: int, stream=0) -> None:
    """out (rows, n) f32 device array = raw (rows, row_bytes) uint8 device array of `qtype`."""
    ids = cuda.to_device(np.arange(raw.shape[0], dtype=np.int32), stream=stream)
    _embed_kernel(qtype, EMBED_THREADS)[raw.shape[0], EMBED_THREADS, stream](out, raw, ids)
