"""KV-cache writes and causal grouped-query attention on the GPU.

Caches: k_cache, v_cache (n_layer, n_kv_head, n_ctx, head_dim), f16 (default) or f32. Query token t at position pos[t]
attends to cache positions 0..pos[t] of KV head h // (n_head // n_kv_head).

Decode (one token): the key range is split into spans of SPLIT keys, one block per (KV head, span),
so that a few KV heads still fill the GPU at long contexts and each K/V row is read once for all the
query heads that share it (GQA); each block leaves its unnormalized outputs, maxes and sums, and a
merge kernel combines the spans with a log-sum-exp pass. The grid covers the whole context and spans
past pos[0] exit at once, so one captured launch serves every step.
Prefill (n tokens): one block per (head, QTILE queries); each warp owns QTILE / warps queries, lanes
split head_dim, keys stream through shared memory in tiles with an online softmax.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, int32, uint32

from ._jit import cuda_kernel
from .intrinsics import f16_bits_to_f32, load_u32x4
from .reduce import WARP, block_max, block_sum, warp_sum

SPLIT = 64               # keys per decode block (short chains, many blocks)
DECODE_THREADS = 128     # a multiple of head_dim (or head_dim itself when larger)
QTILE = 16               # queries per prefill block
KTILE = 32               # keys per shared-memory tile in prefill
PREFILL_WARPS = 4


@cuda_kernel
def _kv_store_kernel(k_cache, v_cache, layer, k, v, pos):
    """Block b writes token b's K and V rows (all KV heads) at cache row pos[b] (the assignment
    converts to the cache's dtype, f16 or f32)."""
    tok = cuda.blockIdx.x
    p = pos[tok]
    head_dim = k_cache.shape[3]
    for i in range(cuda.threadIdx.x, k.shape[1], cuda.blockDim.x):
        g = i // head_dim
        d = i - g * head_dim
        k_cache[layer, g, p, d] = k[tok, i]
        v_cache[layer, g, p, d] = v[tok, i]


def kv_store(k_cache, v_cache, layer: int, k, v, pos, stream) -> None:
    """Write k, v (n, kv_dim) f32 into the caches (f16 or f32) at rows pos (n,) (< n_ctx)."""
    _kv_store_kernel[k.shape[0], 128, stream](k_cache, v_cache, layer, k, v, pos)


