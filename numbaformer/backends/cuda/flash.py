"""Flash attention for prefill on tensor cores (f16 mma.sync, f32 accumulators): causal, grouped-query,
online softmax in f32, reading the f16 KV cache directly.

Interface of attention.prefill_attention: out, q (n, n_head*head_dim) f32, the caches (n_layer,
n_kv_head, n_ctx, head_dim) f16, pos (n,) int32 (query t attends to cache rows 0..pos[t]; a chunk of
a longer prompt starts past 0 and attends to the cached prefix), scale. An f32 cache (chosen to
keep K and V exact) and head_dim not a multiple of 16 go to the FP32 kernel (`supported`).

Precision. The mma takes both operands in one type and the cache is f16, so K and V are used as
they are stored and Q (times scale * log2 e, so that the softmax is exp2) is rounded to f16 once,
when its fragments are loaded: f16 keeps 11 significant bits (bf16 8), and its range (normal from
6.1e-5, at most 65504) holds post-RoPE queries times 1/sqrt(head_dim) with room to spare (values
under 6.1e-5 keep an absolute error of 2^-25, nothing beside the others in a dot product). The
scores S = Q K^T come out of the tensor core in f32 (exact products, f32 sums); max, exp2, the row
sums l and the rescaling of O are f32; the probabilities P (in [0, 1]) are rounded to f16 (11 bits,
where bf16 has 8) as the A operand of O += P V, accumulated in f32.

Tiling (FlashAttention-2). Block (g, b): KV head g and the rows of tokens b*TQ .. of its `group`
query heads, row r = token TQ-slot r // group, head r % group, so one K/V tile serves every head
of the group (GQA); BM = 16 * warps rows, TQ = BM // group tokens (rows past TQ*group idle). Warp
w owns rows 16w .. 16w+15 as one m16 tile: its Q fragments stay in registers (A operands, loaded
from global memory and packed to f16), and for each tile of BN keys it forms S (16 x BN) as BN/8
accumulators, masks keys past each row's position (only on tiles that reach past the block's
first position), updates the running max m and sum l of its two rows per lane (rows g and g+8
of the C layout; a row's max over its 4 lanes by two xor shuffles, the sum reduced only at the
end), rescales O (16 x head_dim, head_dim/8 accumulators) and adds P V, P taken from the S
accumulators as A fragments without any exchange (the C layout of two n8 tiles is the A layout
of one k16 step). K tiles (B of Q K^T, keys as the `.col` rows) come by ldmatrix.x4, V tiles (B
of P V, K-major) by ldmatrix.x4.trans, from shared tiles of 16-byte chunks swizzled as the GEMM's
(chunk c of row r at c ^ (r % 8)). Key tiles run from 0 to the block's last position; keys past it
are zero-filled (never read from the cache, whose rows there may hold anything), so that masked
keys give P = 0 against finite V. Blocks are issued last tile first (the causal work grows with
the position).

Pipeline: two stages of (K, V) tiles; per key tile j, one barrier: wait for this thread's copies
(cp.async.wait_group 0), barrier (tile j visible; every warp done with tile j-1's stage), issue
the cp.async of tile j+1 into that stage, then compute tile j, so the copies overlap the mma.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
from numba import cuda, float32, int32, uint32

from ._sim import SIMULATOR
from .matmul_mma import cached_kernel
from .intrinsics import shfl_xor_sync
from .mma import (cp_async16, cp_async_commit, cp_async_wait, ldmatrix_x4, ldmatrix_x4_trans,
                  mma_f16, pack_f16x2, store_shared_u32x4)

# The CUDA backend's prefill attention over an f16 cache on a GPU (measured with the tensor-core
# GEMM, H200 2026-12-02: the cut model's score within the fidelity bounds); off under the
# simulator, where its own tests run it. NUMBAFORMER_FLASH=0/1 overrides; --exact and f32 caches
# take the FP32 kernel.
ENABLED = os.environ.get("NUMBAFORMER_FLASH", "0" if SIMULATOR else "1") == "1"
FLASH_WARPS = 8          # warps per block, 16 query rows (token, head) each (H200, 8B shape:
                         # 4096 tokens 0.67 ms a layer at 8, 0.81 at 4; 512 tokens 0.032 at both)
FLASH_BN = 64            # keys per shared-memory tile (a multiple of 16)
FLASH_MIN_BLOCKS = 1     # launch bounds: blocks per SM the registers must allow
LOG2E = 1.4426950408889634
FULL = 0xFFFFFFFF


def supported(q, k_cache) -> bool:
    """Whether the flash kernel takes this call: an f16 cache, head_dim a multiple of 16, a
    group that fits a block's rows."""
    head_dim = k_cache.shape[3]
    group = q.shape[1] // head_dim // k_cache.shape[1]
    return k_cache.dtype == np.float16 and head_dim % 16 == 0 and group <= 16 * FLASH_WARPS


