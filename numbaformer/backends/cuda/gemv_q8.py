"""The fast decode mat-vec: weights in the GPU layout (layout.py), activations as 8-bit integers.

Activations (the prologue, once per block into shared memory): x' (rmsnorm(x) * w when fused) is
quantized per 32 values as llama.cpp's q8_1: d = max|x| / 127, q = rint(x / d) in int8, packed four
to a word (xq), with d per 32 values (xd) and d * sum(q) per 16 values (xs, for the min and offset
terms). The error this makes is bounded by the tests and measured against the exact path (f32
activations, gemv.py's staged path) on whole models.

Rows: a warp takes two rows at a time; lane l reads the 16-byte units l, l + 32, .. of each row's q
plane (one aligned LDG.128 each, the warp's loads coalesced), UNROLL units per row and batch, all
issued before any is used. When the rows are few for the grid (ffn_down: 4096 rows of 14336),
SPLIT warps share a pair, each a slice of its units, and add their sums in shared memory. A unit is 32 values of a 4-bit plane (16 of Q8_0); its dot with the activations is
dp4a on nibbles masked four at a time, so a weight byte costs about one integer instruction. The
unit's scale bytes, high bits and f16 d/min come from the other planes of the row (small loads,
coalesced across lanes), and its activations from shared memory as 16-byte loads.

Per type, `_fetch_<type>` loads a unit's scale/high-bit words (issued with its quants) and
`_dot_<type>` returns its float partial dot; UNITS maps a type to them and its units per block.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
from numba import cuda, float32, float64, int32, uint32

from ...quants import (BF16, F16, F32, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K,
                       Q8_0, U)
from .intrinsics import (as_f32, dp4a, f16_bits_to_f32, load_f32x4, load_u32x4,
                         load_u32x4_shared, shfl_xor_sync)
from .reduce import FULL_MASK, WARP, block_sum, warp_sum

UNROLL = 2                    # units per row and lane in a batch (all its loads in flight)
SPLIT_BELOW = 0               # pairs per warp of the grid below which warps split a pair's units
SPLIT = 2                     # warps per pair then (H200 sweep: no gain at the 8B shapes, so off)
# Q4_K/Q5_K: a lane takes two adjacent units with one scale decode (fewer instructions a byte):
# always with gemv.PREQUANT's launches, everywhere with NUMBAFORMER_PAIRS=1 (the H200 probe:
# no gain on staged 4096-column rows, 38.3 -> 37.5 % of copy bandwidth at Q4_K)
PAIR_UNITS = os.environ.get("NUMBAFORMER_PAIRS", "0") == "1"
PROBE = 0                     # timing probes only (scripts/gpu_probe.py): 1 skips the staging,
                              # 2 replaces the unit dots by an XOR of the loaded words
LO = 0x0F0F0F0F


def smem_words(qtype: int, cols: int) -> int:
    """Shared 32-bit words of the staged activations: xq (cols/4), xd (cols/32), xs (cols/16);
    float types: x' (cols) and its 16-value sums (cols/16)."""
    if qtype in F32_UNITS:
        return cols + cols // 16
    return cols // 4 + cols // 32 + cols // 16


@cuda.jit(device=True, inline=True)
def _i8(v):
    return uint32(v) & uint32(0xFF)


@cuda.jit(device=True, inline=True)
def _x_word(xr, norm_w, w, nw, scale, norm):
    """Values 4w .. 4w+3 of x' (0 past the end)."""
    v0 = v1 = v2 = v3 = float32(0)
    if w < nw:
        v0, v1, v2, v3 = load_f32x4(xr, w)
        if norm:
            n0, n1, n2, n3 = load_f32x4(norm_w, w)
            v0 = (v0 * scale) * n0
            v1 = (v1 * scale) * n1
            v2 = (v2 * scale) * n2
            v3 = (v3 * scale) * n3
    return v0, v1, v2, v3


@cuda.jit(device=True, inline=True)
def _quantize_word(v0, v1, v2, v3, w, nw, xq, xd, xs):
    """Word w of the q8 activations from its 4 values: the 32-value group's amax over the 8 lanes
    holding it, its 16-value sums over 4 (every lane runs the shuffles, in or past the end)."""
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


