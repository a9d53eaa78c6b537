"""The one table of GGML types and the block decoders shared by the CPU and CUDA backends.

Every supported type decodes in *chunks* of 32 consecutive values: a 32-value block (Q4_0 ... Q8_0)
is one chunk, a 256-value K-quant block is 8 chunks, and for F32/F16/BF16 a "block" is 32 elements.
Per type there are two functions, written once as plain Python over numpy scalars:

    dq32_<t>(src, b, j, dst, o, h)   writes values [32j, 32j+32) of the block at byte b of src
                                     (a 1-D uint8 array) into dst[o:o+32] (float32)
    dot32_<t>(src, b, j, x, xo, h, xs16)
                                     returns sum_l value[32j+l] * x[xo+l] (float32); xs16[k] holds
                                     sum(x[16k:16k+16]) (the min terms of Q4_1, Q5_1, Q2_K, Q4_K
                                     and Q5_K use it instead of summing x per row)

`h` is always 16 (half a chunk). CPU callers pass it at run time on purpose: with a constant trip
count LLVM fully unrolls the inner loops and then vectorizes the *chunk* loop with gathers (4x
slower); with a run-time one it vectorizes the 16/32-value loop itself. CUDA kernels pass the
constant 16, so that NVVM unrolls them completely.
They are registered with numba's CPU registry here (inlined at the call site) and with numba-cuda's
by `backends.cuda`; under the CUDA simulator they run as the plain Python they are.

dq32_* reproduces `gguf.quants.dequantize` bit for bit: the float32 operations and their order are
the same (no fused multiply-add where a kernel is not compiled with fast math).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload, register_jitable

QK = 32                          # values per decode chunk

# Every function below is inlined into its caller at numba-IR level on the CPU (inline="always"):
# with the chunk offsets visible, LLVM vectorizes the 16/32-value loops and hoists the per-row work
# (2x the mat-vec throughput of a called function, measured). It then runs under the caller's flags:
# the CPU mat-vec reassociates (fast math), the dequantize and embedding kernels stay exact.


@dataclass(frozen=True)
class GGMLType:
    """Block layout of one GGML type. Supported types have a decoder; the rest are only sized."""

    id: int
    name: str
    block_size: int              # values per block
    type_size: int               # bytes per block
    layout: str = ""

    @property
    def supported(self) -> bool:
        return self.id in DECODERS

    @property
    def chunk_bytes(self) -> int:
        """Bytes per 32-value decode unit's block (the whole block for quantized types)."""
        return self.type_size * QK if self.block_size == 1 else self.type_size

    @property
    def chunks_per_block(self) -> int:
        return 1 if self.block_size == 1 else self.block_size // QK

    def row_bytes(self, n: int) -> int:
        return n // self.block_size * self.type_size


