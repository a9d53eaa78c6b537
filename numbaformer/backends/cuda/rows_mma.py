"""A batched step's decode rows on the s8 tensor cores (Q4_K, Q6_K; gemv.ROWS_MMA, its row range).

The many-rows mat-vec (gemv_q8.rows_kernel) pays each activation row the whole per-unit arithmetic
of the one-row kernel: its time grows almost as fast as the rows. Here the rows share it:
`mma.sync.m16n8k32.s8` multiplies a fragment of 16 weight rows x 32 values by 8 activation rows
in one instruction, the 32 values being one Q4_K sub-block, so the s32 sums only need the
sub-block's scale and min afterwards:

    y[r, t] += d_r sc_r[s] dx_t[s] (q_r[s] . qx_t[s])  -  dmin_r m_r[s] sx_t[s]

(dx, qx: the activations' q8 scale and values of sub-block s, sx their d-scaled sum; the xa rows
of gemv.quantize_rows). A block takes one tile of 16 weight rows (grid row y) and `chunks` chunks
of 8 activation rows (grid column x: every activation row of a step up to 8 x MAX_CHUNKS, so the
weights are read once; VERSION 3 takes fewer a block, its weights read once per grid column),
its `warps` warps splitting the 256-value blocks of the rows (warp w: blocks w, w + warps, ..),
their sums added in shared memory in warp order at the end (_finish):
enough warps in flight to stream the weights, whatever the number of rows.

Per block of a row, each lane loads the header (d, dmin, 12 scale bytes) of its two rows (g and
g + 8, g = lane // 4) and, per pair of sub-blocks, 8 bytes of each row: bytes 8t .. 8t + 7 of the
pair's 32 (low nibbles: sub-block 2j, high: 2j + 1). The mma's k order is free as long as A and B
share it: lane t's A registers hold values 8t .. 8t + 3 (k = 4t ..) and 8t + 4 .. 8t + 7
(k = 16 + 4t ..), its B registers the same values of activation row g of each chunk (one 8-byte
load), and C's four values are rows g, g + 8 of activation rows 2t, 2t + 1. Activation rows past
n_x read row n_x - 1 and are not stored; chunks wholly past it are skipped. The accumulators of the
chunks are a nested tuple (_chunk_tree) so that they stay in registers. The sums are the same
numbers as the dp4a kernel's, added in another order: within float32 rounding of them
(tests/test_cuda_ops.py).
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
from numba import cuda, float32, int32, uint32

from ...quants import Q4_K, Q6_K
from .gemv_q8 import LO, _f16_half, _scales_pair
from .intrinsics import load_u32x2, load_u32x4
from .launch import dtype_view
from .mma import mma_s8, mma_s8_k16
from .reduce import WARP

TYPES = (Q4_K, Q6_K)
MAX_ROWS = 64             # activation rows a launch takes
MAX_CHUNKS = 8            # chunks of 8 activation rows a block takes (more: more grid columns)
# a block's warps, splitting the blocks of a row (H200, 8B Q4_K step products at 1 / 4 / 16 / 64
# rows: 4 warps 7.43 / 7.52 / 11.3 / 51.1 ms, 8 warps 5.90 / 5.95 / 9.32 / 51.7)
# (1..8: a block's shared sums, warps x 128 x chunks x 4 bytes, within the 48 KiB of static shared
# memory)
WARPS = min(8, max(1, int(os.environ.get("NUMBAFORMER_ROWS_MMA_WARPS", "8"))))
# Q4_K: 2 = mma_rows_kernel, 3 = mma_rows_kernel3 with TILES 16-row tiles a warp (1, 2). H200, 8B
# Q4_K step products (output Q6_K), 8 warps, ms at 1 / 4 / 16 / 32 / 64 rows (2026-12-02, sixth
# session, scripts/gpu_rows_bench.py): VERSION 2 5.75 / 5.81 / 9.15 / 18.3 / 47.7, VERSION 3 with
# 1 tile 4.69 / 4.76 / 8.67 / 14.9 / 29.7, with 2 tiles 4.67 / 4.72 / 6.87 / 11.9 / 23.9
VERSION = int(os.environ.get("NUMBAFORMER_ROWS_MMA_VERSION", "3"))
TILES = int(os.environ.get("NUMBAFORMER_ROWS_MMA_TILES", "2"))
# VERSION 3's Q4_K products of one input in one launch (launch_many: Q, K and V, their tiles one
# grid; launch_swiglu: gate and up, a warp's two tiles one of each, SwiGLU in the epilogue), the
# same bits as a launch per matrix (and silu_mul): a batched 8B step launched ~15 kernels a layer
# where the single-sequence decode launches 5, each product's time mostly its latency
# (NUMBAFORMER_ROWS_MMA_MERGE=0: a launch per matrix; not yet timed)
MERGE = os.environ.get("NUMBAFORMER_ROWS_MMA_MERGE", "1") == "1"


@cuda.jit(device=True, inline=True)
def _sub(sc, j):
    """Byte j (0, 1) of a 16-bit scale/min pair, as float32."""
    return float32(int32((sc >> uint32(8 * j)) & uint32(0xFF)))


@cuda.jit(device=True, inline=True)
def _lane(cols):
    """(warp of the block, the lane's group g and thread t in it, blocks of 256 a row, then the
    offsets of xd and xs in an activation row: nw (= cols / 4 words of q8 values), cols / 32)."""
    lane = cuda.threadIdx.x % WARP
    return cuda.threadIdx.x // WARP, lane >> 2, lane & 3, cols // 256, cols // 4, cols // 32


@cuda.jit(device=True, inline=True)
def _chunk_rows(ch, g, t, n_x):
    """The activation rows of chunk ch a lane reads: its B column 8 ch + g and its C columns
    8 ch + 2t, 8 ch + 2t + 1, each at most n_x - 1 (rows past n_x are computed, never stored)."""
    return min(8 * ch + g, n_x - 1), min(8 * ch + 2 * t, n_x - 1), min(8 * ch + 2 * t + 1, n_x - 1)


def _chunk_tree(chunks: int, leaf, width: int = 4, skip: bool = True):
    """Device functions (zeros, step, put) over the `width` (4, or 8 for two weight tiles) C
    accumulators of each of `chunks` chunks (a power of two), kept as a nested tuple so that every
    index is a constant: zeros() -> the tuple of 0s; step(acc, ch, n_x, p) -> acc plus leaf(ch + i,
    p) for chunk i (chunks from ch on; with `skip`, one wholly past activation row n_x - 1 adds
    nothing, a branch a chunk; without, it computes on row n_x - 1, in one basic block with the
    others); put(acc, sm, base, lane) -> the accumulators to shared memory, chunk i's value k at
    sm[base + 32 width i + 32 k + lane]."""
    from ._jit import forceinline_device
    assert width in (4, 8)
    if chunks == 1:
        @forceinline_device
        def zeros4():
            return float32(0), float32(0), float32(0), float32(0)

        @forceinline_device
        def add4(acc, d):
            return acc[0] + d[0], acc[1] + d[1], acc[2] + d[2], acc[3] + d[3]

        @forceinline_device
        def put4(acc, sm, base, lane):
            sm[base + lane] = acc[0]
            sm[base + 32 + lane] = acc[1]
            sm[base + 64 + lane] = acc[2]
            sm[base + 96 + lane] = acc[3]

        if width == 4:
            zeros, add, put = zeros4, add4, put4
        else:                                   # two tiles: two halves of four
            @forceinline_device
            def zeros():
                return zeros4() + zeros4()

            @forceinline_device
            def add(acc, d):
                return add4(acc[:4], d[:4]) + add4(acc[4:], d[4:])

            @forceinline_device
            def put(acc, sm, base, lane):
                put4(acc[:4], sm, base, lane)
                put4(acc[4:], sm, base + 128, lane)

        @forceinline_device
        def step(acc, ch, n_x, p):
            if skip and 8 * ch >= n_x:
                return acc
            return add(acc, leaf(ch, p))

        return zeros, step, put
    half = chunks // 2
    z, st, pt = _chunk_tree(half, leaf, width, skip)

    @forceinline_device
    def zeros():
        return z(), z()

    @forceinline_device
    def step(acc, ch, n_x, p):
        return st(acc[0], ch, n_x, p), st(acc[1], ch + half, n_x, p)

    @forceinline_device
    def put(acc, sm, base, lane):
        pt(acc[0], sm, base, lane)
        pt(acc[1], sm, base + 32 * width * half, lane)

    return zeros, step, put


@cuda.jit(device=True, inline=True)
def _store(o, e, t, r, acc, mode, n_x):
    if t < n_x:
        if mode == 1:
            acc += e[r]
        elif mode == 2:
            acc += e[t, r]
        o[t, r] = acc


def _finisher(mode: int, warps: int, chunks: int, put, mt: int = 1):
    """finish(o, e, acc, c0, tile, n_x): the warps' accumulators added in warp order through
    shared memory, each output of the block's `mt` tiles (from 16-row tile `tile` on) stored once
    (with its epilogue, `mode`)."""
    per_chunk = 128 * mt
    per_warp = per_chunk * chunks
    size = warps * per_warp

    @cuda.jit(device=True, inline=True)
    def finish(o, e, acc, c0, tile, n_x):
        sm = cuda.shared.array(size, float32)
        tid = cuda.threadIdx.x
        put(acc, sm, (tid // WARP) * per_warp, tid % WARP)
        cuda.syncthreads()
        for v in range(tid, per_warp, warps * WARP):
            s = sm[v]
            for wi in range(1, warps):
                s += sm[wi * per_warp + v]
            lane = v % WARP
            k = (v // WARP) % (4 * mt)
            t = 8 * (c0 + v // per_chunk) + 2 * (lane & 3) + (k & 1)
            r = 16 * (tile + (k >> 2)) + (lane >> 2) + 8 * ((k >> 1) & 1)
            _store(o, e, t, r, s, mode, n_x)

    return finish


def _swiglu_finisher(warps: int, chunks: int, put):
    """finish(o, acc, c0, tile, n_x) of a block whose warps hold 16-row tile `tile` of gate (their
    first tile) and of up (the second): each sum added in warp order as _finisher adds it, then
    o[t, r] = silu(gate) * up as elementwise.silu_mul computes it (the same bits as two products
    and silu_mul)."""
    per_warp = 256 * chunks
    size = warps * per_warp

    @cuda.jit(device=True, inline=True)
    def finish(o, acc, c0, tile, n_x):
        sm = cuda.shared.array(size, float32)
        tid = cuda.threadIdx.x
        put(acc, sm, (tid // WARP) * per_warp, tid % WARP)
        cuda.syncthreads()
        for u in range(tid, per_warp // 2, warps * WARP):
            v = 256 * (u // 128) + u % 128            # a gate value; its up value at v + 128
            sg = sm[v]
            su = sm[v + 128]
            for wi in range(1, warps):
                sg += sm[wi * per_warp + v]
                su += sm[wi * per_warp + v + 128]
            lane = v % WARP
            k = (v // WARP) % 4
            t = 8 * (c0 + v // 256) + 2 * (lane & 3) + (k & 1)
            r = 16 * tile + (lane >> 2) + 8 * ((k >> 1) & 1)
            if t < n_x:
                o[t, r] = sg / (float32(1) + math.exp(-sg)) * su

    return finish


@cuda.jit(device=True, inline=True)
def _act(ch, xa, sub, t, g, nw, n32, n_x):
    """The activations' part of sub-block sub with chunk ch, for a lane: its B fragment (8 bytes
    of activation row 8 ch + g) and the q8 scale and d-scaled 32-value sum of its C rows."""
    tg, t0, t1 = _chunk_rows(ch, g, t, n_x)
    b0, b1 = load_u32x2(xa[tg].view(np.uint32), 4 * sub + t)
    x0 = xa[t0]
    x1 = xa[t1]
    return (b0, b1, x0[nw + sub], x1[nw + sub],
            x0[nw + n32 + 2 * sub] + x0[nw + n32 + 2 * sub + 1],
            x1[nw + n32 + 2 * sub] + x1[nw + n32 + 2 * sub + 1])


@cuda.jit(device=True, inline=True)
def _tile_c(a0, a1, a2, a3, sa, sb, ma, mb, b0, b1, d0, d1, s0, s1):
    """One 16-row tile's four C increments: the s32 mma of a sub-block, scaled, less the mins."""
    c0, c1, c2, c3 = mma_s8(a0, a1, a2, a3, b0, b1, int32(0), int32(0), int32(0), int32(0))
    return (sa * (d0 * float32(c0)) - ma * s0, sa * (d1 * float32(c1)) - ma * s1,
            sb * (d0 * float32(c2)) - mb * s0, sb * (d1 * float32(c3)) - mb * s1)


