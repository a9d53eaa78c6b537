"""Prefill products on widened weights: a matrix dequantized once per pass into a bf16 scratch
(`widen`), then a plain bf16 tensor-core GEMM (`gemm`) whose two operands both arrive in shared
memory by cp.async, with nothing but ldmatrix and mma.sync between the barriers.

Why: matmul_mma.gemm dequantizes a weight tile once per BM tokens inside the GEMM, and that integer
and FP32 work beside the mma held it to 22-29 % of the mma.sync peak (H200, 2026-12-02: 135-182
TFLOP/s at Q4_K, and 117 for F16 weights, which only convert). Widening a matrix costs one read of
its quantized bytes and a write and a read of 2 bytes a weight (4096 x 14336 Q4_K: ~150 MB, ~35 us
at the copy bandwidth) against ~400 us of mma work for 512 tokens, so a pass of enough tokens
(WIDE_MIN_TOKENS) takes it. llama.cpp does the same for its non-MMQ types (dequantize to f16, then
cuBLAS).

Same bits: `widen` writes the very bf16 values matmul_mma's decoders produce inside its GEMM (the
same decoders on the same GGUF-order blocks staged in shared memory), and `gemm` adds the products
up in the same mma.sync sequence along the shared dimension (k16 steps in order, one accumulator
chain per output) with the same epilogues (matmul_mma.tile_functions), so its output is bitwise
matmul_mma.gemm's: which path a pass takes does not change a token's logits.

widen: block (bx, u) stages weight rows bx*WIDEN_ROWS .. of raw unit u (256 values: a K-quant
block or 8 small ones) in GGUF order by cp.async (matmul_mma.stage_plan), then each thread
decodes 16-value pieces (consecutive threads: consecutive pieces of a row) and stores each as two
16-byte words.

gemm: block tile BM tokens x BN weight rows of WM x WN warps (matmul_mma's warp tiles and
swizzle), the shared dimension in k-tiles of BK values through STAGES shared-memory stages of
both operands. Per k-tile t, one barrier:

    wait for this thread's copies of tile t (cp.async.wait_group STAGES-2), barrier: tile t is
        there for every thread, and every warp is done with tile t-1's stage
    cp.async tile t+STAGES-1 into tile t-1's stage, commit
    mma tile t
"""
from __future__ import annotations

import functools
import os

import numpy as np
from numba import cuda, float32, int64, uint32

from ._sim import SIMULATOR
from .launch import dtype_view
from .matmul_mma import (EPILOGUES, MAX_SMEM, cached_kernel, decoder, plane_offset_function,
                         stage_plan, tile_functions)
from .mma import cp_async16, cp_async_commit, cp_async_wait, store_u32x4

# On by default on a GPU for passes of WIDE_MIN_TOKENS tokens or more (NUMBAFORMER_WIDE=0/1
# overrides; the simulator's tests call it directly). A matrix (SwiGLU: the gate and up pair)
# widens only when its bf16 copy takes at most WIDE_MAX_BYTES, so the output head of a large
# vocabulary stays on the in-kernel path.
ENABLED = os.environ.get("NUMBAFORMER_WIDE", "0" if SIMULATOR else "1") == "1"
WIDE_MIN_TOKENS = int(os.environ.get("NUMBAFORMER_WIDE_MIN_TOKENS", "256"))
WIDE_MAX_BYTES = int(os.environ.get("NUMBAFORMER_WIDE_MAX_MB", "512")) << 20
# Up to RESIDENT_BYTES of widened matrices (first used, first kept) stay on the device after their
# first pass, so later passes launch no widen for them: for a small model (SmolLM2: 270 MB in
# all) every widen of a prefill; off by default until a GPU run times it (NUMBAFORMER_WIDE_RESIDENT_MB).
RESIDENT_BYTES = int(os.environ.get("NUMBAFORMER_WIDE_RESIDENT_MB", "0")) << 20
# (BM, BN, WM, WN, BK, STAGES) per block, largest first: a launch takes the first whose grid has
# at least WIDE_FILL blocks per SM, else the last. H200, Q4_K weights widened, 512 tokens
# (scripts/gpu_wide_check.py, 2026-12-03; TFLOP/s of the GEMM alone, the bf16 mma.sync peak 622):
# 14336 x 4096 256x128x4x4/32/3 237 (128x128x4x4/64/3 214, 128x128x2x4/32/4 178); 4096 x 14336
# 128x128x4x4/64/3 259 (64x64-value warp tiles on 8 warps 110-150: one block an SM); 4096 x 4096
# 233; 1024 x 4096 64x128x2x4/32/4 87 (the 128-token tiles 51-62: 32 blocks).
WIDE_TILES = ((256, 128, 4, 4, 32, 3), (128, 128, 4, 4, 64, 3), (64, 128, 2, 4, 32, 4))
WIDE_FILL = 0.9
WIDE_MIN_BLOCKS = 1
WIDEN_ROWS = 32            # weight rows a widen block
WIDEN_THREADS = 128
WIDEN_VALUES = 256         # values of a row a widen block (one raw unit)


