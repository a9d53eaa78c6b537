"""KV-cache writes and causal grouped-query attention on the CPU.

Caches: k_cache, v_cache (n_layer, n_kv_head, n_ctx, head_dim) f32. Query token t at position
pos[t] attends to cache positions 0..pos[t] of KV head h // (n_head // n_kv_head).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True)
def _kv_store(k_cache, v_cache, layer, k, v, pos):
    n_kv, head_dim = k_cache.shape[1], k_cache.shape[3]
    for t in range(k.shape[0]):
        p = pos[t]
        for g in range(n_kv):
            for i in range(head_dim):
                k_cache[layer, g, p, i] = k[t, g * head_dim + i]
                v_cache[layer, g, p, i] = v[t, g * head_dim + i]


@njit(cache=True, fastmath=FAST)
def _attend(o, q, kc, vc, n_keys, scale, scores):
    # o, q (head_dim,); kc, vc (n_ctx, head_dim); scores (>= n_keys,) scratch
    head_dim = q.shape[0]
    m = np.float32(-np.inf)
    for j in range(n_keys):
        kj = kc[j]
        s = np.float32(0)
        for i in range(head_dim):
            s += q[i] * kj[i]
        s *= scale
        scores[j] = s
        m = max(m, s)
    total = np.float32(0)
    for j in range(n_keys):
        e = np.exp(scores[j] - m)
        scores[j] = e
        total += e
    for i in range(head_dim):
        o[i] = 0
    for j in range(n_keys):
        wj = scores[j] / total
        vj = vc[j]
        for i in range(head_dim):
            o[i] += wj * vj[i]


@njit(parallel=True, cache=True)
def _attention(out, q, k_cache, v_cache, layer, pos, scale):
    n_kv, n_ctx, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    n_head = q.shape[1] // head_dim
    group = n_head // n_kv
    for task in prange(q.shape[0] * n_head):
        t = task // n_head
        h = task % n_head
        g = h // group
        scores = np.empty(pos[t] + 1, dtype=np.float32)
        _attend(out[t, h * head_dim:(h + 1) * head_dim], q[t, h * head_dim:(h + 1) * head_dim],
                k_cache[layer, g], v_cache[layer, g], pos[t] + 1, scale, scores)


def kv_store(k_cache, v_cache, layer: int, k, v, pos) -> None:
    """Write k, v (n, kv_dim) f32 at positions pos (n,) (validated < n_ctx)."""
    _kv_store(k_cache, v_cache, layer, k, v, pos)


def attention(out, q, k_cache, v_cache, layer: int, pos, scale: float) -> None:
    """out (n, q_dim) = softmax(q k^T * scale) v over cache positions 0..pos[t], per head."""
    _attention(out, q, k_cache, v_cache, layer, pos, np.float32(scale))