@cuda.jit(device=True, inline=True)
def _q4k_chunk(ch, p):
    """One Q4_K sub-block's product with activation chunk ch: the four C values' increments."""
    a0, a1, a2, a3, sa, sb, ma, mb, xa, sub, t, g, nw, n32, n_x = p
    b0, b1, d0, d1, s0, s1 = _act(ch, xa, sub, t, g, nw, n32, n_x)
    return _tile_c(a0, a1, a2, a3, sa, sb, ma, mb, b0, b1, d0, d1, s0, s1)


@cuda.jit(device=True, inline=True)
def _q4k_chunk2(ch, p):
    """_q4k_chunk for two 16-row tiles sharing the activations' loads: eight increments."""
    f0, f1, xa, sub, t, g, nw, n32, n_x = p
    b0, b1, d0, d1, s0, s1 = _act(ch, xa, sub, t, g, nw, n32, n_x)
    return (_tile_c(f0[0], f0[1], f0[2], f0[3], f0[4], f0[5], f0[6], f0[7],
                    b0, b1, d0, d1, s0, s1) +
            _tile_c(f1[0], f1[1], f1[2], f1[3], f1[4], f1[5], f1[6], f1[7],
                    b0, b1, d0, d1, s0, s1))


@cuda.jit(device=True, inline=True)
def _q4k_block(ra, rb, b, nb, t):
    """A lane's words of 256-value block b of rows ra, rb (uint32 views), all loaded at once:
    both headers (d, dmin, 12 scale bytes; 16 bytes each), then per pair gp of sub-blocks 8 bytes
    of each row (ra, rb, ra, rb words: pair gp at 8 + 4 gp)."""
    return (load_u32x4(ra, 8 * nb + b) + load_u32x4(rb, 8 * nb + b) +
            load_u32x2(ra, 16 * b + t) + load_u32x2(rb, 16 * b + t) +
            load_u32x2(ra, 16 * b + 4 + t) + load_u32x2(rb, 16 * b + 4 + t) +
            load_u32x2(ra, 16 * b + 8 + t) + load_u32x2(rb, 16 * b + 8 + t) +
            load_u32x2(ra, 16 * b + 12 + t) + load_u32x2(rb, 16 * b + 12 + t))


