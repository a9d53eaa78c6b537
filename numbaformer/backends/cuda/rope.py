"""Rotary position embedding on the GPU, both layouts; angles in float64 for long contexts."""
from __future__ import annotations

import functools
import math

from numba import cuda, float32, float64
from ._jit import cuda_kernel

ROPE_THREADS = 128
ROPE_STORE_THREADS = 512


@cuda.jit(device=True, inline=True)
def _angle_tables(cs, sn, p, inv_freq, half, threads):
    """cs[i], sn[i] = cos, sin of p * inv_freq[i] (float64 angles) for i < half; then a barrier."""
    for i in range(cuda.threadIdx.x, half, threads):
        theta = float64(p) * inv_freq[i]
        cs[i] = float32(math.cos(theta))
        sn[i] = float32(math.sin(theta))
    cuda.syncthreads()                                   # the tables are complete


@cuda.jit(device=True, inline=True)
def _rotate(x, tok, h, i, c, s, head_dim, half, neox):
    """Rotate pair i of head h of token tok: (2i, 2i+1) (llama) or (i, i + half) (NeoX)."""
    if neox:
        i0 = h * head_dim + i
        i1 = i0 + half
    else:
        i0 = h * head_dim + 2 * i
        i1 = i0 + 1
    x0 = x[tok, i0]
    x1 = x[tok, i1]
    x[tok, i0] = x0 * c - x1 * s
    x[tok, i1] = x0 * s + x1 * c


@cuda.jit(device=True, inline=True)
def rotate_qk(q, k, tok, cs, sn, head_dim, half, neox, threads):
    """Thread t rotates (head, pair) indices t::threads over token tok's q heads, then k's, by
    the angle tables cs, sn (_angle_tables)."""
    n_q = q.shape[1] // head_dim
    for idx in range(cuda.threadIdx.x, (n_q + k.shape[1] // head_dim) * half, threads):
        h = idx // half
        i = idx - h * half
        if h < n_q:
            _rotate(q, tok, h, i, cs[i], sn[i], head_dim, half, neox)
        else:
            _rotate(k, tok, h - n_q, i, cs[i], sn[i], head_dim, half, neox)


@cuda.jit(device=True, inline=True)
def store_kv_row(k_cache, v_cache, layer, k, v, tok, p, head_dim, threads):
    """Token tok's k and v rows (every KV head) into the caches' row p (the assignment converts
    to the cache's dtype); thread t takes values t::threads."""
    for i in range(cuda.threadIdx.x, k.shape[1], threads):
        g = i // head_dim
        d = i - g * head_dim
        k_cache[layer, g, p, d] = k[tok, i]
        v_cache[layer, g, p, d] = v[tok, i]


@functools.lru_cache(maxsize=None)
def _rope_kernel(threads: int, half: int):
    @cuda_kernel
    def _rope(x, pos, head_dim, inv_freq, neox):
        """Block b: token b. The angle tables first, then thread t rotates (head, pair) indices
        t::threads of x's heads."""
        tok = cuda.blockIdx.x
        cs = cuda.shared.array(half, float32)
        sn = cuda.shared.array(half, float32)
        _angle_tables(cs, sn, pos[tok], inv_freq, half, threads)
        for idx in range(cuda.threadIdx.x, (x.shape[1] // head_dim) * half, threads):
            h = idx // half
            i = idx - h * half
            _rotate(x, tok, h, i, cs[i], sn[i], head_dim, half, neox)

    return _rope


@functools.lru_cache(maxsize=None)
def _rope_store_kernel(threads: int, half: int):
    @cuda_kernel
    def _rope_store(q, k, v, k_cache, v_cache, layer, pos, head_dim, inv_freq, neox):
        """Block b: token b. The angle tables first (one angle serves every head), then thread t
        rotates (head, pair) indices t::threads over q's heads and k's, then (barrier: k rotated)
        copies token b's k and v rows into the caches at row pos[b]."""
        tok = cuda.blockIdx.x
        p = pos[tok]
        cs = cuda.shared.array(half, float32)
        sn = cuda.shared.array(half, float32)
        _angle_tables(cs, sn, p, inv_freq, half, threads)
        rotate_qk(q, k, tok, cs, sn, head_dim, half, neox, threads)
        cuda.syncthreads()                               # k rotated before it is stored
        store_kv_row(k_cache, v_cache, layer, k, v, tok, p, head_dim, threads)

    return _rope_store


def rope_store(q, k, v, pos, k_cache, v_cache, layer: int, inv_freq, rp, stream) -> None:
    """rope on q (n, n_head*hd) and k (n, n_kv*hd) in place, then k, v into the caches at pos."""
    threads = ROPE_STORE_THREADS
    _rope_store_kernel(threads, rp.rope_dim // 2)[q.shape[0], threads, stream](
        q, k, v, k_cache, v_cache, layer, pos, rp.head_dim, inv_freq, rp.neox)


def rope(x, pos, n_heads: int, inv_freq, rp, stream) -> None:
    """Rotate x (n, n_heads * head_dim) f32 in place by pos (n,) int32; inv_freq (rope_dim/2,) f64."""
    _rope_kernel(ROPE_THREADS, rp.rope_dim // 2)[x.shape[0], ROPE_THREADS, stream](
        x, pos, rp.head_dim, inv_freq, rp.neox)
