"""The paged KV cache on the GPU (kvcache.py, blocks.py): K/V written through a slot mapping and
attention read through block tables, for the rows of many sequences in one step
(Model.forward_batch).

Caches: k_cache, v_cache (n_layer, n_kv_head, n_slots, head_dim), f16 (the default) or f32. A
sequence's position j lives at slot table[j // B] * B + j % B, table its row of
tables (n_seqs, max_blocks) int32 and B the block size. Row t of a step (a decode token or a token of
a prefill chunk) is at position pos[t] of sequence row_seq[t]: its K/V go to slot slots[t] (-1: a
padding row, written nowhere), and it attends causally to positions 0..pos[t] of its sequence.

Attention is the single-sequence decode kernel's design (attention.py) applied per row: one block
per (KV head, span, row), the span being `span_blocks` paged blocks (one paged block up to
MAX_SPANS blocks of context; more blocks per span past it, so the scratch stays bounded); each K/V
row is read once for the `group` query heads that share it (GQA); the lanes take keys in chunks of
the block's threads with a running (max, sum, output) per warp; with one span the block writes the
output, with several the last block of a (row, KV head) to finish merges the spans' parts
(log-sum-exp). Spans past pos[t] exit at once. A prefill chunk's rows take the same kernel (each
row its own causal query): correct, and simple; it does not share K/V reads between a chunk's rows.
Rows go ROWS_PER_LAUNCH to a launch over one scratch, so a row's arithmetic (its spans, their
order, the merge) is the same in any batch: a sequence's outputs are the same bits alone or
batched. All ids and tables are checked on the host before a launch (kvcache.check_batch): the
kernels do not check bounds.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, int32

from ._jit import cuda_kernel
from .attention import _key_dot
from .intrinsics import shfl_sync
from .reduce import FULL_MASK, WARP, warp_max, warp_sum
from .rope import _angle_tables, rotate_qk, store_kv_row

PAGED_THREADS = 64       # threads of an attention block: one key per lane per chunk (2 warps)
PV_BATCH = 8             # V rows a warp loads at once
MAX_SPANS = 32           # spans per row at most (a span: span_blocks paged blocks)
ROWS_PER_LAUNCH = 64     # rows of one attention launch (the scratch holds this many)
STORE_THREADS = 128      # threads of a K/V store / rope-and-store block (one row each)
GATHER_THREADS = 128     # threads of a row-gather block


# --- K/V writes through the slot mapping ---------------------------------------------------------

@cuda_kernel
def _kv_store_kernel(k_cache, v_cache, layer, k, v, slots):
    """Block b writes row b's K and V (all KV heads) at cache slot slots[b] (the assignment
    converts to the cache's dtype); a slot < 0 (padding) writes nothing."""
    tok = cuda.blockIdx.x
    p = slots[tok]
    if p < 0:
        return
    store_kv_row(k_cache, v_cache, layer, k, v, tok, p, k_cache.shape[3], cuda.blockDim.x)


def kv_store(k_cache, v_cache, layer: int, k, v, slots, stream) -> None:
    """Write k, v (n, kv_dim) f32 into the caches (f16 or f32) at slots (n,) int32 (< n_slots;
    -1 writes nothing)."""
    _check_rows(k, v, slots, k_cache)
    _kv_store_kernel[k.shape[0], STORE_THREADS, stream](k_cache, v_cache, layer, k, v, slots)