_TYPES = [
    GGMLType(0, "F32", 1, 4, "f32"),
    GGMLType(1, "F16", 1, 2, "f16"),
    GGMLType(2, "Q4_0", 32, 18, "d:f16 | qs[16]: lo nibbles = values 0..15, hi = 16..31; y = d*(q-8)"),
    GGMLType(3, "Q4_1", 32, 20, "d:f16 m:f16 | qs[16] as Q4_0; y = d*q + m"),
    GGMLType(6, "Q5_0", 32, 22, "d:f16 | qh:u32 (5th bits) | qs[16]; y = d*(q-16)"),
    GGMLType(7, "Q5_1", 32, 24, "d:f16 m:f16 | qh:u32 | qs[16]; y = d*q + m"),
    GGMLType(8, "Q8_0", 32, 34, "d:f16 | qs:i8[32]; y = d*q"),
    GGMLType(9, "Q8_1", 32, 40),
    GGMLType(10, "Q2_K", 256, 84, "scales[16] (lo: scale, hi: min) | qs[64] 2-bit | d:f16 dmin:f16"),
    GGMLType(11, "Q3_K", 256, 110, "hmask[32] | qs[64] 2-bit | scales[12] 6-bit signed | d:f16"),
    GGMLType(12, "Q4_K", 256, 144, "d:f16 dmin:f16 | scales[12] 8x(6-bit scale, 6-bit min) | qs[128]"),
    GGMLType(13, "Q5_K", 256, 176, "d:f16 dmin:f16 | scales[12] | qh[32] | qs[128]"),
    GGMLType(14, "Q6_K", 256, 210, "ql[128] | qh[64] | scales:i8[16] | d:f16; y = d*sc*(q-32)"),
    GGMLType(15, "Q8_K", 256, 292),
    GGMLType(16, "IQ2_XXS", 256, 66), GGMLType(17, "IQ2_XS", 256, 74),
    GGMLType(18, "IQ3_XXS", 256, 98), GGMLType(19, "IQ1_S", 256, 50),
    GGMLType(20, "IQ4_NL", 32, 18), GGMLType(21, "IQ3_S", 256, 110),
    GGMLType(22, "IQ2_S", 256, 82), GGMLType(23, "IQ4_XS", 256, 136),
    GGMLType(24, "I8", 1, 1), GGMLType(25, "I16", 1, 2), GGMLType(26, "I32", 1, 4),
    GGMLType(27, "I64", 1, 8), GGMLType(28, "F64", 1, 8), GGMLType(29, "IQ1_M", 256, 56),
    GGMLType(30, "BF16", 1, 2, "bf16 (upper half of an f32)"),
    GGMLType(34, "TQ1_0", 256, 54), GGMLType(35, "TQ2_0", 256, 66),
    GGMLType(39, "MXFP4", 32, 17), GGMLType(40, "NVFP4", 64, 36), GGMLType(41, "Q1_0", 128, 18),
]
GGML_TYPES: dict[int, GGMLType] = {t.id: t for t in _TYPES}
TYPE_IDS: dict[str, int] = {t.name: t.id for t in _TYPES}

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 10, 11, 12, 13, 14, 30


def jitable(fn):
    """Register fn for numba's CPU target, inlined at the call site; backends.cuda registers the
    same functions (JITABLES) with numba-cuda."""
    register_jitable(inline="always")(fn)
    _JITABLE.append(fn)
    return fn


_JITABLE: list = []


# --- scalar helpers -------------------------------------------------------------------------------
# Indexing style, for both targets: every array index is wrapped in U() (uint64). numba applies
# negative-index wraparound to signed indices only, so an unsigned index compiles to a plain address:
# LLVM then vectorizes the CPU loops as contiguous loads and NVVM unrolls the GPU loops without
# 64-bit selects. Integer values are narrowed with I32() before conversion to float32 (a 32-bit I2F,
# not the slow 64-bit one).
U = np.uint64
I32 = np.int32


def f16_to_f32(lo, hi):
    """IEEE half (two little-endian bytes) -> float32, exactly, with integer ops only. This Python
    body runs under the CUDA simulator; compiled code uses the hardware conversion (CPU: the
    overload below, vcvtph2ps; CUDA: cvt.f32.f16, registered by backends.cuda)."""
    h = (I32(hi) << 8) | I32(lo)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0x1F:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        if e == 0:
            e = 1                # subnormal: m * 2^-24
        else:
            m = m | 0x400        # normal: (1024 + m) * 2^(e - 25)
        v = np.float32(np.int64(m) << e) * np.float32(2.9802322387695312e-08)   # 2^-25, exact
    if h & 0x8000:
        v = -v
    return v


@overload(f16_to_f32, inline="always")
def _f16_to_f32_cpu(lo, hi):
    return lambda lo, hi: _half_to_float(lo, hi)


@intrinsic
def _half_to_float(typingctx, lo, hi):
    """float32 of the half whose bytes are lo, hi: an LLVM bit cast to half and an fpext."""
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        a = builder.zext(context.cast(builder, args[0], sig.args[0], types.uint8), i32)
        b = builder.zext(context.cast(builder, args[1], sig.args[1], types.uint8), i32)
        bits = builder.trunc(builder.or_(a, builder.shl(b, ir.Constant(i32, 8))), ir.IntType(16))
        return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())
    return types.float32(lo, hi), codegen


@jitable
def _f16(src, b):
    return f16_to_f32(src[U(b)], src[U(b + 1)])


@jitable
def _u32(src, b):
    return (np.uint32(src[U(b)]) | (np.uint32(src[U(b + 1)]) << 8)
            | (np.uint32(src[U(b + 2)]) << 16) | (np.uint32(src[U(b + 3)]) << 24))


