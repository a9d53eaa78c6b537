"""KV-cache writes and causal grouped-query attention on the GPU.

Caches: k_cache, v_cache (n_layer, n_kv_head, n_ctx, head_dim), f16 (default) or f32. Query token t at position pos[t]
attends to cache positions 0..pos[t] of KV head h // (n_head // n_kv_head).

Decode (one token, one launch): the key range is split into spans of SPLIT keys, one block per (KV
head, span), so that a few KV heads still fill the GPU at long contexts and each K/V row is read once
for all the query heads that share it (GQA); with one span the block writes the output, with several
the last block of a KV head to finish merges the spans' parts (log-sum-exp). The grid covers the whole
context and spans past pos[0] exit at once, so one captured launch serves every step.
Prefill (n tokens): one block per (head, QTILE queries); each warp owns QTILE / warps queries, lanes
split head_dim, keys stream through shared memory in tiles with an online softmax.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, int32, uint32

from ._jit import cuda_kernel
from .intrinsics import f16_bits_to_f32, load_f32x4, load_u32x4, shfl_sync
from .reduce import FULL_MASK, WARP, warp_max, warp_sum

SPLIT = 128              # keys per decode block (<= DECODE_THREADS: one key per lane)
DECODE_THREADS = 128     # 4 warps
PV_BATCH = 8             # V rows a warp loads at once (the loop is a chain of L2 round trips)
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


@cuda.jit(device=True, inline=True)
def _key_dot(sc, qs, kc, j, head_dim: int, group: int, f16: bool):
    """sc[h] = q_h . K[j] for the group's heads (q_h scaled, staged in qs); K[j] read whole as
    16-byte loads (8 halves or 4 floats each)."""
    for h in range(group):
        sc[h] = 0
    if f16:
        row32 = kc[j].view(np.uint32)
        for c in range(head_dim // 8):
            w0, w1, w2, w3 = load_u32x4(row32, c)
            for e in range(8):
                w = w0 if e < 2 else (w1 if e < 4 else (w2 if e < 6 else w3))
                kv = f16_bits_to_f32(w >> uint32(16 * (e & 1)))
                for h in range(group):
                    sc[h] += qs[h * head_dim + 8 * c + e] * kv
    else:
        row = kc[j]
        for c in range(head_dim // 4):
            a0, a1, a2, a3 = load_f32x4(row, c)
            for h in range(group):
                b = h * head_dim + 4 * c
                sc[h] += qs[b] * a0 + qs[b + 1] * a1 + qs[b + 2] * a2 + qs[b + 3] * a3


@functools.lru_cache(maxsize=None)
def _decode_kernel(split: int, warps: int, head_dim: int, group: int, f16: bool):
    dpl = (head_dim + WARP - 1) // WARP            # output dims per lane (the last lanes may idle)
    gh = group * head_dim
    threads = warps * WARP

    @cuda_kernel
    def _attn_decode(out, part_o, part_ml, count, q, k_cache, v_cache, layer, pos, scale):
        """Block (g, s): the `group` query heads of KV head g over keys [s*split, min((s+1)*split,
        pos + 1)); blocks past pos exit, so one captured launch serves every step. Lane l of warp
        w takes key s*split + 32w + l: its scores for every head (the whole K row against q
        staged in shared memory), then per head the warp's max, weights and sum (shuffles); then
        the warp's keys' V rows, lane l holding output dims dpl*l .., each key's weight broadcast
        from its lane. The warps' (max, sum, output) meet in shared memory (one barrier) and
        merge. One span: the block writes the output. Several: it leaves its unnormalized output
        and (max, sum) in part_o/part_ml, and the last block of KV head g to finish (a counter
        per KV head, after a memory fence) merges the spans and resets the counter."""
        g = cuda.blockIdx.x
        s = cuda.blockIdx.y
        p_last = pos[0]
        start = s * split
        if start > p_last:
            return
        n_spans = p_last // split + 1
        stop = min(start + split, p_last + 1)
        tid = cuda.threadIdx.x
        lane = tid % WARP
        w = tid // WARP
        qs = cuda.shared.array(gh, float32)
        wm = cuda.shared.array((warps, group), float32)
        wl = cuda.shared.array((warps, group), float32)
        wo = cuda.shared.array((warps, gh), float32)
        is_last = cuda.shared.array(1, int32)
        for i in range(tid, gh, threads):
            qs[i] = q[0, g * gh + i] * scale
        cuda.syncthreads()                                  # q staged
        kc = k_cache[layer, g]
        vc = v_cache[layer, g]
        sc = cuda.local.array(group, float32)
        acc = cuda.local.array((group, dpl), float32)
        k0 = start + w * WARP                               # the warp's first key
        j = k0 + lane
        valid = w * WARP + lane < split and j < stop
        if valid:
            _key_dot(sc, qs, kc, j, head_dim, group, f16)
        n_keys = max(0, min(WARP, split - w * WARP, stop - k0))   # warp-uniform
        for h in range(group):
            x = sc[h] if valid else float32(-math.inf)
            m = warp_max(x)
            p = math.exp(x - m) if valid else float32(0)
            sc[h] = p
            total = warp_sum(p)
            if lane == 0:
                wm[w, h] = m
                wl[w, h] = total
            for e in range(dpl):
                acc[h, e] = 0
        vv = cuda.local.array((PV_BATCH, dpl), float32)
        for kb in range(0, n_keys, PV_BATCH):               # a batch's V loads all in flight
            for i in range(PV_BATCH):
                vr = vc[min(k0 + kb + i, stop - 1)]         # past the keys: weight 0 below
                for e in range(dpl):
                    vv[i, e] = float32(vr[min(dpl * lane + e, head_dim - 1)])
            for i in range(PV_BATCH):
                for h in range(group):
                    p = shfl_sync(FULL_MASK, sc[h], (kb + i) % WARP)
                    if kb + i >= n_keys:
                        p = float32(0)
                    for e in range(dpl):
                        acc[h, e] += p * vv[i, e]
        for h in range(group):
            for e in range(dpl):
                if dpl * lane + e < head_dim:
                    wo[w, h * head_dim + dpl * lane + e] = acc[h, e]
        cuda.syncthreads()                                  # every warp's part parked
        for i in range(tid, gh, threads):
            h = i // head_dim
            mx = float32(-math.inf)
            for u in range(warps):
                mx = max(mx, wm[u, h])
            den = float32(0)
            o = float32(0)
            for u in range(warps):
                if wm[u, h] > float32(-math.inf):
                    f = math.exp(wm[u, h] - mx)
                    den += wl[u, h] * f
                    o += wo[u, i] * f
            head = g * group + h
            d = i - h * head_dim
            if n_spans == 1:
                out[0, head * head_dim + d] = o / den
            else:
                part_o[head, s, d] = o
                if d == 0:
                    part_ml[head, s, 0] = mx
                    part_ml[head, s, 1] = den
        if n_spans == 1:
            return
        cuda.threadfence()                                  # this span's part visible to all
        cuda.syncthreads()                                  # .. from every thread of the block
        if tid == 0:
            done = cuda.atomic.add(count, g, 1)
            is_last[0] = 1 if done == n_spans - 1 else 0
        cuda.syncthreads()                                  # is_last set
        if is_last[0] == 0:
            return
        cuda.threadfence()
        for i in range(tid, gh, threads):
            h = i // head_dim
            head = g * group + h
            d = i - h * head_dim
            mx = float32(-math.inf)
            for u in range(n_spans):
                mx = max(mx, part_ml[head, u, 0])
            den = float32(0)
            o = float32(0)
            for u in range(n_spans):
                f = math.exp(part_ml[head, u, 0] - mx)
                den += part_ml[head, u, 1] * f
                o += part_o[head, u, d] * f
            out[0, head * head_dim + d] = o / den
        if tid == 0:
            count[g] = 0                                    # ready for the next launch

    return _attn_decode


def decode_attention(out, q, k_cache, v_cache, layer: int, pos, scale: float, scratch, stream):
    """One query: out (1, n_head*head_dim) f32. scratch: (part_o (n_head, S, hd) f32,
    part_ml (n_head, S, 2) f32, count (n_kv,) int32 zeros) with S >= ceil(n_ctx / SPLIT)."""
    part_o, part_ml, count = scratch
    n_head, n_spans, head_dim = part_o.shape
    n_kv = k_cache.shape[1]
    warps = DECODE_THREADS // WARP
    assert head_dim % 8 == 0 and SPLIT <= DECODE_THREADS, (head_dim, SPLIT)
    k = _decode_kernel(SPLIT, warps, head_dim, n_head // n_kv, k_cache.dtype == np.float16)
    k[(n_kv, n_spans), warps * WARP, stream](out, part_o, part_ml, count, q, k_cache, v_cache,
                                             layer, pos, np.float32(scale))


def decode_scratch_shape(n_head: int, n_kv: int, head_dim: int, n_ctx: int) -> tuple:
    """(shape, dtype) of decode_attention's scratch arrays."""
    n_spans = (n_ctx + SPLIT - 1) // SPLIT
    return (((n_head, n_spans, head_dim), np.float32), ((n_head, n_spans, 2), np.float32),
            ((n_kv,), np.int32))


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