@cuda.jit(device=True)
def stage_f32(sm, x, norm_w, eps, norm, red, threads):
    """x' = x or rmsnorm(x) * norm_w into sm[:cols], its 16-value sums into sm[cols:]."""
    tid = cuda.threadIdx.x
    cols = x.shape[1]
    xsum = sm[cols:]
    scale = float32(1)
    if norm:
        ss = float32(0)
        for i in range(tid, cols, threads):
            ss += x[0, i] * x[0, i]
        ss = block_sum(ss, red)
        scale = float32(1) / math.sqrt(ss / float32(cols) + eps)
    for i in range(tid, cols, threads):
        sm[i] = (x[0, i] * scale) * norm_w[i] if norm else x[0, i]
    cuda.syncthreads()                               # x' staged
    for g in range(tid, cols // 16, threads):
        s = float32(0)
        for i in range(16):
            s += sm[U(16 * g + i)]
        xsum[g] = s


@cuda.jit(device=True, inline=True)
def _sumsq_word(xr, w, nw):
    if w >= nw:
        return float32(0)
    a, b, c, d = load_f32x4(xr, w)
    return a * a + b * b + c * c + d * d


@cuda.jit(device=True, inline=True)
def _q8_scale(xr, cols, norm, eps, red, threads):
    """1 / rms(x) with `norm` (the block reduces x^2: thread t takes words t, t + threads, ..,
    four per step), else 1."""
    scale = float32(1)
    if norm:
        tid = cuda.threadIdx.x
        nw = cols // 4
        ss = float32(0)
        for base in range(tid, nw, 4 * threads):
            ss += (_sumsq_word(xr, base, nw) + _sumsq_word(xr, base + threads, nw)) + \
                (_sumsq_word(xr, base + 2 * threads, nw) + _sumsq_word(xr, base + 3 * threads, nw))
        ss = block_sum(ss, red)
        scale = float32(1) / math.sqrt(ss / float32(cols) + eps)
    return scale


@cuda.jit(device=True, inline=True)
def _q8_words(xr, norm_w, base, nw, scale, norm, xq, xd, xs, threads):
    """Words base + t, + threads, + 2 threads, + 3 threads of the q8 activations (thread t), all
    four words' loads issued before any is quantized."""
    wa = base + cuda.threadIdx.x
    wb = wa + threads
    wc = wb + threads
    wd = wc + threads
    a0, a1, a2, a3 = _x_word(xr, norm_w, wa, nw, scale, norm)
    b0, b1, b2, b3 = _x_word(xr, norm_w, wb, nw, scale, norm)
    c0, c1, c2, c3 = _x_word(xr, norm_w, wc, nw, scale, norm)
    d0, d1, d2, d3 = _x_word(xr, norm_w, wd, nw, scale, norm)
    _quantize_word(a0, a1, a2, a3, wa, nw, xq, xd, xs)
    _quantize_word(b0, b1, b2, b3, wb, nw, xq, xd, xs)
    _quantize_word(c0, c1, c2, c3, wc, nw, xq, xd, xs)
    _quantize_word(d0, d1, d2, d3, wd, nw, xq, xd, xs)


@cuda.jit(device=True)
def stage_q8(sm, x, norm_w, eps, norm, red, threads):
    """x (1, cols) f32 -> the q8 activations in sm (module docstring); with `norm`, of
    rmsnorm(x) * norm_w. Thread t takes words t, t + threads, .. (4 values each, 8 threads per 32
    values), four words per step with all their loads issued first: the staging is a chain of
    L2 round trips (the weights' first batch waits behind it), so it makes as few as it can."""
    cols = x.shape[1]
    nw = cols // 4
    xq = sm[:nw].view(np.uint32)
    xd = sm[nw:nw + cols // 32]
    xs = sm[nw + cols // 32:]
    xr = x[0]
    scale = _q8_scale(xr, cols, norm, eps, red, threads)
    for base in range(0, nw, 4 * threads):
        _q8_words(xr, norm_w, base, nw, scale, norm, xq, xd, xs, threads)


@functools.lru_cache(maxsize=None)
def quant_kernel(norm: bool, threads: int):
    """The staging as a kernel of its own (the mat-vec's `prequant` form and the rows kernel read
    its output): block (b, t) writes words 4 b threads .. of the q8 activations of x[t] (or
    rmsnorm(x[t]) * norm_w) into out[t] (out: (rows, smem_words(qtype, cols)) f32, each row laid
    out as the shared staging). Every block reduces x[t]^2 over the whole row first in stage_q8's
    order, so the numbers equal the staged ones."""
    from ._jit import cuda_kernel

    @cuda_kernel
    def _quantize_q8(out, x, norm_w, eps):
        red = cuda.shared.array(32, float32)
        cols = x.shape[1]
        nw = cols // 4
        t = cuda.blockIdx.y
        xr = x[t]
        o = out[t]
        scale = _q8_scale(xr, cols, norm, eps, red, threads)
        _q8_words(xr, norm_w, cuda.blockIdx.x * 4 * threads, nw, scale, norm,
                  o[:nw].view(np.uint32), o[nw:nw + cols // 32], o[nw + cols // 32:], threads)

    return _quantize_q8


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


# --- per type: fetch(row, row8, u, nb) -> the unit's scale/high-bit words (8 x uint32, unused 0),
# --- issued with the unit's quants; dot(w0..w3, h0..h7, u, nb, xq, xd, xs) -> its partial dot.
# Plane offsets follow layout.PLANES: q plane first, then the others, each padded to 16 bytes.

_Z = uint32(0)


@cuda.jit(device=True, inline=True)
def _fetch_q4_0(row, row8, u, nb):
    return row[4 * nb + (u >> 1)], _Z, _Z, _Z, _Z, _Z, _Z, _Z


@cuda.jit(device=True, inline=True)
def _dot_q4_0(w0, w1, w2, w3, h0, h1, h2, h3, h4, h5, h6, h7, u, nb, xq, xd, xs):
    """y = d * (q - 8): d * (dx * sum q xq - 8 * xs)."""
    lo, hi = _nib_dot(w0, w1, w2, w3, xq, 8 * u, 8 * u + 4)
    return _f16_half(h0, u & 1) * (xd[u] * float32(lo + hi)
                                   - float32(8) * (xs[2 * u] + xs[2 * u + 1]))


@cuda.jit(device=True, inline=True)
def _fetch_q4_1(row, row8, u, nb):
    return row[4 * nb + u], _Z, _Z, _Z, _Z, _Z, _Z, _Z


@cuda.jit(device=True, inline=True)
def _dot_q4_1(w0, w1, w2, w3, h0, h1, h2, h3, h4, h5, h6, h7, u, nb, xq, xd, xs):
    """y = d * q + m."""
    lo, hi = _nib_dot(w0, w1, w2, w3, xq, 8 * u, 8 * u + 4)
    return (_f16_half(h0, 0) * xd[u] * float32(lo + hi)
            + _f16_half(h0, 1) * (xs[2 * u] + xs[2 * u + 1]))


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
def _q5_d_word(nb):
    """Word offset of the Q5_0/Q5_1 d (and m) plane: after the q plane and the padded qh plane."""
    return (16 * nb + (4 * nb + 15) // 16 * 16) // 4


@cuda.jit(device=True, inline=True)
def _fetch_q5_0(row, row8, u, nb):
    return row[4 * nb + u], row[_q5_d_word(nb) + (u >> 1)], _Z, _Z, _Z, _Z, _Z, _Z


@cuda.jit(device=True, inline=True)
def _dot_q5_0(w0, w1, w2, w3, h0, h1, h2, h3, h4, h5, h6, h7, u, nb, xq, xd, xs):
    """y = d * (q - 16), q with its 5th bit from qh (h0)."""
    return _f16_half(h1, u & 1) * (xd[u] * _q5_sum(w0, w1, w2, w3, h0, xq, u)
                                   - float32(16) * (xs[2 * u] + xs[2 * u + 1]))


@cuda.jit(device=True, inline=True)
def _fetch_q5_1(row, row8, u, nb):
    return row[4 * nb + u], row[_q5_d_word(nb) + u], _Z, _Z, _Z, _Z, _Z, _Z


@cuda.jit(device=True, inline=True)
def _dot_q5_1(w0, w1, w2, w3, h0, h1, h2, h3, h4, h5, h6, h7, u, nb, xq, xd, xs):
    """y = d * q + m, q with its 5th bit from qh (h0)."""
    return (_f16_half(h1, 0) * xd[u] * _q5_sum(w0, w1, w2, w3, h0, xq, u)
            + _f16_half(h1, 1) * (xs[2 * u] + xs[2 * u + 1]))


@cuda.jit(device=True, inline=True)
def _fetch_q8_0(row, row8, u, nb):
    return row[8 * nb + (u >> 2)], _Z, _Z, _Z, _Z, _Z, _Z, _Z


@cuda.jit(device=True, inline=True)
def _dot_q8_0(w0, w1, w2, w3, h0, h1, h2, h3, h4, h5, h6, h7, u, nb, xq, xd, xs):
    """Half u % 2 of block u // 2: 16 int8 quants; y = d * q."""
    b = u >> 1
    return _f16_half(h0, b & 1) * xd[b] * float32(_dot16(w0, w1, w2, w3, xq, 4 * u))


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
def _fetch_q4_k(row, row8, u, nb):
    h0, h1, h2, h3 = load_u32x4(row, 8 * nb + (u >> 3))
    return h0, h1, h2, h3, _Z, _Z, _Z, _Z


@cuda.jit(device=True, inline=True)
def _dot_q4_k(w0, w1, w2, w3, h0, h1, h2, h3, h4, h5, h6, h7, u, nb, xq, xd, xs):
    """Unit u' = u % 8 of block u // 8: bytes 32g + 16h .. of qs (g = u' // 2, h = u' % 2); low
    nibbles are values 64g + 16h + i (sub-block 2g), high ones 64g + 32 + 16h + i (2g + 1)."""
    g = (u >> 1) & 3
    v0 = 256 * (u >> 3) + 64 * g + 16 * (u & 1)
    lo, hi = _nib_dot(w0, w1, w2, w3, xq, v0 >> 2, (v0 >> 2) + 8)
    return _kquant_mins(lo, hi, h0, h1, h2, h3, g, v0, xd, xs)


@cuda.jit(device=True, inline=True)
def _fetch_q5_k(row, row8, u, nb):
    b = u >> 3
    e0, e1, e2, e3 = load_u32x4(row, 8 * nb + 2 * b + (u & 1))        # qh bytes 16h ..
    h0, h1, h2, h3 = load_u32x4(row, 10 * nb + b)                       # d dmin scales
    return e0, e1, e2, e3, h0, h1, h2, h3


@cuda.jit(device=True, inline=True)
def _bits_at(w, e, s, mask):
    """(w & 0x0F0F0F0F) | (((e >> s) & mask) << 4): a 4-bit field widened by bits of e."""
    return (w & uint32(LO)) | (((e >> s) & mask) << uint32(4))


@cuda.jit(device=True, inline=True)
def _dot_q5_k(w0, w1, w2, w3, e0, e1, e2, e3, h0, h1, h2, h3, u, nb, xq, xd, xs):
    """As Q4_K, with the 5th bit of value 16h + i of sub-block j in bit j of qh[16h + i]."""
    g = (u >> 1) & 3
    v0 = 256 * (u >> 3) + 64 * g + 16 * (u & 1)
    one = uint32(0x01010101)
    sl = uint32(2 * g)
    sh = uint32(2 * g + 1)
    f = uint32(4)
    lo = _dot16(_bits_at(w0, e0, sl, one), _bits_at(w1, e1, sl, one), _bits_at(w2, e2, sl, one),
                _bits_at(w3, e3, sl, one), xq, v0 >> 2)
    hi = _dot16(_bits_at(w0 >> f, e0, sh, one), _bits_at(w1 >> f, e1, sh, one),
                _bits_at(w2 >> f, e2, sh, one), _bits_at(w3 >> f, e3, sh, one), xq, (v0 >> 2) + 8)
    return _kquant_mins(lo, hi, h0, h1, h2, h3, g, v0, xd, xs)


# --- pair units (PAIR_UNITS): a lane takes units u and u + 1 of a Q4_K/Q5_K block (32 bytes of qs,
# --- one (scale, min) pair), so the scale decode and the float arithmetic are paid once for both

@cuda.jit(device=True, inline=True)
def _pair_sum(lo, hi, hdr0, hdr1, hdr2, hdr3, g, v0, xd, xs):
    """Units 2g and 2g + 1's value from their integer dots over sub-blocks 2g (lo: values v0 ..
    v0 + 31) and 2g + 1 (hi: v0 + 32 ..): d (sc_a dx_a lo + sc_b dx_b hi) - dmin (m_a s_a +
    m_b s_b), s the 32-value sums of the q8 activations."""
    sc, mn = _scales_pair(hdr1, hdr2, hdr3, g)
    gl = v0 >> 5
    xl = v0 >> 4
    return (_f16_half(hdr0, 0) * (float32(int32(sc & uint32(0xFF))) * xd[gl] * float32(lo)
                                  + float32(int32(sc >> uint32(8))) * xd[gl + 1] * float32(hi))
            - _f16_half(hdr0, 1) * (float32(int32(mn & uint32(0xFF))) * (xs[xl] + xs[xl + 1])
                                    + float32(int32(mn >> uint32(8))) * (xs[xl + 2] + xs[xl + 3])))


@cuda.jit(device=True, inline=True)
def _pair_q4_k(a0, a1, a2, a3, b0, b1, b2, b3, h0, h1, h2, h3, h4, h5, h6, h7, k0, k1, k2, k3,
               k4, k5, k6, k7, u, nb, xq, xd, xs):
    """Units u (even) and u + 1: bytes 32g .. 32g + 31 of qs (g = (u % 8) // 2); low nibbles are
    values 64g + i (sub-block 2g), high ones 64g + 32 + i (2g + 1); header words h0..h3 (the
    odd unit's fetch, k0..k7, is the same header)."""
    g = (u >> 1) & 3
    v0 = 256 * (u >> 3) + 64 * g
    w = v0 >> 2
    m = uint32(LO)
    f = uint32(4)
    lo = _dot16(a0 & m, a1 & m, a2 & m, a3 & m, xq, w) + \
        _dot16(b0 & m, b1 & m, b2 & m, b3 & m, xq, w + 4)
    hi = _dot16((a0 >> f) & m, (a1 >> f) & m, (a2 >> f) & m, (a3 >> f) & m, xq, w + 8) + \
        _dot16((b0 >> f) & m, (b1 >> f) & m, (b2 >> f) & m, (b3 >> f) & m, xq, w + 12)
    return _pair_sum(lo, hi, h0, h1, h2, h3, g, v0, xd, xs)


@cuda.jit(device=True, inline=True)
def _pair_q5_k(a0, a1, a2, a3, b0, b1, b2, b3, e0, e1, e2, e3, h0, h1, h2, h3, f0, f1, f2, f3,
               k4, k5, k6, k7, u, nb, xq, xd, xs):
    """As _pair_q4_k, with the 5th bits: qh bytes 0..15 (e, the even unit's fetch) and 16..31
    (f, the odd unit's), bit j of qh[16h + i] for sub-block j."""
    g = (u >> 1) & 3
    v0 = 256 * (u >> 3) + 64 * g
    w = v0 >> 2
    one = uint32(0x01010101)
    sl = uint32(2 * g)
    sh = uint32(2 * g + 1)
    t = uint32(4)
    lo = _dot16(_bits_at(a0, e0, sl, one), _bits_at(a1, e1, sl, one), _bits_at(a2, e2, sl, one),
                _bits_at(a3, e3, sl, one), xq, w) + \
        _dot16(_bits_at(b0, f0, sl, one), _bits_at(b1, f1, sl, one), _bits_at(b2, f2, sl, one),
               _bits_at(b3, f3, sl, one), xq, w + 4)
    hi = _dot16(_bits_at(a0 >> t, e0, sh, one), _bits_at(a1 >> t, e1, sh, one),
                _bits_at(a2 >> t, e2, sh, one), _bits_at(a3 >> t, e3, sh, one), xq, w + 8) + \
        _dot16(_bits_at(b0 >> t, f0, sh, one), _bits_at(b1 >> t, f1, sh, one),
               _bits_at(b2 >> t, f2, sh, one), _bits_at(b3 >> t, f3, sh, one), xq, w + 12)
    return _pair_sum(lo, hi, h0, h1, h2, h3, g, v0, xd, xs)


@cuda.jit(device=True, inline=True)
def _fetch_q6_k(row, row8, u, nb):
    """qh words of the unit, its two int8 scales (low and high half, one word), the d word."""
    b = u >> 3
    n = (u >> 2) & 1
    v = u & 3
    e0, e1, e2, e3 = load_u32x4(row, 8 * nb + 4 * b + 2 * n + (v & 1))
    s8 = 192 * nb + 16 * b + 8 * n + 2 * (v >> 1) + (v & 1)
    sc = uint32(row8[s8]) | (uint32(row8[s8 + 4]) << uint32(8))
    return e0, e1, e2, e3, sc, row[52 * nb + (b >> 1)], _Z, _Z


@cuda.jit(device=True, inline=True)
def _dot_q6_k(w0, w1, w2, w3, e0, e1, e2, e3, sc, dw, h6, h7, u, nb, xq, xd, xs):
    """Unit u' = u % 8 of block b: ql bytes 64n + 16v .. (n = u' // 4, v = u' % 4); low nibbles are
    values 128n + 32(v // 2) + 16(v % 2) + i, high ones 64 further; their 2 high bits are fields
    v // 2 and v // 2 + 2 of qh[32n + 16(v % 2) + i]; y = d * sc * (q - 32)."""
    b = u >> 3
    v = u & 3
    v0 = 256 * b + 128 * ((u >> 2) & 1) + 32 * (v >> 1) + 16 * (v & 1)
    three = uint32(0x03030303)
    sl = uint32(2 * (v >> 1))
    sh = sl + uint32(4)
    f = uint32(4)
    lo = _dot16(_bits_at(w0, e0, sl, three), _bits_at(w1, e1, sl, three),
                _bits_at(w2, e2, sl, three), _bits_at(w3, e3, sl, three), xq, v0 >> 2)
    hi = _dot16(_bits_at(w0 >> f, e0, sh, three), _bits_at(w1 >> f, e1, sh, three),
                _bits_at(w2 >> f, e2, sh, three), _bits_at(w3 >> f, e3, sh, three), xq,
                (v0 >> 2) + 16)
    sc_lo = float32(int32(np.int8(sc & uint32(0xFF))))
    sc_hi = float32(int32(np.int8(sc >> uint32(8))))
    gl = v0 >> 5
    xl = v0 >> 4
    return _f16_half(dw, b & 1) * (sc_lo * (xd[gl] * float32(lo) - float32(32) * xs[xl])
                                   + sc_hi * (xd[gl + 2] * float32(hi) - float32(32) * xs[xl + 4]))


# --- 2- and 3-bit K-quants: a unit is 16 bytes of qs, 64 values in four runs of 16 --------------
# qs byte k of a block holds four 2-bit fields f: value 32j + l of chunk j = 4 (k // 32) + f, l = k %
# 32. So unit u' = u % 4 (bytes 16u' ..) holds, per field f, the 16 values 32j + 16(u' % 2) + i of
# chunk j = 4 (u' // 2) + f: sub-block 2j + u' % 2, each with its own scale.

@cuda.jit(device=True, inline=True)
def _two_bit_runs(w0, w1, w2, w3, e0, e1, e2, e3, f, hbit, xq, xw):
    """Integer dot of field f of the unit's words (| high bit j << 2 from e when hbit >= 0) with
    16 activations at word xw."""
    s = uint32(2 * f)
    m = uint32(0x03030303)
    if hbit < 0:
        return _dot16((w0 >> s) & m, (w1 >> s) & m, (w2 >> s) & m, (w3 >> s) & m, xq, xw)
    hs = uint32(hbit)
    one = uint32(0x01010101)
    two = uint32(2)
    return _dot16(((w0 >> s) & m) | (((e0 >> hs) & one) << two),
                  ((w1 >> s) & m) | (((e1 >> hs) & one) << two),
                  ((w2 >> s) & m) | (((e2 >> hs) & one) << two),
                  ((w3 >> s) & m) | (((e3 >> hs) & one) << two), xq, xw)


@cuda.jit(device=True, inline=True)
def _fetch_q2_k(row, row8, u, nb):
    """Scale bytes 8(u' // 2) .. +8 of the block (scale 2j + u' % 2 of its four chunks j) and
    the d, dmin word."""
    b = u >> 2
    w = 16 * nb + 4 * b + 2 * ((u >> 1) & 1)              # scales plane at byte 64 nb
    return row[w], row[w + 1], row[20 * nb + b], _Z, _Z, _Z, _Z, _Z


@cuda.jit(device=True, inline=True)
def _dot_q2_k(w0, w1, w2, w3, s0, s1, dm, h3, h4, h5, h6, h7, u, nb, xq, xd, xs):
    """y = d * sc * q - dmin * m per 16-value run (scale byte: low nibble sc, high nibble m)."""
    hh = u & 1
    v0 = 256 * (u >> 2) + 128 * ((u >> 1) & 1) + 16 * hh
    acc = float32(0)
    mins = float32(0)
    for f in range(4):
        sw = s0 if f < 2 else s1
        sm = (sw >> uint32(8 * (2 * (f & 1) + hh))) & uint32(0xFF)
        v = v0 + 32 * f
        acc += (float32(int32(sm & uint32(15))) * xd[v >> 5]
                * float32(_two_bit_runs(w0, w1, w2, w3, _Z, _Z, _Z, _Z, f, -1, xq, v >> 2)))
        mins += float32(int32(sm >> uint32(4))) * xs[v >> 4]
    return _f16_half(dm, 0) * acc - _f16_half(dm, 1) * mins


@cuda.jit(device=True, inline=True)
def _fetch_q3_k(row, row8, u, nb):
    """hmask bytes 16(u' % 2) .. (bit j of byte l: value l of chunk j), the 12 scale bytes (3
    words) and the d word."""
    b = u >> 2
    e0, e1, e2, e3 = load_u32x4(row, 4 * nb + 2 * b + (u & 1))    # hmask plane at byte 64 nb
    sw = 24 * nb + 3 * b                                          # scales plane at byte 96 nb
    dw = (96 * nb + (12 * nb + 15) // 16 * 16) // 4 + (b >> 1)    # d plane after it
    return e0, e1, e2, e3, row[sw], row[sw + 1], row[sw + 2], row[dw]


@cuda.jit(device=True, inline=True)
def _q3k_scale6(a0, a1, hi, i):
    """Signed 6-bit scale i of a Q3_K block from its scale words (bytes 0-3, 4-7, 8-11)."""
    k = i & 7
    lo_b = ((a0 if k < 4 else a1) >> uint32(8 * (k & 3))) & uint32(0xFF)
    lo = (lo_b >> uint32(4 * (i >> 3))) & uint32(15)
    h = (hi >> uint32(8 * (i & 3) + 2 * (i >> 2))) & uint32(3)
    return float32(int32(lo | (h << uint32(4))) - 32)


@cuda.jit(device=True, inline=True)
def _dot_q3_k(w0, w1, w2, w3, e0, e1, e2, e3, a0, a1, hi, dw, u, nb, xq, xd, xs):
    """y = d * scale * q, q = low 2 bits | high bit << 2, minus 4: (dx * sum (q+4) xq - 4 xs)."""
    b = u >> 2
    hh = u & 1
    hb = (u >> 1) & 1
    v0 = 256 * b + 128 * hb + 16 * hh
    acc = float32(0)
    for f in range(4):
        j = 4 * hb + f
        v = v0 + 32 * f
        sumi = _two_bit_runs(w0, w1, w2, w3, e0, e1, e2, e3, f, j, xq, v >> 2)
        acc += _q3k_scale6(a0, a1, hi, 2 * j + hh) * (xd[v >> 5] * float32(sumi)
                                                       - float32(4) * xs[v >> 4])
    return _f16_half(dw, b & 1) * acc


# --- float types: f32 activations (staged as f32), a unit is 16 bytes of the row -------------------

@cuda.jit(device=True, inline=True)
def _fetch_none(row, row8, u, nb):
    return _Z, _Z, _Z, _Z, _Z, _Z, _Z, _Z


@cuda.jit(device=True, inline=True)
def _dot_f32(w0, w1, w2, w3, h0, h1, h2, h3, h4, h5, h6, h7, u, nb, x, xd, xs):
    """Values 4u .. 4u+3 (f32 bits) with x'[4u ..]."""
    a0, a1, a2, a3 = load_f32x4(x, u)
    return as_f32(w0) * a0 + as_f32(w1) * a1 + as_f32(w2) * a2 + as_f32(w3) * a3


@cuda.jit(device=True, inline=True)
def _dot_f16(w0, w1, w2, w3, h0, h1, h2, h3, h4, h5, h6, h7, u, nb, x, xd, xs):
    """Values 8u .. 8u+7 (two f16 a word, low half first) with x'[8u ..]."""
    a0, a1, a2, a3 = load_f32x4(x, 2 * u)
    b0, b1, b2, b3 = load_f32x4(x, 2 * u + 1)
    return (_f16_half(w0, 0) * a0 + _f16_half(w0, 1) * a1 + _f16_half(w1, 0) * a2
            + _f16_half(w1, 1) * a3 + _f16_half(w2, 0) * b0 + _f16_half(w2, 1) * b1
            + _f16_half(w3, 0) * b2 + _f16_half(w3, 1) * b3)


@cuda.jit(device=True, inline=True)
def _bf16_pair(w, a, b):
    """Two bf16 (low half first) of word w dotted with a, b: each is the upper half of an f32."""
    return as_f32(w << uint32(16)) * a + as_f32(w & uint32(0xFFFF0000)) * b


@cuda.jit(device=True, inline=True)
def _dot_bf16(w0, w1, w2, w3, h0, h1, h2, h3, h4, h5, h6, h7, u, nb, x, xd, xs):
    """Values 8u .. 8u+7 (bf16) with x'[8u ..]."""
    a0, a1, a2, a3 = load_f32x4(x, 2 * u)
    b0, b1, b2, b3 = load_f32x4(x, 2 * u + 1)
    return (_bf16_pair(w0, a0, a1) + _bf16_pair(w1, a2, a3) + _bf16_pair(w2, b0, b1)
            + _bf16_pair(w3, b2, b3))


# float type -> (fetch, dot, units per 32 values, 32): exact, so taken with --exact too
F32_UNITS = {
    F32: (_fetch_none, _dot_f32, 8, 32), F16: (_fetch_none, _dot_f16, 4, 32),
    BF16: (_fetch_none, _dot_bf16, 4, 32),
}

# type -> its pair dot (PAIR_UNITS): units u, u + 1 from both units' quants and fetched words
PAIR_DOTS = {Q4_K: _pair_q4_k, Q5_K: _pair_q5_k}

# type -> (fetch, dot, units per block, values per block)
UNITS = {
    Q4_0: (_fetch_q4_0, _dot_q4_0, 1, 32), Q4_1: (_fetch_q4_1, _dot_q4_1, 1, 32),
    Q5_0: (_fetch_q5_0, _dot_q5_0, 1, 32), Q5_1: (_fetch_q5_1, _dot_q5_1, 1, 32),
    Q8_0: (_fetch_q8_0, _dot_q8_0, 2, 32),
    Q4_K: (_fetch_q4_k, _dot_q4_k, 8, 256), Q5_K: (_fetch_q5_k, _dot_q5_k, 8, 256),
    Q6_K: (_fetch_q6_k, _dot_q6_k, 8, 256), Q2_K: (_fetch_q2_k, _dot_q2_k, 4, 256),
    Q3_K: (_fetch_q3_k, _dot_q3_k, 4, 256),
}


@cuda.jit(device=True, inline=True)
def pair_ranges(w0, w1, w2, n_mat, swiglu):
    """(p0, p1, n_pairs): virtual row pairs [0, p0) are w0's (rows 2q, 2q+1), [p0, p1) w1's,
    [p1, n_pairs) w2's; SwiGLU: pair p is row p of gate (w0) and of up (w1)."""
    if swiglu:
        n = w0.shape[0]
        return n, n, n
    p0 = (w0.shape[0] + 1) // 2
    p1 = p0 + ((w1.shape[0] + 1) // 2 if n_mat > 1 else 0)
    return p0, p1, p1 + ((w2.shape[0] + 1) // 2 if n_mat > 2 else 0)


@cuda.jit(device=True, inline=True)
def _pair_rows(p, p0, p1, swiglu, rows0, rows1, rows2):
    """Virtual row pair p -> (matrix of its rows, first row, whether it is an odd count's last
    row alone)."""
    if swiglu:
        return 0, p, False
    if p < p0:
        m, r, n = 0, 2 * p, rows0
    elif p < p1:
        m, r, n = 1, 2 * (p - p0), rows1
    else:
        m, r, n = 2, 2 * (p - p1), rows2
    return m, r, r + 1 >= n


@cuda.jit(device=True, inline=True)
def _pick(m, a0, a1, a2):
    if m == 0:
        return a0
    return a1 if m == 1 else a2


@cuda.jit(device=True, inline=True)
def pair_views(p, p0, p1, swiglu, w0, w1, w2, v0, v1, v2):
    """Pair p's two rows as uint32 and uint8 views, and whether the second is the first again (an
    odd count's last row)."""
    m, r, last = _pair_rows(p, p0, p1, swiglu, w0.shape[0], w1.shape[0], w2.shape[0])
    if swiglu:
        return w0[r], w1[r], v0[r], v1[r], False
    w = _pick(m, w0, w1, w2)
    v = _pick(m, v0, v1, v2)
    r2 = r if last else r + 1
    return w[r], w[r2], v[r], v[r2], last


@cuda.jit(device=True, inline=True)
def _store_one(o, e, t, r, acc, mode):
    """o[t, r] = acc (+ bias e[r] in mode 1, + residual e[t, r] in mode 2)."""
    if mode == 1:
        acc += e[r]
    elif mode == 2:
        acc += e[t, r]
    o[t, r] = acc


@cuda.jit(device=True, inline=True)
def finish_pair(p, p0, p1, mode, a, b, o0, o1, o2, e0, e1, e2, rows0, rows1, rows2, t):
    """The epilogue of pair p's two dots for activation row t (module docstring of gemv.py:
    modes 0-3)."""
    swiglu = mode == 3
    m, r, last = _pair_rows(p, p0, p1, swiglu, rows0, rows1, rows2)
    if swiglu:
        o0[t, r] = a / (float32(1) + math.exp(-a)) * b
    else:
        o = _pick(m, o0, o1, o2)
        e = _pick(m, e0, e1, e2)
        _store_one(o, e, t, r, a, mode)
        if not last:
            _store_one(o, e, t, r + 1, b, mode)


# --- rope epilogue (modes 4, 5 = 4 + bias): Q, K, V in one launch, rope on Q and K, K and V into
# --- the cache; the row pairs of Q and K are rope's pairs (the rotation needs both values) -------

@cuda.jit(device=True, inline=True)
def _rope_rows(p, p0, p1, head_dim, neox):
    """Pair p of the Q|K|V range -> (matrix, row a, row b): Q's and K's pairs are rope's pairs
    (rows 2i, 2i+1 of a head, or i, i + head_dim/2 with neox), V's adjacent rows."""
    if p < p0:
        m, q = 0, p
    elif p < p1:
        m, q = 1, p - p0
    else:
        return 2, 2 * (p - p1), 2 * (p - p1) + 1
    if neox:
        half = head_dim // 2
        h = q // half
        r = h * head_dim + (q - h * half)
        return m, r, r + half
    return m, 2 * q, 2 * q + 1


@cuda.jit(device=True, inline=True)
def rope_views(p, p0, p1, head_dim, neox, w0, w1, w2, v0, v1, v2):
    """pair_views for the rope modes."""
    m, r, r2 = _rope_rows(p, p0, p1, head_dim, neox)
    w = _pick(m, w0, w1, w2)
    v = _pick(m, v0, v1, v2)
    return w[r], w[r2], v[r], v[r2], False


@cuda.jit(device=True, inline=True)
def finish_rope_pair(p, p0, p1, head_dim, neox, bias, a, b, o0, o1, o2, e0, e1, e2, pos, cs,
                     sn, kc, vc, layer):
    """(+ bias), rotate Q's and K's pair i by the angle pos[0] * inv_freq[i] (cs[i], sn[i]: its
    cosine and sine, computed in float64 by the prologue; the rotation in f32: rope.py's
    arithmetic), store into o0/o1/o2, and K's and V's pair into the cache row pos[0]."""
    m, r, r2 = _rope_rows(p, p0, p1, head_dim, neox)
    if bias:
        e = _pick(m, e0, e1, e2)
        a += e[r]
        b += e[r2]
    if m < 2:
        i = r % head_dim if neox else (r % head_dim) // 2
        c = cs[i]
        s = sn[i]
        a, b = a * c - b * s, a * s + b * c
    o = _pick(m, o0, o1, o2)
    o[0, r] = a
    o[0, r2] = b
    if m > 0:
        g = r // head_dim
        d = r - g * head_dim
        if m == 1:
            kc[layer, g, pos[0], d] = a
            kc[layer, g, pos[0], d + r2 - r] = b
        else:
            vc[layer, g, pos[0], d] = a
            vc[layer, g, pos[0], d + 1] = b


@functools.lru_cache(maxsize=None)
def unit_ops(qtype: int, unroll: int, pairs: bool, probe: int = 0, full: bool = False):
    """The row walk of the fast mat-vec kernels, as device functions (load, compute):
    load(ra, rb, ra8, rb8, ub, lane, u_end, nb, qa, qb, ha, hb) issues a batch's loads of a row
    pair (the lane's units slot(ub, lane, i), i < unroll, below u_end: quants into qa/qb, fetched
    words into ha/hb); compute(ub, lane, u_end, nb, q, h, xq, xd, xs) returns the batch's partial
    dot of one row with one row of activations. `pairs`: a lane's slots 2j, 2j + 1 are adjacent
    units dotted together (PAIR_DOTS; taken only for those types and an even unroll). `full`:
    the caller guarantees every slot is below u_end (a row's units a multiple of the batch's):
    compute's dots are then branch-free, so one row's and another's share a basic block."""
    f32x = qtype in F32_UNITS                # f32 activations (float types) or q8
    fetch, dot, upb, bv = F32_UNITS[qtype] if f32x else UNITS[qtype]
    pairs = pairs and qtype in PAIR_DOTS and unroll % 2 == 0
    pair_dot = PAIR_DOTS[qtype] if pairs else dot

    @cuda.jit(device=True, inline=True)
    def slot(ub, lane, i):
        """The unit of batch slot i of a lane: ub + lane + 32 i, or with pairs the units
        ub + 2 lane + 64 (i // 2) + i % 2 (a lane's slots 2j, 2j + 1 adjacent)."""
        if pairs:
            return ub + 2 * lane + 2 * WARP * (i >> 1) + (i & 1)
        return ub + lane + WARP * i

    @cuda.jit(device=True, inline=True)
    def load(ra, rb, ra8, rb8, ub, lane, u_end, nb, qa, qb, ha, hb):
        for i in range(unroll):
            u = slot(ub, lane, i)
            if u < u_end:
                qa[4 * i], qa[4 * i + 1], qa[4 * i + 2], qa[4 * i + 3] = load_u32x4(ra, u)
                qb[4 * i], qb[4 * i + 1], qb[4 * i + 2], qb[4 * i + 3] = load_u32x4(rb, u)
                (ha[8 * i], ha[8 * i + 1], ha[8 * i + 2], ha[8 * i + 3], ha[8 * i + 4],
                 ha[8 * i + 5], ha[8 * i + 6], ha[8 * i + 7]) = fetch(ra, ra8, u, nb)
                (hb[8 * i], hb[8 * i + 1], hb[8 * i + 2], hb[8 * i + 3], hb[8 * i + 4],
                 hb[8 * i + 5], hb[8 * i + 6], hb[8 * i + 7]) = fetch(rb, rb8, u, nb)

    @cuda.jit(device=True, inline=True)
    def compute(ub, lane, u_end, nb, q, h, xq, xd, xs):
        acc = float32(0)
        if pairs:                        # slots 2j, 2j + 1: units u, u + 1 (u_end is even)
            for j in range(unroll // 2):
                u = slot(ub, lane, 2 * j)
                if full or u < u_end:
                    a = 8 * j
                    c = 16 * j
                    acc += pair_dot(q[a], q[a + 1], q[a + 2], q[a + 3], q[a + 4], q[a + 5],
                                    q[a + 6], q[a + 7], h[c], h[c + 1], h[c + 2], h[c + 3],
                                    h[c + 4], h[c + 5], h[c + 6], h[c + 7], h[c + 8], h[c + 9],
                                    h[c + 10], h[c + 11], h[c + 12], h[c + 13], h[c + 14],
                                    h[c + 15], u, nb, xq, xd, xs)
            return acc
        for i in range(unroll):
            u = slot(ub, lane, i)
            if u < u_end and probe == 2:
                t = q[4 * i] ^ q[4 * i + 1] ^ q[4 * i + 2] ^ q[4 * i + 3]
                for j in range(8):
                    t ^= h[8 * i + j]
                acc += float32(t & uint32(1))
            elif full or u < u_end:
                acc += dot(q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3],
                           h[8 * i], h[8 * i + 1], h[8 * i + 2], h[8 * i + 3], h[8 * i + 4],
                           h[8 * i + 5], h[8 * i + 6], h[8 * i + 7], u, nb, xq, xd, xs)
        return acc

    return load, compute


@functools.lru_cache(maxsize=None)
def q8_kernel(qtype: int, n_mat: int, norm: bool, mode: int, warps: int, unroll: int,
              split: int, probe: int = 0, head_dim: int = 0, neox: bool = False,
              prequant: bool = False, pairs: bool = False):
    """The fast mat-vec kernel (module docstring); arguments and launch as gemv.py's kernel.
    `split` warps of a block share each row pair, each taking a slice of its units."""
    from ._jit import cuda_kernel
    f32x = qtype in F32_UNITS                # f32 activations (float types) or q8
    upb, bv = (F32_UNITS[qtype] if f32x else UNITS[qtype])[2:]
    threads = warps * WARP
    step = WARP * unroll
    nq = 4 * unroll          # quant words per row and batch
    nh = 8 * unroll          # fetched words per row and batch
    swiglu = mode == 3
    groups = warps // split  # pairs a block works on at once
    rope = mode >= 4         # modes 4, 5: Q, K, V with rope and the cache store (5: + bias)
    load, compute = unit_ops(qtype, unroll, pairs, probe)
    n_angles = max(1, head_dim // 2)

    @cuda.jit(device=True, inline=True)
    def views(p, p0, p1, w0, w1, w2, v0, v1, v2):
        if rope:
            return rope_views(p, p0, p1, head_dim, neox, w0, w1, w2, v0, v1, v2)
        return pair_views(p, p0, p1, swiglu, w0, w1, w2, v0, v1, v2)

    @cuda.jit(device=True, inline=True)
    def finish(p, p0, p1, a, b, o0, o1, o2, e0, e1, e2, rows0, rows1, rows2, pos, cs, sn, kc,
               vc, layer):
        if rope:
            finish_rope_pair(p, p0, p1, head_dim, neox, mode == 5, a, b, o0, o1, o2, e0, e1, e2,
                             pos, cs, sn, kc, vc, layer)
        else:
            finish_pair(p, p0, p1, mode, a, b, o0, o1, o2, e0, e1, e2, rows0, rows1, rows2, 0)

    @cuda_kernel
    def _gemv_q8(o0, o1, o2, w0, w1, w2, v0, v1, v2, e0, e1, e2, x, norm_w, eps, pos, inv_freq,
                 kc, vc, layer):
        """As gemv.py's kernel. The block's warps form `groups` groups of `split`; each round, a
        group takes a row pair (grid-strided) and its warp s the s-th slice of the pair's units,
        streaming it in batches of `unroll` units per lane and row (all loads of a batch issued
        before any is used; the first batch's before the activations are staged). The slices'
        sums meet in shared memory; rounds are block-uniform so the barriers are reached by all."""
        sm = cuda.shared.array(0, float32)
        red = cuda.shared.array(32, float32)
        cs = cuda.shared.array(n_angles, float32)        # rope modes: cos, sin of pair i's angle
        sn = cuda.shared.array(n_angles, float32)
        part = cuda.shared.array((warps, 2), float32)
        qa = cuda.local.array(nq, uint32)
        qb = cuda.local.array(nq, uint32)
        ha = cuda.local.array(nh, uint32)
        hb = cuda.local.array(nh, uint32)
        tid = cuda.threadIdx.x
        lane = tid % WARP
        wi = tid // WARP
        sl = wi % split
        cols = x.shape[1]
        nb = cols // bv
        n_units = nb * upb
        chunk = ((n_units + split * step - 1) // (split * step)) * step   # units per slice
        u_lo = sl * chunk
        u_end = min(n_units, u_lo + chunk)
        p0, p1, n_pairs = pair_ranges(w0, w1, w2, n_mat, swiglu)
        first = cuda.blockIdx.x * groups
        stride = cuda.gridDim.x * groups
        rounds = (n_pairs - first + stride - 1) // stride if first < n_pairs else 0
        p = first + wi // split
        if rounds > 0 and p < n_pairs:                   # batch 0 flies during the staging
            ra, rb, ra8, rb8, last = views(p, p0, p1, w0, w1, w2, v0, v1, v2)
            load(ra, rb, ra8, rb8, u_lo, lane, u_end, nb, qa, qb, ha, hb)
        if probe == 1 or prequant:       # prequant: quant_kernel's output is in norm_w's slot
            pass
        elif f32x:
            stage_f32(sm, x, norm_w, eps, norm, red, threads)
        else:
            stage_q8(sm, x, norm_w, eps, norm, red, threads)
        if rope:                                         # the angles (float64), as rope.py
            for i in range(cuda.threadIdx.x, n_angles, threads):
                theta = float64(pos[0]) * inv_freq[i]
                cs[i] = float32(math.cos(theta))
                sn[i] = float32(math.sin(theta))
        cuda.syncthreads()                               # activations (and angles) staged
        nw = cols // 4
        if f32x:                                         # x' itself (xd, xs unused)
            xq = sm[:cols]
            xd = xs = sm[cols:]
        elif prequant:
            xq = norm_w[:nw].view(np.uint32)
            xd = norm_w[nw:nw + cols // 32]
            xs = norm_w[nw + cols // 32:]
        else:
            xq = sm[:nw].view(np.uint32)
            xd = sm[nw:nw + cols // 32]
            xs = sm[nw + cols // 32:]
        rows0, rows1, rows2 = w0.shape[0], w1.shape[0], w2.shape[0]
        for k in range(rounds):
            p = first + k * stride + wi // split
            acc_a = float32(0)
            acc_b = float32(0)
            if p < n_pairs:
                ra, rb, ra8, rb8, last = views(p, p0, p1, w0, w1, w2, v0, v1, v2)
                for u0 in range(u_lo, u_end, step):
                    if k > 0 or u0 > u_lo:
                        load(ra, rb, ra8, rb8, u0, lane, u_end, nb, qa, qb, ha, hb)
                    acc_a += compute(u0, lane, u_end, nb, qa, ha, xq, xd, xs)
                    acc_b += compute(u0, lane, u_end, nb, qb, hb, xq, xd, xs)
            a = warp_sum(acc_a)
            b = warp_sum(acc_b)
            if split == 1:
                if lane == 0 and p < n_pairs:
                    finish(p, p0, p1, a, b, o0, o1, o2, e0, e1, e2, rows0, rows1, rows2, pos,
                           cs, sn, kc, vc, layer)
            else:
                if lane == 0:
                    part[wi, 0] = a
                    part[wi, 1] = b
                cuda.syncthreads()                       # every slice's sums parked
                if lane == 0 and sl == 0 and p < n_pairs:
                    for j in range(1, split):
                        a += part[wi + j, 0]
                        b += part[wi + j, 1]
                    finish(p, p0, p1, a, b, o0, o1, o2, e0, e1, e2, rows0, rows1, rows2, pos,
                           cs, sn, kc, vc, layer)
                cuda.syncthreads()                       # parked sums read: free for the next

    return _gemv_q8


# --- many activation rows (a batched step's decode rows): each weight row pair is read once for
# --- all of them --------------------------------------------------------------------------------

def _row_tree(group: int, compute, mode: int, clamp: bool):
    """Device functions (zeros, step, finish) over a group's accumulators, kept as a nested tuple
    (a pair of floats per activation row; halves nested) so that every index is a constant and
    they stay in registers once NVVM inlines them (forceinline: numba compiles each level once;
    a local array indexed in a loop would go to the stack):
    zeros() -> the tuple of 0s; step(acc, t, n_x, u0, lane, u_end, nb, qa, qb, ha, hb, xa, cols)
    -> acc plus the batch's dots of rows t .. t + group - 1 (those below n_x) with the row
    pair; finish(acc, t, n_x, lane, p, p0, p1, o0, o1, o2, e0, e1, e2, rows0, rows1, rows2)
    reduces each row's pair over the warp and stores it (finish_pair). `clamp`: rows past n_x
    compute on row n_x - 1 (their sums are never stored) rather than branch around, so that every
    row's work is in one basic block and NVVM can share its row-independent part (nibble masks,
    scale decoding) between the rows."""
    from ._jit import forceinline_device
    if group == 1:
        @forceinline_device
        def zeros():
            return float32(0), float32(0)

        @forceinline_device
        def step(acc, t, n_x, u0, lane, u_end, nb, qa, qb, ha, hb, xa, cols):
            if not clamp and t >= n_x:
                return acc
            nw = cols // 4
            xr = xa[min(t, n_x - 1)]
            xq = xr[:nw].view(np.uint32)
            xd = xr[nw:nw + cols // 32]
            xs = xr[nw + cols // 32:]
            return (acc[0] + compute(u0, lane, u_end, nb, qa, ha, xq, xd, xs),
                    acc[1] + compute(u0, lane, u_end, nb, qb, hb, xq, xd, xs))

        @forceinline_device
        def finish(acc, t, n_x, lane, p, p0, p1, o0, o1, o2, e0, e1, e2, rows0, rows1, rows2):
            if t < n_x:
                a = warp_sum(acc[0])
                b = warp_sum(acc[1])
                if lane == 0:
                    finish_pair(p, p0, p1, mode, a, b, o0, o1, o2, e0, e1, e2, rows0, rows1,
                                rows2, t)

        return zeros, step, finish
    half = group // 2
    z, st, fi = _row_tree(half, compute, mode, clamp)

    @forceinline_device
    def zeros():
        return z(), z()

    @forceinline_device
    def step(acc, t, n_x, u0, lane, u_end, nb, qa, qb, ha, hb, xa, cols):
        return (st(acc[0], t, n_x, u0, lane, u_end, nb, qa, qb, ha, hb, xa, cols),
                st(acc[1], t + half, n_x, u0, lane, u_end, nb, qa, qb, ha, hb, xa, cols))

    @forceinline_device
    def finish(acc, t, n_x, lane, p, p0, p1, o0, o1, o2, e0, e1, e2, rows0, rows1, rows2):
        fi(acc[0], t, n_x, lane, p, p0, p1, o0, o1, o2, e0, e1, e2, rows0, rows1, rows2)
        fi(acc[1], t + half, n_x, lane, p, p0, p1, o0, o1, o2, e0, e1, e2, rows0, rows1, rows2)

    return zeros, step, finish


@functools.lru_cache(maxsize=None)
def rows_kernel(qtype: int, n_mat: int, mode: int, warps: int, unroll: int, pairs: bool,
                group: int, clamp: bool = False, full: bool = False):
    """The fast mat-vec over several activation rows: x (n_x, cols) quantized beforehand by
    quant_kernel into xa (n_x, smem_words) f32; out_m[t, r] = w_m[r] . x[t] (+ e per mode 0-3 as
    q8_kernel's, the residual e_m[t, r]). Block (b, g) takes activation rows g * group ..
    (group, a power of two: its accumulators are a nested tuple in registers, _row_tree) and its
    warps walk the row pairs with a grid stride as q8_kernel's (split 1): a batch of a pair's
    units is loaded once and dotted with each of the rows, which re-read only the activations
    (L1). A row's sums are q8_kernel's, in the same order (same units per lane and batch, same
    warp_sum), so its outputs are the one-row kernel's bits, whatever the other rows, their
    count, `group`, `clamp` (_row_tree) or `full` (unit_ops: rows of whole batches)."""
    from ._jit import cuda_kernel
    assert group & (group - 1) == 0
    upb, bv = UNITS[qtype][2:]
    step = WARP * unroll
    nq = 4 * unroll
    nh = 8 * unroll
    swiglu = mode == 3
    load, compute = unit_ops(qtype, unroll, pairs, 0, full)
    zeros, row_step, row_finish = _row_tree(group, compute, mode, clamp)

    @cuda_kernel
    def _gemv_rows(o0, o1, o2, w0, w1, w2, v0, v1, v2, e0, e1, e2, xa, cols, n_x):
        qa = cuda.local.array(nq, uint32)
        qb = cuda.local.array(nq, uint32)
        ha = cuda.local.array(nh, uint32)
        hb = cuda.local.array(nh, uint32)
        tid = cuda.threadIdx.x
        lane = tid % WARP
        wi = tid // WARP
        nb = cols // bv
        n_units = nb * upb
        t0 = cuda.blockIdx.y * group
        p0, p1, n_pairs = pair_ranges(w0, w1, w2, n_mat, swiglu)
        rows0, rows1, rows2 = w0.shape[0], w1.shape[0], w2.shape[0]
        for p in range(cuda.blockIdx.x * warps + wi, n_pairs, cuda.gridDim.x * warps):
            ra, rb, ra8, rb8, last = pair_views(p, p0, p1, swiglu, w0, w1, w2, v0, v1, v2)
            acc = zeros()
            for u0 in range(0, n_units, step):
                load(ra, rb, ra8, rb8, u0, lane, n_units, nb, qa, qb, ha, hb)
                acc = row_step(acc, t0, n_x, u0, lane, n_units, nb, qa, qb, ha, hb, xa, cols)
            row_finish(acc, t0, n_x, lane, p, p0, p1, o0, o1, o2, e0, e1, e2, rows0, rows1,
                       rows2)

    return _gemv_rows
