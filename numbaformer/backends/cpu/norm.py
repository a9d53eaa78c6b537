"""RMSNorm on the CPU."""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import cpu_jit


@cpu_jit()
def _rmsnorm_row(y, x, w, eps):
    # sum of squares in float64 (as ggml does), then y = (x * scale) * w in float32
    ss = 0.0
    for i in range(x.shape[0]):
        ss += np.float64(x[i]) * np.float64(x[i])
    scale = np.float32(1.0 / np.sqrt(ss / x.shape[0] + eps))
    for i in range(x.shape[0]):
        y[i] = (x[i] * scale) * w[i]


@cpu_jit(parallel=True)
def _rmsnorm_rows(out, x, w, eps):
    for t in prange(x.shape[0]):
        _rmsnorm_row(out[t], x[t], w, eps)


def rmsnorm(out: np.ndarray, x: np.ndarray, w: np.ndarray, eps: float) -> None:
    """out = x / sqrt(mean(x^2) + eps) * w; x, out (n, d) f32, w (d,) f32."""
    if x.shape[0] == 1:
        _rmsnorm_row(out[0], x[0], w, eps)
    else:
        _rmsnorm_rows(out, x, w, eps)
