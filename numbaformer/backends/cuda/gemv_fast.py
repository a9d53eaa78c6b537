"""Register-direct row dots for the formats whose GGUF blocks keep 16-byte alignment (Q4_K).

A Q4_K block (144 bytes: d, dmin, 12 scale bytes, 128 bytes of nibbles) is 9 aligned 16-byte units:
the header and 8 units of nibbles. Lane l of a warp takes nibble units l, l+32, ... of its row, so
the 8 lanes of a block read its 128 nibble bytes contiguously (coalesced), each with one
LDG.128, plus the block header (a broadcast from L1). Unit u' of a block holds, in its 16 bytes,
values 64g + 16h + i (low nibbles, sub-block 2g) and 64g + 32 + 16h + i (high nibbles, sub-block
2g + 1), g = u' // 2, h = u' % 2, i = 0..15; each sub-block has a 6-bit scale and min.
The activation vector and its 16-value partial sums (for the min terms) are staged in shared memory
by the calling kernel (gemv.py); two units are in flight per lane per step.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, float32, uint32

from ...quants import U
from .intrinsics import f16_bits_to_f32, load_u32x4
from .reduce import WARP


@cuda.jit(device=True, inline=True)
def _scale_byte(h1, h2, h3, k):
    """Byte k (0..11) of the 12 packed scale bytes, held in header words 1..3."""
    w = h1 if k < 4 else (h2 if k < 8 else h3)
    return (w >> uint32(8 * (k & 3))) & uint32(0xFF)


@cuda.jit(device=True, inline=True)
def _k_scale_min(h1, h2, h3, j):
    """(scale, min) of sub-block j as float32: 6-bit fields packed as in quants._k_scale_min."""
    if j < 4:
        sc = _scale_byte(h1, h2, h3, j) & uint32(63)
        mn = _scale_byte(h1, h2, h3, j + 4) & uint32(63)
    else:
        sc = (_scale_byte(h1, h2, h3, j + 4) & uint32(15)) | (
            (_scale_byte(h1, h2, h3, j - 4) >> uint32(6)) << uint32(4))
        mn = (_scale_byte(h1, h2, h3, j + 4) >> uint32(4)) | (
            (_scale_byte(h1, h2, h3, j) >> uint32(6)) << uint32(4))
    return float32(np.int32(sc)), float32(np.int32(mn))


@cuda.jit(device=True, inline=True)
def _nibble_dot(w0, w1, w2, w3, xs, xb, shift):
    """sum_i q_i x[xb + i] over the 16 nibbles at bit offset `shift` (0: low, 4: high) of each byte
    of the 4 words (value i = byte i of the 16)."""
    acc = float32(0)
    for k in range(4):
        w = w0 if k == 0 else (w1 if k == 1 else (w2 if k == 2 else w3))
        for bi in range(4):
            q = np.int32((w >> uint32(8 * bi + shift)) & uint32(15))
            acc += float32(q) * xs[U(xb + 4 * k + bi)]
    return acc


@cuda.jit(device=True, inline=True)
def _q4k_unit(row, u, xs, xsum, x0):
    """Dot of nibble unit u (0 .. 8 * n_blocks) of a Q4_K row (uint32 words) with xs."""
    b = u >> 3
    up = u & 7
    h0, h1, h2, h3 = load_u32x4(row, 9 * b)
    q0, q1, q2, q3 = load_u32x4(row, 9 * b + 1 + up)
    g = up >> 1
    xb = x0 + 256 * b + 64 * g + 16 * (up & 1)
    sa, ma = _k_scale_min(h1, h2, h3, 2 * g)
    sb, mb = _k_scale_min(h1, h2, h3, 2 * g + 1)
    d = f16_bits_to_f32(h0 & uint32(0xFFFF))
    dmin = f16_bits_to_f32(h0 >> uint32(16))
    lo = _nibble_dot(q0, q1, q2, q3, xs, xb, 0)
    hi = _nibble_dot(q0, q1, q2, q3, xs, xb + 32, 4)
    return d * (sa * lo + sb * hi) - dmin * (ma * xsum[U(xb >> 4)] + mb * xsum[U((xb + 32) >> 4)])


@cuda.jit(device=True)
def q4k_row_dot(row, cols, xs, xsum, seg, regs, lane):
    """This lane's partial dot of a Q4_K row (uint32 words) with xs: nibble units lane,
    lane + 32, .. two per step (both LDG.128 in flight together). seg/regs: unused here."""
    n_units = (cols // 256) * 8
    acc = float32(0)
    for u in range(lane, n_units, 2 * WARP):
        acc += _q4k_unit(row, u, xs, xsum, 0)
        if u + WARP < n_units:
            acc += _q4k_unit(row, u + WARP, xs, xsum, 0)
    return acc