@cuda.jit(device=True, inline=True)
def _q4k_frags(k, gp, j):
    """A tile's A fragment and scales of sub-block 2 gp + j from its _q4k_block words k (gp, j
    constants at every call, so every index folds): (a0, a1, a2, a3, sa, sb, ma, mb)."""
    sca, mna = _scales_pair(k[1], k[2], k[3], gp)
    scb, mnb = _scales_pair(k[5], k[6], k[7], gp)
    sh = uint32(4 * j)
    m = uint32(LO)
    return ((k[8 + 4 * gp] >> sh) & m, (k[10 + 4 * gp] >> sh) & m,
            (k[9 + 4 * gp] >> sh) & m, (k[11 + 4 * gp] >> sh) & m,
            _f16_half(k[0], 0) * _sub(sca, j), _f16_half(k[4], 0) * _sub(scb, j),
            _f16_half(k[0], 1) * _sub(mna, j), _f16_half(k[4], 1) * _sub(mnb, j))


@functools.lru_cache(maxsize=None)
def mma_rows_kernel(mode: int, warps: int, chunks: int):
    """out[t, r] = w[r] . x[t] (+ bias e[r] in mode 1, + residual e[t, r] in mode 2) for Q4_K rows
    (GPU layout, a multiple of 16) and the `chunks` chunks of 8 activation rows of grid column x
    (module docstring)."""
    from ._jit import cuda_kernel
    assert chunks in (1, 2, 4, 8) and mode in (0, 1, 2)
    zeros, step, put = _chunk_tree(chunks, _q4k_chunk)
    finish = _finisher(mode, warps, chunks, put)

    @cuda_kernel
    def _mma_rows(o, w, e, xa, cols, n_x):
        wi, g, t, nb, nw, n32 = _lane(cols)
        tile = cuda.blockIdx.y
        c0 = chunks * cuda.blockIdx.x            # this block's first chunk of 8 activation rows
        ra = w[16 * tile + g]
        rb = w[16 * tile + g + 8]
        acc = zeros()
        for b in range(wi, nb, warps):
            ha0, ha1, ha2, ha3 = load_u32x4(ra, 8 * nb + b)
            hb0, hb1, hb2, hb3 = load_u32x4(rb, 8 * nb + b)
            da = _f16_half(ha0, 0)
            db = _f16_half(hb0, 0)
            dma = _f16_half(ha0, 1)
            dmb = _f16_half(hb0, 1)
            for gp in range(4):
                wa0, wa1 = load_u32x2(ra, 16 * b + 4 * gp + t)
                wb0, wb1 = load_u32x2(rb, 16 * b + 4 * gp + t)
                sca, mna = _scales_pair(ha1, ha2, ha3, gp)
                scb, mnb = _scales_pair(hb1, hb2, hb3, gp)
                for j in range(2):
                    sh = uint32(4 * j)
                    sub = 8 * b + 2 * gp + j
                    acc = step(acc, c0, n_x, ((wa0 >> sh) & uint32(LO), (wb0 >> sh) & uint32(LO),
                                         (wa1 >> sh) & uint32(LO), (wb1 >> sh) & uint32(LO),
                                         da * _sub(sca, j), db * _sub(scb, j),
                                         dma * _sub(mna, j), dmb * _sub(mnb, j),
                                         xa, sub, t, g, nw, n32, n_x))
        finish(o, e, acc, c0, tile, n_x)

    return _mma_rows


