"""RMSNorm on the GPU: one block per row, warp-shuffle + shared-memory reduction."""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32

from ._jit import cuda_kernel
from .reduce import block_sum

NORM_THREADS = 256


@functools.lru_cache(maxsize=None)
def _rmsnorm_kernel(threads: int):
    @cuda_kernel
    def _rmsnorm(out, x, w, eps):
        """Block b normalizes row b: thread t sums x[b, t::threads]^2, the block reduces, then
        thread t writes out[b, t::threads] = (x * scale) * w."""
        row = cuda.blockIdx.x
        t = cuda.threadIdx.x
        d = x.shape[1]
        sh = cuda.shared.array(32, float32)
        ss = float32(0)
        for i in range(t, d, threads):
            v = x[row, i]
            ss += v * v
        ss = block_sum(ss, sh)
        scale = float32(1) / math.sqrt(ss / float32(d) + eps)
        for i in range(t, d, threads):
            out[row, i] = (x[row, i] * scale) * w[i]

    return _rmsnorm


def rmsnorm(out, x, w, eps: float, stream) -> None:
    """out (n, d) = x (n, d) / sqrt(mean(x^2) + eps) * w (d,); f32 device arrays."""
    _rmsnorm_kernel(NORM_THREADS)[x.shape[0], NORM_THREADS, stream](out, x, w, np.float32(eps))
