"""The fast decode mat-vec: weights in the GPU layout (layout.py), activations as 8-bit integers.

Activations (the prologue, once per block into shared memory): x' (rmsnorm(x) * w when fused) is
quantized per 32 values as llama.cpp's q8_1: d = max|x| / 127, q = rint(x / d) in int8, packed four
to a word (xq), with d per 32 values (xd) and d * sum(q) per 16 values (xs, for the min and offset
terms). The error this makes is bounded by the tests and measured against the exact path (f32
activations, gemv.py's staged path) on whole models.

Rows: a warp takes two rows at a time; lane l reads the 16-byte units l, l + 32, .. of each row's q
plane (one aligned LDG.128 each, the warp's loads coalesced), UNROLL units per row in flight before
any is used. A unit is 32 values of a 4-bit plane (16 of Q8_0); its dot with the activations is
dp4a on nibbles masked four at a time, so a weight byte costs about one integer instruction. The
unit's scale bytes, high bits and f16 d/min come from the other planes of the row (small loads,
coalesced across lanes), and its activations from shared memory as 16-byte loads.

One `_unit_<type>(w0, w1, w2, w3, row, row8, u, nb, xq, xd, xs)` per type returns the unit's float
partial dot; UNITS maps a type to it and its units per block.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, int32, uint32

from ...quants import Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from .intrinsics import (dp4a, f16_bits_to_f32, load_f32x4, load_u32x4, load_u32x4_shared,
                         shfl_xor_sync)
from .reduce import FULL_MASK, WARP, block_sum

UNROLL = 4                    # units per row each lane has in flight
LO = 0x0F0F0F0F


def smem_words(cols: int) -> int:
    """Shared 32-bit words of the staged activations: xq (cols/4), xd (cols/32), xs (cols/16)."""
    return cols // 4 + cols // 32 + cols // 16


@cuda.jit(device=True, inline=True)
def _i8(v):
    return uint32(v) & uint32(0xFF)


@cuda.jit(device=True)
def stage_q8(sm, x, norm_w, eps, norm, red, threads):
    """x (1, cols) f32 -> the q8 activations in sm (module docstring); with `norm`, of
    rmsnorm(x) * norm_w. Thread t takes words t, t + threads, ..: 4 values each, 8 threads per 32
    values (a group's amax and 16-sums by shuffles within the 8; every lane runs the shuffles)."""
    tid = cuda.threadIdx.x
    cols = x.shape[1]
    nw = cols // 4
    xq = sm[:nw].view(np.uint32)
    xd = sm[nw:nw + cols // 32]
    xs = sm[nw + cols // 32:]
    xr = x[0]
    scale = float32(1)
    if norm:
        ss = float32(0)
        for i in range(tid, cols, threads):
            ss += xr[i] * xr[i]
        ss = block_sum(ss, red)
        scale = float32(1) / math.sqrt(ss / float32(cols) + eps)
    for base in range(0, nw, threads):
        w = base + tid
        v0 = v1 = v2 = v3 = float32(0)
        if w < nw:
            v0, v1, v2, v3 = load_f32x4(xr, w)
            if norm:
                n0, n1, n2, n3 = load_f32x4(norm_w, w)
                v0 = (v0 * scale) * n0
                v1 = (v1 * scale) * n1
                v2 = (v2 * scale) * n2
                v3 = (v3 * scale) * n3
        amax = max(max(abs(v0), abs(v1)), max(abs(v2), abs(v3)))
        for off in (1, 2, 4):
            amax = max(amax, shfl_xor_sync(FULL_MASK, amax, off))
        d = amax / float32(127)
        inv = float32(1) / d if d > 0 else float32(0)
        q0 = int32(round(v0 * inv))
        q1 = int32(round(v1 * inv))
        q2 = int32(round(v2 * inv))
        q3 = int32(round(v3 * inv))
        s = q0 + q1 + q2 + q3
        s += shfl_xor_sync(FULL_MASK, s, 1)
        s += shfl_xor_sync(FULL_MASK, s, 2)
        if w < nw:
            xq[w] = _i8(q0) | (_i8(q1) << uint32(8)) | (_i8(q2) << uint32(16)) | \
                (_i8(q3) << uint32(24))
            if w % 4 == 0:
                xs[w // 4] = d * float32(s)
            if w % 8 == 0:
                xd[w // 8] = d


@cuda.jit(device=True, inline=True)
def _dot16(w0, w1, w2, w3, xq, xw):
    """sum of 16 int8 products: bytes of w0..w3 with activation words xw .. xw+3 (xw % 4 == 0)."""
    a, b, c, d = load_u32x4_shared(xq, xw >> 2)
    return dp4a(w3, d, dp4a(w2, c, dp4a(w1, b, dp4a(w0, a, 0))))


@cuda.jit(device=True, inline=True)
def _nib_dot(w0, w1, w2, w3, xq, xw_lo, xw_hi):
    """(low-nibble dot with words xw_lo.., high-nibble dot with words xw_hi..) of a 16-byte unit."""
    m = uint32(LO)
    s = uint32(4)
    lo = _dot16(w0 & m, w1 & m, w2 & m, w3 & m, xq, xw_lo)
    hi = _dot16((w0 >> s) & m, (w1 >> s) & m, (w2 >> s) & m, (w3 >> s) & m, xq, xw_hi)
    return lo, hi


@cuda.jit(device=True, inline=True)
def _f16_half(word, k):
    """f16 number k (0: low half, 1: high half) of a uint32 word, as float32."""
    return f16_bits_to_f32(word >> uint32(16 * k))


@cuda.jit(device=True, inline=True)
def _spread4(t):
    """Bits 0..3 of t -> bit 4 of bytes 0..3 (the 5th bits of four values)."""
    return (((t << uint32(4)) & uint32(0x10)) | ((t << uint32(11)) & uint32(0x1000))
            | ((t << uint32(18)) & uint32(0x100000)) | ((t << uint32(25)) & uint32(0x10000000)))


# --- 32-value block types: one unit (Q8_0: two) per block ---------------------------------------

@cuda.jit(device=True, inline=True)
def _unit_q4_0(w0, w1, w2, w3, row, row8, u, nb, xq, xd, xs):
    lo, hi = _nib_dot(w0, w1, w2, w3, xq, 8 * u, 8 * u + 4)
    d = _f16_half(row[4 * nb + (u >> 1)], u & 1)
    return d * (xd[u] * float32(lo + hi) - float32(8) * (xs[2 * u] + xs[2 * u + 1]))


@cuda.jit(device=True, inline=True)
def _unit_q4_1(w0, w1, w2, w3, row, row8, u, nb, xq, xd, xs):
    lo, hi = _nib_dot(w0, w1, w2, w3, xq, 8 * u, 8 * u + 4)
    dm = row[4 * nb + u]
    return (_f16_half(dm, 0) * xd[u] * float32(lo + hi)
            + _f16_half(dm, 1) * (xs[2 * u] + xs[2 * u + 1]))


@cuda.jit(device=True, inline=True)
def _q5_sum(w0, w1, w2, w3, qh, xq, u):
    """Dot of a Q5 unit's 5-bit values (nibbles | 5th bits from qh) with block u's activations."""
    m = uint32(LO)
    s = uint32(4)
    lo = _dot16((w0 & m) | _spread4(qh), (w1 & m) | _spread4(qh >> uint32(4)),
                (w2 & m) | _spread4(qh >> uint32(8)), (w3 & m) | _spread4(qh >> uint32(12)),
                xq, 8 * u)
    hi = _dot16(((w0 >> s) & m) | _spread4(qh >> uint32(16)),
                ((w1 >> s) & m) | _spread4(qh >> uint32(20)),
                ((w2 >> s) & m) | _spread4(qh >> uint32(24)),
                ((w3 >> s) & m) | _spread4(qh >> uint32(28)), xq, 8 * u + 4)
    return float32(lo + hi)


@cuda.jit(device=True, inline=True)
def _unit_q5_0(w0, w1, w2, w3, row, row8, u, nb, xq, xd, xs):
    qh = row[4 * nb + u]
    d = _f16_half(row[(16 * nb + (4 * nb + 15) // 16 * 16) // 4 + (u >> 1)], u & 1)
    return d * (xd[u] * _q5_sum(w0, w1, w2, w3, qh, xq, u)
                - float32(16) * (xs[2 * u] + xs[2 * u + 1]))


@cuda.jit(device=True, inline=True)
def _unit_q5_1(w0, w1, w2, w3, row, row8, u, nb, xq, xd, xs):
    qh = row[4 * nb + u]
    dm = row[(16 * nb + (4 * nb + 15) // 16 * 16) // 4 + u]
    return (_f16_half(dm, 0) * xd[u] * _q5_sum(w0, w1, w2, w3, qh, xq, u)
            + _f16_half(dm, 1) * (xs[2 * u] + xs[2 * u + 1]))


@cuda.jit(device=True, inline=True)
def _unit_q8_0(w0, w1, w2, w3, row, row8, u, nb, xq, xd, xs):
    b = u >> 1
    d = _f16_half(row[8 * nb + (b >> 1)], b & 1)
    return d * xd[b] * float32(_dot16(w0, w1, w2, w3, xq, 4 * u))


# --- K-quants: 256-value blocks of 8 units ------------------------------------------------------

@cuda.jit(device=True, inline=True)
def _scales_pair(h1, h2, h3, g):
    """6-bit (scale, min) of sub-blocks 2g and 2g+1 of a Q4_K/Q5_K block as 16-bit pairs (low byte:
    2g), from the 12 packed scale bytes in header words h1..h3 (quants._k_scale_min, two at once)."""
    sh = uint32(16 * (g & 1))
    a = (h1 >> sh) & uint32(0xFFFF)
    b = (h2 >> sh) & uint32(0xFFFF)
    c = (h3 >> sh) & uint32(0xFFFF)
    if g < 2:
        sc = a & uint32(0x3F3F)
        mn = b & uint32(0x3F3F)
    else:
        sc = (c & uint32(0x0F0F)) | ((a & uint32(0xC0C0)) >> uint32(2))
        mn = ((c >> uint32(4)) & uint32(0x0F0F)) | ((b & uint32(0xC0C0)) >> uint32(2))
    return sc, mn


@cuda.jit(device=True, inline=True)
def _kquant_mins(lo, hi, hdr0, hdr1, hdr2, hdr3, g, v0, xd, xs):
    """Q4_K/Q5_K unit value from its two integer dots: sub-blocks 2g (values v0..v0+15) and 2g+1
    (v0+32..): d * (sc_a dx_a lo + sc_b dx_b hi) - dmin * (m_a xs_a + m_b xs_b)."""
    sc, mn = _scales_pair(hdr1, hdr2, hdr3, g)
    gl = v0 >> 5
    xl = v0 >> 4
    return (_f16_half(hdr0, 0) * (float32(int32(sc & uint32(0xFF))) * xd[gl] * float32(lo)
                                  + float32(int32(sc >> uint32(8))) * xd[gl + 1] * float32(hi))
            - _f16_half(hdr0, 1) * (float32(int32(mn & uint32(0xFF))) * xs[xl]
                                    + float32(int32(mn >> uint32(8))) * xs[xl + 2]))


@cuda.jit(device=True, inline=True)
def _unit_q4_k(w0, w1, w2, w3, row, row8, u, nb, xq, xd, xs):
    """Unit u' = u % 8 of block b: bytes 32g + 16h .. of qs (g = u' // 2, h = u' % 2); low nibbles
    are values 64g + 16h + i (sub-block 2g), high ones 64g + 32 + 16h + i (sub-block 2g + 1)."""
    b = u >> 3
    g = (u >> 1) & 3
    v0 = 256 * b + 64 * g + 16 * (u & 1)
    lo, hi = _nib_dot(w0, w1, w2, w3, xq, v0 >> 2, (v0 >> 2) + 8)
    h0, h1, h2, h3 = load_u32x4(row, 8 * nb + b)
    return _kquant_mins(lo, hi, h0, h1, h2, h3, g, v0, xd, xs)


@cuda.jit(device=True, inline=True)
def _unit_q5_k(w0, w1, w2, w3, row, row8, u, nb, xq, xd, xs):
    """As Q4_K, with the 5th bit of value 16h + i of sub-block j in bit j of qh[16h + i]."""
    b = u >> 3
    g = (u >> 1) & 3
    v0 = 256 * b + 64 * g + 16 * (u & 1)
    e0, e1, e2, e3 = load_u32x4(row, 8 * nb + 2 * b + (u & 1))
    m = uint32(LO)
    one = uint32(0x01010101)
    sl = uint32(2 * g)
    sh = uint32(2 * g + 1)
    f = uint32(4)
    lo = _dot16((w0 & m) | (((e0 >> sl) & one) << f), (w1 & m) | (((e1 >> sl) & one) << f),
                (w2 & m) | (((e2 >> sl) & one) << f), (w3 & m) | (((e3 >> sl) & one) << f),
                xq, v0 >> 2)
    hi = _dot16(((w0 >> f) & m) | (((e0 >> sh) & one) << f),
                ((w1 >> f) & m) | (((e1 >> sh) & one) << f),
                ((w2 >> f) & m) | (((e2 >> sh) & one) << f),
                ((w3 >> f) & m) | (((e3 >> sh) & one) << f), xq, (v0 >> 2) + 8)
    h0, h1, h2, h3 = load_u32x4(row, 10 * nb + b)
    return _kquant_mins(lo, hi, h0, h1, h2, h3, g, v0, xd, xs)


@cuda.jit(device=True, inline=True)
def _unit_q6_k(w0, w1, w2, w3, row, row8, u, nb, xq, xd, xs):
    """Unit u' = u % 8 of block b: ql bytes 64n + 16v .. (n = u' // 4, v = u' % 4); low nibbles are
    values 128n + 32(v // 2) + 16(v % 2) + i, high ones 64 further; their 2 high bits are fields
    v // 2 and v // 2 + 2 of qh[32n + 16(v % 2) + i]; y = d * sc * (q - 32)."""
    b = u >> 3
    n = (u >> 2) & 1
    v = u & 3
    vb = 128 * n + 32 * (v >> 1) + 16 * (v & 1)            # value index in the block
    v0 = 256 * b + vb
    e0, e1, e2, e3 = load_u32x4(row, 8 * nb + 4 * b + 2 * n + (v & 1))
    m = uint32(LO)
    three = uint32(0x03030303)
    sl = uint32(2 * (v >> 1))
    sh = sl + uint32(4)
    f = uint32(4)
    lo = _dot16((w0 & m) | (((e0 >> sl) & three) << f), (w1 & m) | (((e1 >> sl) & three) << f),
                (w2 & m) | (((e2 >> sl) & three) << f), (w3 & m) | (((e3 >> sl) & three) << f),
                xq, v0 >> 2)
    hi = _dot16(((w0 >> f) & m) | (((e0 >> sh) & three) << f),
                ((w1 >> f) & m) | (((e1 >> sh) & three) << f),
                ((w2 >> f) & m) | (((e2 >> sh) & three) << f),
                ((w3 >> f) & m) | (((e3 >> sh) & three) << f), xq, (v0 >> 2) + 16)
    s8 = 192 * nb + 16 * b + (vb >> 4)
    sc_lo = float32(int32(np.int8(row8[s8])))
    sc_hi = float32(int32(np.int8(row8[s8 + 4])))
    d = _f16_half(row[52 * nb + (b >> 1)], b & 1)
    gl = v0 >> 5
    xl = v0 >> 4
    return d * (sc_lo * (xd[gl] * float32(lo) - float32(32) * xs[xl])
                + sc_hi * (xd[gl + 2] * float32(hi) - float32(32) * xs[xl + 4]))


# type -> (unit dot, units per block, values per block)
UNITS = {
    Q4_0: (_unit_q4_0, 1, 32), Q4_1: (_unit_q4_1, 1, 32), Q5_0: (_unit_q5_0, 1, 32),
    Q5_1: (_unit_q5_1, 1, 32), Q8_0: (_unit_q8_0, 2, 32),
    Q4_K: (_unit_q4_k, 8, 256), Q5_K: (_unit_q5_k, 8, 256), Q6_K: (_unit_q6_k, 8, 256),
}


@functools.lru_cache(maxsize=None)
def q8_pair_dot(qtype: int):
    """Device function pair_dot(row_a, row_b, row_a8, row_b8, cols, sm, lane) -> this lane's
    partial dots of two GPU-layout rows (uint32 and uint8 views) with the q8 activations in sm."""
    unit, upb, bv = UNITS[qtype]
    unroll = UNROLL
    step = WARP * unroll
    n_words = 4 * unroll

    @cuda.jit(device=True)
    def pair_dot(ra, rb, ra8, rb8, cols, sm, lane):
        nw = cols // 4
        xq = sm[:nw].view(np.uint32)
        xd = sm[nw:nw + cols // 32]
        xs = sm[nw + cols // 32:]
        nb = cols // bv
        n_units = nb * upb
        wa = cuda.local.array(n_words, uint32)
        wb = cuda.local.array(n_words, uint32)
        acc_a = float32(0)
        acc_b = float32(0)
        full = n_units // step
        for it in range(full):
            u0 = it * step + lane
            for i in range(unroll):                      # every load in flight first
                wa[4 * i], wa[4 * i + 1], wa[4 * i + 2], wa[4 * i + 3] = \
                    load_u32x4(ra, u0 + WARP * i)
                wb[4 * i], wb[4 * i + 1], wb[4 * i + 2], wb[4 * i + 3] = \
                    load_u32x4(rb, u0 + WARP * i)
            for i in range(unroll):
                u = u0 + WARP * i
                acc_a += unit(wa[4 * i], wa[4 * i + 1], wa[4 * i + 2], wa[4 * i + 3], ra, ra8,
                              u, nb, xq, xd, xs)
                acc_b += unit(wb[4 * i], wb[4 * i + 1], wb[4 * i + 2], wb[4 * i + 3], rb, rb8,
                              u, nb, xq, xd, xs)
        for u in range(full * step + lane, n_units, WARP):
            a0, a1, a2, a3 = load_u32x4(ra, u)
            b0, b1, b2, b3 = load_u32x4(rb, u)
            acc_a += unit(a0, a1, a2, a3, ra, ra8, u, nb, xq, xd, xs)
            acc_b += unit(b0, b1, b2, b3, rb, rb8, u, nb, xq, xd, xs)
        return acc_a, acc_b

    return pair_dot
