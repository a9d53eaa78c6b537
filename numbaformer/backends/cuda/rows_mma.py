"""A batched step's decode rows on the s8 tensor cores (Q4_K, Q6_K; gemv.ROWS_MMA, off until timed).

The many-rows mat-vec (gemv_q8.rows_kernel) pays each activation row the whole per-unit arithmetic
of the one-row kernel: its time grows almost as fast as the rows. Here the rows share it:
`mma.sync.m16n8k32.s8` multiplies a fragment of 16 weight rows x 32 values by 8 activation rows
in one instruction, the 32 values being one Q4_K sub-block, so the s32 sums only need the
sub-block's scale and min afterwards:

    y[r, t] += d_r sc_r[s] dx_t[s] (q_r[s] . qx_t[s])  -  dmin_r m_r[s] sx_t[s]

(dx, qx: the activations' q8 scale and values of sub-block s, sx their d-scaled sum; the xa rows
of gemv.quantize_rows). A warp takes 16 weight rows (a grid stride over tiles of 16) and all the
activation rows (chunks of 8, `chunks` of them), walking the blocks of the rows: per block, each
lane loads the header (d, dmin, 12 scale bytes) of its two rows (g and g + 8, g = lane // 4) and,
per pair of sub-blocks, the two words of each row that are its A fragment (PTX layout, mma.py:
bytes 4t .. and 16 + 4t .. of the sub-block pair's 32 bytes: low nibbles are sub-block 2j, high
nibbles 2j + 1), and the B fragment of activation row g of each chunk; C's four values are rows g,
g + 8 of activation rows 2t, 2t + 1. Activation rows past n_x read row n_x - 1 and are not
stored. The sums are the same numbers as the dp4a kernel's, added in another order: within
float32 rounding of them (tests/test_cuda_ops.py).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32, int32, uint32

from ...quants import Q4_K, Q6_K
from .gemv_q8 import LO, _f16_half, _scales_pair
from .intrinsics import load_u32x4
from .mma import mma_s8, mma_s8_k16
from .reduce import WARP

TYPES = (Q4_K, Q6_K)
MAX_ROWS = 64             # activation rows of a launch (a grid row per 16)


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


@cuda.jit(device=True, inline=True)
def _add4(a0, a1, a2, a3, d):
    """A lane's four C accumulators plus a chunk's increments d."""
    return a0 + d[0], a1 + d[1], a2 + d[2], a3 + d[3]


@cuda.jit(device=True, inline=True)
def _store(o, e, t, r, acc, mode, n_x):
    if t < n_x:
        if mode == 1:
            acc += e[r]
        elif mode == 2:
            acc += e[t, r]
        o[t, r] = acc


@functools.lru_cache(maxsize=None)
def mma_rows_kernel(mode: int, warps: int, chunks: int):
    """out[t, r] = w[r] . x[t] (+ bias e[r] in mode 1, + residual e[t, r] in mode 2) for Q4_K rows
    (GPU layout, a multiple of 16) and up to 8 `chunks` activation rows (module docstring)."""
    from ._jit import cuda_kernel
    assert 1 <= chunks <= 2 and mode in (0, 1, 2)

    @cuda.jit(device=True, inline=True)
    def chunk(ch, a0, a1, a2, a3, sa, sb, ma, mb, xa, n_x, t, g, wq, sub, nw, n32):
        """One sub-block's product with activation chunk ch: the four C values' increments."""
        tg, t0, t1 = _chunk_rows(ch, g, t, n_x)
        xq = xa[tg].view(np.uint32)
        b0 = xq[wq]
        b1 = xq[wq + 4]
        c0, c1, c2, c3 = mma_s8(a0, a1, a2, a3, b0, b1, int32(0), int32(0), int32(0), int32(0))
        x0 = xa[t0]
        x1 = xa[t1]
        d0 = x0[nw + sub]
        d1 = x1[nw + sub]
        s0 = x0[nw + n32 + 2 * sub] + x0[nw + n32 + 2 * sub + 1]
        s1 = x1[nw + n32 + 2 * sub] + x1[nw + n32 + 2 * sub + 1]
        return (sa * d0 * float32(c0) - ma * s0, sa * d1 * float32(c1) - ma * s1,
                sb * d0 * float32(c2) - mb * s0, sb * d1 * float32(c3) - mb * s1)

    @cuda_kernel
    def _mma_rows(o, w, e, xa, cols, n_x):
        wi, g, t, nb, nw, n32 = _lane(cols)
        n_tiles = w.shape[0] // 16
        c0 = 2 * cuda.blockIdx.y                 # this block's chunks of 8 activation rows
        for tile in range(cuda.blockIdx.x * warps + wi, n_tiles, cuda.gridDim.x * warps):
            ra = w[16 * tile + g]
            rb = w[16 * tile + g + 8]
            p0 = p1 = p2 = p3 = float32(0)
            q0 = q1 = q2 = q3 = float32(0)
            for b in range(nb):
                ha0, ha1, ha2, ha3 = load_u32x4(ra, 8 * nb + b)
                hb0, hb1, hb2, hb3 = load_u32x4(rb, 8 * nb + b)
                da = _f16_half(ha0, 0)
                db = _f16_half(hb0, 0)
                dma = _f16_half(ha0, 1)
                dmb = _f16_half(hb0, 1)
                for gp in range(4):
                    wa0 = ra[32 * b + 8 * gp + t]
                    wa1 = ra[32 * b + 8 * gp + 4 + t]
                    wb0 = rb[32 * b + 8 * gp + t]
                    wb1 = rb[32 * b + 8 * gp + 4 + t]
                    sca, mna = _scales_pair(ha1, ha2, ha3, gp)
                    scb, mnb = _scales_pair(hb1, hb2, hb3, gp)
                    for j in range(2):
                        sh = uint32(4 * j)
                        a0 = (wa0 >> sh) & uint32(LO)
                        a1 = (wb0 >> sh) & uint32(LO)
                        a2 = (wa1 >> sh) & uint32(LO)
                        a3 = (wb1 >> sh) & uint32(LO)
                        sa = da * _sub(sca, j)
                        sb = db * _sub(scb, j)
                        ma = dma * _sub(mna, j)
                        mb = dmb * _sub(mnb, j)
                        sub = 8 * b + 2 * gp + j
                        wq = 8 * sub + t
                        p0, p1, p2, p3 = _add4(p0, p1, p2, p3, chunk(
                            c0, a0, a1, a2, a3, sa, sb, ma, mb, xa, n_x, t, g, wq, sub, nw, n32))
                        if chunks > 1:
                            q0, q1, q2, q3 = _add4(q0, q1, q2, q3, chunk(
                                c0 + 1, a0, a1, a2, a3, sa, sb, ma, mb, xa, n_x, t, g, wq, sub, nw,
                                n32))
            _store_tile(o, e, 8 * c0, t, 16 * tile + g, p0, p1, p2, p3, q0, q1, q2, q3, mode,
                        n_x, chunks)

    return _mma_rows


@functools.lru_cache(maxsize=None)
def q6k_rows_kernel(mode: int, warps: int, chunks: int):
    """mma_rows_kernel for Q6_K, on the k = 16 form (mma_s8_k16): a Q6_K sub-block is 16 values
    with its own int8 scale. Values are q - 32 with q = 4 bits of ql | 2 bits of qh (0..63, an s8
    as it is): y[r, t] += d_r sc_r[s] (dx_t (q_r[s] . qx_t[s]) - 32 sx_t[s]). Per 16-byte group
    (n, v) of a block (gemv_q8._dot_q6_k's unit: ql bytes 64n + 16v .., qh bytes 32n + 16 (v % 2)
    .., fields v // 2 and v // 2 + 2), lane t's word t of each is A[g, 4t:4t+4] of sub-blocks
    8n + v (low nibbles) and 8n + v + 4 (high)."""
    from ._jit import cuda_kernel
    assert 1 <= chunks <= 2 and mode in (0, 1, 2)
    three = uint32(0x03030303)

    @cuda.jit(device=True, inline=True)
    def chunk(ch, a0, a1, sa, sb, xa, n_x, t, g, wq, s16, nw, n32):
        tg, t0, t1 = _chunk_rows(ch, g, t, n_x)
        b0 = xa[tg].view(np.uint32)[wq]
        c0, c1, c2, c3 = mma_s8_k16(a0, a1, b0, int32(0), int32(0), int32(0), int32(0))
        x0 = xa[t0]
        x1 = xa[t1]
        d0 = x0[nw + (s16 >> 1)]
        d1 = x1[nw + (s16 >> 1)]
        s0 = float32(32) * x0[nw + n32 + s16]
        s1 = float32(32) * x1[nw + n32 + s16]
        return (sa * (d0 * float32(c0) - s0), sa * (d1 * float32(c1) - s1),
                sb * (d0 * float32(c2) - s0), sb * (d1 * float32(c3) - s1))

    @cuda_kernel
    def _q6k_rows(o, w, w8, e, xa, cols, n_x):
        wi, g, t, nb, nw, n32 = _lane(cols)
        n_tiles = w.shape[0] // 16
        c0 = 2 * cuda.blockIdx.y                 # this block's chunks of 8 activation rows
        for tile in range(cuda.blockIdx.x * warps + wi, n_tiles, cuda.gridDim.x * warps):
            ra = w[16 * tile + g]
            rb = w[16 * tile + g + 8]
            ra8 = w8[16 * tile + g]
            rb8 = w8[16 * tile + g + 8]
            p0 = p1 = p2 = p3 = float32(0)
            q0 = q1 = q2 = q3 = float32(0)
            for b in range(nb):
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
                            a0 = ((la >> uint32(4 * hi)) & uint32(LO)) | \
                                (((qa >> f) & three) << uint32(4))
                            a1 = ((lb >> uint32(4 * hi)) & uint32(LO)) | \
                                (((qb >> f) & three) << uint32(4))
                            s = 8 * n + v + 4 * hi                      # sub-block in the block
                            sa = da * float32(int32(np.int8(ra8[192 * nb + 16 * b + s])))
                            sb = db * float32(int32(np.int8(rb8[192 * nb + 16 * b + s])))
                            s16 = 16 * b + s
                            wq = 4 * s16 + t
                            p0, p1, p2, p3 = _add4(p0, p1, p2, p3, chunk(
                                c0, a0, a1, sa, sb, xa, n_x, t, g, wq, s16, nw, n32))
                            if chunks > 1:
                                q0, q1, q2, q3 = _add4(q0, q1, q2, q3, chunk(
                                    c0 + 1, a0, a1, sa, sb, xa, n_x, t, g, wq, s16, nw, n32))
            _store_tile(o, e, 8 * c0, t, 16 * tile + g, p0, p1, p2, p3, q0, q1, q2, q3, mode,
                        n_x, chunks)

    return _q6k_rows


@cuda.jit(device=True, inline=True)
def _store_tile(o, e, base, t, r0, p0, p1, p2, p3, q0, q1, q2, q3, mode, n_x, chunks):
    """A lane's C values of a tile: rows r0, r0 + 8 of activation rows base + 2t, base + 2t + 1
    (p) and, with two chunks, base + 8 + 2t, base + 9 + 2t (q)."""
    _store(o, e, base + 2 * t, r0, p0, mode, n_x)
    _store(o, e, base + 2 * t + 1, r0, p1, mode, n_x)
    _store(o, e, base + 2 * t, r0 + 8, p2, mode, n_x)
    _store(o, e, base + 2 * t + 1, r0 + 8, p3, mode, n_x)
    if chunks > 1:
        _store(o, e, base + 8 + 2 * t, r0, q0, mode, n_x)
        _store(o, e, base + 9 + 2 * t, r0, q1, mode, n_x)
        _store(o, e, base + 8 + 2 * t, r0 + 8, q2, mode, n_x)
        _store(o, e, base + 9 + 2 * t, r0 + 8, q3, mode, n_x)


def launch(w, outs, extras, xa, n: int, mode: int, warps: int, stream, grid_cap) -> None:
    """out[:n] = w . xa's rows (+ extras per mode) on the tensor cores (`supported`)."""
    chunks = 1 if n <= 8 else 2             # per block; grid rows of 16 activation rows beyond
    if w.qtype == Q6_K:
        k = q6k_rows_kernel(mode, warps, chunks)
        args = (outs[0], w.data.view(np.uint32), w.data)
    else:
        k = mma_rows_kernel(mode, warps, chunks)
        args = (outs[0], w.data.view(np.uint32))
    args += (extras[0] if extras else outs[0], xa, np.int64(w.cols), np.int64(n))
    grid = max(1, min(-(-w.rows // (16 * warps)), grid_cap(k, warps * WARP, 0)))
    k[(grid, -(-n // 16)), warps * WARP, stream](*args)


def supported(qtype: int, rows: int, cols: int, n: int, mode: int) -> bool:
    return qtype in TYPES and rows % 16 == 0 and cols % 256 == 0 and 1 <= n <= MAX_ROWS and \
        mode < 3
