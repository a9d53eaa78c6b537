"""Rotary position embedding on the CPU, both layouts (llama: adjacent pairs; NeoX: halves)."""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import cpu_jit
from .attention import round_f16


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


@cpu_jit()
def _rope_store_row(q, k, v, p, slot, n_head, n_kv, head_dim, rope_dim, inv_freq, neox, k_cache,
                    v_cache, layer, f16):
    _rope_row(q, p, n_head, head_dim, rope_dim, inv_freq, neox)
    _rope_row(k, p, n_kv, head_dim, rope_dim, inv_freq, neox)
    if slot < 0:
        return
    for g in range(n_kv):
        for i in range(head_dim):
            kv, vv = k[g * head_dim + i], v[g * head_dim + i]
            k_cache[layer, g, slot, i] = round_f16(kv) if f16 else kv
            v_cache[layer, g, slot, i] = round_f16(vv) if f16 else vv


@cpu_jit()
def _rope_store_rows(q, k, v, pos, slots, n_head, n_kv, head_dim, rope_dim, inv_freq, neox,
                     k_cache, v_cache, layer, f16):
    # serially: for a few rows (a batched step's decodes) a parallel launch costs more than this
    for t in range(q.shape[0]):
        _rope_store_row(q[t], k[t], v[t], pos[t], slots[t], n_head, n_kv, head_dim, rope_dim,
                        inv_freq, neox, k_cache, v_cache, layer, f16)


def rope_store_rows(q, k, v, pos, cache, layer: int, inv_freq, rope) -> None:
    """rope_store_one for each row of q, k, v (n, ...), serially, at positions pos (n,), K/V to
    cache.slots (or pos for the plain cache)."""
    slots = pos if cache.slots is None else cache.slots
    _rope_store_rows(q, k, v, pos, slots, q.shape[1] // rope.head_dim,
                     k.shape[1] // rope.head_dim, rope.head_dim, rope.rope_dim, inv_freq,
                     rope.neox, cache.k, cache.v, layer, cache.kv_type == "f16")


def rope_store_one(q, k, v, pos, cache, layer: int, inv_freq, rope) -> None:
    """One token's rope of q (1, n_head * hd) and k (1, n_kv * hd) and its K/V store: rope() and
    attention.kv_store() in one call (the same arithmetic); K/V go to cache.slots[0] when the
    cache is paged."""
    slot = pos[0] if cache.slots is None else cache.slots[0]
    _rope_store_row(q[0], k[0], v[0], pos[0], slot, q.shape[1] // rope.head_dim,
                    k.shape[1] // rope.head_dim, rope.head_dim, rope.rope_dim, inv_freq,
                    rope.neox, cache.k, cache.v, layer, cache.kv_type == "f16")


def rope(x: np.ndarray, pos: np.ndarray, n_heads: int, inv_freq: np.ndarray, rope) -> None:
    """Rotate x (n, n_heads * head_dim) f32 in place at positions pos (n,) int32;
    inv_freq (rope_dim // 2,) float64."""
    args = (n_heads, rope.head_dim, rope.rope_dim, inv_freq, rope.neox)
    if x.shape[0] == 1:
        _rope_row(x[0], pos[0], *args)
    else:
        _rope_rows(x, pos, *args)
