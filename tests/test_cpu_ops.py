"""Each CPU op (backends/cpu) against tests/reference.py (NumPy float64) at awkward sizes, and the
exact dequantization of every GGML type against gguf.quants.dequantize.

Sizes: n (tokens) 1, 7, 33 (and 70, past the GEMM's 64-token tile); widths 64, 96, 576 (K-quants,
whose blocks are 256 wide: 256, 768); 37 weight rows (not a multiple of the GEMM's 16-row tile or
its 4-row unroll); head_dim 64 and 32; GQA groups 1, 2 and 3; both rope layouts; positions that do
not start at 0. The n == 1 cases take the mat-vec / single-row paths, n > 1 the GEMM / parallel
ones.

Error bounds, u = 2^-24 (float32's unit roundoff), all elementwise:
- dequantize, embed: bit for bit (the same float32 operations as gguf's decoder).
- add: exact (one correctly rounded float32 addition).
- rmsnorm: 4u|ref| (scale rounded once, x * scale * w rounded twice; the sum of squares is float64).
- silu_mul: 6u|ref| (exp, 1 + e, the division and the product: ~4 roundings).
- rope: 4u(|x0| + |x1|) for each rotated pair (cos, sin rounded to float32, two products, one sum);
  dimensions past rope_dim are left untouched (error 0).
- matmul: 16u * sum_k |x_k W_rk| (+ 2u|bias_r|). A float32 dot product of random-sign terms errs
  by about u * sum|x w| at any length (worst case cols * u * sum|x w|); measured <= 3.1u here.
  One wrong quant value among 768 already errs by ~1e-3 * sum|x w|.
- attention: 64u * max|v|: scores are float32 dot products over head_dim <= 64 terms and the
  softmax sums <= 64 weights, each ~64u ~ 4e-6 relative at worst.
- the 8-bit mat-vec (fast path, Q4_0/Q4_1/Q8_0, one token): against the float64 product of W with
  llama.cpp's q8_1 rounding of x (reference.q8_activations), within (n_blocks + 8)u * sum over
  blocks of |d q| . |x_q| + |m| |x_q| (the integer sums are exact; each block adds a float32 term of
  that size). Where the kernel quantizes its own normed x, values within 1e-3 of a rounding tie may
  round the other way: reference.q8_tie_slack adds |W| times their d.

The exact-path tests use a backend with exact=True; FAST (exact=False) is the default backend.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import reference as R
import reference as ref
from sampling_cases import OPTIONS, chain_cases, check_bookkeeping, run_op
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

from numbaformer.backends.base import RopeParams
from numbaformer.backends.cpu import CPUBackend, CPUTensor
from numbaformer.backends.cpu.dequant import dequantize
from numbaformer.backends.cpu.layout import KIND, pack, unpack
from numbaformer.kvcache import KVCache
from numbaformer.sampling import SamplingParams, make_sampler
from numbaformer.quants import DECODERS, GGML_TYPES
from numbaformer.weights import QTensor

U = 2.0 ** -24
OPS = CPUBackend(exact=True)
FAST = CPUBackend()
TYPE_NAMES = [GGML_TYPES[t].name for t in DECODERS]
FLOAT_TYPES = ("F32", "F16", "BF16")
# byte offsets of the fp16 scale fields in each block (ggml-common.h's block_* structs)
F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
              "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
N_TOKENS = (1, 7, 33)


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels(record_figure):
    """Compile (or load from the cache) every type's kernels once, timed, before the tests."""
    t0 = time.perf_counter()
    for qt in DECODERS:
        name = GGML_TYPES[qt].name
        cols = widths(name)[0]
        w = QTensor("w", qt, 2, cols, np.zeros((2, GGML_TYPES[qt].row_bytes(cols)), np.uint8))
        for n in (1, 2):
            OPS.matmul(np.empty((n, 2), np.float32), np.zeros((n, cols), np.float32), w)
        OPS.embed(np.empty((1, cols), np.float32), w, np.zeros(1, np.int32))
        dequantize(w.data, qt, cols)
    record_figure("CPU matmul/embed/dequantize kernels of all 13 types (compile or cache load)",
                  f"{time.perf_counter() - t0:.1f} s")


def test_every_decoder_is_covered():
    assert set(TYPE_NAMES) == set(F16_FIELDS) | set(FLOAT_TYPES)


def widths(name: str) -> tuple[int, ...]:
    return (256, 768) if GGML_QUANT_SIZES[QT[name]][0] == 256 else (64, 96, 576)


# --- random weights -------------------------------------------------------------------------------