def _block_stepper(step, mt: int):
    """block_step(acc, k0, k1, c0, xa, b, t, g, nw, n32, n_x): the 8 sub-blocks of 256-value
    block b with the `mt` tiles' words k0 (k1), through the chunk tree's step."""

    @cuda.jit(device=True, inline=True)
    def sub_step(acc, k0, k1, gp, j, c0, xa, b, t, g, nw, n32, n_x):
        sub = 8 * b + 2 * gp + j
        f0 = _q4k_frags(k0, gp, j)
        if mt == 1:
            return step(acc, c0, n_x, (f0[0], f0[1], f0[2], f0[3], f0[4], f0[5], f0[6], f0[7],
                                       xa, sub, t, g, nw, n32, n_x))
        return step(acc, c0, n_x, (f0, _q4k_frags(k1, gp, j), xa, sub, t, g, nw, n32, n_x))

    @cuda.jit(device=True, inline=True)
    def block_step(acc, k0, k1, c0, xa, b, t, g, nw, n32, n_x):
        acc = sub_step(acc, k0, k1, 0, 0, c0, xa, b, t, g, nw, n32, n_x)
        acc = sub_step(acc, k0, k1, 0, 1, c0, xa, b, t, g, nw, n32, n_x)
        acc = sub_step(acc, k0, k1, 1, 0, c0, xa, b, t, g, nw, n32, n_x)
        acc = sub_step(acc, k0, k1, 1, 1, c0, xa, b, t, g, nw, n32, n_x)
        acc = sub_step(acc, k0, k1, 2, 0, c0, xa, b, t, g, nw, n32, n_x)
        acc = sub_step(acc, k0, k1, 2, 1, c0, xa, b, t, g, nw, n32, n_x)
        acc = sub_step(acc, k0, k1, 3, 0, c0, xa, b, t, g, nw, n32, n_x)
        return sub_step(acc, k0, k1, 3, 1, c0, xa, b, t, g, nw, n32, n_x)

    return block_step