@functools.lru_cache(maxsize=None)
def _rope_store_kernel(threads: int, half: int):
    @cuda_kernel
    def _paged_rope_store(q, k, v, k_cache, v_cache, layer, pos, slots, head_dim, inv_freq, neox):
        """Block b: row b. The angle tables of position pos[b] (barrier inside), then thread t
        rotates (head, pair) indices t::threads over q's heads and k's; then (barrier: k rotated)
        k and v rows go to cache slot slots[b], unless it is < 0 (padding)."""
        tok = cuda.blockIdx.x
        cs = cuda.shared.array(half, float32)
        sn = cuda.shared.array(half, float32)
        _angle_tables(cs, sn, pos[tok], inv_freq, half, threads)
        rotate_qk(q, k, tok, cs, sn, head_dim, half, neox, threads)
        cuda.syncthreads()                               # k rotated before it is stored
        p = slots[tok]
        if p >= 0:                                       # padding rows store nothing
            store_kv_row(k_cache, v_cache, layer, k, v, tok, p, head_dim, threads)

    return _paged_rope_store


def rope_store(q, k, v, pos, slots, k_cache, v_cache, layer: int, inv_freq, rp, stream) -> None:
    """rope on q (n, n_head*hd) and k (n, n_kv*hd) in place at positions pos (n,) int32, then k, v
    into the caches at slots (n,) int32 (-1 writes nothing); inv_freq (rope_dim/2,) f64."""
    _check_rows(k, v, slots, k_cache)
    if q.shape[0] != k.shape[0] or pos.shape[0] < k.shape[0] or q.shape[1] % rp.head_dim:
        raise ValueError(f"rope_store: q {q.shape}, k {k.shape}, pos {pos.shape}")
    _rope_store_kernel(STORE_THREADS, rp.rope_dim // 2)[q.shape[0], STORE_THREADS, stream](
        q, k, v, k_cache, v_cache, layer, pos, slots, rp.head_dim, inv_freq, rp.neox)


def _check_rows(k, v, slots, k_cache) -> None:
    n_kv, head_dim = k_cache.shape[1], k_cache.shape[3]
    if k.shape != v.shape or k.shape[1] != n_kv * head_dim or slots.shape[0] < k.shape[0]:
        raise ValueError(f"K/V store: k {k.shape}, v {v.shape}, slots {slots.shape}, cache "
                         f"{k_cache.shape}")


