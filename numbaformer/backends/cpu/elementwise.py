"""Elementwise ops on the CPU: SiLU(gate) * up, and the residual add."""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import cpu_jit


@cpu_jit()
def _silu_mul_row(y, g, u):
    for i in range(y.shape[0]):
        gv = g[i]
        y[i] = gv / (np.float32(1.0) + np.exp(-gv)) * u[i]


@cpu_jit(parallel=True)
def _silu_mul_rows(out, gate, up):
    for t in prange(out.shape[0]):
        _silu_mul_row(out[t], gate[t], up[t])


@cpu_jit()
def _add_row(y, a, b):
    for i in range(y.shape[0]):
        y[i] = a[i] + b[i]


@cpu_jit(parallel=True)
def _add_rows(out, a, b):
    for t in prange(out.shape[0]):
        _add_row(out[t], a[t], b[t])


def silu_mul(out: np.ndarray, gate: np.ndarray, up: np.ndarray) -> None:
    """out = silu(gate) * up; (n, n_ff) f32."""
    if out.shape[0] == 1:
        _silu_mul_row(out[0], gate[0], up[0])
    else:
        _silu_mul_rows(out, gate, up)


def add(out: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """out = a + b; (n, d) f32."""
    if out.shape[0] == 1:
        _add_row(out[0], a[0], b[0])
    else:
        _add_rows(out, a, b)