def _tiles_walker(warps: int, chunks: int, mt: int):
    """(zeros, put, walk): walk(wa0, wb0, wa1, wb1, xa, c0, cols, n_x) -> a warp's accumulators
    over its blocks of the rows (tile 0: rows wa0, wb0; tile 1, mt == 2: wa1, wb1)."""
    zeros, step, put = _chunk_tree(chunks, _q4k_chunk if mt == 1 else _q4k_chunk2, 4 * mt, False)
    block_step = _block_stepper(step, mt)

    @cuda.jit(device=True, inline=True)
    def walk(ra0, rb0, ra1, rb1, xa, c0, cols, n_x):
        wi, g, t, nb, nw, n32 = _lane(cols)
        acc = zeros()
        for b in range(wi, nb, warps):
            k0 = _q4k_block(ra0, rb0, b, nb, t)
            k1 = _q4k_block(ra1, rb1, b, nb, t) if mt == 2 else k0
            acc = block_step(acc, k0, k1, c0, xa, b, t, g, nw, n32, n_x)
        return acc

    return zeros, put, walk


@functools.lru_cache(maxsize=None)
def mma_rows_kernel3(mode: int, warps: int, chunks: int, mt: int):
    """mma_rows_kernel's form for latency (VERSION 3): a warp takes `mt` (1, 2)
    tiles of 16 weight rows, the activations' loads of a chunk shared between them; a block's
    words for all its sub-blocks loaded at once (_q4k_block); the chunks without a branch between
    them (rows past n_x computed on row n_x - 1), in one basic block, so that their loads and mma
    overlap (registers: mt x chunks <= 4 keeps them under 255 without spills, ptxas). Same sums
    as mma_rows_kernel, in the same order."""
    from ._jit import cuda_kernel
    assert chunks in (1, 2, 4, 8) and mode in (0, 1, 2) and mt in (1, 2)
    _, put, walk = _tiles_walker(warps, chunks, mt)
    finish = _finisher(mode, warps, chunks, put, mt)

    @cuda_kernel
    def _mma_rows3(o, w, e, xa, cols, n_x):
        g = (cuda.threadIdx.x % WARP) >> 2
        tile = mt * cuda.blockIdx.y              # this block's first 16-row tile
        c0 = chunks * cuda.blockIdx.x            # this block's first chunk of 8 activation rows
        top = 16 * (tile + mt - 1)               # (mt == 1: the same rows, never used)
        acc = walk(w[16 * tile + g], w[16 * tile + g + 8], w[top + g], w[top + g + 8], xa, c0,
                   cols, n_x)
        finish(o, e, acc, c0, tile, n_x)

    return _mma_rows3