def finite_f16_bits(rng, n: int) -> np.ndarray:
    """n random finite fp16 bit patterns (uint16): every exponent but all-ones, so subnormals,
    zeros and huge values too."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    exp_all_ones = (bits & 0x7C00) == 0x7C00
    bits[exp_all_ones] &= np.uint16(0xBFFF)            # drop one exponent bit: finite
    return bits


def modest_f16(rng, n: int) -> np.ndarray:
    """n random fp16 scales of either sign spanning 2^-12 .. 2^-2 (what real models hold)."""
    mag = rng.uniform(0.5, 1.0, n) * 2.0 ** rng.integers(-11, -1, n)
    return (mag * rng.choice([-1.0, 1.0], n)).astype(np.float16)


def random_rows(name: str, rows: int, cols: int, rng, *, wild_scales: bool = False) -> np.ndarray:
    """(rows, row_bytes) uint8 of GGML type `name`. Float types: N(0, 1) values. Block types: random
    bytes with finite fp16 scale fields: modest ones, or (wild_scales) any finite bit pattern."""
    block, size = GGML_QUANT_SIZES[QT[name]]
    if name in FLOAT_TYPES:
        v = rng.standard_normal((rows, cols)).astype(np.float32)
        if name == "F16":
            v = v.astype(np.float16)
        elif name == "BF16":
            v = (v.view(np.uint32) >> 16).astype(np.uint16)
        return np.ascontiguousarray(v).view(np.uint8).reshape(rows, -1)
    nb = rows * cols // block
    raw = rng.integers(0, 256, (nb, size), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        d = finite_f16_bits(rng, nb) if wild_scales else modest_f16(rng, nb).view(np.uint16)
        raw[:, off:off + 2] = d.astype("<u2").view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, cols // block * size)


def gguf_rows(raw: np.ndarray, name: str) -> np.ndarray:
    """gguf-py's float32 dequantization of (rows, row_bytes) -> (rows, cols)."""
    return gguf_dequantize(raw, QT[name]).reshape(raw.shape[0], -1)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """float32 arrays equal bit for bit, except that any NaN matches any NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return False
    ok = ~np.isnan(a)
    return np.array_equal(a[ok].view(np.uint32), b[ok].view(np.uint32))


# --- dequantization: bit for bit -----------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in TYPE_NAMES if n not in FLOAT_TYPES])
def test_dequantize_block_types_exact(name):
    rng = np.random.default_rng(1)
    cols = 1024 if GGML_QUANT_SIZES[QT[name]][0] == 32 else 2048
    for wild in (False, True):
        raw = random_rows(name, 9, cols, rng, wild_scales=wild)
        assert same_bits(dequantize(raw, QT[name], cols), gguf_rows(raw, name)), name


def test_dequantize_f16_all_values_exact():
    raw = np.arange(1 << 16, dtype=np.uint16).astype("<u2").view(np.uint8).reshape(4, -1)
    got = dequantize(raw, QT.F16, (1 << 16) // 4)
    assert same_bits(got, gguf_rows(raw, "F16"))
    assert np.isnan(got).sum() == 2 * 1023 and np.isinf(got).sum() == 2


# Regression: quants._pow2 once built 2^k with an int64 shift by 63 or more for k <= -125, so float32 /
# bf16 bit patterns with a biased exponent <= 25 (zeros, subnormals, |x| < 2^-101) decoded to garbage.
TINY_EXPONENT = 25


def bf16_exponent(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) >> 7) & 0xFF


def check_bf16(bits: np.ndarray) -> None:
    pad = np.full(-len(bits) % 32, 0x3F80, np.uint16)           # 1.0: whole 32-value chunks
    bits = np.concatenate([bits, pad]).astype(np.uint16)
    raw = bits.astype("<u2").view(np.uint8).reshape(1, -1)
    got = dequantize(raw, QT.BF16, bits.size)
    assert same_bits(got, gguf_rows(raw, "BF16"))
    # bf16 is the upper half of a float32: check against that definition too
    assert same_bits(got.reshape(-1), (bits.astype(np.uint32) << 16).view(np.float32))


def test_dequantize_bf16_all_values_exact():
    check_bf16(np.arange(1 << 16, dtype=np.uint16))


def test_dequantize_bf16_exponents_above_25_exact():
    bits = np.arange(1 << 16, dtype=np.uint16)
    check_bf16(bits[bf16_exponent(bits) > TINY_EXPONENT])


def f32_test_patterns(rng) -> np.ndarray:
    """Specials, every exponent with random mantissas and signs, and uniformly random patterns."""
    specials = np.array([0, 0x80000000, 1, 0x80000001, 0x007FFFFF, 0x00800000, 0x00400000,
                         0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001,
                         0x7F800001, 0x3F800000, 0xBF800000, 0x0C000000, 0x0BFFFFFF],
                        dtype=np.uint32)
    exps = np.repeat(np.arange(256, dtype=np.uint32), 64)
    by_exp = (exps << 23) | rng.integers(0, 1 << 23, exps.size, dtype=np.uint32) \
        | (rng.integers(0, 2, exps.size, dtype=np.uint32) << 31)
    anything = rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([specials, by_exp, anything])


def check_f32(bits: np.ndarray) -> None:
    bits = np.concatenate([bits, np.full(-len(bits) % 32, 0x3F800000, np.uint32)])     # 1.0
    raw = bits.astype("<u4").view(np.uint8).reshape(1, -1)
    got = dequantize(raw, QT.F32, bits.size)
    assert same_bits(got, gguf_rows(raw, "F32"))
    assert same_bits(got.reshape(-1), bits.view(np.float32))


def test_dequantize_f32_bit_patterns_exact():
    check_f32(f32_test_patterns(np.random.default_rng(2)))


def test_dequantize_f32_exponents_above_25_exact():
    bits = f32_test_patterns(np.random.default_rng(2))
    check_f32(bits[((bits >> 23) & 0xFF) > TINY_EXPONENT])


@pytest.mark.parametrize("name", ["F32", "BF16"])
def test_matmul_and_embed_with_zero_weights(name):
    """A weight matrix holding exact zeros (common in real F32 / BF16 files) multiplies as zeros."""
    rng = np.random.default_rng(15)
    raw = random_rows(name, 8, 64, rng)
    raw[:, :16] = 0                            # the first 4 (F32) or 8 (BF16) values: +0.0
    w = QTensor("w", QT[name], 8, 64, raw)
    out = np.empty((1, 8), np.float32)
    OPS.matmul(out, np.ones((1, 64), np.float32), w)
    assert np.isfinite(out).all()
    emb = np.empty((1, 64), np.float32)
    OPS.embed(emb, w, np.array([3], np.int32))
    assert same_bits(emb, gguf_rows(raw, name)[3:4])


def test_dequantize_rejects_bad_shapes():
    with pytest.raises(ValueError, match="Q4_0"):
        dequantize(np.zeros((2, 17), np.uint8), QT.Q4_0, 32)
    with pytest.raises(ValueError):
        dequantize(np.zeros((2, 36), np.uint8), QT.Q4_0, 48)


# --- embed ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TYPE_NAMES)
def test_embed_exact(name):
    rng = np.random.default_rng(3)
    n_vocab, cols = 37, widths(name)[0]
    raw = random_rows(name, n_vocab, cols, rng)
    table = QTensor("token_embd", QT[name], n_vocab, cols, raw)
    want = gguf_rows(raw, name)
    for ids in ([5], [0, n_vocab - 1, 5, 5, 17, 0, 36], rng.integers(0, n_vocab, 33)):
        ids = np.asarray(ids, np.int32)
        out = np.full((len(ids), cols), np.nan, np.float32)
        OPS.embed(out, table, ids)
        assert same_bits(out, want[ids]), ids


# --- matmul ---------------------------------------------------------------------------------------

def check_matmul(name: str, rows: int, cols: int, n: int, bias: bool, rng) -> None:
    raw = random_rows(name, rows, cols, rng)
    w = QTensor("w", QT[name], rows, cols, raw)
    W = gguf_rows(raw, name).astype(np.float64)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    b = rng.standard_normal(rows).astype(np.float32) if bias else None
    out = np.full((n, rows), np.nan, np.float32)
    OPS.matmul(out, x, w, b)
    x64 = x.astype(np.float64)
    want = x64 @ W.T + (0 if b is None else b.astype(np.float64))
    bound = 16 * U * (np.abs(x64) @ np.abs(W).T) + (0 if b is None else 2 * U * np.abs(b))
    err = np.abs(out - want)
    assert np.isfinite(out).all()
    assert (err <= bound).all(), (f"{name} {n}x{cols} -> {rows}: worst err/bound "
                                  f"{np.max(err / bound):.2f}")


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n", N_TOKENS)
@pytest.mark.parametrize("name", TYPE_NAMES)
def test_matmul(name, n, bias):
    rng = np.random.default_rng([4, n, bias])
    for cols in widths(name):
        check_matmul(name, 37, cols, n, bias, rng)


@pytest.mark.parametrize("name", ["Q4_1", "Q8_0", "Q6_K"])
def test_matmul_crosses_token_tile(name):
    """70 tokens: past the GEMM's 64-token tile; 576 rows as SmolLM2's projections."""
    rng = np.random.default_rng(5)
    check_matmul(name, 70, widths(name)[0], 70, True, rng)
    if name != "Q6_K":
        check_matmul(name, 576, 576, 9, False, rng)


def test_matmul_paths_agree():
    """Row t of a GEMM equals the mat-vec of x[t] up to rounding (the decode/prefill switch)."""
    rng = np.random.default_rng(6)
    raw = random_rows("Q4_1", 64, 576, rng)
    w = QTensor("w", QT.Q4_1, 64, 576, raw)
    x = rng.standard_normal((7, 576)).astype(np.float32)
    gemm = np.empty((7, 64), np.float32)
    OPS.matmul(gemm, x, w)
    W = gguf_rows(raw, "Q4_1").astype(np.float64)
    for t in range(7):
        mv = np.empty((1, 64), np.float32)
        OPS.matmul(mv, x[t:t + 1], w)
        bound = 32 * U * (np.abs(x[t].astype(np.float64)) @ np.abs(W).T)
        assert (np.abs(mv[0] - gemm[t]) <= bound).all()


# --- rmsnorm, silu_mul, add -----------------------------------------------------------------------

@pytest.mark.parametrize("width", [64, 96, 576])
@pytest.mark.parametrize("n", N_TOKENS)
def test_rmsnorm(n, width):
    rng = np.random.default_rng([7, n, width])
    # rows of very different magnitudes; the tiny ones make eps matter
    x = (rng.standard_normal((n, width)) * 10.0 ** rng.uniform(-4, 3, (n, 1))).astype(np.float32)
    w = rng.uniform(-2, 2, width).astype(np.float32)
    for eps in (1e-5, 1e-6):
        out = np.full_like(x, np.nan)
        OPS.rmsnorm(out, x, w, eps)
        want = ref.rmsnorm(x, w, eps)
        assert (np.abs(out - want) <= 4 * U * np.abs(want)).all()


def test_rmsnorm_in_place():
    """The model normalizes into another buffer, but the op must not depend on out != x."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((7, 96)).astype(np.float32)
    w = rng.standard_normal(96).astype(np.float32)
    want = ref.rmsnorm(x, w, 1e-5)
    OPS.rmsnorm(x, x, w, 1e-5)
    assert (np.abs(x - want) <= 4 * U * np.abs(want)).all()


