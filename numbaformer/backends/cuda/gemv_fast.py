"""Register-direct row dots for the formats whose GGUF blocks keep 16-byte alignment (Q4_K).

A Q4_K block (144 bytes: d, dmin, 12 scale bytes, 128 bytes of nibbles) is 9 aligned 16-byte units:
the header and 8 units of nibbles. Lane l of a warp takes nibble units l, l+32, ... of its row, so
the 8 lanes of a block read its 128 nibble bytes contiguously (coalesced), each with one
LDG.128, plus the block header (a broadcast from L1). Unit u' of a block holds, in its 16 bytes,
values 64g + 16h + i (low nibbles, sub-block 2g) and 64g + 32 + 16h + i (high nibbles, sub-block
2g + 1), g = u' // 2, h = u' % 2, i = 0..15; each sub-block has a 6-bit scale and min.
The activation vector and its 16-value partial sums (for the min terms) are staged in shared memory
by the calling kernel (gemv.py). Rows come in pairs (adjacent rows, or gate and up for SwiGLU): a
unit's 32 activations are read from shared memory once into registers and serve both rows.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, float32, uint32

from ...quants import U
from .intrinsics import as_f32, f16_bits_to_f32, load_f32x4, load_u32x4, prmt
from .reduce import WARP


@cuda.jit(device=True, inline=True)
def _scales_pair(h1, h2, h3, g):
    """6-bit (scale, min) of sub-blocks 2g and 2g+1 as 16-bit pairs (low byte: 2g), from the 12
    packed scale bytes in header words h1..h3, branch-free but for the g < 2 select (the packing
    of quants._k_scale_min, two sub-blocks per 16-bit lane)."""
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


MAGIC = 0x3F000000        # 0.5: a nibble q in bits 16..19 of its mantissa reads 0.5 + q / 256


@cuda.jit(device=True, inline=True)
def _unit_dot(h0, h1, h2, h3, q0, q1, q2, q3, g, xv, xs_lo, xs_hi):
    """Dot of one 16-byte nibble unit (words q0..q3, block header h0..h3, sub-block pair g) with
    its 32 activations xv (registers: 16 for the low nibbles, then 16 for the high ones) and their
    two 16-sums. No int-to-float conversions: the 4 low (high) nibbles of a word are masked at once,
    and one byte permute per value drops a nibble into bits 16..19 of the float 0.5, giving
    f = 0.5 + q/256; then sum q x = 256 (sum f x - 0.5 sum x), sum x being the 16-sum.
    Returns d * (sc_a * lo + sc_b * hi) - dmin * (m_a * xs_lo + m_b * xs_hi)."""
    sc, mn = _scales_pair(h1, h2, h3, g)
    d = f16_bits_to_f32(h0 & uint32(0xFFFF)) * float32(256)
    dmin = f16_bits_to_f32(h0 >> uint32(16))
    c = uint32(MAGIC)
    lo = float32(0)
    hi = float32(0)
    for k in range(4):
        w = q0 if k == 0 else (q1 if k == 1 else (q2 if k == 2 else q3))
        lo4 = w & uint32(0x0F0F0F0F)
        hi4 = (w >> uint32(4)) & uint32(0x0F0F0F0F)
        for bi in range(4):
            sel = uint32(0x7054 | (bi << 8))        # bytes: c.b0, c.b1, nibble byte bi, c.b3
            lo += as_f32(prmt(lo4, c, sel)) * xv[4 * k + bi]
            hi += as_f32(prmt(hi4, c, sel)) * xv[16 + 4 * k + bi]
    sa = float32(np.int32(sc & uint32(0xFF)))
    sb = float32(np.int32(sc >> uint32(8)))
    ma = float32(np.int32(mn & uint32(0xFF)))
    mb = float32(np.int32(mn >> uint32(8)))
    half = float32(0.5)
    return (d * (sa * (lo - half * xs_lo) + sb * (hi - half * xs_hi))
            - dmin * (ma * xs_lo + mb * xs_hi))


@cuda.jit(device=True, inline=True)
def _load_x(xv, xs, xb):
    """The unit's 32 activations into registers: xs[xb .. xb+15], xs[xb+32 .. xb+47] (16-byte
    vector loads: xb is a multiple of 16)."""
    for i in range(4):
        a, b, c, d = load_f32x4(xs, (xb >> 2) + i)
        xv[4 * i] = a
        xv[4 * i + 1] = b
        xv[4 * i + 2] = c
        xv[4 * i + 3] = d
        a, b, c, d = load_f32x4(xs, (xb >> 2) + 8 + i)
        xv[16 + 4 * i] = a
        xv[16 + 4 * i + 1] = b
        xv[16 + 4 * i + 2] = c
        xv[16 + 4 * i + 3] = d


@cuda.jit(device=True)
def q4k_pair_dot(row_a, row_b, cols, xs, xsum, lane):
    """This lane's partial dots of two Q4_K rows (uint32 words) with xs: nibble units lane,
    lane + 32, ..; each unit's activations are loaded once into registers and serve both rows, and
    the four 16-byte loads (two headers, two units) are in flight together."""
    xv = cuda.local.array(32, float32)
    n_units = (cols // 256) * 8
    acc_a = float32(0)
    acc_b = float32(0)
    for u in range(lane, n_units, WARP):
        b = u >> 3
        up = u & 7
        ha0, ha1, ha2, ha3 = load_u32x4(row_a, 9 * b)
        qa0, qa1, qa2, qa3 = load_u32x4(row_a, 9 * b + 1 + up)
        hb0, hb1, hb2, hb3 = load_u32x4(row_b, 9 * b)
        qb0, qb1, qb2, qb3 = load_u32x4(row_b, 9 * b + 1 + up)
        g = up >> 1
        xb = 256 * b + 64 * g + 16 * (up & 1)
        _load_x(xv, xs, xb)
        xs_lo = xsum[U(xb >> 4)]
        xs_hi = xsum[U((xb >> 4) + 2)]
        acc_a += _unit_dot(ha0, ha1, ha2, ha3, qa0, qa1, qa2, qa3, g, xv, xs_lo, xs_hi)
        acc_b += _unit_dot(hb0, hb1, hb2, hb3, qb0, qb1, qb2, qb3, g, xv, xs_lo, xs_hi)
    return acc_a, acc_b