@jitable
def _bf16(src, b):
    """bf16 (two little-endian bytes) -> float32: the upper half of an f32 bit pattern."""
    return _f32_from_bits(((np.uint32(src[U(b + 1)]) << 8) | np.uint32(src[U(b)])) << 16)


@jitable
def _pow2(k):
    """2^k as float32 for -149 <= k <= 127, exact: built from shifts of at most 62 bits (a longer
    shift of an int64 is undefined), each product or quotient by a power of two exact."""
    if k >= 0:
        return np.float32(np.int64(1) << min(k, 62)) * np.float32(np.int64(1) << max(k - 62, 0))
    v = np.float32(1.0)
    r = -k
    while r > 0:
        step = min(r, 62)
        v = v / np.float32(np.int64(1) << step)
        r -= step
    return v


@jitable
def _f32_from_bits(bits):
    """uint32 bit pattern -> float32 with integer ops only (exact: subnormals, inf, nan too)."""
    e = I32((bits >> 23) & 0xFF)
    m = np.int64(bits & 0x7FFFFF)
    if e == 0xFF:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        if e == 0:
            e = 1                # subnormal: m * 2^-149
        else:
            m = m | 0x800000     # normal: (2^23 + m) * 2^(e - 150)
        v = np.float32(m) * _pow2(e - 150)
    if bits & 0x80000000:
        v = -v
    return v


@jitable
def _i8(v):
    q = I32(v)
    return I32(q - ((q & 0x80) << 1))