@pytest.mark.parametrize("width", [64, 96, 1536])
@pytest.mark.parametrize("n", N_TOKENS)
def test_silu_mul(n, width):
    rng = np.random.default_rng([9, n, width])
    gate = (rng.standard_normal((n, width)) * 4).astype(np.float32)
    gate[0, :8] = [0.0, -0.0, 88.0, -88.0, 100.0, -100.0, 1e-30, -20.0]
    up = rng.standard_normal((n, width)).astype(np.float32)
    out = np.full_like(gate, np.nan)
    OPS.silu_mul(out, gate, up)
    want = ref.silu(gate.astype(np.float64)) * up
    assert (np.abs(out - want) <= 6 * U * np.abs(want) + 1e-38).all()
    OPS.silu_mul(gate, gate, up)            # in place, as the model calls it
    assert np.array_equal(gate, out)


@pytest.mark.parametrize("width", [64, 96, 576])
@pytest.mark.parametrize("n", N_TOKENS)
def test_add_exact(n, width):
    rng = np.random.default_rng([10, n, width])
    a = (rng.standard_normal((n, width)) * 100).astype(np.float32)
    b = rng.standard_normal((n, width)).astype(np.float32)
    out = np.full_like(a, np.nan)
    OPS.add(out, a, b)
    assert np.array_equal(out, a + b)
    OPS.add(a, a, b)                         # in place, as the residual update
    assert np.array_equal(a, out)


# --- rope -----------------------------------------------------------------------------------------

def rope_partner(head_dim: int, rope_dim: int, n_heads: int, neox: bool) -> np.ndarray:
    """Index of the value each dimension is rotated with (itself past rope_dim)."""
    p = np.arange(head_dim)
    half = rope_dim // 2
    if neox:
        p[:half], p[half:rope_dim] = np.arange(half, rope_dim), np.arange(half)
    else:
        p[:rope_dim] = np.arange(rope_dim) ^ 1
    return (p[None, :] + head_dim * np.arange(n_heads)[:, None]).reshape(-1)


