"""KV-cache writes and causal grouped-query attention on the CPU.

Caches: k_cache, v_cache (n_layer, n_kv_head, n_ctx, head_dim) f32. Query token t at position
pos[t] attends to cache positions 0..pos[t] of KV head h // (n_head // n_kv_head).
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from ._jit import cpu_jit

FAST = {"reassoc", "contract", "nsz", "arcp"}


@cpu_jit()
def round_f16(x):
    """x rounded to the nearest IEEE half (ties to even), returned as float32: what storing in f16
    keeps. 11 significant bits for normal halves, a 2^-24 quantum below 2^-14, inf past 65504."""
    a = abs(np.float64(x))
    if a < 6.103515625e-05:                          # f16 subnormal range: fixed quantum 2^-24
        return np.float32(np.round(np.float64(x) * 16777216.0) / 16777216.0)
    m, e = math.frexp(np.float64(x))                 # x = m * 2^e, 0.5 <= |m| < 1
    r = np.round(m * 2048.0) * 2.0 ** (e - 11)
    if abs(r) > 65504.0:
        return np.float32(np.inf) if r > 0 else np.float32(-np.inf)
    return np.float32(r)


@cpu_jit()
def _kv_store(k_cache, v_cache, layer, k, v, pos, f16):
    n_kv, head_dim = k_cache.shape[1], k_cache.shape[3]
    for t in range(k.shape[0]):
        p = pos[t]
        for g in range(n_kv):
            for i in range(head_dim):
                kv = k[t, g * head_dim + i]
                vv = v[t, g * head_dim + i]
                k_cache[layer, g, p, i] = round_f16(kv) if f16 else kv
                v_cache[layer, g, p, i] = round_f16(vv) if f16 else vv


@cpu_jit(fastmath=FAST)
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


@cpu_jit(parallel=True)
def _attention(out, q, k_cache, v_cache, layer, pos, scale):
    n_kv, head_dim = k_cache.shape[1], k_cache.shape[3]
    n_head = q.shape[1] // head_dim
    group = n_head // n_kv
    for task in prange(q.shape[0] * n_head):
        t = task // n_head
        h = task % n_head
        g = h // group
        scores = np.empty(pos[t] + 1, dtype=np.float32)
        _attend(out[t, h * head_dim:(h + 1) * head_dim], q[t, h * head_dim:(h + 1) * head_dim],
                k_cache[layer, g], v_cache[layer, g], pos[t] + 1, scale, scores)


def kv_store(k_cache, v_cache, layer: int, k, v, pos, f16: bool = False) -> None:
    """Write k, v (n, kv_dim) f32 at positions pos (n,) (validated < n_ctx); with f16, rounded
    to f16 precision first (the GPU's f16 cache holds exactly these values)."""
    _kv_store(k_cache, v_cache, layer, k, v, pos, f16)


def attention(out, q, k_cache, v_cache, layer: int, pos, scale: float) -> None:
    """out (n, q_dim) = softmax(q k^T * scale) v over cache positions 0..pos[t], per head."""
    _attention(out, q, k_cache, v_cache, layer, pos, np.float32(scale))