@jitable
def _xsum(xs16, xo, n):
    """Sum of x[xo : xo + 16n] from the precomputed 16-value sums (xo a multiple of 16)."""
    s = xs16[U(xo // 16)]
    if n == 2:
        s += xs16[U(xo // 16 + 1)]
    return s


@jitable
def _k_scale_min(src, b, j):
    """6-bit (scale, min) of sub-block j from the 12 packed bytes at src[b:] (Q4_K / Q5_K)."""
    if j < 4:
        sc = I32(src[U(b + j)]) & 63
        mn = I32(src[U(b + 4 + j)]) & 63
    else:
        sc = (I32(src[U(b + 4 + j)]) & 15) | ((I32(src[U(b + j - 4)]) >> 2) & 0x30)
        mn = (I32(src[U(b + 4 + j)]) >> 4) | ((I32(src[U(b + j)]) >> 2) & 0x30)
    return np.float32(I32(sc)), np.float32(I32(mn))


@jitable
def _q3k_scale(src, b, i):
    """Signed 6-bit scale i (0..15) of a Q3_K block whose 12 scale bytes start at src[b]."""
    lo = (I32(src[U(b + (i & 7))]) >> (4 * (i >> 3))) & 15
    hi = (I32(src[U(b + 8 + (i & 3))]) >> (2 * (i >> 2))) & 3
    return np.float32(I32((lo | (hi << 4)) - 32))


# --- float types: a "block" is 32 elements --------------------------------------------------------

@jitable
def dq32_f32(src, b, j, dst, o, h):
    for l in range(2 * h):
        dst[U(o + l)] = _f32_from_bits(_u32(src, b + 4 * l))


@jitable
def dot32_f32(src, b, j, x, xo, h, xs16):
    acc = np.float32(0)
    for l in range(2 * h):
        acc += _f32_from_bits(_u32(src, b + 4 * l)) * x[U(xo + l)]
    return acc


@jitable
def dq32_f16(src, b, j, dst, o, h):
    for l in range(2 * h):
        dst[U(o + l)] = _f16(src, b + 2 * l)


@jitable
def dot32_f16(src, b, j, x, xo, h, xs16):
    acc = np.float32(0)
    for l in range(2 * h):
        acc += _f16(src, b + 2 * l) * x[U(xo + l)]
    return acc


@jitable
def dq32_bf16(src, b, j, dst, o, h):
    for l in range(2 * h):
        dst[U(o + l)] = _bf16(src, b + 2 * l)


@jitable
def dot32_bf16(src, b, j, x, xo, h, xs16):
    acc = np.float32(0)
    for l in range(2 * h):
        acc += _bf16(src, b + 2 * l) * x[U(xo + l)]
    return acc


# --- 32-value block types ---------------------------------------------------------------------------

@jitable
def dq32_q4_0(src, b, j, dst, o, h):
    d = _f16(src, b)
    for l in range(h):
        q = I32(src[U(b + 2 + l)])
        dst[U(o + l)] = d * np.float32(I32((q & 15) - 8))
        dst[U(o + h + l)] = d * np.float32(I32((q >> 4) - 8))


@jitable
def dot32_q4_0(src, b, j, x, xo, h, xs16):
    acc = np.float32(0)
    for l in range(h):
        q = I32(src[U(b + 2 + l)])
        acc += (np.float32(I32((q & 15) - 8)) * x[U(xo + l)]
                + np.float32(I32((q >> 4) - 8)) * x[U(xo + h + l)])
    return _f16(src, b) * acc


@jitable
def dq32_q4_1(src, b, j, dst, o, h):
    d = _f16(src, b)
    m = _f16(src, b + 2)
    for l in range(h):
        q = I32(src[U(b + 4 + l)])
        dst[U(o + l)] = d * np.float32(I32(q & 15)) + m
        dst[U(o + h + l)] = d * np.float32(I32(q >> 4)) + m


@jitable
def dot32_q4_1(src, b, j, x, xo, h, xs16):
    acc = np.float32(0)
    for l in range(h):
        q = I32(src[U(b + 4 + l)])
        acc += np.float32(I32(q & 15)) * x[U(xo + l)] + np.float32(I32(q >> 4)) * x[U(xo + h + l)]
    return _f16(src, b) * acc + _f16(src, b + 2) * _xsum(xs16, xo, 2)


@jitable
def _q5_bit(qh, l):
    """The 5th bit of value l of a Q5_0/Q5_1 block, as 0 or 16."""
    return I32((qh >> np.uint32(l)) & np.uint32(1)) << 4


@jitable
def dq32_q5_0(src, b, j, dst, o, h):
    d = _f16(src, b)
    qh = _u32(src, b + 2)
    for l in range(h):
        q = I32(src[U(b + 6 + l)])
        dst[U(o + l)] = d * np.float32(I32(((q & 15) | _q5_bit(qh, l)) - 16))
        dst[U(o + h + l)] = d * np.float32(I32(((q >> 4) | _q5_bit(qh, l + h)) - 16))


@jitable
def dot32_q5_0(src, b, j, x, xo, h, xs16):
    qh = _u32(src, b + 2)
    acc = np.float32(0)
    for l in range(h):
        q = I32(src[U(b + 6 + l)])
        acc += (np.float32(I32(((q & 15) | _q5_bit(qh, l)) - 16)) * x[U(xo + l)]
                + np.float32(I32(((q >> 4) | _q5_bit(qh, l + h)) - 16)) * x[U(xo + h + l)])
    return _f16(src, b) * acc


@jitable
def dq32_q5_1(src, b, j, dst, o, h):
    d = _f16(src, b)
    m = _f16(src, b + 2)
    qh = _u32(src, b + 4)
    for l in range(h):
        q = I32(src[U(b + 8 + l)])
        dst[U(o + l)] = d * np.float32(I32((q & 15) | _q5_bit(qh, l))) + m
        dst[U(o + h + l)] = d * np.float32(I32((q >> 4) | _q5_bit(qh, l + h))) + m


@jitable
def dot32_q5_1(src, b, j, x, xo, h, xs16):
    qh = _u32(src, b + 4)
    acc = np.float32(0)
    for l in range(h):
        q = I32(src[U(b + 8 + l)])
        acc += (np.float32(I32((q & 15) | _q5_bit(qh, l))) * x[U(xo + l)]
                + np.float32(I32((q >> 4) | _q5_bit(qh, l + h))) * x[U(xo + h + l)])
    return _f16(src, b) * acc + _f16(src, b + 2) * _xsum(xs16, xo, 2)


@jitable
def dq32_q8_0(src, b, j, dst, o, h):
    d = _f16(src, b)
    for l in range(2 * h):
        dst[U(o + l)] = np.float32(_i8(src[U(b + 2 + l)])) * d


@jitable
def dot32_q8_0(src, b, j, x, xo, h, xs16):
    acc = np.float32(0)
    for l in range(2 * h):
        acc += np.float32(_i8(src[U(b + 2 + l)])) * x[U(xo + l)]
    return _f16(src, b) * acc


# --- K-quants: 256-value blocks, 8 chunks of 32 ---------------------------------------------------

@jitable
def dq32_q2_k(src, b, j, dst, o, h):
    d = _f16(src, b + 80)
    dmin = _f16(src, b + 82)
    q0 = b + 16 + 32 * (j >> 2)                    # 32 bytes; 2-bit field (j & 3) of each
    shift = 2 * (j & 3)
    for half in range(2):
        sm = I32(src[U(b + 2 * j + half)])          # scale 2j + half: lo nibble scale, hi min
        dl = d * np.float32(I32(sm & 15))
        ml = dmin * np.float32(I32(sm >> 4))
        for l in range(h * half, h * half + h):
            dst[U(o + l)] = dl * np.float32(I32((I32(src[U(q0 + l)]) >> shift) & 3)) - ml


@jitable
def dot32_q2_k(src, b, j, x, xo, h, xs16):
    q0 = b + 16 + 32 * (j >> 2)
    shift = 2 * (j & 3)
    acc = np.float32(0)
    mins = np.float32(0)
    for half in range(2):
        sm = I32(src[U(b + 2 * j + half)])
        part = np.float32(0)
        for l in range(h * half, h * half + h):
            part += np.float32(I32((I32(src[U(q0 + l)]) >> shift) & 3)) * x[U(xo + l)]
        acc += np.float32(I32(sm & 15)) * part
        mins += np.float32(I32(sm >> 4)) * _xsum(xs16, xo + h * half, 1)
    return _f16(src, b + 80) * acc - _f16(src, b + 82) * mins


@jitable
def dq32_q3_k(src, b, j, dst, o, h):
    d = _f16(src, b + 108)
    q0 = b + 32 + 32 * (j >> 2)                     # low 2 bits: field (j & 3) of qs
    lshift = 2 * (j & 3)                            # high bit: bit j of hmask[l]
    for half in range(2):
        dl = d * _q3k_scale(src, b + 96, 2 * j + half)
        for l in range(h * half, h * half + h):
            lo = (I32(src[U(q0 + l)]) >> lshift) & 3
            hb = (I32(src[U(b + l)]) >> j) & 1
            dst[U(o + l)] = dl * np.float32(I32(lo - ((hb ^ 1) << 2)))


@jitable
def dot32_q3_k(src, b, j, x, xo, h, xs16):
    q0 = b + 32 + 32 * (j >> 2)
    lshift = 2 * (j & 3)
    acc = np.float32(0)
    for half in range(2):
        part = np.float32(0)
        for l in range(h * half, h * half + h):
            lo = (I32(src[U(q0 + l)]) >> lshift) & 3
            hb = (I32(src[U(b + l)]) >> j) & 1
            part += np.float32(I32(lo - ((hb ^ 1) << 2))) * x[U(xo + l)]
        acc += _q3k_scale(src, b + 96, 2 * j + half) * part
    return _f16(src, b + 108) * acc


@jitable
def dq32_q4_k(src, b, j, dst, o, h):
    sc, mn = _k_scale_min(src, b + 4, j)
    d = _f16(src, b) * sc
    m = _f16(src, b + 2) * mn
    q0 = b + 16 + 32 * (j >> 1)                     # 32 bytes; nibble (j & 1) of each
    shift = 4 * (j & 1)
    for l in range(2 * h):
        dst[U(o + l)] = d * np.float32(I32((I32(src[U(q0 + l)]) >> shift) & 15)) - m


@jitable
def dot32_q4_k(src, b, j, x, xo, h, xs16):
    sc, mn = _k_scale_min(src, b + 4, j)
    q0 = b + 16 + 32 * (j >> 1)
    shift = 4 * (j & 1)
    acc = np.float32(0)
    for l in range(2 * h):
        acc += np.float32(I32((I32(src[U(q0 + l)]) >> shift) & 15)) * x[U(xo + l)]
    return (_f16(src, b) * sc) * acc - (_f16(src, b + 2) * mn) * _xsum(xs16, xo, 2)


@jitable
def _q5k_value(src, q0, b, l, shift, j):
    return I32(((I32(src[U(q0 + l)]) >> shift) & 15) | (((I32(src[U(b + 16 + l)]) >> j) & 1) << 4))


@jitable
def dq32_q5_k(src, b, j, dst, o, h):
    sc, mn = _k_scale_min(src, b + 4, j)
    d = _f16(src, b) * sc
    m = _f16(src, b + 2) * mn
    q0 = b + 48 + 32 * (j >> 1)                     # low nibbles as Q4_K; 5th bit: bit j of qh[l]
    shift = 4 * (j & 1)
    for l in range(2 * h):
        dst[U(o + l)] = d * np.float32(_q5k_value(src, q0, b, l, shift, j)) - m


@jitable
def dot32_q5_k(src, b, j, x, xo, h, xs16):
    sc, mn = _k_scale_min(src, b + 4, j)
    q0 = b + 48 + 32 * (j >> 1)
    shift = 4 * (j & 1)
    acc = np.float32(0)
    for l in range(2 * h):
        acc += np.float32(_q5k_value(src, q0, b, l, shift, j)) * x[U(xo + l)]
    return (_f16(src, b) * sc) * acc - (_f16(src, b + 2) * mn) * _xsum(xs16, xo, 2)


@jitable
def _q6k_value(src, ql0, qh0, l, lshift, hshift):
    lo = (I32(src[U(ql0 + l)]) >> lshift) & 15
    hi = (I32(src[U(qh0 + l)]) >> hshift) & 3
    return I32((lo | (hi << 4)) - 32)


@jitable
def dq32_q6_k(src, b, j, dst, o, h):
    d = _f16(src, b + 208)
    hb = j >> 2                                     # 128-value half of the block
    r = j & 3                                       # which of its 4 runs of 32
    ql0 = b + 64 * hb + 32 * (r & 1)                # low 4 bits: nibble (r >> 1) of ql
    qh0 = b + 128 + 32 * hb                         # high 2 bits: field r of qh
    for half in range(2):
        dl = d * np.float32(_i8(src[U(b + 192 + 8 * hb + 2 * r + half)]))
        for l in range(h * half, h * half + h):
            dst[U(o + l)] = dl * np.float32(_q6k_value(src, ql0, qh0, l, 4 * (r >> 1), 2 * r))


@jitable
def dot32_q6_k(src, b, j, x, xo, h, xs16):
    hb = j >> 2
    r = j & 3
    ql0 = b + 64 * hb + 32 * (r & 1)
    qh0 = b + 128 + 32 * hb
    acc = np.float32(0)
    for half in range(2):
        part = np.float32(0)
        for l in range(h * half, h * half + h):
            part += np.float32(_q6k_value(src, ql0, qh0, l, 4 * (r >> 1), 2 * r)) * x[U(xo + l)]
        acc += np.float32(_i8(src[U(b + 192 + 8 * hb + 2 * r + half)])) * part
    return _f16(src, b + 208) * acc


# type id -> (dq32, dot32). The one place a new format is added.
DECODERS = {
    F32: (dq32_f32, dot32_f32), F16: (dq32_f16, dot32_f16), BF16: (dq32_bf16, dot32_bf16),
    Q4_0: (dq32_q4_0, dot32_q4_0), Q4_1: (dq32_q4_1, dot32_q4_1),
    Q5_0: (dq32_q5_0, dot32_q5_0), Q5_1: (dq32_q5_1, dot32_q5_1), Q8_0: (dq32_q8_0, dot32_q8_0),
    Q2_K: (dq32_q2_k, dot32_q2_k), Q3_K: (dq32_q3_k, dot32_q3_k), Q4_K: (dq32_q4_k, dot32_q4_k),
    Q5_K: (dq32_q5_k, dot32_q5_k), Q6_K: (dq32_q6_k, dot32_q6_k),
}

# every jitable above, for backends that register them with another target (numba-cuda)
JITABLES = tuple(_JITABLE)

SUPPORTED_TYPES = tuple(GGML_TYPES[t].name for t in DECODERS)


def chunk_location(qtype: int, c: int) -> tuple[int, int]:
    """Byte offset of the block holding 32-value chunk c of a row, and the chunk index inside it."""
    t = GGML_TYPES[qtype]
    cpb = t.chunks_per_block
    return (c // cpb) * t.chunk_bytes, c % cpb