ROPE_SHAPES = [(64, 64, 9), (64, 64, 3), (32, 32, 4), (64, 32, 2)]   # head_dim, rope_dim, heads


@pytest.mark.parametrize("neox", [False, True], ids=["normal", "neox"])
@pytest.mark.parametrize("head_dim,rope_dim,n_heads", ROPE_SHAPES)
@pytest.mark.parametrize("n,start", [(1, 0), (1, 4095), (7, 3), (33, 100)])
def test_rope(n, start, head_dim, rope_dim, n_heads, neox):
    rng = np.random.default_rng([11, n, start, head_dim, rope_dim, n_heads, neox])
    params = RopeParams(head_dim, rope_dim, 10000.0 if neox else 100000.0, 1.0, neox)
    freqs = params.inv_freq()
    pos = (start + np.arange(n)).astype(np.int32)
    x = rng.standard_normal((n, n_heads * head_dim)).astype(np.float32)
    got = x.copy()
    OPS.rope(got, pos, n_heads, freqs, params)
    want = ref.rope(x, pos, n_heads, head_dim, rope_dim, freqs, neox)
    partner = rope_partner(head_dim, rope_dim, n_heads, neox)
    bound = 4 * U * (np.abs(x) + np.abs(x[:, partner]))
    assert (np.abs(got - want) <= bound).all()
    untouched = (np.arange(n_heads * head_dim) % head_dim) >= rope_dim
    assert np.array_equal(got[:, untouched], x[:, untouched])


def test_rope_scaling_and_freq_factors():
    """Linear scaling and per-frequency divisors (Llama 3.1's rope_freqs) reach the rotation."""
    rng = np.random.default_rng(12)
    params = RopeParams(64, 64, 500000.0, 0.25, False)
    factors = rng.uniform(1, 8, 32).astype(np.float32)
    freqs = params.inv_freq(factors)
    assert np.allclose(freqs, ref.inv_freq(64, 500000.0, 0.25, factors), rtol=1e-15, atol=0)
    pos = np.arange(50, 57, dtype=np.int32)
    x = rng.standard_normal((7, 4 * 64)).astype(np.float32)
    got = x.copy()
    OPS.rope(got, pos, 4, freqs, params)
    want = ref.rope(x, pos, 4, 64, 64, freqs, False)
    pair = np.abs(x) + np.abs(x[:, rope_partner(64, 64, 4, False)])
    assert (np.abs(got - want) <= 4 * U * pair).all()


# --- kv_store + attention ---------------------------------------------------------------------------

ATTN_HEADS = [(3, 3, 64), (9, 3, 64), (6, 2, 32), (4, 4, 32)]       # n_head, n_kv_head, head_dim


def make_cache(n_layer: int, n_kv: int, n_ctx: int, head_dim: int, kv_type: str = "f32",
               **paging):
    """A KVCache as the model allocates it, for a config of these sizes, every value NaN;
    paging: n_blocks, block_size."""
    cfg = SimpleNamespace(n_layer=n_layer, n_head_kv=n_kv, head_dim=head_dim)
    cache = KVCache(OPS, cfg, n_ctx, kv_type, **paging)
    cache.k[...] = np.nan
    cache.v[...] = np.nan
    return cache


def stored(x: np.ndarray, kv_type: str) -> np.ndarray:
    """What a cache of kv_type keeps of float32 values: themselves, or their nearest half."""
    if kv_type == "f32":
        return x
    with np.errstate(over="ignore"):                  # past 65504: inf, as intended
        return x.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
@pytest.mark.parametrize("n_head,n_kv,head_dim", ATTN_HEADS)
@pytest.mark.parametrize("n,start", [(1, 0), (1, 17), (7, 0), (7, 20), (33, 5)])
def test_kv_store_and_attention(n, start, n_head, n_kv, head_dim, kv_type):
    """A chunk of n tokens at positions start.. over a cache already holding positions 0..start-1
    (an earlier chunk). Cache rows past the chunk hold NaN: reading them would poison the output."""
    rng = np.random.default_rng([13, n, start, n_head, n_kv, head_dim])
    n_layer, n_ctx, layer = 2, 64, 1
    kv_dim, q_dim = n_kv * head_dim, n_head * head_dim
    cache = make_cache(n_layer, n_kv, n_ctx, head_dim, kv_type)
    cache.k[:, :, :start] = rng.standard_normal((n_layer, n_kv, start, head_dim))
    cache.v[:, :, :start] = rng.standard_normal((n_layer, n_kv, start, head_dim))
    before = cache.k.copy(), cache.v.copy()
    k = rng.standard_normal((n, kv_dim)).astype(np.float32)
    v = rng.standard_normal((n, kv_dim)).astype(np.float32)
    q = (rng.standard_normal((n, q_dim)) * 2).astype(np.float32)      # peaky enough softmaxes
    pos = (start + np.arange(n)).astype(np.int32)

    OPS.kv_store(cache, layer, k, v, pos)
    end = start + n
    for arr, new, old in ((cache.k, k, before[0]), (cache.v, v, before[1])):
        heads = stored(new, kv_type).reshape(n, n_kv, head_dim).swapaxes(0, 1)
        assert np.array_equal(arr[layer, :, start:end], heads)
        assert np.array_equal(arr[0], old[0], equal_nan=True)      # nothing else was written
        assert np.array_equal(arr[layer, :, :start], old[layer, :, :start])
        assert np.isnan(arr[layer, :, end:]).all()

    out = np.full((n, q_dim), np.nan, np.float32)
    OPS.attention(out, q, cache, layer, pos, 1.0 / np.sqrt(head_dim))
    keys = cache.k[layer, :, :end].swapaxes(0, 1).reshape(end, kv_dim).astype(np.float64)
    vals = cache.v[layer, :, :end].swapaxes(0, 1).reshape(end, kv_dim).astype(np.float64)
    want = ref.attention(q.astype(np.float64), keys, vals, pos, np.arange(end), n_head, n_kv,
                         head_dim)
    assert np.isfinite(out).all()
    assert np.abs(out - want).max() <= 64 * U * np.abs(vals).max()


