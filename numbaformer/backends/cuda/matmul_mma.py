"""The tensor-core GEMM for prefill: out (n, rows) = x (n, cols) @ W.T on bf16 mma.sync (mma.py),
the weights dequantized inside the kernel from the GPU layout (layout.py), f32 accumulators.

Why bf16 and not int8 (llama.cpp's MMQ): every type goes through one path (F16, BF16 and F32 too),
the per-block scales and mins are applied once per weight when it is dequantized instead of once
per 32-value sum and output, and the activations keep 8 significant bits with their own exponent
each instead of 7 bits under a scale per 32 values. The activations are rounded to bf16 once per
GEMM input by `to_bf16` (fused with the rmsnorm where one precedes the product); a weight is
dequantized once per BM tokens, which at BM = 128 is a small part of the mma work.

Block tile: BM tokens x BN weight rows, WM x WN warps, each holding a (BM/WM) x (BN/WN) tile as
MT x NT m16n8 accumulators (MT = BM/WM/16, NT = BN/WN/8) in registers. The shared dimension is
walked in k-tiles of BK values; the weights arrive in raw *units* of KR = max(BK, block size)
values (a whole K-quant block, or BK/32 small blocks) per row. Per k-tile t, one barrier:

    wait for this thread's copies (cp.async.wait_group 0), barrier: x tile t, raw unit of t+1 and
        the dequantized tile t are there, and every warp is done with tile t-1's buffers
    cp.async x tile t+1 (bf16, BM x BK) and, when tile t+2 starts a new raw unit, that unit's
        16-byte planes; the short planes (2-byte d, 4-byte qh, 12-byte scales) are loaded into
        registers now and stored after the mma, so that their latency hides behind this tile
    dequantize tile t+1 from the raw unit (GGUF order in shared memory) to bf16 in shared memory
    mma tile t: A from the x tile and B from the weight tile by ldmatrix.x4, mma.sync bf16

so the copies of tile t+1 and the dequantization of t+1 overlap tile t's tensor-core work (the
warps' integer/FP32 instructions of one interleave with the mma of the others). Shared tiles are
bf16 rows of BK values in 16-byte chunks, chunk c of row r stored at c ^ f(r) (an XOR swizzle), so
that the 8 rows an ldmatrix or a 16-byte store touches fall on distinct banks.

Raw units keep each block in GGUF order (at a 16-byte-aligned pitch, shifted so that the q plane
is 16-byte aligned): the block decoders of quants.py run on them unchanged (`_generic_decoder`),
and the common types have faster decoders here reading 16-byte words and converting integers to
floats with a byte permute into a float's mantissa (the same values: float(q) exactly, then the
decoder's f32 arithmetic, then bf16 rounding to nearest).

Epilogues: 0 store, 1 + bias[r], 2 + residual[t, r] (out may be the residual), 3 SwiGLU: tiles
cover BN/2 rows of gate and the same BN/2 rows of up, a warp's first NT/2 n-tiles gate rows and
its last NT/2 the matching up rows, so out[t, r] = silu(gate) * up is formed in registers.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
from numba import cuda, float32, int64, uint32
from ._sim import SIMULATOR

from ...quants import BF16, F16, F32, GGML_TYPES, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0
from ..kernel_cache import cached
from ._jit import cuda_kernel, launched_fast
from .launch import derived, dtype_view
from .decoders import DECODERS, HELPERS
from .intrinsics import as_f32, f16_bits_to_f32, prmt
from .layout import PLANES
from .mma import (cp_async16, cp_async_commit, cp_async_wait, ldmatrix_x4, load_shared_u32x4,
                  mma_bf16, pack_bf16x2, store_shared_u32x4)
from .reduce import block_sum

# The CUDA backend's prefill product on a GPU (H200, 2026-12-02: 8B Q4_K pp512 8,455 tok/s against
# 1,012 on the FP32 GEMM; the cut model's score within the fidelity bounds); off under the
# simulator, where its own tests run it (the warp emulation is too slow at model sizes).
# NUMBAFORMER_MMA=0/1 overrides; --exact takes the FP32 GEMM.
ENABLED = os.environ.get("NUMBAFORMER_MMA", "0" if SIMULATOR else "1") == "1"
# (BM tokens, BN weight rows, WM, WN warps) per block, largest first: a launch takes the first
# whose grid fills the GPU (>= MMA_FILL blocks per SM: 512 x 4096 at 128 x 128 is 128 blocks on
# the H200's 132 SMs), else the last. H200, Q4_K, 512 tokens (scripts/gpu_mma_check.py,
# 2026-12-02): 256 x 128 x 4 x 4 takes 14336 x 4096 at 182 TFLOP/s against 122 at 128 x 128 (a
# weight tile dequantized once for twice the tokens); 4096 x 14336 fills only 64 blocks with it
# (112 TFLOP/s) and stays on 128 x 128 (143). Its 512 threads have at most 128 registers each:
# only the types whose kernel then spills at most 16 bytes a thread take it (ptxas, sm_90: Q4_K
# 4, Q4_0 16, Q8_0 and the floats 0; Q6_K 72, Q3_K 100; the others not yet measured).
MMA_TILES = ((256, 128, 4, 4), (128, 128, 2, 4), (64, 128, 2, 4), (64, 64, 2, 2))
BIG_TILE_TYPES = frozenset({Q4_K, Q4_0, Q8_0, F16, BF16, F32})
MMA_BK = 32                # values of the shared dimension per k-tile (32, 64, 128 or 256)
MMA_LOOKAHEAD = 2          # x tiles (and raw units) copied ahead of the tile in use
MMA_MIN_BLOCKS = 1         # launch bounds: blocks per SM the registers must allow
MAX_SMEM = 227 << 10       # the most dynamic shared memory a block may opt in to (sm_90)
MMA_FILL = 0.9
BF16_THREADS = 256
EPILOGUES = {"store": 0, "bias": 1, "residual": 2, "swiglu": 3}

_MAGIC = 0x4B000000        # float bits of 2^23: OR a byte into the mantissa, subtract 2^23
_LO4 = 0x0F0F0F0F


# --- the activations: f32 -> bf16 (with the rmsnorm fused) --------------------------------------------

@functools.lru_cache(maxsize=None)
def _bf16_kernel(norm: bool, threads: int):
    @cuda_kernel
    def _to_bf16(xb2, x, norm_w, eps):
        """Block r: xb2[r, i] (uint32, two bf16) = x[r, 2i], x[r, 2i+1] rounded to nearest, or of
        (x * scale) * norm_w with scale = 1 / sqrt(mean(x[r]^2) + eps) (norm.py's rmsnorm)."""
        red = cuda.shared.array(32, float32)
        r = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        cols = x.shape[1]
        scale = float32(1)
        if norm:
            ss = float32(0)
            for i in range(tid, cols, threads):
                ss += x[r, i] * x[r, i]
            ss = block_sum(ss, red)
            scale = float32(1) / math.sqrt(ss / float32(cols) + eps)
        for i in range(tid, cols // 2, threads):
            a = x[r, 2 * i]
            b = x[r, 2 * i + 1]
            if norm:
                a = (a * scale) * norm_w[2 * i]
                b = (b * scale) * norm_w[2 * i + 1]
            xb2[r, i] = pack_bf16x2(a, b)

    return _to_bf16


def to_bf16(xb, x, stream, norm_w=None, eps: float = 0.0) -> None:
    """xb (n, cols) uint16 = bf16 of x (n, cols) f32, or of rmsnorm(x) * norm_w; cols even."""
    k = _bf16_kernel(norm_w is not None, BF16_THREADS)
    k[x.shape[0], BF16_THREADS, stream](dtype_view(xb, np.uint32), x,
                                        derived(x, "row0", lambda x: x[0]) if norm_w is None
                                        else norm_w,
                                        np.float32(eps))


# --- decoders: 16 values of a staged GGUF-order block -> 8 words of bf16 pairs -----------------------
# decode(rs, rs8, rs16, b, j, hf, wv): the block at byte b of the raw stage (rs: uint32, rs8, rs16
# the same memory as uint8 / uint16), values 16 hf .. 16 hf + 15 of its 32-value chunk j; wv (8,)
# uint32 receives values 2h, 2h+1 of those in word h. Every value is the decoder's f32 (as
# quants.py's dq32 computes it) rounded to bf16.

_k_scale_min, _f16, _i8 = HELPERS["_k_scale_min"], HELPERS["_f16"], HELPERS["_i8"]


@cuda.jit(device=True, inline=True)
def _byte_f32(v, i, off):
    """float(byte i of v) - off, exactly (bytes and offsets below 2^8): the byte OR'ed into the
    mantissa of 2^23 by one prmt, then 2^23 + off subtracted."""
    return as_f32(prmt(v, uint32(_MAGIC), uint32(0x7440) | uint32(i))) - float32(8388608 + off)


@cuda.jit(device=True, inline=True)
def _mul4(v, off, d, wv, o):
    """wv[o], wv[o+1] = bf16 pairs of d * (byte - off) for the 4 bytes of v."""
    wv[o] = pack_bf16x2(d * _byte_f32(v, 0, off), d * _byte_f32(v, 1, off))
    wv[o + 1] = pack_bf16x2(d * _byte_f32(v, 2, off), d * _byte_f32(v, 3, off))


@cuda.jit(device=True, inline=True)
def _fma4(v, d, m, wv, o):
    """wv[o], wv[o+1] = bf16 pairs of d * byte + m for the 4 bytes of v."""
    wv[o] = pack_bf16x2(d * _byte_f32(v, 0, 0) + m, d * _byte_f32(v, 1, 0) + m)
    wv[o + 1] = pack_bf16x2(d * _byte_f32(v, 2, 0) + m, d * _byte_f32(v, 3, 0) + m)


@cuda.jit(device=True, inline=True)
def _dq_q4_k(rs, rs8, rs16, b, j, hf, wv):
    """y = d sc * q - dmin mn (quants.dq32_q4_k): q nibble (j & 1) of qs[32 (j >> 1) + l]."""
    sc, mn = _k_scale_min(rs8, b + 4, j)
    d = _f16(rs8, b) * sc
    m = -(_f16(rs8, b + 2) * mn)
    s = uint32(4 * (j & 1))
    lo = uint32(_LO4)
    w0, w1, w2, w3 = load_shared_u32x4(rs, (b + 16 + 32 * (j >> 1)) // 16 + hf)
    _fma4((w0 >> s) & lo, d, m, wv, 0)
    _fma4((w1 >> s) & lo, d, m, wv, 2)
    _fma4((w2 >> s) & lo, d, m, wv, 4)
    _fma4((w3 >> s) & lo, d, m, wv, 6)


@cuda.jit(device=True, inline=True)
def _dq_q5_k(rs, rs8, rs16, b, j, hf, wv):
    """Q4_K's nibbles with a 5th bit: bit j of qh[l] (quants.dq32_q5_k)."""
    sc, mn = _k_scale_min(rs8, b + 4, j)
    d = _f16(rs8, b) * sc
    m = -(_f16(rs8, b + 2) * mn)
    s = uint32(4 * (j & 1))
    lo = uint32(_LO4)
    one = uint32(0x01010101)
    jj = uint32(j)
    four = uint32(4)
    w0, w1, w2, w3 = load_shared_u32x4(rs, (b + 48 + 32 * (j >> 1)) // 16 + hf)
    h0, h1, h2, h3 = load_shared_u32x4(rs, (b + 16) // 16 + hf)
    _fma4(((w0 >> s) & lo) | (((h0 >> jj) & one) << four), d, m, wv, 0)
    _fma4(((w1 >> s) & lo) | (((h1 >> jj) & one) << four), d, m, wv, 2)
    _fma4(((w2 >> s) & lo) | (((h2 >> jj) & one) << four), d, m, wv, 4)
    _fma4(((w3 >> s) & lo) | (((h3 >> jj) & one) << four), d, m, wv, 6)


@cuda.jit(device=True, inline=True)
def _q6_word(wl, wh, ls, hs):
    return ((wl >> ls) & uint32(_LO4)) | (((wh >> hs) & uint32(0x03030303)) << uint32(4))


@cuda.jit(device=True, inline=True)
def _dq_q6_k(rs, rs8, rs16, b, j, hf, wv):
    """y = d sc16 * (q - 32), q = low nibble from ql | 2 high bits from qh (quants.dq32_q6_k)."""
    hb = j >> 2
    r = j & 3
    ls = uint32(4 * (r >> 1))
    hs = uint32(2 * r)
    dl = _f16(rs8, b + 208) * float32(_i8(rs8[b + 192 + 8 * hb + 2 * r + hf]))
    l0, l1, l2, l3 = load_shared_u32x4(rs, (b + 64 * hb + 32 * (r & 1)) // 16 + hf)
    h0, h1, h2, h3 = load_shared_u32x4(rs, (b + 128 + 32 * hb) // 16 + hf)
    _mul4(_q6_word(l0, h0, ls, hs), 32, dl, wv, 0)
    _mul4(_q6_word(l1, h1, ls, hs), 32, dl, wv, 2)
    _mul4(_q6_word(l2, h2, ls, hs), 32, dl, wv, 4)
    _mul4(_q6_word(l3, h3, ls, hs), 32, dl, wv, 6)


@cuda.jit(device=True, inline=True)
def _dq_q8_0(rs, rs8, rs16, b, j, hf, wv):
    """y = q * d, q int8 (its byte XOR 0x80 is q + 128)."""
    d = _f16(rs8, b)
    flip = uint32(0x80808080)
    w0, w1, w2, w3 = load_shared_u32x4(rs, (b + 2) // 16 + hf)
    _mul4(w0 ^ flip, 128, d, wv, 0)
    _mul4(w1 ^ flip, 128, d, wv, 2)
    _mul4(w2 ^ flip, 128, d, wv, 4)
    _mul4(w3 ^ flip, 128, d, wv, 6)


@cuda.jit(device=True, inline=True)
def _dq_q4_0(rs, rs8, rs16, b, j, hf, wv):
    """y = d * (q - 8): low nibbles are values 0..15, high nibbles 16..31."""
    d = _f16(rs8, b)
    lo = uint32(_LO4)
    s = uint32(4 * hf)
    w0, w1, w2, w3 = load_shared_u32x4(rs, (b + 2) // 16)
    _mul4((w0 >> s) & lo, 8, d, wv, 0)
    _mul4((w1 >> s) & lo, 8, d, wv, 2)
    _mul4((w2 >> s) & lo, 8, d, wv, 4)
    _mul4((w3 >> s) & lo, 8, d, wv, 6)


@cuda.jit(device=True, inline=True)
def _dq_q4_1(rs, rs8, rs16, b, j, hf, wv):
    """y = d * q + m, nibbles as Q4_0."""
    d = _f16(rs8, b)
    m = _f16(rs8, b + 2)
    lo = uint32(_LO4)
    s = uint32(4 * hf)
    w0, w1, w2, w3 = load_shared_u32x4(rs, (b + 4) // 16)
    _fma4((w0 >> s) & lo, d, m, wv, 0)
    _fma4((w1 >> s) & lo, d, m, wv, 2)
    _fma4((w2 >> s) & lo, d, m, wv, 4)
    _fma4((w3 >> s) & lo, d, m, wv, 6)


@cuda.jit(device=True, inline=True)
def _dq_f16(rs, rs8, rs16, b, j, hf, wv):
    sixteen = uint32(16)
    for c in range(2):
        w0, w1, w2, w3 = load_shared_u32x4(rs, b // 16 + 2 * hf + c)
        wv[4 * c] = pack_bf16x2(f16_bits_to_f32(w0), f16_bits_to_f32(w0 >> sixteen))
        wv[4 * c + 1] = pack_bf16x2(f16_bits_to_f32(w1), f16_bits_to_f32(w1 >> sixteen))
        wv[4 * c + 2] = pack_bf16x2(f16_bits_to_f32(w2), f16_bits_to_f32(w2 >> sixteen))
        wv[4 * c + 3] = pack_bf16x2(f16_bits_to_f32(w3), f16_bits_to_f32(w3 >> sixteen))


@cuda.jit(device=True, inline=True)
def _dq_bf16(rs, rs8, rs16, b, j, hf, wv):
    for c in range(2):
        wv[4 * c], wv[4 * c + 1], wv[4 * c + 2], wv[4 * c + 3] = load_shared_u32x4(
            rs, b // 16 + 2 * hf + c)


@cuda.jit(device=True, inline=True)
def _dq_f32(rs, rs8, rs16, b, j, hf, wv):
    for c in range(4):
        w0, w1, w2, w3 = load_shared_u32x4(rs, b // 16 + 4 * hf + c)
        wv[2 * c] = pack_bf16x2(as_f32(w0), as_f32(w1))
        wv[2 * c + 1] = pack_bf16x2(as_f32(w2), as_f32(w3))


FAST_DECODERS = {Q4_K: _dq_q4_k, Q5_K: _dq_q5_k, Q6_K: _dq_q6_k, Q8_0: _dq_q8_0, Q4_0: _dq_q4_0,
                 Q4_1: _dq_q4_1, F16: _dq_f16, BF16: _dq_bf16, F32: _dq_f32}


@functools.lru_cache(maxsize=None)
def _generic_decoder(qtype: int):
    """quants.py's dq32 for the type (32 f32 into registers), then the half's bf16 pairs."""
    dq32 = DECODERS[qtype][0]

    @cuda.jit(device=True, inline=True)
    def decode(rs, rs8, rs16, b, j, hf, wv):
        f = cuda.local.array(32, float32)
        dq32(rs8, b, j, f, 0, 16)
        if hf == 0:
            for h in range(8):
                wv[h] = pack_bf16x2(f[2 * h], f[2 * h + 1])
        else:
            for h in range(8):
                wv[h] = pack_bf16x2(f[16 + 2 * h], f[17 + 2 * h])

    return decode


def decoder(qtype: int):
    return FAST_DECODERS.get(qtype) or _generic_decoder(qtype)


# --- staging: a raw unit of BN rows into shared memory ------------------------------------------------

@functools.lru_cache(maxsize=None)
def stage_plan(qtype: int, bk: int) -> dict:
    """How a type's blocks are staged for k-tiles of bk values: block values bs, bytes bb, blocks
    per unit nbu and tiles per unit tpu, the staged block's shift and 16-byte pitch, and its planes
    as (plane, byte offset in the staged block, bytes per block): `async` ones by 16-byte
    cp.async, `sync` ones (short or unaligned) by 2-byte loads through registers."""
    t = GGML_TYPES[qtype]
    bs = t.block_size if t.block_size > 1 else 32
    kr = max(bk, bs)
    assert kr % bk == 0 and kr % bs == 0, (t.name, bk)
    planes = PLANES[qtype]
    shift = (-planes[0][0]) % 16
    pitch = -(-(t.chunk_bytes + shift) // 16) * 16
    parts = {"async": [], "sync": []}
    for p, (a, b) in enumerate(planes):
        n = b - a
        aligned = (a + shift) % 16 == 0 and n % 16 == 0
        assert aligned or ((a + shift) % 2 == 0 and n % 2 == 0), t.name
        parts["async" if aligned else "sync"].append((p, a + shift, n))
    sync = parts["sync"] or [(0, 0, 2)]        # (a typed placeholder when there is none)
    return dict(bs=bs, bb=t.chunk_bytes, cpb=t.chunks_per_block, nbu=kr // bs, tpu=kr // bk,
                shift=shift, pitch=pitch, unit=(kr // bs) * pitch, lens=tuple(b - a for a, b in planes),
                **{k: tuple(v) for k, v in parts.items()},
                # the same as columns (plane, offset in the staged block, bytes a block)
                a_plane=tuple(p for p, _, _ in parts["async"]),
                a_dst=tuple(o for _, o, _ in parts["async"]),
                a_len=tuple(n for _, _, n in parts["async"]),
                s_plane=tuple(p for p, _, _ in sync), s_dst=tuple(o for _, o, _ in sync),
                s_len=tuple(n for _, _, n in sync))


def raw_stages(qtype: int, bk: int, lookahead: int) -> int:
    """Raw-unit buffers: the units of tiles t+1 .. t+L+1 are in use or in flight at once."""
    return -(-lookahead // stage_plan(qtype, bk)["tpu"]) + 1


def smem_bytes(qtype: int, bm: int, bn: int, bk: int, lookahead: int) -> int:
    """Dynamic shared memory of a launch: L+1 stages of the x tile (bf16), 2 of the dequantized
    weight tile, raw_stages of the raw unit."""
    return ((lookahead + 1) * 2 * bm * bk + 2 * 2 * bn * bk
            + raw_stages(qtype, bk, lookahead) * bn * stage_plan(qtype, bk)["unit"])


# --- the kernel ------------------------------------------------------------------------------------

def cached_kernel(threads: int, min_blocks: int):
    """cuda_kernel with launch bounds (threads per block, blocks per SM the registers allow; the
    simulator takes none)."""
    if SIMULATOR:
        return cuda_kernel
    return launched_fast(cached("cuda", cuda.jit(cache=True, launch_bounds=(threads, min_blocks))))


@functools.lru_cache(maxsize=None)
def tile_functions(bm: int, bn: int, bk: int, wm: int, wn: int, epilogue: int, split_k: int):
    """The device functions every tensor-core GEMM here shares, for a bm x bn block tile of wm x wn
    warps over k-tiles of bk bf16 values: swz (the swizzled chunk of a tile row), tile_row (the
    weight row behind a tile row: SwiGLU's gate or up), mma_tile (a warp's product of two staged
    tiles) and finish (the epilogues, or split-K's raw sums)."""
    wtm, wtn = bm // wm, bn // wn               # a warp's tokens and weight rows
    MT, NT = wtm // 16, wtn // 8                # its m16 and n8 tiles
    swiglu = epilogue == 3
    half_w = wtn // 2                           # SwiGLU: a warp's gate (and up) rows
    rows_per_block = bn // 2 if swiglu else bn
    NT_OUT = NT // 2 if swiglu else NT
    CPR = bk // 8                               # 16-byte chunks per tile row (bf16)
    KSTEPS = bk // 16
    XM = min(CPR, 8)                            # swizzle: chunk c of row r at c ^ ((r // RDIV) % XM)
    RDIV = max(1, 8 // CPR)
    threads = 32 * wm * wn
    X_ITERS = -(-bm * CPR // threads)           # a thread's 16-byte chunks of an x tile

    @cuda.jit(device=True, inline=True)
    def swz(r, c):
        return r * CPR + (c ^ ((r // RDIV) % XM))

    @cuda.jit(device=True, inline=True)
    def tile_row(rho, bx, rows):
        """Tile row rho -> (0 or 1: w0 or w1, its row in that matrix, clamped to the last)."""
        if swiglu:
            wc = rho // wtn
            j = rho - wc * wtn
            half = j // half_w
            r = bx * rows_per_block + wc * half_w + j - half * half_w
        else:
            half = 0
            r = bx * bn + rho
        return half, min(r, rows - 1)

    @cuda.jit(device=True, inline=True)
    def mma_tile(xs, ws, xstage, wstage, acc, af, wmi, wni, lane):
        """acc += the warp's (wtm x bk) x (bk x wtn) product of the staged tiles."""
        xbase = xstage * bm * CPR
        wbase = wstage * bn * CPR
        for ks in range(KSTEPS):
            for mt in range(MT):
                row = wmi * wtm + mt * 16 + (lane & 15)
                af[4 * mt], af[4 * mt + 1], af[4 * mt + 2], af[4 * mt + 3] = ldmatrix_x4(
                    xs, xbase + swz(row, 2 * ks + (lane >> 4)))
            for p in range(NT // 2):
                nrow = wni * wtn + (2 * p + (lane >> 4)) * 8 + (lane & 7)
                b0, b1, b2, b3 = ldmatrix_x4(ws, wbase + swz(nrow, 2 * ks + ((lane >> 3) & 1)))
                for mt in range(MT):
                    i = (mt * NT + 2 * p) * 4
                    acc[i], acc[i + 1], acc[i + 2], acc[i + 3] = mma_bf16(
                        af[4 * mt], af[4 * mt + 1], af[4 * mt + 2], af[4 * mt + 3], b0, b1,
                        acc[i], acc[i + 1], acc[i + 2], acc[i + 3])
                    i += 4
                    acc[i], acc[i + 1], acc[i + 2], acc[i + 3] = mma_bf16(
                        af[4 * mt], af[4 * mt + 1], af[4 * mt + 2], af[4 * mt + 3], b2, b3,
                        acc[i], acc[i + 1], acc[i + 2], acc[i + 3])

    @cuda.jit(device=True, inline=True)
    def finish(out, extra, acc, m0, bx, wmi, wni, lane, n_tok, rows_out):
        """The accumulators (c layout: rows g, g+8; columns 2t, 2t+1 of each n8 tile) -> out;
        split: the raw sums -> extra[z] (SwiGLU: gate at r, up at rows_out + r)."""
        z = cuda.blockIdx.z
        for mt in range(MT):
            for nt in range(NT_OUT):
                for e in range(4):
                    m = m0 + wmi * wtm + mt * 16 + (lane >> 2) + 8 * (e >> 1)
                    j = nt * 8 + 2 * (lane & 3) + (e & 1)
                    v = acc[(mt * NT + nt) * 4 + e]
                    if split_k == 1:                   # raw sums of this k-slice
                        if swiglu:
                            r = bx * rows_per_block + wni * half_w + j
                        else:
                            r = bx * bn + wni * wtn + j
                        if m < n_tok and r < rows_out:
                            extra[z, m, r] = v
                            if swiglu:
                                extra[z, m, rows_out + r] = acc[(mt * NT + nt + NT // 2) * 4 + e]
                    else:
                        if swiglu:
                            r = bx * rows_per_block + wni * half_w + j
                            v = v / (float32(1) + math.exp(-v)) * \
                                acc[(mt * NT + nt + NT // 2) * 4 + e]
                        else:
                            r = bx * bn + wni * wtn + j
                        if m < n_tok and r < rows_out:
                            if epilogue == 1:
                                v += extra[r]
                            elif epilogue == 2:
                                v += extra[m, r]
                            out[m, r] = v

    @cuda.jit(device=True, inline=True)
    def x_plan(xdst, xsrc, xcol, m0, n_tok, cols, tid):
        """This thread's 16-byte chunks of every x tile, worked out once: xdst its offset in a
        stage (-1: none), xsrc its source chunk in tile 0 (tokens past the end repeat the last
        one), xcol its column chunk in the tile."""
        for it in range(X_ITERS):
            q = tid + it * threads
            row = q // CPR
            c = q - row * CPR
            xdst[it] = swz(row, c) if q < bm * CPR else -1
            xsrc[it] = min(m0 + row, n_tok - 1) * (cols // 8) + c
            xcol[it] = c

    @cuda.jit(device=True, inline=True)
    def stage_tile(sm, base, src, dst, srci, coli, iters, tc, cols8):
        """A tile of bf16 rows (column chunks tc ..; this thread's chunks planned in dst, srci,
        coli) -> the stage at chunk `base` of sm: one cp.async per 16-byte chunk, zeros past the
        last column."""
        for it in range(iters):
            if dst[it] >= 0:
                if tc + coli[it] < cols8:
                    cp_async16(sm, base + dst[it], src, srci[it] + tc)
                else:
                    store_shared_u32x4(sm, base + dst[it], 0, 0, 0, 0)

    return swz, tile_row, mma_tile, finish, x_plan, stage_tile


@functools.lru_cache(maxsize=None)
def plane_offset_function(lens: tuple):
    """A device function plane_offset(p, nb): the byte offset of plane p in a GPU-layout row of nb
    blocks whose planes take lens[q] bytes a block (layout.plane_offsets)."""
    n_planes = len(lens)

    @cuda.jit(device=True, inline=True)
    def plane_offset(p, nb):
        off = 0
        for q in range(n_planes):
            if q < p:
                off += (nb * lens[q] + 15) // 16 * 16
        return off

    return plane_offset


@functools.lru_cache(maxsize=None)
def _gemm_kernel(qtype: int, bm: int, bn: int, bk: int, wm: int, wn: int, epilogue: int,
                 lookahead: int, min_blocks: int, split: bool = False):
    plan = stage_plan(qtype, bk)
    split_k = 1 if split else 0                 # partial sums per k-slice (gemm's `part`)
    decode = decoder(qtype)
    threads = 32 * wm * wn
    wtm, wtn = bm // wm, bn // wn               # a warp's tokens and weight rows
    MT, NT = wtm // 16, wtn // 8                # its m16 and n8 tiles
    assert MT >= 1 and NT >= 2 and NT % 2 == 0 and bk % 32 == 0, (bm, bn, bk, wm, wn)
    CPR = bk // 8                               # 16-byte chunks per tile row (bf16)
    CPT = bk // 32                              # 32-value chunks per tile row
    ACC = MT * NT * 4
    AF = 4 * MT
    L = lookahead                               # x tiles in flight ahead of the one in use
    XST = L + 1                                 # x stages
    RST = raw_stages(qtype, bk, L)              # raw-unit stages
    WAIT_LOOP, WAIT_FIRST = L - 1, L            # cp.async groups that may stay pending
    X_WORDS = XST * bm * bk // 2
    W_WORDS = 2 * bn * bk // 2
    nbu, tpu, cpb, bs = plan["nbu"], plan["tpu"], plan["cpb"], plan["bs"]
    assert tpu & (tpu - 1) == 0, tpu            # tiles per raw unit: a power of two
    R_FIRST = (1 // tpu) % RST                  # raw stage of tile 1's unit
    UB, P, SHIFT = plan["unit"], plan["pitch"], plan["shift"]
    lens = plan["lens"]
    a_plane, a_dst, a_len = plan["a_plane"], plan["a_dst"], plan["a_len"]
    s_plane, s_dst, s_len = plan["s_plane"], plan["s_dst"], plan["s_len"]
    n_async, n_sync = len(a_plane), len(plan["sync"])
    s_iters = tuple(-(-bn * nbu * n // 2 // threads) for n in s_len)
    s_first = tuple(sum(s_iters[:k]) for k in range(len(s_len)))
    PRE = max(1, sum(s_iters[:n_sync]))
    swz, tile_row, mma_tile, finish, x_plan, stage_tile = tile_functions(bm, bn, bk, wm, wn,
                                                                         epilogue, split_k)
    X_ITERS = -(-bm * CPR // threads)
    HPT = bk // 16                              # 16-value pieces per tile row
    DQ_ITERS = -(-bn * HPT // threads)

    plane_offset = plane_offset_function(lens)

    @cuda.jit(device=True, inline=True)
    def stage_raw(rs, w0, w1, u, stage, bx, rows, nb, tid):
        """The 16-byte planes of raw unit u (blocks u*nbu ..) of the tile's rows -> rs stage."""
        kb = u * nbu
        for k in range(n_async):
            ln = a_len[k]
            off = plane_offset(a_plane[k], nb) + kb * ln
            cpr = nbu * ln // 16
            for q in range(tid, bn * cpr, threads):
                rho = q // cpr
                c = q - rho * cpr
                i = (16 * c) // ln
                if kb + i < nb:
                    half, r = tile_row(rho, bx, rows)
                    w = w1 if half else w0
                    dst = ((stage * bn + rho) * UB + i * P + a_dst[k] + 16 * c - i * ln) // 16
                    cp_async16(rs, dst, w, (r * w.shape[1] + off) // 16 + c)

    @cuda.jit(device=True, inline=True)
    def load_short(pre, w0h, w1h, u, bx, rows, nb, tid):
        """The short planes of raw unit u, 2 bytes per item, into registers pre."""
        kb = u * nbu
        for k in range(n_sync):
            ln = s_len[k]
            off = (plane_offset(s_plane[k], nb) + kb * ln) // 2
            per_row = nbu * ln // 2
            for it in range(s_iters[k]):
                q = tid + it * threads
                v = uint32(0)
                if q < bn * per_row:
                    rho = q // per_row
                    c = q - rho * per_row
                    if kb + (2 * c) // ln < nb:
                        half, r = tile_row(rho, bx, rows)
                        wh = w1h if half else w0h
                        v = uint32(wh[r, off + c])
                pre[s_first[k] + it] = v

    @cuda.jit(device=True, inline=True)
    def store_short(rs16, pre, stage, tid):
        for k in range(n_sync):
            ln = s_len[k]
            per_row = nbu * ln // 2
            for it in range(s_iters[k]):
                q = tid + it * threads
                if q < bn * per_row:
                    rho = q // per_row
                    c = q - rho * per_row
                    i = (2 * c) // ln
                    dst = (stage * bn + rho) * UB + i * P + s_dst[k] + 2 * c - i * ln
                    rs16[dst // 2] = pre[s_first[k] + it]

    @cuda.jit(device=True, inline=True)
    def dq_plan(dqd, dqr, dqp, tid):
        """This thread's dequantization tasks (row rho, 16-value piece pc; consecutive threads on
        consecutive rows), worked out once: dqd the first of its two 16-byte chunks in a weight
        stage (-1: none; the second is dqd ^ 1, CPR being even), dqr its row's raw block offset
        in a raw stage, dqp the piece."""
        for it in range(DQ_ITERS):
            q = tid + it * threads
            rho = q % bn
            pc = q // bn
            dqd[it] = swz(rho, 2 * pc) if q < bn * HPT else -1
            dqr[it] = rho * UB + SHIFT
            dqp[it] = pc

    @cuda.jit(device=True, inline=True)
    def dequant(ws, rs, rs8, rs16, dqd, dqr, dqp, gc, jt, wbase, rbase, cols32, wv):
        """A tile's bn x bk weights (its first 32-value chunk: gc of the row, jt of the raw unit)
        from the raw stage at byte rbase -> bf16 in the weight stage at chunk wbase."""
        for it in range(DQ_ITERS):
            if dqd[it] >= 0:
                cc = dqp[it] >> 1
                if gc + cc < cols32:
                    jj = jt + cc
                    i = jj // cpb
                    decode(rs, rs8, rs16, rbase + dqr[it] + i * P, jj - i * cpb, dqp[it] & 1, wv)
                else:
                    for h in range(8):
                        wv[h] = uint32(0)
                store_shared_u32x4(ws, wbase + dqd[it], wv[0], wv[1], wv[2], wv[3])
                store_shared_u32x4(ws, wbase + (dqd[it] ^ 1), wv[4], wv[5], wv[6], wv[7])

    @cached_kernel(threads, min_blocks)
    def _gemm(out, w0, w1, w0h, w1h, xb, extra):
        """out (n, rows_out) f32 for one bm-token x bn-row tile (module docstring): w0, w1 (rows,
        pitch) uint8 weights in the GPU layout (w1: SwiGLU's up, else w0), w0h, w1h the same as
        uint16; xb (n, cols) uint16 bf16 activations; extra: bias (rows,) or residual (n, rows)."""
        sm = cuda.shared.array(0, uint32)
        xs = sm[:X_WORDS]
        ws = sm[X_WORDS:X_WORDS + W_WORDS]
        rs = sm[X_WORDS + W_WORDS:]
        rs8 = rs.view(np.uint8)
        rs16 = rs.view(np.uint16)
        acc = cuda.local.array(ACC, float32)
        af = cuda.local.array(AF, uint32)
        wv = cuda.local.array(8, uint32)
        pre = cuda.local.array(PRE, uint32)
        xdst = cuda.local.array(X_ITERS, int64)
        xsrc = cuda.local.array(X_ITERS, int64)
        xcol = cuda.local.array(X_ITERS, int64)
        dqd = cuda.local.array(DQ_ITERS, int64)
        dqr = cuda.local.array(DQ_ITERS, int64)
        dqp = cuda.local.array(DQ_ITERS, int64)
        tid = cuda.threadIdx.x
        lane = tid % 32
        wmi = (tid // 32) % wm
        wni = (tid // 32) // wm
        bx = cuda.blockIdx.x
        m0 = cuda.blockIdx.y * bm
        n_tok = xb.shape[0]
        cols = xb.shape[1]
        rows = w0.shape[0]
        nb = cols // bs
        # split-K (gridDim.z slices, whole raw units each): this block's tiles t_lo .. t_lo+n_tiles
        n_all = (cols + bk - 1) // bk
        n_units = (n_all + tpu - 1) // tpu
        u_lo = cuda.blockIdx.z * n_units // cuda.gridDim.z
        t_lo = u_lo * tpu
        n_tiles = min(((cuda.blockIdx.z + 1) * n_units // cuda.gridDim.z) * tpu, n_all) - t_lo
        for i in range(ACC):
            acc[i] = float32(0)
        x_plan(xdst, xsrc, xcol, m0, n_tok, cols, tid)
        dq_plan(dqd, dqr, dqp, tid)
        # Group g(i) of cp.async copies, committed at iteration i: x tile i+L and the raw unit
        # that tile i+L+1 starts, if it starts one. The prologue commits the raw unit 0, then
        # g(-L) .. g(-1); the short planes of those units are stored at once. Stages rotate:
        # x tile t in x stage t % (L+1), weight tile t in weight stage t % 2, raw unit u in raw
        # stage u % RST (counters below, not divisions).
        stage_raw(rs, w0, w1, u_lo, 0, bx, rows, nb, tid)
        load_short(pre, w0h, w1h, u_lo, bx, rows, nb, tid)
        store_short(rs16, pre, 0, tid)
        cp_async_commit()
        r_new = 1 % RST                                  # raw stage of the next unit staged
        for i in range(L):                               # g(i - L): x tile i, tile i+1's unit
            if i < n_tiles:
                stage_tile(xs, i * bm * CPR, xb, xdst, xsrc, xcol, X_ITERS, (t_lo + i) * CPR,
                           cols // 8)
            j = i + 1
            if j < n_tiles and j % tpu == 0:
                stage_raw(rs, w0, w1, u_lo + j // tpu, r_new, bx, rows, nb, tid)
                load_short(pre, w0h, w1h, u_lo + j // tpu, bx, rows, nb, tid)
                store_short(rs16, pre, r_new, tid)
                r_new = r_new + 1 if r_new + 1 < RST else 0
            cp_async_commit()
        cp_async_wait(WAIT_FIRST)
        cuda.syncthreads()                               # raw unit 0 visible to every thread
        dequant(ws, rs, rs8, rs16, dqd, dqr, dqp, t_lo * CPT, 0, 0, 0, cols // 32, wv)
        x_read = 0                                       # x stage of tile t
        x_write = L                                      # x stage of tile t + L
        r_read = R_FIRST                                 # raw stage of tile t+1's unit
        for t in range(n_tiles):
            cp_async_wait(WAIT_LOOP)
            cuda.syncthreads()    # g(t-L) landed: x tile t, the raw unit of t+1; the dequantized
            #                       tile t visible; every warp done with tile t-1's stages
            if t + L < n_tiles:
                stage_tile(xs, x_write * bm * CPR, xb, xdst, xsrc, xcol, X_ITERS,
                           (t_lo + t + L) * CPR, cols // 8)
            j = t + L + 1
            new_unit = j < n_tiles and (j & (tpu - 1)) == 0
            r_staged = r_new
            if new_unit:
                stage_raw(rs, w0, w1, u_lo + j // tpu, r_staged, bx, rows, nb, tid)
                load_short(pre, w0h, w1h, u_lo + j // tpu, bx, rows, nb, tid)
                r_new = r_new + 1 if r_new + 1 < RST else 0
            cp_async_commit()
            if t + 1 < n_tiles:
                dequant(ws, rs, rs8, rs16, dqd, dqr, dqp, (t_lo + t + 1) * CPT,
                        ((t + 1) & (tpu - 1)) * CPT, ((t + 1) & 1) * bn * CPR,
                        r_read * bn * UB, cols // 32, wv)
            mma_tile(xs, ws, x_read, t & 1, acc, af, wmi, wni, lane)
            if new_unit:
                store_short(rs16, pre, r_staged, tid)
            x_read = x_read + 1 if x_read < L else 0
            x_write = x_write + 1 if x_write < L else 0
            if ((t + 2) & (tpu - 1)) == 0:               # tile t+2 starts the next unit
                r_read = r_read + 1 if r_read + 1 < RST else 0
        finish(out, extra, acc, m0, bx, wmi, wni, lane, n_tok, w0.shape[0])

    return _gemm


# --- the launcher ----------------------------------------------------------------------------------

def pick_tile(n: int, rows_out: int, swiglu: bool, n_sms: int, qtype: int = Q4_K):
    """The first of MMA_TILES whose grid has >= MMA_FILL blocks per SM, else the last; tiles of
    16 warps only for BIG_TILE_TYPES (unless there is no other)."""
    tiles = [t for t in MMA_TILES if t[2] * t[3] <= 8 or qtype in BIG_TILE_TYPES] or MMA_TILES
    for bm, bn, wm, wn in tiles:
        per = bn // 2 if swiglu else bn
        if -(-rows_out // per) * -(-n // bm) >= MMA_FILL * n_sms:
            return bm, bn, wm, wn
    return tiles[-1]


# Decode rows of a batched step (issue 10): few tokens, so a GEMM's blocks are few (one per BN
# weight rows) and each walks the whole shared dimension, latency-bound (H200: a 4096x4096 Q4_K
# product took 80 us at 1..64 tokens, 2.6 % of the copy bandwidth, against 8 us for the one-row
# mat-vec). The decode product splits the shared dimension into k-slices of whole raw units
# (split-K), as many as bring the grid to SPLIT_BLOCKS_PER_SM blocks per SM, each slice's raw
# sums reduced in a fixed order by a second kernel that applies the epilogue. The slice count
# depends on the matrix's shape only, so a row's bits do not depend on the batch.
# Off by default until an end-to-end GPU run checks and times it (H200, 2026-12-02, alone: 4096x4096
# Q4_K 85 -> 46 us, 1024x4096 85 -> 14 us, 4096x14336 281 -> 101 us, 14336x4096 no gain: a 64-token
# tile does 64 tokens of mma work whatever the batch, so the slices share one SM throughput);
# NUMBAFORMER_SPLIT_DECODE=1 turns it on in the CUDA backend's batched steps.
SPLIT_DECODE = os.environ.get("NUMBAFORMER_SPLIT_DECODE", "0") == "1"
# BMxBNxWMxWN; a 16-token tile does a quarter of the 64-token one's mma work (to be timed)
DECODE_TILE = tuple(int(v) for v in os.environ.get("NUMBAFORMER_DECODE_TILE", "64x64x2x2")
                    .split("x"))
SPLIT_BLOCKS_PER_SM = 8


def decode_splits(w, swiglu: bool, n_sms: int) -> int:
    """k-slices of the decode product of W (QTensor) with DECODE_TILE: 1 if its row tiles alone
    fill the GPU, else up to one raw unit per slice."""
    bn = DECODE_TILE[1] // (2 if swiglu else 1)       # output rows a block
    blocks = -(-w.rows // bn)
    units = -(-w.cols // max(MMA_BK, stage_plan(w.qtype, MMA_BK)["bs"] *
                             stage_plan(w.qtype, MMA_BK)["nbu"]))
    return max(1, min(units, -(-SPLIT_BLOCKS_PER_SM * n_sms // blocks)))


def part_shape(n: int, w, swiglu: bool, splits: int) -> tuple:
    """The split product's partial sums: (splits, n, rows, or 2 rows for SwiGLU's gate and up)."""
    return (splits, n, w.rows * (2 if swiglu else 1))


@cuda_kernel
def _split_reduce(out, part, extra, epilogue):
    """out[m, r] = the epilogue of the k-slices' sums part[0..S-1, m, r] added in order (SwiGLU:
    silu(gate) * up, up at column rows + r); one thread an output."""
    n, rows = out.shape
    i = cuda.grid(1)
    if i >= n * rows:
        return
    m = i // rows
    r = i - m * rows
    v = float32(0)
    for z in range(part.shape[0]):
        v += part[z, m, r]
    if epilogue == 3:
        u = float32(0)
        for z in range(part.shape[0]):
            u += part[z, m, rows + r]
        v = v / (float32(1) + math.exp(-v)) * u
    elif epilogue == 1:
        v += extra[0, r]
    elif epilogue == 2:
        v += extra[m, r]
    out[m, r] = v


def gemm(out, xb, w, stream, *, bias=None, residual=None, up=None, tile=None, part=None) -> None:
    """out (n, rows) f32 = xb (n, cols) bf16 (uint16, to_bf16) @ W.T, W a QTensor on the device in
    the GPU layout, + bias (rows,) | + residual (n, rows) (may be `out`) | SwiGLU: out =
    silu(x @ W.T) * (x @ up.T) with `up` a QTensor of W's type and shape. tile: (bm, bn, wm, wn)
    instead of pick_tile's; MMA_BK, MMA_LOOKAHEAD, MMA_MIN_BLOCKS are read at each call.
    part: the decode product instead (DECODE_TILE, split-K): a float32 array of part_shape's
    shape (or larger in every dimension) for decode_splits' slices (unused, any array, when
    that is 1)."""
    from .gemv import _n_sms
    from .matmul import _opt_in
    n, cols = xb.shape
    assert cols == w.cols and cols % 32 == 0, (cols, w.cols)
    epilogue = EPILOGUES["swiglu" if up is not None else "bias" if bias is not None
                         else "residual" if residual is not None else "store"]
    if up is not None:
        assert (up.qtype, up.rows, up.cols) == (w.qtype, w.rows, w.cols)
    splits = 1
    if part is not None:
        tile = DECODE_TILE
        splits = decode_splits(w, up is not None, _n_sms())
        want = part_shape(n, w, up is not None, splits)
        if splits > 1 and (part.ndim != 3 or any(h < s for h, s in zip(part.shape, want))):
            raise ValueError(f"split GEMM: partial sums {part.shape}, need {want}")
    bm, bn, wm, wn = tile or pick_tile(n, w.rows, up is not None, _n_sms(), w.qtype)
    smem = smem_bytes(w.qtype, bm, bn, MMA_BK, MMA_LOOKAHEAD)
    if smem > MAX_SMEM:
        raise ValueError(f"tensor-core GEMM tile {bm}x{bn}x{MMA_BK} (lookahead {MMA_LOOKAHEAD}) "
                         f"needs {smem} bytes of shared memory, over {MAX_SMEM}")
    split = splits > 1
    k = _gemm_kernel(w.qtype, bm, bn, MMA_BK, wm, wn, epilogue, MMA_LOOKAHEAD, MMA_MIN_BLOCKS,
                     split)
    w1 = (up if up is not None else w).data
    extra = bias if bias is not None else residual if residual is not None else out
    if split:
        sums = part[:splits, :n, :want[2]]
        args = (sums, w.data, w1, dtype_view(w.data, np.uint16), dtype_view(w1, np.uint16), xb,
                sums)
    else:
        args = (out, w.data, w1, dtype_view(w.data, np.uint16), dtype_view(w1, np.uint16), xb,
                extra)
    _opt_in(k, smem, *args)
    per = bn // 2 if up is not None else bn
    grid = (-(-w.rows // per), -(-n // bm), splits)
    k[grid, 32 * wm * wn, stream, smem](*args)
    if split:
        ex = extra.reshape(1, extra.shape[0]) if extra.ndim == 1 else extra
        _split_reduce[-(-n * w.rows // 256), 256, stream](out, sums, ex, epilogue)