@functools.lru_cache(maxsize=None)
def mma_rows_kernel3_many(mode: int, warps: int, chunks: int, mt: int):
    """mma_rows_kernel3 over up to three matrices of one input in one grid (Q, K, V): grid rows
    0 .. y1 - 1 take matrix 0's tiles, y1 .. y2 - 1 matrix 1's, the rest matrix 2's (its own
    output and extras); each block's sums are those of its matrix's own launch, the same bits."""
    from ._jit import cuda_kernel
    assert chunks in (1, 2, 4, 8) and mode in (0, 1, 2) and mt in (1, 2)
    _, put, walk = _tiles_walker(warps, chunks, mt)
    finish = _finisher(mode, warps, chunks, put, mt)

    @cuda_kernel
    def _mma_rows3_many(o0, o1, o2, w0, w1, w2, e0, e1, e2, xa, cols, n_x, y1, y2):
        g = (cuda.threadIdx.x % WARP) >> 2
        y = cuda.blockIdx.y
        c0 = chunks * cuda.blockIdx.x
        if y < y1:
            w, o, e, tile = w0, o0, e0, mt * y
        elif y < y2:
            w, o, e, tile = w1, o1, e1, mt * (y - y1)
        else:
            w, o, e, tile = w2, o2, e2, mt * (y - y2)
        top = 16 * (tile + mt - 1)
        acc = walk(w[16 * tile + g], w[16 * tile + g + 8], w[top + g], w[top + g + 8], xa, c0,
                   cols, n_x)
        finish(o, e, acc, c0, tile, n_x)

    return _mma_rows3_many


@functools.lru_cache(maxsize=None)
def mma_rows_kernel3_swiglu(warps: int, chunks: int):
    """o = silu(gate . x) * (up . x) for Q4_K gate and up (the same shape): a warp's two tiles are
    tile y of gate and tile y of up (mma_rows_kernel3 at mt = 2 over the pair), their sums those
    of each matrix's own launch, SwiGLU applied as silu_mul does (_swiglu_finisher)."""
    from ._jit import cuda_kernel
    assert chunks in (1, 2, 4, 8)
    _, put, walk = _tiles_walker(warps, chunks, 2)
    finish = _swiglu_finisher(warps, chunks, put)

    @cuda_kernel
    def _mma_rows3_swiglu(o, wg, wu, xa, cols, n_x):
        g = (cuda.threadIdx.x % WARP) >> 2
        tile = cuda.blockIdx.y
        c0 = chunks * cuda.blockIdx.x
        acc = walk(wg[16 * tile + g], wg[16 * tile + g + 8], wu[16 * tile + g],
                   wu[16 * tile + g + 8], xa, c0, cols, n_x)
        finish(o, acc, c0, tile, n_x)

    return _mma_rows3_swiglu