@pytest.mark.parametrize("n_head,n_kv,head_dim", ATTN_HEADS[1:3])
@pytest.mark.parametrize("bs", [1, 4, 7])
def test_paged_kv_store_and_attention_equal_the_plain_cache(n_head, n_kv, head_dim, bs):
    """Three sequences (lengths 1, 9, 23) written through slot mappings into blocks of bs scattered
    over a shared pool, each attending through its block table, give the bits each gives alone in a
    plain cache (slot == position); the identity table gives the plain cache's bits too; a slot of
    -1 (padding) writes nothing."""
    rng = np.random.default_rng([21, n_head, bs])
    lens, layer, kv_dim, q_dim = [1, 9, 23], 1, n_kv * head_dim, n_head * head_dim
    need = [-(-n // bs) for n in lens]
    n_blocks = sum(need) + 3
    perm = rng.permutation(n_blocks)
    tables = np.full((len(lens), max(need)), -1, np.int32)
    at = 0
    for i, m in enumerate(need):
        tables[i, :m] = perm[at:at + m]
        at += m
    pool = make_cache(2, n_kv, 0, head_dim, n_blocks=n_blocks, block_size=bs)
    seqs = []
    for n in lens:
        k, v = (rng.standard_normal((n, kv_dim)).astype(np.float32) for _ in range(2))
        q = (rng.standard_normal((n, q_dim)) * 2).astype(np.float32)
        seqs.append((k, v, q, np.arange(n, dtype=np.int32)))
    row_seq = np.repeat(np.arange(len(lens), dtype=np.int32), lens)
    pos = np.concatenate([s[3] for s in seqs])
    slots = (tables[row_seq, pos // bs] * bs + pos % bs).astype(np.int32)
    k, v, q = (np.concatenate([s[j] for s in seqs]) for j in range(3))
    view = pool.paged(np.append(slots, -1), tables, row_seq)
    OPS.kv_store(view, layer, np.vstack([k, k[:1]]), np.vstack([v, v[:1]]), np.append(pos, 0))
    paged = view.paged(slots, tables, row_seq)
    out = np.full((len(pos), q_dim), np.nan, np.float32)
    OPS.attention(out, q, paged, layer, pos, 0.125)
    unused = (perm[sum(need):, None] * bs + np.arange(bs)).ravel()     # the unused blocks' slots
    assert np.isnan(pool.k[layer, :, unused]).all() and np.isnan(pool.k[0]).all()
    for i, (k1, v1, q1, p1) in enumerate(seqs):
        plain = make_cache(2, n_kv, 32, head_dim, block_size=bs)
        OPS.kv_store(plain, layer, k1, v1, p1)
        want = np.empty((len(p1), q_dim), np.float32)
        OPS.attention(want, q1, plain, layer, p1, 0.125)
        assert same_bits(out[row_seq == i], want)
        ident = plain.paged(p1, np.arange(-(-32 // bs), dtype=np.int32)[None], np.zeros_like(p1))
        got = np.empty_like(want)
        OPS.attention(got, q1, ident, layer, p1, 0.125)
        assert same_bits(got, want)


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
@pytest.mark.parametrize("neox", [False, True])
def test_rope_store_one_token_equals_the_ops(kv_type, neox):
    """One token's fused rope + K/V store (the decode path) writes the bits of rope(q), rope(k)
    and kv_store, and nothing else."""
    rng = np.random.default_rng([16, neox])
    params = RopeParams(64, 64, 10000.0, 1.0, neox)
    freqs = params.inv_freq()
    q = rng.standard_normal((1, 9 * 64)).astype(np.float32)
    k = rng.standard_normal((1, 3 * 64)).astype(np.float32)
    v = rng.standard_normal((1, 3 * 64)).astype(np.float32)
    pos = np.array([37], np.int32)
    a, b = make_cache(2, 3, 64, 64, kv_type), make_cache(2, 3, 64, 64, kv_type)
    qa, ka = q.copy(), k.copy()
    OPS.rope_store(qa, ka, v, pos, a, 1, freqs, params)
    qb, kb = q.copy(), k.copy()
    OPS.rope(qb, pos, 9, freqs, params)
    OPS.rope(kb, pos, 3, freqs, params)
    OPS.kv_store(b, 1, kb, v, pos)
    assert same_bits(qa, qb) and same_bits(ka, kb)
    assert same_bits(a.k, b.k) and same_bits(a.v, b.v)


@pytest.mark.parametrize("n_ctx,n_blocks,bs,slots", [(257, 2, 64, 320), (100, 4, 16, 112),
                                                      (64, 4, 16, 64), (30, 0, 16, 30)])
def test_paged_pool_holds_whole_blocks(n_ctx, n_blocks, bs, slots):
    """A paged pool is whole blocks, at least the context's (a context of 257 at blocks of 64:
    5 blocks, 320 slots; the CUDA kernels refuse a pool that is not); the plain cache n_ctx."""
    cache = make_cache(2, 1, n_ctx, 8, n_blocks=n_blocks or None, block_size=bs)
    assert cache.n_slots == slots and cache.k.shape[2] == slots
    assert not n_blocks or slots % bs == 0


def test_f16_cache_rounds_like_numpy():
    """Values of every magnitude (f16 subnormals, ties, overflow, zeros, inf, nan) are stored as
    numpy's round-to-nearest-even float16 conversion keeps them."""
    rng = np.random.default_rng(16)
    mags = 2.0 ** rng.uniform(-30, 17, 4096)
    x = (mags * rng.choice([-1, 1], mags.size)).astype(np.float32)
    halves = rng.integers(0, 0x7C00, 1024, dtype=np.uint16).view(np.float16).astype(np.float32)
    ties = (halves + np.spacing(halves.astype(np.float16)).astype(np.float32) / 2)    # midpoints
    special = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e9, np.inf, -np.inf,
                        2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14, np.nan], np.float32)
    vals = np.concatenate([x, halves, ties, special]).astype(np.float32)
    n = -(-vals.size // 64)
    vals = np.concatenate([vals, np.zeros(n * 64 - vals.size, np.float32)]).reshape(n, 64)
    cache = make_cache(1, 1, n, 64, "f16")
    OPS.kv_store(cache, 0, vals, -vals, np.arange(n, dtype=np.int32))
    assert same_bits(cache.k[0, 0], stored(vals, "f16"))
    assert same_bits(cache.v[0, 0], stored(-vals, "f16"))


def test_attention_first_position_copies_v():
    """At position 0 the only key has weight 1: the output is v itself, whatever q is."""
    rng = np.random.default_rng(14)
    cache = make_cache(1, 2, 8, 32)
    k = rng.standard_normal((1, 64)).astype(np.float32)
    v = rng.standard_normal((1, 64)).astype(np.float32)
    pos = np.zeros(1, np.int32)
    OPS.kv_store(cache, 0, k, v, pos)
    out = np.empty((1, 4 * 32), np.float32)
    q = rng.standard_normal((1, 128)).astype(np.float32) * 50
    OPS.attention(out, q, cache, 0, pos, 1 / np.sqrt(32))
    assert np.array_equal(out.reshape(4, 32), np.repeat(v.reshape(2, 32), 2, axis=0))


def test_argmax():
    out = np.zeros(1, np.int32)
    logits = np.array([1.0, 5.0, -3.0, 5.0, 4.9], np.float32)
    OPS.argmax(out, logits)
    assert out[0] == 1                       # the first of equal maxima, as np.argmax


# --- the sampling chain (sample): against tests/reference.py, then its bookkeeping -------------------

@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("n_vocab", [1000, 577])
def test_sample_op_matches_reference(name, n_vocab):
    checked = 0
    for logits, history, p, want in chain_cases(n_vocab, OPTIONS[name], seed=n_vocab):
        got = run_op(OPS, logits, history, p)
        assert got == make_sampler(p)(logits.copy(), history, index=len(history))
        if want is not None:
            assert got == want
            checked += 1
    assert checked >= 8


def test_sample_op_ties_and_flat_logits():
    """Exact ties (rounded logits) go to the smaller id, as the reference orders them; flat
    logits (all within 0.05 of each other) cut exactly."""
    rng = np.random.default_rng(3)
    checked = 0
    for flat in (False, True) * 10:
        logits = (rng.standard_normal(700) * 0.01 + 4 if flat else
                  np.round(rng.standard_normal(700), 1)).astype(np.float32)
        p = SamplingParams(temperature=1.0, top_k=int(rng.choice([0, 7, 300])),
                           top_p=float(rng.choice([1.0, 0.5])), min_p=float(rng.choice([0, 0.99])),
                           seed=int(rng.integers(0, 2**63)))
        history = [1, 2, 3]
        want, m = R.sample_chain(logits, [], temperature=1.0, top_k=p.top_k, top_p=p.top_p,
                                 min_p=p.min_p, seed=p.seed, index=3)
        got = run_op(OPS, logits, history, p)
        if m["draw"] > 1e-4 and m["top_p"] > 1e-6 and m["min_p"] > 1e-6 and (
                not flat or m["top_k"] > 1e-6):
            assert got == want
            checked += 1
    assert checked >= 12


def test_sample_op_bookkeeping():
    check_bookkeeping(OPS)


# --- the 8-bit mat-vec: packed weights, q8 activations (the default single-token path) ------------

FAST_TYPES = [GGML_TYPES[t].name for t in KIND]


def packed_tensor(name: str, rows: int, cols: int, rng) -> tuple[np.ndarray, CPUTensor]:
    raw = random_rows(name, rows, cols, rng)
    t = QTensor("w", QT[name], rows, cols, raw)
    return raw, FAST.upload_matrix(t)


def q8_bound(raw: np.ndarray, name: str, xq: np.ndarray) -> np.ndarray:
    """(rows,): (n_blocks + 8)u * sum over blocks of |d q| . |x_q| + |m| |x_q| (module doc)."""
    W = gguf_rows(raw, name).astype(np.float64)
    rows, cols = W.shape
    M = np.zeros_like(W)
    if name == "Q4_1":                               # the block's min: f16 at byte 2 of its 20
        m = raw.reshape(rows, -1, 20)[:, :, 2:4].copy().view(np.float16)[..., 0]
        M = np.repeat(m.astype(np.float64), 32, axis=1)
    return (cols // 32 + 8) * U * ((np.abs(W - M) + np.abs(M)) @ np.abs(xq)) + 1e-30


def test_packed_layout_round_trips():
    """Packing is lossless (a permutation of bytes, Q8_0's quants + 128), rows padded to 16."""
    rng = np.random.default_rng(20)
    for name in FAST_TYPES:
        for rows, cols in ((1, 32), (37, 64), (300, 96), (48, 576)):
            raw = random_rows(name, rows, cols, rng)
            p = pack(raw, QT[name], rows, cols)
            assert p.groups == -(-rows // 16) and p.w.nbytes == p.groups * 16 * raw.shape[1]
            assert np.array_equal(unpack(p, QT[name]), raw), (name, rows, cols)


@pytest.mark.parametrize("name", FAST_TYPES)
@pytest.mark.parametrize("rows,cols", [(37, 64), (576, 576), (300, 1536)])
def test_matvec_q8_fast_path(name, rows, cols):
    """One token's product (with bias, and the residual form) equals W @ q8(x) in float64 to the
    bound above; x has a quiet block (its own scale) and an all-zero block (d = 0)."""
    rng = np.random.default_rng([21, rows, cols])
    raw, w = packed_tensor(name, rows, cols, rng)
    assert FAST._fast(np.zeros((1, cols)), w) and not OPS._fast(np.zeros((1, cols)), w)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    x[0, :32] *= 1e-3
    x[0, 32:64] = 0
    xq = ref.q8_activations(x[0])
    W = gguf_rows(raw, name).astype(np.float64)
    bias = rng.standard_normal(rows).astype(np.float32)
    bound = q8_bound(raw, name, xq)
    out = np.full((1, rows), np.nan, np.float32)
    FAST.matmul(out, x, w, bias)
    err = np.abs(out[0] - (W @ xq + bias))
    assert (err <= bound + 2 * U * np.abs(bias)).all(), f"max err/bound {np.max(err / bound):.2f}"
    x0 = rng.standard_normal((1, rows)).astype(np.float32)
    acc = x0.copy()
    FAST.matmul_add(acc, x, w, np.empty((1, rows), np.float32))
    err = np.abs(acc[0] - (x0[0] + W @ xq))
    assert (err <= bound + 2 * U * np.abs(x0[0])).all(), f"max err/bound {np.max(err / bound):.2f}"


def test_matvec_q8_fused_norm_qkv_and_swiglu():
    """The fused single-token ops against the composition on the q8 rounding of the normed x:
    norm + Q/K/V (three matrices in one launch, biases), norm + gate/up + SwiGLU."""
    rng = np.random.default_rng(22)
    cols, rows = 576, (576, 192, 48)
    mats = [packed_tensor("Q4_1", r, cols, rng) for r in rows]
    x = (rng.standard_normal((1, cols)) * 3).astype(np.float32)
    nw = rng.uniform(0.5, 1.5, cols).astype(np.float32)
    biases = [rng.standard_normal(r).astype(np.float32) for r in rows]
    outs = [np.full((1, r), np.nan, np.float32) for r in rows]
    xn = np.empty((1, cols), np.float32)
    FAST.norm_matmul(outs, x, nw, 1e-5, [m[1] for m in mats], biases, xn)
    OPS.rmsnorm(want_xn := np.empty_like(xn), x, nw, 1e-5)
    assert np.array_equal(xn, want_xn)               # the normed x, as the exact op computes it
    slack = ref.q8_tie_slack(xn[0])
    xq = ref.q8_activations(xn[0])
    for out, (raw, w), b in zip(outs, mats, biases):
        W = gguf_rows(raw, "Q4_1").astype(np.float64)
        err = np.abs(out[0] - (W @ xq + b))
        assert (err <= q8_bound(raw, "Q4_1", xq) + 2 * U * np.abs(b) + np.abs(W) @ slack).all()
    (rg, gate), (ru, up) = packed_tensor("Q4_1", 1536, cols, rng), packed_tensor("Q4_1", 1536,
                                                                               cols, rng)
    out = np.full((1, 1536), np.nan, np.float32)
    FAST.norm_swiglu(out, x, nw, 1e-5, gate, up, xn, np.empty((1, 1536), np.float32))
    Wg, Wu = gguf_rows(rg, "Q4_1").astype(np.float64), gguf_rows(ru, "Q4_1").astype(np.float64)
    g, u = Wg @ xq, Wu @ xq
    eg = q8_bound(rg, "Q4_1", xq) + np.abs(Wg) @ slack
    eu = q8_bound(ru, "Q4_1", xq) + np.abs(Wu) @ slack
    want = ref.silu(g) * u                           # |d silu/dg| <= 1.1
    err = np.abs(out[0] - want)
    assert (err <= 1.1 * eg * np.abs(u) + np.abs(ref.silu(g)) * eu + 8 * U * np.abs(want)).all()


@pytest.mark.parametrize("name", FAST_TYPES)
def test_batched_decode_rows_are_the_one_row_products(name):
    """In a batched step (split_rows) the decode rows take the multi-row kernels (two rows per
    weight pass, an odd one alone) and the prompt rows the GEMM: each decode row's result is the
    single-token op's bits, each prompt row the GEMM's alone, whatever the batch."""
    rng = np.random.default_rng([24, len(name)])
    cols, rows = 96, (40, 24, 8)
    mats = [packed_tensor(name, r, cols, rng)[1] for r in rows]
    gate, up = (packed_tensor(name, 72, cols, rng)[1] for _ in range(2))
    nw = rng.uniform(0.5, 1.5, cols).astype(np.float32)
    x = (rng.standard_normal((7, cols)) * 2).astype(np.float32)

    def ops(xs):
        outs = [np.zeros((len(xs), r), np.float32) for r in rows]
        FAST.norm_matmul(outs, xs, nw, 1e-5, mats, (None,) * 3, np.empty_like(xs))
        res = xs[:, :40].copy() + 1
        FAST.matmul_add(res, np.ascontiguousarray(xs[:, :cols]), mats[0],
                        np.empty((len(xs), 40), np.float32))
        sw = np.zeros((len(xs), 72), np.float32)
        FAST.norm_swiglu(sw, xs, nw, 1e-5, gate, up, np.empty_like(xs),
                         np.empty((len(xs), 72), np.float32))
        return outs + [res, sw]

    alone = [ops(x[t:t + 1]) for t in range(len(x))]          # the one-row path
    for n_rows, n_dec in ((1, 1), (2, 2), (5, 5), (7, 3), (4, 0)):
        try:
            FAST.split_rows(n_dec)
            got = ops(x[:n_rows])
        finally:
            FAST.split_rows(None)
        for t in range(n_dec):
            assert all(same_bits(g[t], a[0]) for g, a in zip(got, alone[t])), (n_rows, n_dec, t)
        if n_dec < n_rows:                                    # prompt rows: the GEMM's bits
            FAST.split_rows(0)
            try:
                rest = ops(x[n_dec:n_rows])
            finally:
                FAST.split_rows(None)
            assert all(same_bits(g[n_dec:], r) for g, r in zip(got, rest))


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0"])
def test_generic_ir_equals_vnni(kind):
    """The portable IR of the inner loop (CPUs without AVX-512 VNNI) gives the same bits as the
    kernel this machine uses: the integer sums are exact either way, the float steps the same."""
    from numba import njit

    from numbaformer.backends.cpu import simd
    fast, generic = getattr(simd, f"dot_{kind}"), simd.GENERIC_ROWS16[kind]

    @njit
    def both(res, w, xq, xd, xsq):
        for g in range(w.shape[0]):
            fast(res[0, g], w, g, xq, xd, xsq)
            generic(res[1, g], w, g, xq, xd, xsq)

    name = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q8_0": "Q8_0"}[kind]
    rng = np.random.default_rng(23)
    raw, w = packed_tensor(name, 40, 256, rng)                 # 3 row groups
    x = rng.standard_normal(256).astype(np.float32)
    xq, xd, xsq = FAST._q8_scratch(256)
    from numbaformer.backends.cpu.gemv_q8 import quantize_q8
    quantize_q8(x, xq, xd, xsq)
    res = np.zeros((2, 3, 16), np.float32)
    both(res, w.packed.w, xq, xd, xsq)
    assert same_bits(res[0], res[1]) and np.isfinite(res).all()


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("n_rows", [2, 4])
def test_multi_row_dot_is_the_one_row_dot_per_row(kind, n_rows):
    """dot2 / dot4 (two or four activation rows per weight pass), on this CPU and in the portable
    IR: each row's 16 results are the one-row dot's bits."""
    from numba import njit

    from numbaformer.backends.cpu import simd
    from numbaformer.backends.cpu.gemv_q8 import quantize_q8
    one = getattr(simd, f"dot_{kind}")
    many = getattr(simd, f"dot{n_rows}_{kind}")
    generic = (simd.GENERIC_ROWS16_X2 if n_rows == 2 else simd.GENERIC_ROWS16_X4)[kind]

    @njit
    def run(res, w, xq, xd, xsq):
        for g in range(w.shape[0]):
            for t in range(xq.shape[0]):
                one(res[0, g, t], w, g, xq[t], xd[t], xsq[t])
            for t in range(0, xq.shape[0] - n_rows + 1, n_rows):
                many(res[1, g, t:t + n_rows], w, g, xq, xd, xsq, t)
                generic(res[2, g, t:t + n_rows], w, g, xq, xd, xsq, t)

    name = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q8_0": "Q8_0"}[kind]
    rng = np.random.default_rng(25)
    _, w = packed_tensor(name, 40, 256, rng)                   # 3 row groups
    x = (rng.standard_normal((8, 256)) * [[1], [1e-3], [5], [0], [2], [30], [1e-2], [1]]
         ).astype(np.float32)
    xq, xd, xsq = (np.zeros((8, 256), np.int8), np.zeros((8, 8), np.float32),
                   np.zeros((8, 8), np.int32))
    for t in range(8):
        quantize_q8(x[t], xq[t], xd[t], xsq[t])
    res = np.full((3, 3, 8, 16), np.nan, np.float32)
    run(res, w.packed.w, xq, xd, xsq)
    assert np.isfinite(res).all() and same_bits(res[0], res[1]) and same_bits(res[0], res[2])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 9])
def test_rows_products_are_each_rows_one_row_product(n):
    """The batched decode rows' products (matvec_rows with a norm, a residual and three
    matrices; swiglu_rows) for n rows (passes of four, then two, then one): each row's outputs
    are the one-row kernel's bits for that row alone."""
    from numbaformer.backends.cpu import gemv_q8
    rng = np.random.default_rng(40 + n)
    cols = 256
    mats = [packed_tensor(t, r, cols, rng)[1] for t, r in (("Q4_1", 48), ("Q4_1", 32),
                                                           ("Q4_1", 32))]
    fast = FAST._plan(*mats)
    swi = FAST._plan(mats[1], mats[2])
    x = rng.standard_normal((n, cols)).astype(np.float32)
    norm_w = (rng.random(cols) + 0.5).astype(np.float32)
    q8 = FAST._q8_rows(cols, n)
    outs = [rng.standard_normal((n, m.rows)).astype(np.float32) for m in mats]
    base = [o.copy() for o in outs]
    fast.matvec_rows(outs, x, q8, residual=True, norm=(norm_w, 1e-5, np.zeros((n, cols),
                                                                             np.float32)))
    sw = np.zeros((n, 32), np.float32)
    swi.swiglu_rows(sw, x, q8, (norm_w, 1e-5, np.zeros((n, cols), np.float32)))
    for t in range(n):
        one = [b[t].copy() for b in base]
        fast.matvec(one, x[t], residual=True, norm=(norm_w, 1e-5, np.zeros(cols, np.float32)))
        for o, e in zip(outs, one):
            assert same_bits(o[t], e)
        s1 = np.zeros(32, np.float32)
        swi.swiglu(s1, x[t], (norm_w, 1e-5, np.zeros(cols, np.float32)))
        assert same_bits(sw[t], s1)


def test_quantize_q8_matches_reference():
    """The activation quantizer: d = max|x| / 127 and q = rint(x * (1/d)) per 32 values, as
    reference.q8_activations; zero blocks give d = 0, q = 0."""
    from numbaformer.backends.cpu.gemv_q8 import quantize_q8
    rng = np.random.default_rng(24)
    x = (rng.standard_normal(576) * 10.0 ** rng.integers(-6, 4, 576)).astype(np.float32)
    x[64:96] = 0
    x[96:128] = np.arange(32) - 15.5                  # d = 1: every value a rounding tie (to even)
    x[127] = 127
    xq, xd, xsq = np.empty(576, np.int8), np.empty(18, np.float32), np.empty(18, np.int32)
    quantize_q8(x, xq, xd, xsq)
    got = (xq.reshape(18, 32).astype(np.float64) * xd[:, None]).reshape(-1)
    assert np.array_equal(got, ref.q8_activations(x))
    assert np.array_equal(xsq, xq.reshape(18, 32).sum(1)) and xd[2] == 0
