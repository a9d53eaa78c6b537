"""Elementwise ops on the GPU: SiLU(gate) * up, the residual add, and a 16-byte copy (the bandwidth
ceiling that bench --kernels and gpu_bench measure against); one thread per element."""
from __future__ import annotations

import math

from numba import cuda, float32
from ._jit import cuda_kernel

ELEM_THREADS = 256


@cuda_kernel
def _silu_mul_kernel(out, gate, up):
    i = cuda.grid(1)
    d = out.shape[1]
    if i < out.shape[0] * d:
        r = i // d
        c = i - r * d
        g = gate[r, c]
        out[r, c] = g / (float32(1) + math.exp(-g)) * up[r, c]


@cuda_kernel
def _add_kernel(out, a, b):
    i = cuda.grid(1)
    d = out.shape[1]
    if i < out.shape[0] * d:
        r = i // d
        c = i - r * d
        out[r, c] = a[r, c] + b[r, c]


def _grid(n: int) -> int:
    return (n + ELEM_THREADS - 1) // ELEM_THREADS


def silu_mul(out, gate, up, stream) -> None:
    """out = silu(gate) * up; (n, n_ff) f32."""
    _silu_mul_kernel[_grid(out.size), ELEM_THREADS, stream](out, gate, up)


def add(out, a, b, stream) -> None:
    """out = a + b; (n, d) f32."""
    _add_kernel[_grid(out.size), ELEM_THREADS, stream](out, a, b)


@cuda_kernel
def _copy16_kernel(dst, src):
    i = cuda.grid(1)
    if i < src.shape[0]:
        dst[i] = src[i]


def copy16(dst, src, stream) -> None:
    """dst = src, (n,) complex128: one 16-byte load and store per thread."""
    _copy16_kernel[_grid(src.shape[0]), ELEM_THREADS, stream](dst, src)