@cuda.jit(device=True, inline=True)
def _q6k_chunk(ch, p):
    """One Q6_K sub-block (16 values) with activation chunk ch: y += d sc (dx (q . qx) - 32 sx)."""
    a0, a1, sa, sb, xa, s16, t, g, nw, n32, n_x = p
    tg, t0, t1 = _chunk_rows(ch, g, t, n_x)
    b0 = xa[tg].view(np.uint32)[4 * s16 + t]
    c0, c1, c2, c3 = mma_s8_k16(a0, a1, b0, int32(0), int32(0), int32(0), int32(0))
    x0 = xa[t0]
    x1 = xa[t1]
    d0 = x0[nw + (s16 >> 1)]
    d1 = x1[nw + (s16 >> 1)]
    s0 = float32(32) * x0[nw + n32 + s16]
    s1 = float32(32) * x1[nw + n32 + s16]
    return (sa * (d0 * float32(c0) - s0), sa * (d1 * float32(c1) - s1),
            sb * (d0 * float32(c2) - s0), sb * (d1 * float32(c3) - s1))


@functools.lru_cache(maxsize=None)
def q6k_rows_kernel(mode: int, warps: int, chunks: int):
    """mma_rows_kernel for Q6_K, on the k = 16 form (mma_s8_k16): a Q6_K sub-block is 16 values
    with its own int8 scale. Values are q - 32 with q = 4 bits of ql | 2 bits of qh (0..63, an s8
    as it is): y[r, t] += d_r sc_r[s] (dx_t (q_r[s] . qx_t[s]) - 32 sx_t[s]). Per 16-byte group
    (n, v) of a block (gemv_q8._dot_q6_k's unit: ql bytes 64n + 16v .., qh bytes 32n + 16 (v % 2)
    .., fields v // 2 and v // 2 + 2), lane t's word t of each is A[g, 4t:4t+4] of sub-blocks
    8n + v (low nibbles) and 8n + v + 4 (high)."""
    from ._jit import cuda_kernel
    assert chunks in (1, 2, 4, 8) and mode in (0, 1, 2)
    three = uint32(0x03030303)
    zeros, step, put = _chunk_tree(chunks, _q6k_chunk)
    finish = _finisher(mode, warps, chunks, put)

    @cuda_kernel
    def _q6k_rows(o, w, w8, e, xa, cols, n_x):
        wi, g, t, nb, nw, n32 = _lane(cols)
        tile = cuda.blockIdx.y
        c0 = chunks * cuda.blockIdx.x            # this block's first chunk of 8 activation rows
        ra = w[16 * tile + g]
        rb = w[16 * tile + g + 8]
        ra8 = w8[16 * tile + g]
        rb8 = w8[16 * tile + g + 8]
        acc = zeros()
        for b in range(wi, nb, warps):
            da = _f16_half(ra[52 * nb + (b >> 1)], b & 1)
            db = _f16_half(rb[52 * nb + (b >> 1)], b & 1)
            for n in range(2):
                for v in range(4):
                    la = ra[32 * b + 16 * n + 4 * v + t]
                    lb = rb[32 * b + 16 * n + 4 * v + t]
                    qa = ra[32 * nb + 16 * b + 8 * n + 4 * (v & 1) + t]
                    qb = rb[32 * nb + 16 * b + 8 * n + 4 * (v & 1) + t]
                    for hi in range(2):
                        f = uint32(2 * (v >> 1) + 4 * hi)
                        s = 8 * n + v + 4 * hi                      # sub-block in the block
                        acc = step(acc, c0, n_x, (
                            ((la >> uint32(4 * hi)) & uint32(LO)) | (((qa >> f) & three) << uint32(4)),
                            ((lb >> uint32(4 * hi)) & uint32(LO)) | (((qb >> f) & three) << uint32(4)),
                            da * float32(int32(np.int8(ra8[192 * nb + 16 * b + s]))),
                            db * float32(int32(np.int8(rb8[192 * nb + 16 * b + s]))),
                            xa, 16 * b + s, t, g, nw, n32, n_x))
        finish(o, e, acc, c0, tile, n_x)

    return _q6k_rows