def smem_bytes(bn: int, head_dim: int) -> int:
    """Dynamic shared memory of a launch: 2 stages of a K and a V tile, bn x head_dim f16."""
    return 2 * 2 * bn * head_dim * 2


@functools.lru_cache(maxsize=None)
def _flash_kernel(warps: int, bn: int, head_dim: int, group: int, min_blocks: int):
    threads = 32 * warps
    BM = 16 * warps                       # rows (token, head) per block
    TQ = BM // group                      # tokens per block
    ROWS = TQ * group                     # rows in use
    CPR = head_dim // 8                   # 16-byte chunks per K/V row
    KS = head_dim // 16                   # k16 steps of Q K^T
    NTK = bn // 8                         # n8 tiles of S
    KK = bn // 16                         # k16 steps of P V
    NTO = head_dim // 8                   # n8 tiles of O
    XM = min(CPR, 8)                      # swizzle: chunk c of row r at c ^ ((r // RDIV) % XM)
    RDIV = max(1, 8 // CPR)
    STAGE = bn * CPR                      # chunks per stage of one tile
    WORDS = 2 * STAGE * 4                 # uint32 words of the K (or V) stages
    ITERS = -(-STAGE // threads)          # chunks a thread copies per tile
    SACC, OACC, QF = NTK * 4, NTO * 4, KS * 4
    assert bn % 16 == 0 and head_dim % 16 == 0 and 1 <= group <= BM, (bn, head_dim, group)

    @cuda.jit(device=True, inline=True)
    def swz(r, c):
        return r * CPR + (c ^ ((r // RDIV) % XM))

    @cuda.jit(device=True, inline=True)
    def stage_kv(ks, vs, k_cache, v_cache, head0, k0, last, st, tid):
        """Keys k0 .. k0+bn-1 of this KV head (chunk head0 of the caches is its row 0) -> stage
        st: one cp.async per 16-byte chunk; rows past `last` zero-filled instead."""
        base = st * STAGE
        src = head0 + k0 * CPR
        for it in range(ITERS):
            c = tid + it * threads
            if c < STAGE:
                row = c // CPR
                dst = base + swz(row, c - row * CPR)
                if k0 + row <= last:
                    cp_async16(ks, dst, k_cache, src + c)
                    cp_async16(vs, dst, v_cache, src + c)
                else:
                    store_shared_u32x4(ks, dst, 0, 0, 0, 0)
                    store_shared_u32x4(vs, dst, 0, 0, 0, 0)

    @cuda.jit(device=True, inline=True)
    def load_q(qf, q, tok, head, qscale, lane):
        """qf: the warp's A fragments of Q * qscale rounded to f16: register 4 ks + 2 h + i holds
        row g + 8 i, columns 16 ks + 8 h + 2t, +1 (tok, head: the two rows' token and head,
        -1 for an idle row)."""
        t2 = 2 * (lane & 3)
        for ks in range(KS):
            for hh in range(2):
                for i in range(2):
                    v = uint32(0)
                    if tok[i] >= 0:
                        col = head[i] * head_dim + 16 * ks + 8 * hh + t2
                        v = pack_f16x2(q[tok[i], col] * qscale, q[tok[i], col + 1] * qscale)
                    qf[4 * ks + 2 * hh + i] = v

    @cuda.jit(device=True, inline=True)
    def scores(s, qf, ks, st, lane):
        """s = the warp's Q (16 rows) times the K tile of stage st transposed (16 x bn, C layout
        per n8 tile): B fragments of two n8 tiles per ldmatrix.x4 (the GEMM's weight tile)."""
        for i in range(SACC):
            s[i] = float32(0)
        base = st * STAGE
        for kq in range(KS):
            for p in range(NTK // 2):
                nrow = (2 * p + (lane >> 4)) * 8 + (lane & 7)
                b0, b1, b2, b3 = ldmatrix_x4(ks, base + swz(nrow, 2 * kq + ((lane >> 3) & 1)))
                i = 8 * p
                s[i], s[i + 1], s[i + 2], s[i + 3] = mma_f16(
                    qf[4 * kq], qf[4 * kq + 1], qf[4 * kq + 2], qf[4 * kq + 3], b0, b1,
                    s[i], s[i + 1], s[i + 2], s[i + 3])
                s[i + 4], s[i + 5], s[i + 6], s[i + 7] = mma_f16(
                    qf[4 * kq], qf[4 * kq + 1], qf[4 * kq + 2], qf[4 * kq + 3], b2, b3,
                    s[i + 4], s[i + 5], s[i + 6], s[i + 7])

    @cuda.jit(device=True, inline=True)
    def add_pv(o, s, vs, st, lane):
        """o += P V: P (16 x bn) from s (C layout of n8 tiles 2kk, 2kk+1 = A of k16 step kk),
        rounded to f16; V's B fragments of two n8 tiles of O per ldmatrix.x4.trans."""
        base = st * STAGE
        for kk in range(KK):
            j = 8 * kk
            a0 = pack_f16x2(s[j], s[j + 1])
            a1 = pack_f16x2(s[j + 2], s[j + 3])
            a2 = pack_f16x2(s[j + 4], s[j + 5])
            a3 = pack_f16x2(s[j + 6], s[j + 7])
            krow = 16 * kk + ((lane >> 3) & 1) * 8 + (lane & 7)
            for pp in range(NTO // 2):
                b0, b1, b2, b3 = ldmatrix_x4_trans(vs, base + swz(krow, 2 * pp + (lane >> 4)))
                i = 8 * pp
                o[i], o[i + 1], o[i + 2], o[i + 3] = mma_f16(
                    a0, a1, a2, a3, b0, b1, o[i], o[i + 1], o[i + 2], o[i + 3])
                o[i + 4], o[i + 5], o[i + 6], o[i + 7] = mma_f16(
                    a0, a1, a2, a3, b2, b3, o[i + 4], o[i + 5], o[i + 6], o[i + 7])

    @cuda.jit(device=True, inline=True)
    def softmax_step(s, o, ml, k0, rpos, masked, lane):
        """Online softmax of one key tile for the lane's two rows (i = 0: row g, 1: row g+8):
        mask keys past rpos[i] (when `masked`), new max m (over the row's 4 lanes), rescale l
        and o by exp2(m_old - m), s -> exp2(s - m), l += the lane's part of the row sum. A row
        with every key masked so far keeps m = -inf and subtracts 0 (no inf - inf)."""
        t2 = 2 * (lane & 3)
        if masked:
            for nt in range(NTK):
                for e in range(4):
                    if k0 + 8 * nt + t2 + (e & 1) > rpos[e >> 1]:
                        s[4 * nt + e] = float32(-math.inf)
        for i in range(2):
            mx = ml[2 * i]
            for nt in range(NTK):
                mx = max(mx, max(s[4 * nt + 2 * i], s[4 * nt + 2 * i + 1]))
            mx = max(mx, shfl_xor_sync(FULL, mx, 1))
            mx = max(mx, shfl_xor_sync(FULL, mx, 2))
            sub = float32(0) if mx == float32(-math.inf) else mx
            corr = math.exp2(ml[2 * i] - sub)
            ml[2 * i] = mx
            total = float32(0)
            for nt in range(NTK):
                for e in range(2):
                    p = math.exp2(s[4 * nt + 2 * i + e] - sub)
                    s[4 * nt + 2 * i + e] = p
                    total += p
            ml[2 * i + 1] = ml[2 * i + 1] * corr + total
            for nt in range(NTO):
                o[4 * nt + 2 * i] *= corr
                o[4 * nt + 2 * i + 1] *= corr

    @cached_kernel(threads, min_blocks)
    def _flash_prefill(out, q, k_cache, v_cache, layer, pos, qscale):
        """out (n, n_head*head_dim) f32 for KV head blockIdx.x and the tokens of query tile
        (gridDim.y - 1 - blockIdx.y) (module docstring); q as out; caches (n_layer, n_kv, n_ctx,
        head_dim) f16; pos (n,) int32; qscale = scale * log2(e)."""
        sm = cuda.shared.array(0, uint32)
        ks = sm[:WORDS]
        vs = sm[WORDS:]
        s = cuda.local.array(SACC, float32)
        o = cuda.local.array(OACC, float32)
        qf = cuda.local.array(QF, uint32)
        ml = cuda.local.array(4, float32)              # m, l of row g; m, l of row g+8
        tok = cuda.local.array(2, int32)
        head = cuda.local.array(2, int32)
        rpos = cuda.local.array(2, int32)
        tid = cuda.threadIdx.x
        lane = tid & 31
        w = tid >> 5
        g = cuda.blockIdx.x
        n_tok = q.shape[0]
        t0 = (cuda.gridDim.y - 1 - cuda.blockIdx.y) * TQ
        first = int32(0x7FFFFFFF)                       # the block's smallest and largest position
        last = int32(-1)
        for i in range(TQ):
            if t0 + i < n_tok:
                first = min(first, pos[t0 + i])
                last = max(last, pos[t0 + i])
        for i in range(2):
            r = 16 * w + (lane >> 2) + 8 * i
            slot = r // group
            tok[i] = t0 + slot if r < ROWS and t0 + slot < n_tok else -1
            head[i] = g * group + (r - slot * group)
            rpos[i] = pos[tok[i]] if tok[i] >= 0 else -1
            ml[2 * i] = float32(-math.inf)
            ml[2 * i + 1] = float32(0)
        for i in range(OACC):
            o[i] = float32(0)
        load_q(qf, q, tok, head, qscale, lane)
        head0 = ((layer * k_cache.shape[1] + g) * k_cache.shape[2]) * CPR
        n_kt = last // bn + 1
        stage_kv(ks, vs, k_cache, v_cache, head0, 0, last, 0, tid)
        cp_async_commit()
        for j in range(n_kt):
            cp_async_wait(0)
            cuda.syncthreads()        # tile j landed for every thread (copies and zero fills);
            #                           every warp done with tile j-1, whose stage is refilled now
            if j + 1 < n_kt:
                stage_kv(ks, vs, k_cache, v_cache, head0, (j + 1) * bn, last, (j + 1) & 1, tid)
            cp_async_commit()
            k0 = j * bn
            scores(s, qf, ks, j & 1, lane)
            softmax_step(s, o, ml, k0, rpos, k0 + bn - 1 > first, lane)
            add_pv(o, s, vs, j & 1, lane)
        t2 = 2 * (lane & 3)
        for i in range(2):
            lsum = ml[2 * i + 1]
            lsum += shfl_xor_sync(FULL, lsum, 1)
            lsum += shfl_xor_sync(FULL, lsum, 2)
            if tok[i] >= 0:
                inv = float32(1) / lsum
                col = head[i] * head_dim + t2
                for nt in range(NTO):
                    out[tok[i], col + 8 * nt] = o[4 * nt + 2 * i] * inv
                    out[tok[i], col + 8 * nt + 1] = o[4 * nt + 2 * i + 1] * inv

    return _flash_prefill


def flash_attention(out, q, k_cache, v_cache, layer: int, pos, scale: float, stream) -> None:
    """Prefill attention on tensor cores: out, q (n, n_head*head_dim) f32; k_cache, v_cache
    (n_layer, n_kv, n_ctx, head_dim) f16; pos (n,) int32; causal by position. FLASH_WARPS,
    FLASH_BN, FLASH_MIN_BLOCKS are read at each call."""
    from .matmul import _opt_in
    n, q_dim = q.shape
    head_dim, n_kv = k_cache.shape[3], k_cache.shape[1]
    group = q_dim // head_dim // n_kv
    assert supported(q, k_cache) and group * n_kv * head_dim == q_dim, (q.shape, k_cache.shape)
    k = _flash_kernel(FLASH_WARPS, FLASH_BN, head_dim, group, FLASH_MIN_BLOCKS)
    smem = smem_bytes(FLASH_BN, head_dim)
    args = (out, q, k_cache, v_cache, layer, pos, np.float32(scale * LOG2E))
    _opt_in(k, smem, *args)
    tq = 16 * FLASH_WARPS // group
    k[(n_kv, -(-n // tq)), 32 * FLASH_WARPS, stream, smem](*args)