@functools.lru_cache(maxsize=None)
def _split_kernel(split: int, threads: int, head_dim: int, group: int, f16: bool):
    n_vec = head_dim // 8                         # a K row as 16-byte vectors of 8 halves (f16)
    gh = group * head_dim

    @cuda_kernel
    def _attn_split(part_o, part_ml, q, k_cache, v_cache, layer, pos, scale):
        """Block (g, s): the `group` query heads of KV head g over keys [s*split, min((s+1)*split,
        pos + 1)), so each K and V row is read once for all of them. Scores: thread t takes keys
        t, t+threads, .. and dots the whole key row (read as 16-byte loads) with every head's q
        (scaled, in shared memory); then per head a block max and sum (barriers inside); then thread
        t takes output dim t % head_dim of every head over keys of its slice (t // head_dim), the
        slices meet in shared memory (barrier) and their sum is part_o[head, s] (not normalized),
        part_ml[head, s] = (max, sum). An empty span writes sum 0."""
        g = cuda.blockIdx.x
        s = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        start = s * split
        stop = min(start + split, pos[0] + 1)
        if start >= stop:
            if tid < group:
                part_ml[g * group + tid, s, 0] = float32(-math.inf)
                part_ml[g * group + tid, s, 1] = float32(0)
            return
        qs = cuda.shared.array(gh, float32)
        sc = cuda.shared.array((group, split), float32)
        red = cuda.shared.array(32, float32)
        po = cuda.shared.array((threads, group), float32)
        for i in range(tid, gh, threads):
            qs[i] = q[0, g * gh + i] * scale
        cuda.syncthreads()                                  # q staged
        kc = k_cache[layer, g]
        vc = v_cache[layer, g]
        acc = cuda.local.array(group, float32)
        for j in range(start + tid, stop, threads):
            for h in range(group):
                acc[h] = 0
            if f16:                                         # 8 halves per 16-byte load
                row32 = kc[j].view(np.uint32)
                for c in range(n_vec):
                    w0, w1, w2, w3 = load_u32x4(row32, c)
                    for e in range(8):
                        w = w0 if e < 2 else (w1 if e < 4 else (w2 if e < 6 else w3))
                        kv = f16_bits_to_f32(w >> uint32(16 * (e & 1)))
                        for h in range(group):
                            acc[h] += qs[h * head_dim + 8 * c + e] * kv
            else:
                row = kc[j]
                for d in range(head_dim):
                    kv = row[d]
                    for h in range(group):
                        acc[h] += qs[h * head_dim + d] * kv
            for h in range(group):
                sc[h, j - start] = acc[h]
        cuda.syncthreads()                                  # scores complete
        n = stop - start
        for h in range(group):
            m = float32(-math.inf)
            for j in range(tid, n, threads):
                m = max(m, sc[h, j])
            m = block_max(m, red)
            total = float32(0)
            for j in range(tid, n, threads):
                e = math.exp(sc[h, j] - m)
                sc[h, j] = e
                total += e
            total = block_sum(total, red)                   # also orders sc's weights
            if tid == 0:
                part_ml[g * group + h, s, 0] = m
                part_ml[g * group + h, s, 1] = total
        d = tid % head_dim
        n_slices = threads // head_dim
        for h in range(group):
            acc[h] = 0
        for j in range(tid // head_dim, n, n_slices):
            vv = float32(vc[start + j, d])
            for h in range(group):
                acc[h] += sc[h, j] * vv
        for h in range(group):
            po[tid, h] = acc[h]
        cuda.syncthreads()                                  # every slice's partial output parked
        if tid < head_dim:
            for h in range(group):
                o = float32(0)
                for k in range(n_slices):
                    o += po[tid + k * head_dim, h]
                part_o[g * group + h, s, tid] = o

    return _attn_split


@cuda_kernel
def _merge_kernel(out, part_o, part_ml, pos, split):
    """Block h combines head h's spans 0..pos[0] // split:
    out = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M), M the largest span max."""
    h = cuda.blockIdx.x
    head_dim = part_o.shape[2]
    n = pos[0] // split + 1
    mx = float32(-math.inf)
    for s in range(n):
        mx = max(mx, part_ml[h, s, 0])
    den = float32(0)
    for s in range(n):
        den += part_ml[h, s, 1] * math.exp(part_ml[h, s, 0] - mx)
    for d in range(cuda.threadIdx.x, head_dim, cuda.blockDim.x):
        acc = float32(0)
        for s in range(n):
            acc += part_o[h, s, d] * math.exp(part_ml[h, s, 0] - mx)
        out[0, h * head_dim + d] = acc / den


def decode_attention(out, q, k_cache, v_cache, layer: int, pos, scale: float, scratch, stream):
    """One query: out (1, n_head*head_dim) f32. scratch: (part_o (n_head, S, hd) f32,
    part_ml (n_head, S, 2) f32) with S >= ceil(n_ctx / SPLIT)."""
    part_o, part_ml = scratch
    n_head, n_spans, head_dim = part_o.shape
    n_kv = k_cache.shape[1]
    threads = max(DECODE_THREADS, head_dim)
    k = _split_kernel(SPLIT, threads, head_dim, n_head // n_kv, k_cache.dtype == np.float16)
    k[(n_kv, n_spans), threads, stream](part_o, part_ml, q, k_cache, v_cache, layer, pos,
                                         np.float32(scale))
    _merge_kernel[n_head, min(head_dim, 128), stream](out, part_o, part_ml, pos, SPLIT)


def decode_scratch_shape(n_head: int, head_dim: int, n_ctx: int) -> tuple:
    n_spans = (n_ctx + SPLIT - 1) // SPLIT
    return (n_head, n_spans, head_dim), (n_head, n_spans, 2)


@functools.lru_cache(maxsize=None)
def _prefill_kernel(qtile: int, ktile: int, warps: int, head_dim: int):
    per_warp = qtile // warps                      # queries per warp
    per_lane = (head_dim + WARP - 1) // WARP       # head dims per lane

    @cuda_kernel
    def _attn_prefill(out, q, k_cache, v_cache, layer, pos, scale):
        """Block (h, b): head h, queries b*qtile .. +qtile. Warp w owns queries w*per_warp..;
        lane l owns dims l, l+32, ... of each. Key tiles of ktile rows are staged in shared memory
        (as f32) for keys up to the tile's last position; per key every warp forms its queries'
        scores (lane partial dot + warp_sum) and updates an online softmax (running max m, sum l,
        output acc in registers)."""
        h = cuda.blockIdx.x
        q0 = cuda.blockIdx.y * qtile
        n_tok = q.shape[0]
        tid = cuda.threadIdx.x
        lane = tid % WARP
        w = tid // WARP
        n_kv = k_cache.shape[1]
        g = h // (q.shape[1] // head_dim // n_kv)
        kc = k_cache[layer, g]
        vc = v_cache[layer, g]
        ks = cuda.shared.array((ktile, head_dim), float32)
        vs = cuda.shared.array((ktile, head_dim), float32)
        qr = cuda.local.array((per_warp, per_lane), float32)
        acc = cuda.local.array((per_warp, per_lane), float32)
        m = cuda.local.array(per_warp, float32)
        lsum = cuda.local.array(per_warp, float32)
        my_pos = cuda.local.array(per_warp, int32)
        for r in range(per_warp):
            tq = q0 + w * per_warp + r
            my_pos[r] = pos[tq] if tq < n_tok else -1
            m[r] = float32(-math.inf)
            lsum[r] = float32(0)
            for e in range(per_lane):
                d = lane + e * WARP
                acc[r, e] = 0
                qr[r, e] = q[tq, h * head_dim + d] * scale if tq < n_tok and d < head_dim else float32(0)
        last = pos[min(q0 + qtile, n_tok) - 1]           # keys 0..last cover the whole tile
        for k0 in range(0, last + 1, ktile):
            cuda.syncthreads()                           # previous tile fully consumed
            for i in range(tid, ktile * head_dim, warps * WARP):
                j = i // head_dim
                d = i - j * head_dim
                if k0 + j <= last:
                    ks[j, d] = float32(kc[k0 + j, d])
                    vs[j, d] = float32(vc[k0 + j, d])
            cuda.syncthreads()                           # tile staged
            for j in range(min(ktile, last + 1 - k0)):
                key = k0 + j
                for r in range(per_warp):
                    if key > my_pos[r]:
                        continue
                    part = float32(0)
                    for e in range(per_lane):
                        d = lane + e * WARP
                        if d < head_dim:
                            part += qr[r, e] * ks[j, d]
                    s = warp_sum(part)
                    m_new = max(m[r], s)
                    corr = math.exp(m[r] - m_new)
                    p = math.exp(s - m_new)
                    lsum[r] = lsum[r] * corr + p
                    for e in range(per_lane):
                        d = lane + e * WARP
                        if d < head_dim:
                            acc[r, e] = acc[r, e] * corr + p * vs[j, d]
                    m[r] = m_new
        for r in range(per_warp):
            tq = q0 + w * per_warp + r
            if tq < n_tok:
                for e in range(per_lane):
                    d = lane + e * WARP
                    if d < head_dim:
                        out[tq, h * head_dim + d] = acc[r, e] / lsum[r]

    return _attn_prefill


def prefill_attention(out, q, k_cache, v_cache, layer: int, pos, scale: float, stream) -> None:
    """n queries: out, q (n, n_head * head_dim) f32; causal by positions pos (n,)."""
    head_dim = k_cache.shape[3]
    n_head = q.shape[1] // head_dim
    grid = (n_head, (q.shape[0] + QTILE - 1) // QTILE)
    _prefill_kernel(QTILE, KTILE, PREFILL_WARPS, head_dim)[grid, PREFILL_WARPS * WARP, stream](
        out, q, k_cache, v_cache, layer, pos, np.float32(scale))
