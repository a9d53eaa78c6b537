"""KV-cache writes and causal grouped-query attention on the GPU.

Caches: k_cache, v_cache (n_layer, n_kv_head, n_ctx, head_dim), f16 (default) or f32. Query token t at position pos[t]
attends to cache positions 0..pos[t] of KV head h // (n_head // n_kv_head).

Decode (one token): the key range is split into spans of SPLIT keys, one block per (head, span), so
that a few KV heads still fill the GPU; lanes split head_dim (head_dim % 32 == 0), so key and value
rows are read coalesced; each block leaves its unnormalized output, max and sum, and a merge kernel
combines the spans with a log-sum-exp pass. The grid covers the whole context and spans
past pos[0] exit at once, so one captured launch serves every step.
Prefill (n tokens): one block per (head, QTILE queries); each warp owns QTILE / warps queries, lanes
split head_dim, keys stream through shared memory in tiles with an online softmax.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, int32

from ._jit import cuda_kernel
from .reduce import WARP, block_max, block_sum, warp_sum

SPLIT = 256              # keys per decode block
DECODE_WARPS = 4
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
def _split_kernel(split: int, warps: int, head_dim: int):
    per_lane = head_dim // WARP                   # head dims held by each lane

    @cuda_kernel
    def _attn_split(part_o, part_ml, q, k_cache, v_cache, layer, pos, scale):
        """Block (h, s): head h of the one query over keys [s*split, min((s+1)*split, pos+1)).
        Lane l holds dims l*per_lane .. of q (scaled). Scores: warp w takes keys w, w+warps, ..;
        its lanes load their slice of the key row (coalesced), a warp_sum finishes each dot, and
        lane 0 parks it in shared memory. The block then takes max and sum (barriers inside), and
        for the output warp w accumulates keys w, w+warps, .. over its lanes' dims; the warps'
        partial outputs meet in shared memory (barrier) and warp 0 writes part_o[h, s] (not
        normalized) and part_ml[h, s] = (max, sum). An empty span writes sum 0."""
        h = cuda.blockIdx.x
        s = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        lane = tid % WARP
        w = tid // WARP
        n_kv = k_cache.shape[1]
        g = h // (q.shape[1] // head_dim // n_kv)
        start = s * split
        stop = min(start + split, pos[0] + 1)
        if start >= stop:
            if tid == 0:
                part_ml[h, s, 0] = float32(-math.inf)
                part_ml[h, s, 1] = float32(0)
            return
        sc = cuda.shared.array(split, float32)
        red = cuda.shared.array(32, float32)
        po = cuda.shared.array((warps, head_dim), float32)
        qr = cuda.local.array(per_lane, float32)
        acc = cuda.local.array(per_lane, float32)
        d0 = lane * per_lane
        for e in range(per_lane):
            qr[e] = q[0, h * head_dim + d0 + e] * scale
            acc[e] = 0
        kc = k_cache[layer, g]
        vc = v_cache[layer, g]
        m = float32(-math.inf)
        for j in range(start + w, stop, warps):
            part = float32(0)
            for e in range(per_lane):
                part += qr[e] * float32(kc[j, d0 + e])
            dot = warp_sum(part)
            if lane == 0:
                sc[j - start] = dot
            m = max(m, dot)
        m = block_max(m, red)                               # barrier inside: sc complete
        total = float32(0)
        for j in range(tid, stop - start, warps * WARP):
            e = math.exp(sc[j] - m)
            sc[j] = e
            total += e
        total = block_sum(total, red)                       # barrier inside: sc holds weights
        for j in range(start + w, stop, warps):
            p = sc[j - start]
            for e in range(per_lane):
                acc[e] += p * float32(vc[j, d0 + e])
        for e in range(per_lane):
            po[w, d0 + e] = acc[e]
        cuda.syncthreads()                                  # every warp's partial output parked
        if w == 0:
            for e in range(per_lane):
                o = float32(0)
                for ww in range(warps):
                    o += po[ww, d0 + e]
                part_o[h, s, d0 + e] = o
            if lane == 0:
                part_ml[h, s, 0] = m
                part_ml[h, s, 1] = total

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
    _split_kernel(SPLIT, DECODE_WARPS, head_dim)[(n_head, n_spans), DECODE_WARPS * WARP, stream](
        part_o, part_ml, q, k_cache, v_cache, layer, pos, np.float32(scale))
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
