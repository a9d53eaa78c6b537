"""Rotary position embedding on the GPU, both layouts; angles in float64 for long contexts."""
from __future__ import annotations

import functools
import math

from numba import cuda, float32, float64
from ._jit import cuda_kernel

ROPE_THREADS = 128
ROPE_STORE_THREADS = 512


@functools.lru_cache(maxsize=None)
def _rope_kernel(threads: int):
    @cuda_kernel
    def _rope(x, pos, n_heads, head_dim, rope_dim, inv_freq, neox):
        """Block b rotates token b; thread t handles (head, pair) indices t::threads. Pair i of a
        head is (2i, 2i+1) (llama) or (i, i + rope_dim/2) (NeoX), angle pos * inv_freq[i]."""
        tok = cuda.blockIdx.x
        p = float64(pos[tok])
        half = rope_dim // 2
        for idx in range(cuda.threadIdx.x, n_heads * half, threads):
            h = idx // half
            i = idx - h * half
            theta = p * inv_freq[i]
            c = float32(math.cos(theta))
            s = float32(math.sin(theta))
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

    return _rope


@functools.lru_cache(maxsize=None)
def _rope_store_kernel(threads: int, half: int):
    @cuda_kernel
    def _rope_store(q, k, v, k_cache, v_cache, layer, pos, head_dim, inv_freq, neox):
        """Block b: token b. Threads first compute the half = rope_dim/2 angles pos * inv_freq[i]
        (float64) into shared cos/sin tables (barrier), then rotate (head, pair) indices
        t::threads of q's and k's heads, then (barrier: k rotated) copy token b's k and v rows
        into the caches at row pos[b]."""
        tok = cuda.blockIdx.x
        p = pos[tok]
        cs = cuda.shared.array(half, float32)
        sn = cuda.shared.array(half, float32)
        for i in range(cuda.threadIdx.x, half, threads):
            theta = float64(p) * inv_freq[i]
            cs[i] = float32(math.cos(theta))
            sn[i] = float32(math.sin(theta))
        cuda.syncthreads()                               # the angle tables are complete
        n_q = q.shape[1] // head_dim
        n_kv = k.shape[1] // head_dim
        for idx in range(cuda.threadIdx.x, (n_q + n_kv) * half, threads):
            h = idx // half
            i = idx - h * half
            c = cs[i]
            s = sn[i]
            hh = h if h < n_q else h - n_q
            if neox:
                i0 = hh * head_dim + i
                i1 = i0 + half
            else:
                i0 = hh * head_dim + 2 * i
                i1 = i0 + 1
            if h < n_q:
                x0 = q[tok, i0]
                x1 = q[tok, i1]
                q[tok, i0] = x0 * c - x1 * s
                q[tok, i1] = x0 * s + x1 * c
            else:
                x0 = k[tok, i0]
                x1 = k[tok, i1]
                k[tok, i0] = x0 * c - x1 * s
                k[tok, i1] = x0 * s + x1 * c
        cuda.syncthreads()                               # k rotated before it is stored
        for i in range(cuda.threadIdx.x, k.shape[1], threads):
            g = i // head_dim
            d = i - g * head_dim
            k_cache[layer, g, p, d] = k[tok, i]
            v_cache[layer, g, p, d] = v[tok, i]

    return _rope_store


def rope_store(q, k, v, pos, k_cache, v_cache, layer: int, inv_freq, rp, stream) -> None:
    """rope on q (n, n_head*hd) and k (n, n_kv*hd) in place, then k, v into the caches at pos."""
    threads = ROPE_STORE_THREADS
    _rope_store_kernel(threads, rp.rope_dim // 2)[q.shape[0], threads, stream](
        q, k, v, k_cache, v_cache, layer, pos, rp.head_dim, inv_freq, rp.neox)


def rope(x, pos, n_heads: int, inv_freq, rp, stream) -> None:
    """Rotate x (n, n_heads * head_dim) f32 in place by pos (n,) int32; inv_freq (rope_dim/2,) f64."""
    _rope_kernel(ROPE_THREADS)[x.shape[0], ROPE_THREADS, stream](
        x, pos, n_heads, rp.head_dim, rp.rope_dim, inv_freq, rp.neox)
