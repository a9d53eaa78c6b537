"""Rotary position embedding on the CPU, both layouts (llama: adjacent pairs; NeoX: halves)."""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import cpu_jit


@cpu_jit()
def _rope_row(x, p, n_heads, head_dim, rope_dim, inv_freq, neox):
    half = rope_dim // 2
    for i in range(half):
        theta = np.float64(p) * inv_freq[i]
        c = np.float32(np.cos(theta))
        s = np.float32(np.sin(theta))
        for hd in range(n_heads):
            if neox:
                i0 = hd * head_dim + i
                i1 = i0 + half
            else:
                i0 = hd * head_dim + 2 * i
                i1 = i0 + 1
            x0 = x[i0]
            x1 = x[i1]
            x[i0] = x0 * c - x1 * s
            x[i1] = x0 * s + x1 * c


@cpu_jit(parallel=True)
def _rope_rows(x, pos, n_heads, head_dim, rope_dim, inv_freq, neox):
    for t in prange(x.shape[0]):
        _rope_row(x[t], pos[t], n_heads, head_dim, rope_dim, inv_freq, neox)


def rope(x: np.ndarray, pos: np.ndarray, n_heads: int, inv_freq: np.ndarray, rope) -> None:
    """Rotate x (n, n_heads * head_dim) f32 in place at positions pos (n,) int32;
    inv_freq (rope_dim // 2,) float64."""
    args = (n_heads, rope.head_dim, rope.rope_dim, inv_freq, rope.neox)
    if x.shape[0] == 1:
        _rope_row(x[0], pos[0], *args)
    else:
        _rope_rows(x, pos, *args)