def chunks_for(n: int, cap: int = MAX_CHUNKS) -> int:
    """Chunks of 8 activation rows a block takes for n rows (a power of two, at most `cap`)."""
    return min(cap, MAX_CHUNKS, 1 << (-(-n // 8) - 1).bit_length())


def launch(w, outs, extras, xa, n: int, mode: int, stream) -> None:
    """out[:n] = w . xa's rows (+ extras per mode) on the tensor cores (`supported`)."""
    mt = 1
    if w.qtype == Q6_K:
        chunks = chunks_for(n)
        k = q6k_rows_kernel(mode, WARPS, chunks)
        args = (outs[0], dtype_view(w.data, np.uint32), w.data)
    elif VERSION == 3:
        mt = 2 if TILES >= 2 and w.rows % 32 == 0 else 1
        chunks = chunks_for(n, 4 // mt)               # registers: see mma_rows_kernel3
        k = mma_rows_kernel3(mode, WARPS, chunks, mt)
        args = (outs[0], dtype_view(w.data, np.uint32))
    else:
        chunks = chunks_for(n)
        k = mma_rows_kernel(mode, WARPS, chunks)
        args = (outs[0], dtype_view(w.data, np.uint32))
    args += (extras[0] if extras else outs[0], xa, np.int64(w.cols), np.int64(n))
    k[(-(-n // (8 * chunks)), w.rows // (16 * mt)), WARPS * WARP, stream](*args)


def mergeable(ws) -> bool:
    """Whether launch_many / launch_swiglu take these matrices (MERGE, VERSION 3, Q4_K, one
    width, each `supported`)."""
    return MERGE and VERSION == 3 and len({(w.qtype, w.cols) for w in ws}) == 1 and \
        ws[0].qtype == Q4_K


def launch_many(ws, outs, extras, xa, n: int, mode: int, stream) -> None:
    """launch() for each of 2 or 3 matrices (`mergeable`) of one input, in one grid."""
    assert 2 <= len(ws) <= 3 and mergeable(ws)
    mt = 2 if TILES >= 2 and all(w.rows % 32 == 0 for w in ws) else 1
    chunks = chunks_for(n, 4 // mt)
    ys = [w.rows // (16 * mt) for w in ws]
    k = mma_rows_kernel3_many(mode, WARPS, chunks, mt)
    pad = 3 - len(ws)                         # a pair: its second matrix's grid rows go on to y2
    os_ = list(outs[:len(ws)]) + [outs[len(ws) - 1]] * pad
    wv = [dtype_view(w.data, np.uint32) for w in ws]
    wv += [wv[-1]] * pad
    es = list(extras[:len(ws)]) if extras else list(os_[:len(ws)])
    es += [es[-1]] * pad
    y1 = ys[0]
    y2 = ys[0] + ys[1] if len(ws) == 3 else sum(ys)
    k[(-(-n // (8 * chunks)), sum(ys)), WARPS * WARP, stream](
        *os_, *wv, *es, xa, np.int64(ws[0].cols), np.int64(n), np.int64(y1), np.int64(y2))


def launch_swiglu(out, w_gate, w_up, xa, n: int, stream) -> None:
    """out[:n] = silu(w_gate . x) * (w_up . x) for xa's rows, one launch (`mergeable`, one
    shape): the bits of two launch() calls and silu_mul."""
    assert mergeable([w_gate, w_up]) and w_gate.rows == w_up.rows
    chunks = chunks_for(n, 2)
    k = mma_rows_kernel3_swiglu(WARPS, chunks)
    k[(-(-n // (8 * chunks)), w_gate.rows // 16), WARPS * WARP, stream](
        out, dtype_view(w_gate.data, np.uint32), dtype_view(w_up.data, np.uint32), xa,
        np.int64(w_gate.cols), np.int64(n))


def supported(qtype: int, rows: int, cols: int, n: int, mode: int) -> bool:
    return qtype in TYPES and rows % 16 == 0 and 16 <= rows <= 16 * 65535 and \
        cols % 256 == 0 and 1 <= n <= MAX_ROWS and mode < 3
