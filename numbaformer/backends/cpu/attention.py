"""KV-cache writes and causal grouped-query attention on the CPU.

Caches: k_cache, v_cache (n_layer, n_kv_head, n_slots, head_dim) f32. Query token t at position
pos[t] attends to positions 0..pos[t] of KV head h // (n_head // n_kv_head), position j read at slot
tables[row_seq[t], j // bs] * bs + j % bs (kvcache.py). The plain cache is one table [0] with
bs = n_slots (slot == position): the same kernel, the same arithmetic.
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
def _kv_store(k_cache, v_cache, layer, k, v, slots, f16):
    n_kv, head_dim = k_cache.shape[1], k_cache.shape[3]
    for t in range(k.shape[0]):
        p = slots[t]
        if p < 0:                                    # a padding row writes nowhere
            continue
        for g in range(n_kv):
            for i in range(head_dim):
                kv = k[t, g * head_dim + i]
                vv = v[t, g * head_dim + i]
                k_cache[layer, g, p, i] = round_f16(kv) if f16 else kv
                v_cache[layer, g, p, i] = round_f16(vv) if f16 else vv


@cpu_jit(fastmath=FAST)
def _attend(o, q, kc, vc, n_keys, table, bs, scale, scores):
    # o, q (head_dim,); kc, vc (n_slots, head_dim); table (max_blocks,) of block size bs;
    # scores (>= n_keys,) scratch. The keys in order, a block of the table at a time (no
    # division a key: j // bs, j % bs took ~13 % of a decode row's attention time)
    head_dim = q.shape[0]
    n_blocks = (n_keys + bs - 1) // bs
    m = np.float32(-np.inf)
    for b in range(n_blocks):
        base, j0 = table[b] * bs, b * bs
        for jj in range(min(bs, n_keys - j0)):
            kj = kc[base + jj]
            s = np.float32(0)
            for i in range(head_dim):
                s += q[i] * kj[i]
            s *= scale
            scores[j0 + jj] = s
            m = max(m, s)
    total = np.float32(0)
    for j in range(n_keys):
        e = np.exp(scores[j] - m)
        scores[j] = e
        total += e
    for i in range(head_dim):
        o[i] = 0
    for b in range(n_blocks):
        base, j0 = table[b] * bs, b * bs
        for jj in range(min(bs, n_keys - j0)):
            wj = scores[j0 + jj] / total
            vj = vc[base + jj]
            for i in range(head_dim):
                o[i] += wj * vj[i]


@cpu_jit(parallel=True)
def _attention(out, q, k_cache, v_cache, layer, pos, tables, row_seq, bs, scale):
    # row_seq empty: every row reads tables[0]
    n_kv, head_dim = k_cache.shape[1], k_cache.shape[3]
    n_head = q.shape[1] // head_dim
    group = n_head // n_kv
    for task in prange(q.shape[0] * n_head):
        t = task // n_head
        h = task % n_head
        g = h // group
        s = row_seq[t] if row_seq.shape[0] > 0 else 0
        scores = np.empty(pos[t] + 1, dtype=np.float32)
        _attend(out[t, h * head_dim:(h + 1) * head_dim], q[t, h * head_dim:(h + 1) * head_dim],
                k_cache[layer, g], v_cache[layer, g], pos[t] + 1, tables[s], bs, scale, scores)


_IDENTITY = np.zeros((1, 1), np.int32)             # the plain cache's table: one block, slot == pos
_NO_ROWS = np.zeros(0, np.int32)


def kv_store(k_cache, v_cache, layer: int, k, v, slots, f16: bool = False) -> None:
    """Write k, v (n, kv_dim) f32 at cache slots (n,) int32 (positions for the plain cache; a
    slot < 0 writes nothing); with f16, rounded to f16 precision first (the GPU's f16 cache holds
    exactly these values)."""
    _kv_store(k_cache, v_cache, layer, k, v, slots, f16)


def attention(out, q, k_cache, v_cache, layer: int, pos, scale: float, tables=None,
              row_seq=None, block_size: int = 0) -> None:
    """out (n, q_dim) = softmax(q k^T * scale) v over positions 0..pos[t], per head; the keys of
    row t read through tables[row_seq[t]] (n_seqs, max_blocks) int32 of block_size, or, without
    tables, at slot == position."""
    if tables is None:
        tables, row_seq, block_size = _IDENTITY, _NO_ROWS, k_cache.shape[2]
    _attention(out, q, k_cache, v_cache, layer, pos, tables, row_seq, block_size,
               np.float32(scale))