# --- widen: the GPU layout -> bf16 rows ---------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _widen_kernel(qtype: int, rows_blk: int, threads: int):
    plan = stage_plan(qtype, WIDEN_VALUES)
    decode = decoder(qtype)
    nbu, cpb, bs = plan["nbu"], plan["cpb"], plan["bs"]
    UB, P, SHIFT = plan["unit"], plan["pitch"], plan["shift"]
    lens = plan["lens"]
    a_plane, a_dst, a_len = plan["a_plane"], plan["a_dst"], plan["a_len"]
    s_plane, s_dst, s_len = plan["s_plane"], plan["s_dst"], plan["s_len"]
    n_async, n_sync = len(a_plane), len(plan["sync"])
    PIECES = WIDEN_VALUES // 16                 # 16-value pieces of a row in a unit

    plane_offset = plane_offset_function(lens)

    @cached_kernel(threads, 1)
    def _widen(wb, w, wh, row0):
        """wb (R, cols / 2) uint32, bf16 pairs: its rows row0 .. row0 + rows - 1 = the rows of w
        (rows, pitch) uint8 in the GPU layout (wh: the same as uint16), dequantized. Block (bx, u):
        rows bx * rows_blk .., values 256 u ..; thread q of the decoding: row q // 16, piece
        q % 16 (16 values: 32 bytes, two 16-byte stores)."""
        sm = cuda.shared.array(0, uint32)
        rs8 = sm.view(np.uint8)
        rs16 = sm.view(np.uint16)
        wv = cuda.local.array(8, uint32)
        tid = cuda.threadIdx.x
        bx = cuda.blockIdx.x
        u = cuda.blockIdx.y
        rows = w.shape[0]
        cols = 2 * wb.shape[1]
        nb = cols // bs
        kb = u * nbu
        for k in range(n_async):                # 16-byte planes (quants), by cp.async
            ln = a_len[k]
            off = plane_offset(a_plane[k], nb) + kb * ln
            cpr = nbu * ln // 16
            for q in range(tid, rows_blk * cpr, threads):
                rho = q // cpr
                c = q - rho * cpr
                i = (16 * c) // ln
                r = bx * rows_blk + rho
                if kb + i < nb and r < rows:
                    cp_async16(sm, (rho * UB + i * P + a_dst[k] + 16 * c - i * ln) // 16, w,
                               (r * w.shape[1] + off) // 16 + c)
        for k in range(n_sync):                 # short planes (d, scales), 2 bytes an item
            ln = s_len[k]
            off = (plane_offset(s_plane[k], nb) + kb * ln) // 2
            per_row = nbu * ln // 2
            for q in range(tid, rows_blk * per_row, threads):
                rho = q // per_row
                c = q - rho * per_row
                i = (2 * c) // ln
                r = bx * rows_blk + rho
                if kb + i < nb and r < rows:
                    rs16[(rho * UB + i * P + s_dst[k] + 2 * c - i * ln) // 2] = wh[r, off + c]
        cp_async_commit()
        cp_async_wait(0)
        cuda.syncthreads()                      # the unit's blocks are in shared memory
        for q in range(tid, rows_blk * PIECES, threads):
            rho = q // PIECES
            pc = q - rho * PIECES
            r = bx * rows_blk + rho
            col = u * WIDEN_VALUES + 16 * pc
            if r < rows and col < cols:
                c32 = pc >> 1
                i = c32 // cpb
                decode(sm, rs8, rs16, rho * UB + SHIFT + i * P, c32 - i * cpb, pc & 1, wv)
                o = ((row0 + r) * cols + col) // 8
                store_u32x4(wb, o, wv[0], wv[1], wv[2], wv[3])
                store_u32x4(wb, o + 1, wv[4], wv[5], wv[6], wv[7])

    return _widen


def widen(wb, w, stream, row0: int = 0) -> None:
    """wb (R, cols) uint16 device array: rows row0 .. row0 + w.rows - 1 = bf16 of W's rows (W a
    QTensor on the device in the GPU layout), as matmul_mma's decoders round them."""
    if wb.ndim != 2 or wb.shape[1] != w.cols or row0 < 0 or row0 + w.rows > wb.shape[0] \
            or w.cols % 32:
        raise ValueError(f"widen: {w.rows} x {w.cols} weights into rows {row0}.. of {wb.shape}")
    k = _widen_kernel(w.qtype, WIDEN_ROWS, WIDEN_THREADS)
    smem = WIDEN_ROWS * stage_plan(w.qtype, WIDEN_VALUES)["unit"]
    grid = (-(-w.rows // WIDEN_ROWS), -(-w.cols // WIDEN_VALUES))
    k[grid, WIDEN_THREADS, stream, smem](dtype_view(wb, np.uint32), w.data,
                                         dtype_view(w.data, np.uint16), np.int64(row0))


def widen_pair(wb, w, stream, up=None) -> None:
    """wb's rows = W's widened rows, then SwiGLU's up's after them (what gemm(swiglu=True) reads)."""
    widen(wb, w, stream)
    if up is not None:
        widen(wb, up, stream, w.rows)


# --- the GEMM on bf16 weights -------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _gemm_kernel(bm: int, bn: int, bk: int, wm: int, wn: int, stages: int, epilogue: int,
                 min_blocks: int):
    threads = 32 * wm * wn
    wtm, wtn = bm // wm, bn // wn
    MT, NT = wtm // 16, wtn // 8
    assert MT >= 1 and NT >= 2 and NT % 2 == 0 and bk % 32 == 0 and stages >= 2, \
        (bm, bn, bk, wm, wn, stages)
    swz, tile_row, mma_tile, finish, x_plan, stage = tile_functions(bm, bn, bk, wm, wn,
                                                                    epilogue, 0)
    CPR = bk // 8                               # 16-byte chunks per tile row
    ACC = MT * NT * 4
    AF = 4 * MT
    S = stages
    WAIT = S - 2                                # cp.async groups that may stay pending
    X_WORDS = S * bm * bk // 2
    X_ITERS = -(-bm * CPR // threads)
    W_ITERS = -(-bn * CPR // threads)
    swiglu = epilogue == 3

    @cached_kernel(threads, min_blocks)
    def _gemm(out, wb, xb, extra, rows):
        """out (n, rows) f32 for one bm-token x bn-row tile: xb (n, cols) uint16 bf16 activations,
        wb (R, cols) uint16 bf16 weights (SwiGLU: gate rows 0 .. rows-1, up rows rows ..
        2 rows-1), extra: bias (rows,) or residual (n, rows)."""
        sm = cuda.shared.array(0, uint32)
        xs = sm[:X_WORDS]
        ws = sm[X_WORDS:]
        acc = cuda.local.array(ACC, float32)
        af = cuda.local.array(AF, uint32)
        xdst = cuda.local.array(X_ITERS, int64)
        xsrc = cuda.local.array(X_ITERS, int64)
        xcol = cuda.local.array(X_ITERS, int64)
        wdst = cuda.local.array(W_ITERS, int64)
        wsrc = cuda.local.array(W_ITERS, int64)
        wcol = cuda.local.array(W_ITERS, int64)
        tid = cuda.threadIdx.x
        lane = tid % 32
        wmi = (tid // 32) % wm
        wni = (tid // 32) // wm
        bx = cuda.blockIdx.x
        m0 = cuda.blockIdx.y * bm
        n_tok = xb.shape[0]
        cols = xb.shape[1]
        cols8 = cols // 8
        n_tiles = (cols + bk - 1) // bk
        for i in range(ACC):
            acc[i] = float32(0)
        x_plan(xdst, xsrc, xcol, m0, n_tok, cols, tid)   # this thread's chunks of every x tile
        for it in range(W_ITERS):               # ... and of every weight tile
            q = tid + it * threads
            rho = q // CPR
            c = q - rho * CPR
            half, r = tile_row(rho, bx, rows)
            wdst[it] = swz(rho, c) if q < bn * CPR else -1
            wsrc[it] = (r + half * rows if swiglu else r) * cols8 + c
            wcol[it] = c
        for s in range(S - 1):                  # prologue: tiles 0 .. S-2, a group each
            if s < n_tiles:
                stage(xs, s * bm * CPR, xb, xdst, xsrc, xcol, X_ITERS, s * CPR, cols8)
                stage(ws, s * bn * CPR, wb, wdst, wsrc, wcol, W_ITERS, s * CPR, cols8)
            cp_async_commit()
        read = 0                                # stage of tile t
        write = S - 1                           # stage of tile t + S - 1
        for t in range(n_tiles):
            cp_async_wait(WAIT)
            cuda.syncthreads()                  # tile t landed for all; tile t-1's stage free
            nxt = t + S - 1
            if nxt < n_tiles:
                stage(xs, write * bm * CPR, xb, xdst, xsrc, xcol, X_ITERS, nxt * CPR, cols8)
                stage(ws, write * bn * CPR, wb, wdst, wsrc, wcol, W_ITERS, nxt * CPR, cols8)
            cp_async_commit()
            mma_tile(xs, ws, read, read, acc, af, wmi, wni, lane)
            read = read + 1 if read + 1 < S else 0
            write = write + 1 if write + 1 < S else 0
        finish(out, extra, acc, m0, bx, wmi, wni, lane, n_tok, rows)

    return _gemm


def smem_bytes(bm: int, bn: int, bk: int, stages: int) -> int:
    return stages * 2 * (bm + bn) * bk


def pick_tile(n: int, rows_out: int, swiglu: bool, n_sms: int):
    """The first of WIDE_TILES whose grid has >= WIDE_FILL blocks per SM, else the last."""
    for tile in WIDE_TILES:
        per = tile[1] // 2 if swiglu else tile[1]
        if -(-rows_out // per) * -(-n // tile[0]) >= WIDE_FILL * n_sms:
            return tile
    return WIDE_TILES[-1]


def gemm(out, xb, wb, rows: int, stream, *, bias=None, residual=None, swiglu: bool = False,
         tile=None) -> None:
    """out (n, rows) f32 = xb (n, cols) bf16 (uint16) @ wb[:rows].T, wb (R, cols) uint16 bf16
    weights (widen's), + bias (rows,) | + residual (n, rows) (may be `out`) | SwiGLU: out =
    silu(x @ wb[:rows].T) * (x @ wb[rows:2 rows].T). tile: (bm, bn, wm, wn, bk, stages) instead
    of pick_tile's; WIDE_MIN_BLOCKS is read at each call."""
    from .gemv import _n_sms
    from .matmul import _opt_in
    n, cols = xb.shape
    if wb.shape[1] != cols or cols % 32 or wb.shape[0] < rows * (2 if swiglu else 1) \
            or out.shape != (n, rows):
        raise ValueError(f"wide GEMM: x {xb.shape}, weights {wb.shape}, {rows} rows, out "
                         f"{out.shape}")
    epilogue = EPILOGUES["swiglu" if swiglu else "bias" if bias is not None
                         else "residual" if residual is not None else "store"]
    bm, bn, wm, wn, bk, stages = tile or pick_tile(n, rows, swiglu, _n_sms())
    smem = smem_bytes(bm, bn, bk, stages)
    if smem > MAX_SMEM:
        raise ValueError(f"wide GEMM tile {bm}x{bn}x{bk} ({stages} stages) needs {smem} bytes "
                         f"of shared memory, over {MAX_SMEM}")
    k = _gemm_kernel(bm, bn, bk, wm, wn, stages, epilogue, WIDE_MIN_BLOCKS)
    extra = bias if bias is not None else residual if residual is not None else out
    args = (out, wb, xb, extra, np.int64(rows))
    _opt_in(k, smem, *args)
    per = bn // 2 if swiglu else bn
    k[(-(-rows // per), -(-n // bm)), 32 * wm * wn, stream, smem](*args)


def takes(n: int, w, up=None) -> bool:
    """Whether a pass of n tokens through W (and SwiGLU's up) takes the widened path."""
    return ENABLED and n >= WIDE_MIN_TOKENS and \
        2 * w.rows * w.cols * (2 if up is not None else 1) <= WIDE_MAX_BYTES