# --- attention through block tables --------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _attention_kernel(warps: int, head_dim: int, group: int, f16: bool, block_size: int,
                      span: int):
    dpl = (head_dim + WARP - 1) // WARP            # output dims per lane (the last lanes may idle)
    gh = group * head_dim
    threads = warps * WARP
    B = block_size

    @cuda_kernel
    def _paged_attention(out, part_o, part_ml, count, q, k_cache, v_cache, layer, pos, tables,
                         row_seq, row0, scale):
        """Block (g, s, r): row t = row0 + r, the `group` query heads of KV head g, over keys
        [s*span, min((s+1)*span, pos[t] + 1)) of sequence row_seq[t] (key j at slot
        table[j // B] * B + j % B); blocks past pos[t] exit. The keys go in chunks of `threads`:
        lane l of warp w takes key c0 + 32w + l, its scores for every head (the K row against q
        staged in shared memory); per head the warp's running max, sum and output (lane l holding
        dims dpl*l ..) are rescaled to the new max and take the chunk's keys (weights by shuffle,
        V rows PV_BATCH at a time). The warps' (max, sum, output) meet in shared memory (one
        barrier) and merge. One span: the block writes the output. Several: it parks its
        unnormalized output and (max, sum) in part_o/part_ml[r], and the last block of (r, g) to
        finish (a counter per (r, g), after a memory fence) merges the spans in order and resets
        the counter."""
        g = cuda.blockIdx.x
        s = cuda.blockIdx.y
        r = cuda.blockIdx.z
        t = row0 + r
        p_last = pos[t]
        start = s * span
        if start > p_last:
            return
        n_spans = p_last // span + 1
        stop = min(start + span, p_last + 1)
        table = tables[row_seq[t]]
        tid = cuda.threadIdx.x
        lane = tid % WARP
        w = tid // WARP
        qs = cuda.shared.array(gh, float32)
        wm = cuda.shared.array((warps, group), float32)
        wl = cuda.shared.array((warps, group), float32)
        wo = cuda.shared.array((warps, gh), float32)
        is_last = cuda.shared.array(1, int32)
        for i in range(tid, gh, threads):
            qs[i] = q[t, g * gh + i] * scale
        cuda.syncthreads()                                  # q staged
        kc = k_cache[layer, g]
        vc = v_cache[layer, g]
        sc = cuda.local.array(group, float32)
        m_run = cuda.local.array(group, float32)
        l_run = cuda.local.array(group, float32)
        acc = cuda.local.array((group, dpl), float32)
        vv = cuda.local.array((PV_BATCH, dpl), float32)
        for h in range(group):
            m_run[h] = float32(-math.inf)
            l_run[h] = float32(0)
            for e in range(dpl):
                acc[h, e] = 0
        for c0 in range(start, stop, threads):
            k0 = c0 + w * WARP                              # the warp's first key of the chunk
            n_keys = min(WARP, stop - k0)                   # warp-uniform
            if n_keys <= 0:
                continue
            j = k0 + lane
            valid = lane < n_keys
            if valid:
                _key_dot(sc, qs, kc, table[j // B] * B + j % B, head_dim, group, f16)
            for h in range(group):
                x = sc[h] if valid else float32(-math.inf)
                m_new = max(m_run[h], warp_max(x))          # finite: the warp has a key
                corr = math.exp(m_run[h] - m_new)
                p = math.exp(x - m_new) if valid else float32(0)
                sc[h] = p
                l_run[h] = l_run[h] * corr + warp_sum(p)
                m_run[h] = m_new
                for e in range(dpl):
                    acc[h, e] *= corr
            for kb in range(0, n_keys, PV_BATCH):           # a batch's V loads all in flight
                for i in range(PV_BATCH):
                    jj = min(k0 + kb + i, stop - 1)         # past the keys: weight 0 below
                    vr = vc[table[jj // B] * B + jj % B]
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
            if lane == 0:
                wm[w, h] = m_run[h]
                wl[w, h] = l_run[h]
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
                out[t, head * head_dim + d] = o / den
            else:
                part_o[r, head, s, d] = o
                if d == 0:
                    part_ml[r, head, s, 0] = mx
                    part_ml[r, head, s, 1] = den
        if n_spans == 1:
            return
        cuda.threadfence()                                  # this span's part visible to all
        cuda.syncthreads()                                  # .. from every thread of the block
        if tid == 0:
            done = cuda.atomic.add(count, (r, g), 1)
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
                mx = max(mx, part_ml[r, head, u, 0])
            den = float32(0)
            o = float32(0)
            for u in range(n_spans):
                f = math.exp(part_ml[r, head, u, 0] - mx)
                den += part_ml[r, head, u, 1] * f
                o += part_o[r, head, u, d] * f
            out[t, head * head_dim + d] = o / den
        if tid == 0:
            count[r, g] = 0                                 # ready for the next launch

    return _paged_attention


def span_blocks(max_blocks: int) -> int:
    """Paged blocks per attention span: one, unless a table is longer than MAX_SPANS blocks."""
    return max(1, -(-max_blocks // MAX_SPANS))


def scratch_shape(n_head: int, n_kv: int, head_dim: int, max_blocks: int) -> tuple:
    """(shape, dtype) of attention's scratch arrays (part_o, part_ml, count zeros) for tables of
    max_blocks blocks: ROWS_PER_LAUNCH rows."""
    n_spans = -(-max_blocks // span_blocks(max_blocks))
    rows = ROWS_PER_LAUNCH
    return (((rows, n_head, n_spans, head_dim), np.float32), ((rows, n_head, n_spans, 2),
                                                              np.float32), ((rows, n_kv), np.int32))


def attention(out, q, k_cache, v_cache, layer: int, pos, tables, row_seq, block_size: int,
              scale: float, scratch, stream) -> None:
    """Causal GQA attention of n rows through block tables: out, q (n, n_head*hd) f32; row t at
    position pos[t] (n,) int32 attends to positions 0..pos[t] of sequence row_seq[t] (n,) int32,
    read through tables[row_seq[t]] (tables (n_seqs, max_blocks) int32, blocks of block_size).
    scratch: scratch_shape's arrays (their rows: the rows per launch)."""
    part_o, part_ml, count = scratch
    rows, n_head, n_spans, head_dim = part_o.shape
    n, n_kv = q.shape[0], k_cache.shape[1]
    sb = span_blocks(tables.shape[1])
    if (out.shape != q.shape or q.shape[1] != n_head * head_dim or k_cache.shape[3] != head_dim
            or n_head % n_kv or count.shape != (rows, n_kv) or head_dim % 8
            or pos.shape[0] < n or row_seq.shape[0] < n or k_cache.shape[2] % block_size
            or n_spans * sb < tables.shape[1] or v_cache.shape != k_cache.shape):
        raise ValueError(f"paged attention: out {out.shape}, q {q.shape}, cache {k_cache.shape}, "
                         f"pos {pos.shape}, tables {tables.shape}, row_seq {row_seq.shape}, "
                         f"scratch {part_o.shape}, block size {block_size}")
    warps = PAGED_THREADS // WARP
    kern = _attention_kernel(warps, head_dim, n_head // n_kv, k_cache.dtype == np.float16,
                             block_size, block_size * sb)
    grid_spans = -(-tables.shape[1] // sb)
    for r0 in range(0, n, rows):
        kern[(n_kv, grid_spans, min(rows, n - r0)), warps * WARP, stream](
            out, part_o, part_ml, count, q, k_cache, v_cache, layer, pos, tables, row_seq, r0,
            np.float32(scale))


# --- the rows whose logits a step wants ----------------------------------------------------------

@cuda_kernel
def _gather_rows_kernel(out, x, idx):
    """Block i copies row idx[i] of x into row i of out."""
    i = cuda.blockIdx.x
    src = idx[i]
    for c in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
        out[i, c] = x[src, c]


def gather_rows(out, x, idx, stream) -> None:
    """out (m, d) = x[idx] (idx (m,) int32, each < x.shape[0]); f32."""
    if out.shape[1] != x.shape[1] or idx.shape[0] < out.shape[0]:
        raise ValueError(f"gather_rows: out {out.shape}, x {x.shape}, idx {idx.shape}")
    _gather_rows_kernel[out.shape[0], GATHER_THREADS, stream](out, x, idx)


# --- several greedy decode steps of a batch in one replay ---------------------------------------

@cuda_kernel
def _advance_rows_kernel(ids, pos, slots, tables, row_seq, picks, out, j, block_size):
    """Thread r: a real row (slot >= 0) takes its pick as its next token, one position on, and
    the slot that position maps to through its sequence's table (-1 past the table)."""
    r = cuda.grid(1)
    if r < ids.shape[0] and slots[r] >= 0:
        t = picks[r]
        out[j, r] = t
        ids[r] = t
        p = pos[r] + 1
        pos[r] = p
        b = p // block_size
        slots[r] = -1
        if b < tables.shape[1]:
            blk = tables[row_seq[r], b]
            if blk >= 0:
                slots[r] = blk * block_size + p % block_size


def advance_rows(ids, pos, slots, tables, row_seq, picks, out, j: int, block_size: int,
                 stream) -> None:
    """For each row r of a decode-only batch with slots[r] >= 0 (padding rows: -1, untouched):
    out[j, r] = ids[r] = picks[r], pos[r] += 1, slots[r] = the new position's slot (-1 when its
    block is not in the table). int32 device arrays; row_seq[r] < tables.shape[0] and picks,
    out[j] as long as ids (checked by the caller, Model.run_batch_steps)."""
    n = ids.shape[0]
    _advance_rows_kernel[-(-n // 64), 64, stream](ids, pos, slots, tables, row_seq, picks, out,
                                                  j, block_size)

