"""CUDA ops against tests/reference.py (float64), the CPU backend and gguf's decoder.

Without a GPU (CI) the kernels run under numba's simulator (NUMBA_ENABLE_CUDASIM=1, set by
conftest.py) at toy sizes, with block sizes and tiles patched small so that tiny inputs still cross
tile, segment, span and block boundaries. With NUMBAFORMER_TEST_GPU=1 on the lent GPU
(scripts/gpu_check.sh) the same checks run at real sizes (4096 x 14336 and odd ones), marked `cuda`.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import reference as R
from sampling_cases import OPTIONS, chain_cases, check_bookkeeping, robust_cases, run_op
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from numbaformer.quants import DECODERS, GGML_TYPES, TYPE_IDS
from numbaformer.sampling import SamplingParams
from numbaformer.synthetic import random_blocks
from numbaformer.weights import QTensor

ON_GPU = os.environ.get("NUMBAFORMER_TEST_GPU") == "1"
SMALL = os.environ.get("NUMBAFORMER_TEST_SMALL") == "1"   # toy sizes on the GPU (compute-sanitizer)
pytestmark = pytest.mark.cuda if ON_GPU else []
ALL_TYPES = [GGML_TYPES[t].name for t in DECODERS]
U = 2.0 ** -24                                   # float32 unit roundoff


@pytest.fixture(scope="module")
def cu():
    """The CUDA backend modules, with toy launch shapes under the simulator."""
    from numba import cuda  # noqa: F401  (simulator or driver, as conftest decided)

    from numbaformer.backends.cuda import (attention, elementwise, embed, gemv, matmul, matmul_mma,
                                           norm, rope, sample)
    from numbaformer.backends.cuda.backend import CUDABackend
    saved = []
    if not ON_GPU:
        toy = [(matmul_mma, "MMA_TILES", ((16, 16, 1, 1),)), (matmul_mma, "MMA_BK", 32),
               (matmul_mma, "BF16_THREADS", 32),
               (gemv, "GEMV_WARPS", 1), (gemv, "SEGMENT_BYTES", 64), (gemv, "BLOCKS_PER_SM", 2),
               (matmul, "GEMM_BM", 8), (matmul, "GEMM_BN", 8), (matmul, "GEMM_TM", 2),
               (matmul, "GEMM_TN", 2), (norm, "NORM_THREADS", 32), (rope, "ROPE_THREADS", 32),
               (rope, "ROPE_STORE_THREADS", 32), (embed, "EMBED_THREADS", 32), (sample, "ARGMAX_THREADS", 32),
               (sample, "SAMPLE_THREADS", 32),
               (attention, "SPLIT", 4), (attention, "DECODE_THREADS", 32), (attention, "QTILE", 2),
               (attention, "KTILE", 4), (attention, "PREFILL_WARPS", 1),
               (elementwise, "ELEM_THREADS", 32)]
        for mod, name, value in toy:
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, value)
    be = CUDABackend()
    yield be
    for mod, name, value in saved:
        setattr(mod, name, value)


def dev(be, a):
    return be.to_device(np.ascontiguousarray(a))


def host(be, a):
    return be.to_host(a)


def rand_qtensor(be, qtype: int, rows: int, cols: int, seed: int = 0):
    raw = random_blocks(qtype, rows * cols // GGML_TYPES[qtype].block_size, cols ** -0.5,
                        seed=seed).reshape(rows, -1)
    return raw, be.upload_matrix(QTensor("w", qtype, rows, cols, raw))


def ref_matrix(raw, qtype):
    return gguf_dequantize(raw, GGMLQuantizationType(qtype)).astype(np.float64)


def sizes(toy, real):
    return real if ON_GPU and not SMALL else toy


# --- dequantization: bit-exact with gguf through the CUDA path ------------------------------------

@pytest.mark.parametrize("name", ALL_TYPES)
def test_dequantize_matches_gguf_exactly(cu, name):
    from numbaformer.backends.cuda.dequant import dequantize
    qt = TYPE_IDS[name]
    cols = 256 if GGML_TYPES[qt].block_size == 256 else 64
    raw, w = rand_qtensor(cu, qt, 3, cols, seed=1)
    out = cu.alloc((3, cols))
    dequantize(out, w.data, qt, cu.stream)
    np.testing.assert_array_equal(host(cu, out), gguf_dequantize(raw, GGMLQuantizationType(qt)))


# --- matrix products: every type, mat-vec (decode) and GEMM (prefill), epilogues --------------------

@pytest.fixture
def exact(cu):
    """The backend with every mat-vec exact (f32 activations) for the test's duration."""
    cu.exact = True
    yield cu
    cu.exact = False


def test_gpu_layout_round_trips_and_keeps_the_size():
    from numbaformer.backends.cuda.layout import PLANES, plane_offsets, repack, row_pitch, unpack
    for qt in DECODERS:
        t = GGML_TYPES[qt]
        cols = 512 if t.block_size == 256 else 96
        raw = random_blocks(qt, 5 * cols // t.block_size, 0.1, seed=qt).reshape(5, -1)
        packed = repack(raw, qt, cols)
        assert packed.shape == (5, row_pitch(qt, cols)) and packed.shape[1] % 16 == 0
        assert packed.shape[1] - raw.shape[1] < 16 * len(PLANES[qt]), t.name
        np.testing.assert_array_equal(unpack(packed, qt, cols), raw)
        ranges = sorted(PLANES[qt])                  # the planes tile the block exactly
        assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert ranges[-1][1] == t.chunk_bytes and plane_offsets(qt, 1)[0] == 0


@pytest.mark.parametrize("name", ALL_TYPES)
@pytest.mark.parametrize("n", [1, 5])
def test_matmul_every_type(exact, name, n):
    cu = exact
    qt = TYPE_IDS[name]
    big = GGML_TYPES[qt].block_size == 256
    rows, cols = sizes((13, 512 if big else 96), (4096 + 37, 14336))
    n = n if not ON_GPU or SMALL else {1: 1, 5: 77}[n]
    raw, w = rand_qtensor(cu, qt, rows, cols)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    out = cu.alloc((n, rows))
    cu.matmul(out, dev(cu, x), w, dev(cu, bias))
    W = ref_matrix(raw, qt)
    ref = x.astype(np.float64) @ W.T + bias
    bound = 16 * U * (np.abs(x) @ np.abs(W).T + np.abs(bias)) + 1e-30
    err = np.abs(host(cu, out) - ref)
    assert np.all(err <= bound * (8 if ON_GPU else 1)), f"{name}: max err/bound {np.max(err / bound):.2f}"


FAST_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def q8_bound(raw, qt, xq):
    """64 float32 roundoffs of each output's magnitude scale: per-block max |w| times |x|, so that
    the offset and min terms computed apart (d * (dx * sum q x - 8 * xs) and the like) are covered."""
    W = np.abs(ref_matrix(raw, qt))
    bs = GGML_TYPES[qt].block_size
    B = np.repeat(W.reshape(W.shape[0], -1, bs).max(axis=2), bs, axis=1)
    return 64 * U * (B @ np.abs(xq)) + 1e-30


@pytest.mark.parametrize("name,split", [(n, s) for n in FAST_TYPES for s in (1, 2)]
                         + [("Q4_K", "pairs"), ("Q5_K", "pairs")])
def test_matvec_q8_fast_path(cu, name, split, monkeypatch):
    """The 8-bit mat-vec equals the product with llama.cpp's q8_1 rounding of x (float64
    reference) to float32 roundoff, with bias and residual epilogues and odd row counts; split 2:
    two warps share each row pair (forced), their sums added in shared memory; pairs: a lane
    takes two adjacent K-quant units (gemv_q8.PAIR_UNITS)."""
    from numbaformer.backends.cuda import gemv, gemv_q8
    from numbaformer.backends.cuda.gemv import fast_path
    built = []
    if split == "pairs":
        monkeypatch.setattr(gemv_q8, "PAIR_UNITS", True)
        monkeypatch.setattr(gemv_q8, "UNROLL", max(2, gemv_q8.UNROLL))
        monkeypatch.setattr(gemv_q8, "SPLIT_BELOW", 0)
        monkeypatch.setattr(gemv, "q8_kernel", lambda *a: built.append(a) or gemv_q8.q8_kernel(*a))
    elif split == 2:
        monkeypatch.setattr(gemv, "GEMV_WARPS", max(2, gemv.GEMV_WARPS))
        monkeypatch.setattr(gemv_q8, "SPLIT_BELOW", 1 << 30)
    else:
        monkeypatch.setattr(gemv_q8, "SPLIT_BELOW", 0)
    qt = TYPE_IDS[name]
    assert fast_path(qt) and not fast_path(qt, exact=True)
    big = GGML_TYPES[qt].block_size == 256
    rows, cols = sizes((13, 1024 if big else 4160), (4096 + 37, 14336))
    raw, w = rand_qtensor(cu, qt, rows, cols, seed=11)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    x[0, :32] *= 1e-3                                # a quiet group: its own scale
    x[0, 32:64] = 0                                  # an all-zero group (d = 0)
    xq = R.q8_activations(x[0])
    bias = rng.standard_normal(rows).astype(np.float32)
    ref = ref_matrix(raw, qt) @ xq
    bound = q8_bound(raw, qt, xq)
    out = cu.alloc((1, rows))
    cu.matmul(out, dev(cu, x), w, dev(cu, bias))
    err = np.abs(host(cu, out)[0] - (ref + bias))
    assert np.all(err <= bound + 4 * U * np.abs(bias)), f"max err/bound {np.max(err / bound):.2f}"
    x0 = rng.standard_normal((1, rows)).astype(np.float32)
    xd = dev(cu, x0)
    cu.matmul_add(xd, dev(cu, x), w, cu.alloc((1, rows)))
    err = np.abs(host(cu, xd)[0] - (x0[0] + ref))
    assert np.all(err <= bound + 4 * U * np.abs(x0[0])), f"max err/bound {np.max(err / bound):.2f}"
    assert split != "pairs" or (built and all(a[-1] for a in built))   # the pair kernel ran


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "Q6_K"])
def test_matmul_add_residual_in_place(exact, name):
    cu = exact
    qt = TYPE_IDS[name]
    rows, cols = sizes((11, 256), (4096, 14336))
    raw, w = rand_qtensor(cu, qt, rows, cols, seed=3)
    rng = np.random.default_rng(4)
    for n in (1, 3):
        a = rng.standard_normal((n, cols)).astype(np.float32)
        x0 = rng.standard_normal((n, rows)).astype(np.float32)
        xd = dev(cu, x0)
        cu.matmul_add(xd, dev(cu, a), w, cu.alloc((n, rows)))
        ref = x0 + a.astype(np.float64) @ ref_matrix(raw, qt).T
        np.testing.assert_allclose(host(cu, xd), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("path", ["exact", "q8"])
def test_norm_matmul_fused_qkv_and_swiglu(cu, path):
    """The fused decode kernels (norm prologue, 3 matrices / SwiGLU) against the composition: of
    the normed x (exact path) or of its q8 rounding (fast path)."""
    cu.exact = path == "exact"
    try:
        _fused_qkv_and_swiglu(cu, path == "q8")
    finally:
        cu.exact = False


def _fused_qkv_and_swiglu(cu, q8):
    rows_q, rows_kv, cols = sizes((12, 4, 256), (4096, 1024, 4096))
    mats = [rand_qtensor(cu, TYPE_IDS["Q4_K"], r, cols, seed=s)
            for s, r in enumerate((rows_q, rows_kv, rows_kv))]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, cols)).astype(np.float32) * 3
    nw = rng.uniform(0.5, 1.5, cols).astype(np.float32)
    biases = [rng.standard_normal(r).astype(np.float32) for r in (rows_q, rows_kv, rows_kv)]
    outs = [cu.alloc((1, r)) for r in (rows_q, rows_kv, rows_kv)]
    cu.norm_matmul(outs, dev(cu, x), dev(cu, nw), 1e-5, [m[1] for m in mats],
                   [dev(cu, b) for b in biases], cu.alloc((1, cols)))
    xn = R.rmsnorm(x, nw, 1e-5)
    slack = np.zeros(cols)
    if q8:        # the kernel quantizes its own f32 normed x: near a tie it may round the other way
        slack = R.q8_tie_slack(xn[0])
        xn = R.q8_activations(xn.astype(np.float32)[0])[None]
    for out, (raw, w), b in zip(outs, mats, biases):
        W = ref_matrix(raw, w.qtype)
        ref = xn @ W.T + b
        err = np.abs(host(cu, out) - ref)
        assert np.all(err <= 2e-5 * np.abs(ref).max() + np.abs(W) @ slack)
    gate, up = mats[1], mats[2]
    out = cu.alloc((1, rows_kv))
    cu.norm_swiglu(out, dev(cu, x), dev(cu, nw), 1e-5, gate[1], up[1], cu.alloc((1, cols)),
                   cu.alloc((1, rows_kv)))
    Wg, Wu = ref_matrix(gate[0], gate[1].qtype), ref_matrix(up[0], up[1].qtype)
    g, u = xn @ Wg.T, xn @ Wu.T
    ref = R.silu(g) * u
    tie = 1.1 * np.abs(u) * (np.abs(Wg) @ slack) + np.abs(R.silu(g)) * (np.abs(Wu) @ slack)
    assert np.all(np.abs(host(cu, out) - ref) <= 2e-5 * np.abs(ref).max() + 2 * tie)


@pytest.mark.parametrize("name,split", [("Q4_K", 1), ("Q8_0", 2), ("Q6_K", 1)])
def test_prequant_mat_vec_equals_the_staged_one(cu, monkeypatch, name, split):
    """gemv.PREQUANT (x quantized by a kernel of its own, read by every block from global memory)
    gives the staged kernel's numbers bit for bit: norm + Q/K/V, SwiGLU, residual; also with a
    row pair's units split over warps. Prequant takes pair units for Q4_K/Q5_K (another order
    of the sums): the staged Q4_K side runs with them too."""
    from numbaformer.backends.cuda import gemv, gemv_q8
    if name in ("Q4_K", "Q5_K"):
        monkeypatch.setattr(gemv_q8, "PAIR_UNITS", True)
        monkeypatch.setattr(gemv_q8, "UNROLL", max(2, gemv_q8.UNROLL))
    if split > 1:
        monkeypatch.setattr(gemv_q8, "SPLIT", split)
        monkeypatch.setattr(gemv_q8, "SPLIT_BELOW", 1 << 30)
        monkeypatch.setattr(gemv, "GEMV_WARPS", 2 * gemv.GEMV_WARPS)
    qt = TYPE_IDS[name]
    rows, cols = sizes((12, 512), (1024, 4096))
    mats = [rand_qtensor(cu, qt, rows, cols, seed=30 + s)[1] for s in range(3)]
    rng = np.random.default_rng(31)
    x = dev(cu, rng.standard_normal((1, cols)).astype(np.float32) * 2)
    nw = dev(cu, rng.uniform(0.5, 1.5, cols).astype(np.float32))
    xr = rng.standard_normal((1, rows)).astype(np.float32)
    got = []
    monkeypatch.setattr(gemv, "PREQUANT_MIN_BYTES", 0)
    monkeypatch.setattr(gemv, "PREQUANT_MIN_COLS", 0)
    for pre in (False, True):
        monkeypatch.setattr(gemv, "PREQUANT", pre)
        outs = [cu.alloc((1, rows)) for _ in range(3)]
        cu.norm_matmul(outs, x, nw, 1e-5, mats, [None] * 3, cu.alloc((1, cols)))
        sw = cu.alloc((1, rows))
        cu.norm_swiglu(sw, x, nw, 1e-5, mats[0], mats[1], cu.alloc((1, cols)), cu.alloc((1, rows)))
        res = dev(cu, xr)
        cu.matmul_add(res, dev(cu, np.ascontiguousarray(host(cu, x)[:, :cols])), mats[2],
                      cu.alloc((1, rows)))
        got.append([host(cu, a) for a in (*outs, sw, res)])
    for a, b in zip(*got):
        np.testing.assert_array_equal(a, b)
    assert np.abs(got[0][0]).max() > 0 and cols in gemv._QBUFS      # the prequant path ran


@pytest.mark.parametrize("name,prequant,clamp,width", [
    ("Q4_K", True, False, 0), ("Q6_K", False, False, 0), ("Q8_0", False, False, 0),
    ("Q8_0", False, True, 0), ("Q4_1", False, False, 576)])
def test_rows_mat_vec_gives_each_row_its_one_row_bits(cu, monkeypatch, name, prequant, clamp,
                                                      width):
    """gemv.ROWS: a batched step's decode rows (split_rows) take gemv_rows, weights read once for
    a group of rows (ROWS_GROUP 2 here: 5 rows in 3 grid rows). Each row's outputs equal the
    one-row mat-vec's bits for that row alone (norm + Q/K/V with biases, SwiGLU, residual, the
    plain product), with long-row prequant (Q4_K: pair units) and without. In a step of 5 rows
    of which 3 are decode rows, the 2 prompt rows get the bits of the batched product of those
    rows alone. Past gemv.ROWS_MAX decode rows, every row takes the batched product. With
    ROWS_CLAMP (the 5th row's group computes a 6th on row 5's activations; Q8_0 rows of 1024
    values: whole batches, no bound checks) the same. (The dp4a kernel's test: the tensor-core
    rows kernel, which takes Q4_K and Q6_K rows from gemv.ROWS_MMA_MIN on, is off.) Width 576
    (SmolLM2's): q8 rows of 198 words, padded to 200 (gemv.rows_words) so that each row's 16-byte
    loads are aligned (the simulator's vector loads check it; the H200 faulted without it).)"""
    from numbaformer.backends.cuda import gemv
    monkeypatch.setattr(gemv, "ROWS", True)
    monkeypatch.setattr(gemv, "ROWS_MMA", False)
    monkeypatch.setattr(gemv, "ROWS_GROUP", 2)
    monkeypatch.setattr(gemv, "ROWS_CLAMP", clamp)
    if prequant:
        monkeypatch.setattr(gemv, "PREQUANT_MIN_BYTES", 0)
        monkeypatch.setattr(gemv, "PREQUANT_MIN_COLS", 0)
    from numbaformer.backends.cuda import gemv_q8
    built, real = [], gemv_q8.rows_kernel
    monkeypatch.setattr(gemv_q8, "rows_kernel", lambda *a: built.append(a) or real(*a))
    qt = TYPE_IDS[name]
    n, rows, cols = 5, *sizes((6, width or (1024 if clamp else 512)), (1024, width or 4096))
    mats = [rand_qtensor(cu, qt, rows, cols, seed=40 + s)[1] for s in range(3)]
    rng = np.random.default_rng(41)
    x = rng.standard_normal((n, cols)).astype(np.float32) * 2
    nw = dev(cu, rng.uniform(0.5, 1.5, cols).astype(np.float32))
    bias = [dev(cu, rng.standard_normal(rows).astype(np.float32)) for _ in range(3)]
    xr = rng.standard_normal((n, rows)).astype(np.float32)
    xs = rng.standard_normal((n, cols)).astype(np.float32)

    def run(xx, rr, ss, decode):
        cu.split_rows(decode)
        try:
            m = xx.shape[0]
            outs = [cu.alloc((m, rows)) for _ in range(3)]
            cu.norm_matmul(outs, dev(cu, xx), nw, 1e-5, mats, bias, cu.alloc((m, cols)))
            sw = cu.alloc((m, rows))
            cu.norm_swiglu(sw, dev(cu, xx), nw, 1e-5, mats[0], mats[1], cu.alloc((m, cols)),
                           cu.alloc((m, rows)))
            res = dev(cu, rr)
            cu.matmul_add(res, dev(cu, ss), mats[2], cu.alloc((m, rows)))
            plain = cu.alloc((m, rows))
            cu.matmul(plain, dev(cu, ss), mats[1])
            return [host(cu, a) for a in (*outs, sw, res, plain)]
        finally:
            cu.split_rows(None)

    together = run(x, xr, xs, n)
    for t in range(n):
        alone = run(x[t:t + 1], xr[t:t + 1], xs[t:t + 1], None)
        for a, b in zip(together, alone):
            np.testing.assert_array_equal(a[t:t + 1], b)
    mixed = run(x, xr, xs, 3)
    prompt = run(x[3:], xr[3:], xs[3:], 0)
    for a, b, c in zip(mixed, together, prompt):
        np.testing.assert_array_equal(a[:3], b[:3])
        np.testing.assert_array_equal(a[3:], c)
    assert np.abs(together[0]).max() > 0
    assert {a[-2:] for a in built} == {(clamp, clamp)}     # with clamp, rows of whole batches
    monkeypatch.setattr(gemv, "ROWS_MAX", 2)        # past the crossover: the batched product
    for a, b in zip(run(x[:3], xr[:3], xs[:3], 3), run(x[:3], xr[:3], xs[:3], 0)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, together[-1][:3])


@pytest.mark.parametrize("name,n", [("Q4_K", 5), ("Q4_K", 11), ("Q6_K", 11), ("Q4_K", 21)])
def test_rows_on_tensor_cores_against_float64(cu, monkeypatch, name, n):
    """gemv.ROWS_MMA (rows_mma.py, Q4_K on s8 mma.sync m16n8k32, Q6_K on m16n8k16; activation
    rows in chunks of 8: one chunk at 5 rows, two at 11, two grid columns of two chunks at 21 (at
    most 2 a block there); a block's warps split the blocks of a row, 2 of them): each output against float64 of gguf's dequantized weights times the
    rows' q8 activations as the kernel reads them, within float32 rounding of the terms (as the
    dp4a rows kernel, held to the same bound); the bias and residual epilogues; the backend's
    SwiGLU of decode rows (two products and silu_mul) as the dp4a kernel's SwiGLU epilogue, and
    its norm + two biased products (a launch per matrix) as the dp4a kernel's one launch."""
    from numbaformer.backends.cuda import gemv, rows_mma
    monkeypatch.setattr(rows_mma, "WARPS", 2)
    if n > 16:
        monkeypatch.setattr(rows_mma, "MAX_CHUNKS", 2)
    qt = TYPE_IDS[name]
    rows, cols = sizes((32, 768), (1024, 4096))
    raw, w = rand_qtensor(cu, qt, rows, cols, seed=50)
    W = ref_matrix(raw, qt)
    rng = np.random.default_rng(51)
    x = dev(cu, rng.standard_normal((n, cols)).astype(np.float32) * 2)
    bias = rng.standard_normal(rows).astype(np.float32)
    res = rng.standard_normal((n, rows)).astype(np.float32)
    xa = cu.alloc((n, gemv.rows_words(cols)))
    gemv.quantize_rows(xa, x, None, 0.0, cu.stream)
    ha = host(cu, xa)
    nw = cols // 4
    q = ha[:, :nw].copy().view(np.int8).astype(np.float64)             # (n, cols) q8 values
    d = np.repeat(ha[:, nw:nw + cols // 32].astype(np.float64), 32, axis=1)
    terms = np.abs(q * d) @ np.abs(W).T
    ref = (q * d) @ W.T
    for mma in (True, False):
        monkeypatch.setattr(gemv, "ROWS_MMA", mma)
        for mode, extras, add in (("store", None, 0), ("bias", [dev(cu, bias)], bias),
                                  ("residual", [dev(cu, res)], res)):
            out = dev(cu, res) if mode == "residual" else cu.alloc((n, rows))
            gemv.gemv_rows([out], [w], xa, n, cu.stream, mode=mode,
                           extras=[out] if mode == "residual" else extras)
            got = host(cu, out).astype(np.float64)
            assert np.all(np.abs(got - ref - add) <= 2e-6 * terms + 1e-6 * np.abs(add)), \
                (mma, mode, np.abs(got - ref - add).max())
    # the backend's SwiGLU of a batched step's decode rows: two tensor-core products, then silu_mul
    up_raw, w_up = rand_qtensor(cu, qt, rows, cols, seed=52)
    nw_ = dev(cu, rng.uniform(0.5, 1.5, cols).astype(np.float32))
    sw = {}
    monkeypatch.setattr(gemv, "ROWS_MAX", 64)          # the dp4a kernel for all rows too
    for mma in (True, False):
        monkeypatch.setattr(gemv, "ROWS_MMA", mma)
        cu.split_rows(n)
        try:
            out = cu.alloc((n, rows))
            cu.norm_swiglu(out, x, nw_, 1e-5, w, w_up, cu.alloc((n, cols)), cu.alloc((n, rows)))
            qk = [cu.alloc((n, rows)) for _ in range(2)]      # a run of two: one launch each
            cu.norm_matmul(qk, x, nw_, 1e-5, [w, w_up], [dev(cu, bias)] * 2, cu.alloc((n, cols)))
        finally:
            cu.split_rows(None)
        sw[mma] = [host(cu, a) for a in (out, *qk)]
    for a, b in zip(sw[True], sw[False]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
    assert np.abs(sw[True][0]).max() > 0


@pytest.mark.parametrize("mt", [1, 2])
def test_rows_mma_version3_gives_the_timed_kernels_bits(cu, monkeypatch, mt):
    """rows_mma.VERSION 3 (mma_rows_kernel3: `mt` 16-row tiles a warp sharing the activations'
    loads, a block's words loaded at once, chunks without branches)
    adds the same numbers in the same order as the timed kernel (VERSION 2, held to float64
    above): the same bits, with the bias and residual epilogues, at 11 rows (two chunks, the
    second partly past the rows) and 21 (two grid columns of two chunks); 2 warps a block over 3
    blocks a row."""
    from numbaformer.backends.cuda import gemv, rows_mma
    monkeypatch.setattr(rows_mma, "WARPS", 2)
    monkeypatch.setattr(rows_mma, "TILES", mt)
    monkeypatch.setattr(rows_mma, "MAX_CHUNKS", 2)
    qt = TYPE_IDS["Q4_K"]
    rows, cols = sizes((32, 768), (1024, 4096))
    _, w = rand_qtensor(cu, qt, rows, cols, seed=53)
    rng = np.random.default_rng(54)
    n = 21
    x = dev(cu, rng.standard_normal((n, cols)).astype(np.float32) * 2)
    xa = cu.alloc((n, gemv.rows_words(cols)))
    gemv.quantize_rows(xa, x, None, 0.0, cu.stream)
    bias = dev(cu, rng.standard_normal(rows).astype(np.float32))
    res = rng.standard_normal((n, rows)).astype(np.float32)
    for m in (11, 21):
        for mode, code in (("bias", 1), ("residual", 2)):
            got = {}
            for version in (2, 3):
                monkeypatch.setattr(rows_mma, "VERSION", version)
                out = dev(cu, res) if mode == "residual" else cu.alloc((n, rows))
                rows_mma.launch(w, [out], [out] if mode == "residual" else [bias], xa, m, code,
                                cu.stream)
                got[version] = host(cu, out)
            np.testing.assert_array_equal(got[3], got[2])
            assert np.abs(got[2][:m]).max() > 0


@pytest.mark.parametrize("rows_k", [32, 16])
def test_rows_mma_merged_launches_give_a_launch_per_matrix_bits(cu, monkeypatch, rows_k):
    """rows_mma.launch_many (Q, K, V in one grid; a pair too) and launch_swiglu (gate and up a
    warp's two tiles, SwiGLU in the epilogue) against a launch per matrix and silu_mul: the same
    bits, store and bias epilogues, at 11 rows (two chunks, the second partly past the rows);
    with K and V of 16 rows (rows_k 16) every matrix takes one tile a warp. The backend's batched
    norm_matmul and norm_swiglu take them (one launch each)."""
    from numbaformer.backends.cuda import elementwise, gemv, rows_mma
    monkeypatch.setattr(rows_mma, "WARPS", 2)
    monkeypatch.setattr(rows_mma, "MAX_CHUNKS", 2)
    monkeypatch.setattr(rows_mma, "VERSION", 3)
    qt = TYPE_IDS["Q4_K"]
    (rq, rk), cols = sizes(((64, rows_k), 512), ((4096, 1024), 4096))
    ws = [rand_qtensor(cu, qt, r, cols, seed=60 + i)[1] for i, r in enumerate((rq, rk, rk))]
    rng = np.random.default_rng(61)
    n = 11
    x = dev(cu, rng.standard_normal((n, cols)).astype(np.float32) * 2)
    xa = cu.alloc((n, gemv.rows_words(cols)))
    gemv.quantize_rows(xa, x, None, 0.0, cu.stream)
    biases = [dev(cu, rng.standard_normal(w.rows).astype(np.float32)) for w in ws]
    assert rows_mma.mergeable(ws)
    for mats in (ws, ws[1:]):
        for mode, code in (("store", 0), ("bias", 1)):
            extras = biases[-len(mats):] if code else None
            merged = [cu.alloc((n, w.rows)) for w in mats]
            rows_mma.launch_many(mats, merged, extras, xa, n, code, cu.stream)
            for k, w in enumerate(mats):
                one = cu.alloc((n, w.rows))
                rows_mma.launch(w, [one], extras[k:] if extras else None, xa, n, code,
                                cu.stream)
                np.testing.assert_array_equal(host(cu, merged[k])[:n], host(cu, one)[:n])
                assert np.abs(host(cu, one)).max() > 0
    gate, up = ws[1], ws[2]
    out = cu.alloc((n, gate.rows))
    rows_mma.launch_swiglu(out, gate, up, xa, n, cu.stream)
    g, u = cu.alloc((n, gate.rows)), cu.alloc((n, gate.rows))
    rows_mma.launch(gate, [g], None, xa, n, 0, cu.stream)
    rows_mma.launch(up, [u], None, xa, n, 0, cu.stream)
    elementwise.silu_mul(g, g, u, cu.stream)
    np.testing.assert_array_equal(host(cu, out), host(cu, g))
    assert np.abs(host(cu, out)).max() > 0
    # the backend: a batched step's decode rows through the merged launches, or not
    nw_ = dev(cu, rng.uniform(0.5, 1.5, cols).astype(np.float32))
    calls = []
    for name in ("launch_many", "launch_swiglu"):
        real = getattr(rows_mma, name)
        monkeypatch.setattr(rows_mma, name,
                            lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    got = {}
    for merge in (True, False):
        monkeypatch.setattr(rows_mma, "MERGE", merge)
        calls.clear()
        cu.split_rows(n)
        try:
            qkv = [cu.alloc((n, w.rows)) for w in ws]
            cu.norm_matmul(qkv, x, nw_, 1e-5, ws, [None] * 3, cu.alloc((n, cols)))
            sw = cu.alloc((n, gate.rows))
            cu.norm_swiglu(sw, x, nw_, 1e-5, gate, up, cu.alloc((n, cols)),
                           cu.alloc((n, gate.rows)))
        finally:
            cu.split_rows(None)
        got[merge] = [host(cu, a) for a in (*qkv, sw)]
        assert calls == (["launch_many", "launch_swiglu"] if merge else [])
    for a, b in zip(got[True], got[False]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(ON_GPU, reason="an offline check (CI); the GPU run compiles them for real")
def test_ptx_rows_mat_vec(record_figure):
    """The many-rows mat-vec at its launch shapes (8 warps, the largest group; Q4_K with pair
    units, Q6_K, Q8_0; SwiGLU and residual epilogues; Q4_K with ROWS_CLAMP at group 8, whose
    shared row-independent work costs registers; the s8 tensor-core forms of rows_mma.py, Q4_K with
    one and eight chunks of activation rows, Q6_K with eight; the VERSION 3 Q4_K kernel at 1
    tile a warp x 4 chunks, 2 x 2 and 2 x 1, its merged Q/K/V form at 2 x 2 and 1 x 4 and its
    gate/up SwiGLU form at 2 x 1 and 2 x 2) compiles for sm_90 with its accumulators in registers:
    ptxas reports no spills and no stack frame."""
    from ptx_tools import offline_ptx, ptxas_info
    ptx = offline_ptx("""
from numbaformer.backends.cuda import gemv, gemv_q8
from numbaformer.quants import Q4_K, Q6_K, Q8_0
A = types.Array
i64 = types.int64
f2, u2, u82 = A(f32, 2, "C"), A(u32, 2, "C"), A(u8, 2, "C")
for name, qt, pairs, mode, clamp in (("q4k_swiglu", Q4_K, True, 3, False),
                                     ("q6k_res", Q6_K, False, 2, False),
                                     ("q80_store", Q8_0, False, 0, False),
                                     ("q4k_store_clamp_g8", Q4_K, False, 0, True)):
    e = f2 if mode == 2 else A(f32, 1, "C")
    k = gemv_q8.rows_kernel(qt, 2 if mode == 3 else 1, mode, gemv.GEMV_WARPS, gemv_q8.UNROLL,
                            pairs, 8 if clamp else gemv.ROWS_GROUP_MAX, clamp, clamp)
    ptx[name] = compile(k, (f2, f2, f2, u2, u2, u2, u82, u82, u82, e, e, e, f2, i64, i64))
from numbaformer.backends.cuda import rows_mma
for chunks in (1, 8):
    ptx[f"mma_q4k_bias_{chunks}"] = compile(rows_mma.mma_rows_kernel(1, rows_mma.WARPS, chunks),
                                            (f2, u2, A(f32, 1, "C"), f2, i64, i64))
ptx["mma_q6k_store_8"] = compile(rows_mma.q6k_rows_kernel(0, rows_mma.WARPS, 8),
                                 (f2, u2, u82, f2, f2, i64, i64))
for mt, chunks in ((1, 4), (2, 2), (2, 1)):
    ptx[f"mma3_q4k_res_t{mt}_c{chunks}"] = compile(
        rows_mma.mma_rows_kernel3(2, rows_mma.WARPS, chunks, mt), (f2, u2, f2, f2, i64, i64))
f1 = A(f32, 1, "C")
for mt, chunks in ((2, 2), (1, 4)):
    ptx[f"mma3_q4k_qkv_bias_t{mt}_c{chunks}"] = compile(
        rows_mma.mma_rows_kernel3_many(1, rows_mma.WARPS, chunks, mt),
        (f2, f2, f2, u2, u2, u2, f1, f1, f1, f2, i64, i64, i64, i64))
for chunks in (1, 2):
    ptx[f"mma3_q4k_swiglu_c{chunks}"] = compile(
        rows_mma.mma_rows_kernel3_swiglu(rows_mma.WARPS, chunks), (f2, u2, u2, f2, i64, i64))
""")
    assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in ptx["mma3_q4k_swiglu_c2"]
    assert "ex2.approx" in ptx["mma3_q4k_swiglu_c2"] or "ex2" in ptx["mma3_q4k_swiglu_c2"]
    assert "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32" in ptx["mma_q6k_store_8"]
    assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in ptx["mma_q4k_bias_8"]
    for name, text in ptx.items():
        info = ptxas_info(text)
        if info is None:
            pytest.skip("no ptxas: PTX checked, registers and spills not")
        record_figure(f"rows mat-vec {name} (sm_90, ptxas)",
                      f"{info['registers']} regs, stack {info['stack']} B")
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (name, info)
        assert info["stack"] == 0, (name, info)


# --- elementwise, norm, rope, embedding, argmax ------------------------------------------------------

@pytest.mark.parametrize("n,d", [(1, 7 * 32), (3, 33)])
def test_rmsnorm_silu_add(cu, n, d):
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    out = cu.alloc((n, d))
    cu.rmsnorm(out, dev(cu, x), dev(cu, w), 1e-6)
    np.testing.assert_allclose(host(cu, out), R.rmsnorm(x, w, 1e-6), rtol=1e-5, atol=1e-6)
    g, u = rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32)
    cu.silu_mul(out, dev(cu, g), dev(cu, u))
    np.testing.assert_allclose(host(cu, out), R.silu(g.astype(np.float64)) * u, rtol=1e-5, atol=1e-6)
    cu.add(out, dev(cu, g), dev(cu, u))
    np.testing.assert_array_equal(host(cu, out), g + u)


@pytest.mark.parametrize("neox", [False, True])
def test_rope_store_matches_reference(cu, neox):
    from numbaformer.backends.base import RopeParams
    from numbaformer.kvcache import KVCache
    hd, n_q, n_kv, n = 16, 4, 2, 3
    rp = RopeParams(hd, hd, 10000.0, 1.0, neox)
    pos = np.array([5, 6, 9], np.int32)
    rng = np.random.default_rng(7)
    q = rng.standard_normal((n, n_q * hd)).astype(np.float32)
    k = rng.standard_normal((n, n_kv * hd)).astype(np.float32)
    v = rng.standard_normal((n, n_kv * hd)).astype(np.float32)
    cfg = type("C", (), {"n_layer": 2, "n_head_kv": n_kv, "head_dim": hd})
    cache = KVCache(cu, cfg, 16, "f32")
    qd, kd = dev(cu, q), dev(cu, k)
    inv = dev(cu, rp.inv_freq())
    cu.rope_store(qd, kd, dev(cu, v), dev(cu, pos), cache, 1, inv, rp)
    f = R.inv_freq(hd, 10000.0)
    qr = R.rope(q, pos, n_q, hd, hd, f, neox)
    kr = R.rope(k, pos, n_kv, hd, hd, f, neox)
    np.testing.assert_allclose(host(cu, qd), qr, rtol=0, atol=1e-5)
    kc, vc = host(cu, cache.k), host(cu, cache.v)
    for t, p in enumerate(pos):
        np.testing.assert_allclose(kc[1, :, p].reshape(-1), kr[t], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(vc[1, :, p].reshape(-1), v[t])


@pytest.mark.parametrize("neox,kv_type,bias", [(False, "f16", False), (True, "f32", True),
                                               (True, "f16", False)])
def test_qkv_rope_one_launch_equals_the_composition(cu, neox, kv_type, bias):
    """Decode's Q, K, V with rope and the cache store in one launch (the fast mat-vec's rope
    epilogue) against norm_matmul then rope_store on the same backend: the same q8 dots and the
    same rotation arithmetic, so the same numbers; the cache's other rows untouched."""
    from numbaformer.backends.base import Backend, RopeParams
    from numbaformer.kvcache import KVCache
    hd, n_q, n_kv, cols, qt = sizes((16, 4, 2, 64, "Q8_0"), (128, 32, 8, 4096, "Q4_K"))
    rp = RopeParams(hd, hd, 10000.0, 1.0, neox)
    rng = np.random.default_rng(12)
    mats = [rand_qtensor(cu, TYPE_IDS[qt], r * hd, cols, seed=20 + r)[1] for r in (n_q, n_kv, n_kv)]
    biases = [dev(cu, rng.standard_normal(r * hd).astype(np.float32)) if bias else None
              for r in (n_q, n_kv, n_kv)]
    x = dev(cu, rng.standard_normal((1, cols)).astype(np.float32))
    nw = dev(cu, rng.uniform(0.5, 1.5, cols).astype(np.float32))
    pos, inv = dev(cu, np.array([5], np.int32)), dev(cu, rp.inv_freq())
    cfg = type("C", (), {"n_layer": 2, "n_head_kv": n_kv, "head_dim": hd})
    from numbaformer.backends.cuda import gemv
    assert gemv.rope_fusable(mats, False, hd, hd)
    got = []
    for op in (cu.qkv_rope, lambda *a: Backend.qkv_rope(cu, *a)):
        cache = KVCache(cu, cfg, 8, kv_type)
        q, k, v = cu.alloc((1, n_q * hd)), cu.alloc((1, n_kv * hd)), cu.alloc((1, n_kv * hd))
        op(q, k, v, x, nw, 1e-5, mats, biases, cu.alloc((1, cols)), pos, cache, 1, inv, rp)
        got.append([host(cu, a) for a in (q, k, cache.k, cache.v)])
    for a, b in zip(*got):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    kc = got[0][2].astype(np.float64)
    assert np.abs(kc[1, :, 5]).sum() > 0 and not kc[0].any() and not kc[1, :, :5].any()


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "F16", "Q6_K"])
def test_embed_rows(cu, name):
    qt = TYPE_IDS[name]
    cols = 256 if GGML_TYPES[qt].block_size == 256 else 64
    raw, w = rand_qtensor(cu, qt, 9, cols, seed=8)
    ids = np.array([3, 0, 8, 3], np.int32)
    out = cu.alloc((4, cols))
    cu.embed(out, w, dev(cu, ids))
    np.testing.assert_array_equal(host(cu, out), ref_matrix(raw, qt)[ids].astype(np.float32))


def test_argmax_first_of_ties(cu):
    logits = np.random.default_rng(9).standard_normal(sizes(1000, 128256)).astype(np.float32)
    logits[[17, 400, 700]] = 50.0
    out = cu.alloc((1,), np.int32)
    cu.argmax(out, dev(cu, logits))
    assert host(cu, out)[0] == 17



def test_argmax_rows(cu):
    """Each row's first maximum (a batched step's greedy picks), as np.argmax of the row."""
    logits = np.random.default_rng(10).standard_normal((5, sizes(1000, 128256))).astype(np.float32)
    logits[2, [3, 90]] = 40.0
    logits[4, -1] = 40.0
    out = cu.alloc((8,), np.int32)
    cu.argmax_rows(out, dev(cu, logits))
    np.testing.assert_array_equal(host(cu, out)[:5], np.argmax(logits, axis=1))
    assert host(cu, out)[2] == 3 and host(cu, out)[4] == logits.shape[1] - 1
    with pytest.raises(ValueError, match="argmax of rows"):
        cu.argmax_rows(cu.alloc((4,), np.int32), dev(cu, logits))

# --- attention: decode (split spans + merge) and prefill (tiles), f16 and f32 caches ------------------

@pytest.mark.parametrize("kv_type", ["f32", "f16"])
def test_attention_decode_and_prefill(cu, monkeypatch, kv_type):
    """The FP32 attention kernels (decode spans + merge, prefill tiles). On a GPU a prefill over an
    f16 cache takes the tensor-core flash kernel by default, with its own bound for the f16
    roundings of Q and P (tests/test_cuda_flash.py): turned off here, so this checks the exact one."""
    from numbaformer.backends.cuda import flash
    from numbaformer.kvcache import KVCache
    monkeypatch.setattr(flash, "ENABLED", False)
    hd, n_q, n_kv = sizes((32, 4, 2), (128, 32, 8))
    n_ctx, n_prev, n_new = sizes((24, 9, 5), (2048, 700, 77))
    cfg = type("C", (), {"n_layer": 1, "n_head_kv": n_kv, "head_dim": hd})
    cache = KVCache(cu, cfg, n_ctx, kv_type)
    rng = np.random.default_rng(10)
    n = n_prev + n_new
    k = rng.standard_normal((n, n_kv * hd)).astype(np.float32)
    v = rng.standard_normal((n, n_kv * hd)).astype(np.float32)
    q = rng.standard_normal((n, n_q * hd)).astype(np.float32)
    if kv_type == "f16":                     # the reference sees what the cache holds
        k, v = k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
    pos = np.arange(n, dtype=np.int32)
    cu.kv_store(cache, 0, dev(cu, k[:n_prev]), dev(cu, v[:n_prev]), dev(cu, pos[:n_prev]))
    cu.kv_store(cache, 0, dev(cu, k[n_prev:]), dev(cu, v[n_prev:]), dev(cu, pos[n_prev:]))
    scale = 1 / np.sqrt(hd)
    ref = R.attention(q, k, v, pos, pos, n_q, n_kv, hd)
    out = cu.alloc((n_new, n_q * hd))                       # prefill chunk over a filled cache
    cu.attention(out, dev(cu, q[n_prev:]), cache, 0, dev(cu, pos[n_prev:]), scale)
    np.testing.assert_allclose(host(cu, out), ref[n_prev:], rtol=0, atol=2e-5)
    for t in (0, n_prev, n - 1):                            # decode: one query, several spans
        out1 = cu.alloc((1, n_q * hd))
        cu.attention(out1, dev(cu, q[t:t + 1]), cache, 0, dev(cu, pos[t:t + 1]), scale)
        np.testing.assert_allclose(host(cu, out1)[0], ref[t], rtol=0, atol=2e-5)


# --- the sampling chain ------------------------------------------------------------------------------

CPU_OPS = None


def cpu_ops():
    global CPU_OPS
    if CPU_OPS is None:
        from numbaformer.backends.cpu import CPUBackend
        CPU_OPS = CPUBackend()
    return CPU_OPS


def check_cases(cu, cases, min_checked):
    """Each case's pick equals the CPU op's and, away from near-ties, the reference's."""
    checked = 0
    for logits, history, p, want in cases:
        got = run_op(cu, logits, history, p)
        if want is not None:
            assert got == want == run_op(cpu_ops(), logits, history, p), p
            checked += 1
    assert checked >= min_checked


@pytest.mark.parametrize("n_vocab", sizes([1000], [49152, 128256]))
@pytest.mark.parametrize("name", OPTIONS)
def test_sample_matches_reference(cu, name, n_vocab):
    """Each option alone and combined, small path (the survivors sorted in shared memory): n
    cases whose reference pick is away from near-ties, each equal to the reference's and the CPU
    op's."""
    n = sizes(3, 10)
    check_cases(cu, robust_cases(n_vocab, OPTIONS[name], n=n, seed=n_vocab), n)


FLAT_OPTIONS = [dict(top_k=300), dict(top_p=0.5), dict(top_k=40, top_p=0.9, min_p=0.05),
                dict(top_k=0, min_p=0.99, temperature=2.0)]


def flat_cases(n_vocab, n, seed):
    """Logits rounded to 0.5 (exact ties, broken by id) or all within ~0.05 of each other (whole
    bins of candidates), with each of FLAT_OPTIONS; the reference's pick unless a cut or the
    draw is a near-tie (the top-k cut may fall inside ties: the order breaks them exactly)."""
    rng = np.random.default_rng(seed)
    for c in range(n):
        flat = c % 2 == 1
        logits = (rng.standard_normal(n_vocab) * 0.01 + 4 if flat else
                  np.round(2 * rng.standard_normal(n_vocab)) / 2).astype(np.float32)
        opts = FLAT_OPTIONS[c % len(FLAT_OPTIONS)]
        p = SamplingParams(**{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                              **opts, "seed": int(rng.integers(0, 2**63))})
        want, m = R.sample_chain(logits, [], temperature=p.temperature, top_k=p.top_k,
                                 top_p=p.top_p, min_p=p.min_p, seed=p.seed, index=3)
        robust = m["draw"] > 1e-4 and m["top_p"] > 1e-6 and m["min_p"] > 1e-6 and (
            not flat or m["top_k"] > 1e-6)
        yield logits, [5, 6, 7], p, want if robust else None


def test_sample_big_path(cu, monkeypatch):
    """Survivors beyond the shared-memory candidates (SAMPLE_CAP 32 under the simulator, its
    real 2048 on the GPU, with 128k flat or tied logits): the cuts by radix select, down to the
    last levels of the key for ties, then Gumbel-max over the vocabulary."""
    from numbaformer.backends.cuda import sample
    levels = set()
    if not ON_GPU:
        monkeypatch.setattr(sample, "SAMPLE_CAP", 32)
        real = sample._histogram

        def histogram(logits, m, shift, prefix, hc, hm):      # the simulator runs Python
            levels.add(shift)
            return real(logits, m, shift, prefix, hc, hm)
        monkeypatch.setattr(sample, "_histogram", histogram)
    n_vocab = sizes(600, 128256)
    check_cases(cu, flat_cases(n_vocab, sizes(8, 16), seed=11), sizes(5, 10))
    if not ON_GPU:
        assert levels == {38, 27, 16, 5}                      # every refinement level ran
    check_cases(cu, chain_cases(n_vocab, OPTIONS["combined"], n=sizes(3, 10), seed=12),
                sizes(2, 9))


def test_sample_bookkeeping(cu):
    check_bookkeeping(cu)


ROWS_OPTIONS = ["temperature", "top_k", "top_p", "min_p", "no truncation", "combined, no penalties",
                "greedy"]


@pytest.mark.parametrize("n_vocab", sizes([1000], [49152, 128256]))
def test_sample_rows_are_each_rows_host_pick(cu, n_vocab):
    """sample_rows (a batched step's sampled rows in one launch, a block a row): each pick is the
    reference's and the host sampler's (make_sampler, the draw keyed by the row's own index) for
    its row's logits and parameters, rows taken out of order from a larger batch, a greedy row
    among them; the logits are left as they were."""
    from numbaformer.backends.base import sampler_params
    from numbaformer.sampling import make_sampler
    no_pen = {k: v for k, v in OPTIONS["combined"].items()
              if k not in ("repeat_penalty", "presence_penalty", "frequency_penalty",
                           "repeat_last_n")}
    opts = dict(OPTIONS, **{"no truncation": {}, "combined, no penalties": no_pen,
                            "greedy": dict(temperature=0.0)})
    cases = [next(robust_cases(n_vocab, opts[name], n=1, seed=70 + i))
             for i, name in enumerate(ROWS_OPTIONS)]
    n_rows = len(cases) + 2
    order = np.random.default_rng(71).permutation(n_rows)[:len(cases)]    # batch rows used
    logits = np.random.default_rng(72).standard_normal((n_rows, n_vocab)).astype(np.float32)
    where = np.zeros((len(cases), 2), np.int32)
    fp, ip = np.zeros((len(cases), 8)), np.zeros((len(cases), 8), np.int64)
    want = []
    for b, (lg, history, p, ref) in enumerate(cases):
        logits[order[b]] = lg
        where[b] = order[b], len(history)
        sampler = make_sampler(p)
        fp[b], ip[b] = sampler_params(p, sampler.seed, 1 << 30)
        host_pick = sampler(lg.copy(), (), len(history))
        assert host_pick == ref
        want.append(ref)
    picks = cu.alloc((n_rows,), np.int32)
    x = dev(cu, logits)
    cu.sample_rows(picks, x, dev(cu, where), dev(cu, fp), dev(cu, ip), len(cases))
    assert host(cu, picks)[:len(cases)].tolist() == want
    np.testing.assert_array_equal(host(cu, x), logits)


PENALTY_ROWS = ["repeat", "presence", "frequency", "combined", "greedy+penalties"]


@pytest.mark.parametrize("n_vocab", sizes([1000], [128256]))
def test_adjusted_rows_are_each_rows_host_pick(cu, n_vocab):
    """adjust_rows then sample_rows (a batch's rows with penalties, logit_bias, or both: the
    adjustments Model.batch_sample_ids makes, model._row_adjustments): each pick is the host
    sampler's (a server's logit_bias added first, then make_sampler's penalties over the
    history and its chain) and, for the penalty-only rows, the reference's; every adjusted
    logit is the host's bit for bit."""
    from types import SimpleNamespace

    from numbaformer.backends.base import sampler_params
    from numbaformer.model import _row_adjustments
    from numbaformer.sampling import apply_penalties, make_sampler
    cases = [next(robust_cases(n_vocab, OPTIONS[name], n=1, seed=80 + i))
             for i, name in enumerate(PENALTY_ROWS)]
    rng = np.random.default_rng(81)
    biases = [None] * len(cases)
    for b in (1, 3):                                         # presence, combined: a bias too
        ids = rng.choice(n_vocab, 6, replace=False)
        ids[0] = cases[b][1][-1]                             # one biased id also penalized
        biases[b] = (ids, np.array([8.0, -3.0, 2.5, -100.0, 0.5, 1.0], np.float32))
    biases.append((np.array([3, 7]), np.array([6.0, -2.0], np.float32)))   # bias alone
    cases.append((rng.standard_normal(n_vocab).astype(np.float32) * 3, [1, 2, 3],
                  SamplingParams(temperature=0.8, seed=5), None))
    n = len(cases)
    logits = np.stack([c[0] for c in cases])[::-1].copy()     # row b at n - 1 - b
    where = np.array([(n - 1 - b, len(c[1])) for b, c in enumerate(cases)], np.int32)
    fp, ip = np.zeros((n, 8)), np.zeros((n, 8), np.int64)
    adj, bias, want, adjusted = [], [], [], logits.copy()
    for b, ((lg, history, p, ref), bs) in enumerate(zip(cases, biases)):
        sampler = make_sampler(p)
        fp[b], ip[b] = sampler_params(p, sampler.seed, 1 << 30)
        a, v = _row_adjustments(SimpleNamespace(params=p, bias=bs), history, n_vocab)
        a[:, 0] = b
        adj.append(a)
        bias.append(v)
        lg = lg.copy()
        if bs is not None:
            lg[bs[0]] += bs[1]
        pick = sampler(lg.copy(), history, len(history))
        apply_penalties(lg, history, p)
        adjusted[n - 1 - b] = lg
        assert bs is not None or pick == ref
        want.append(pick)
    x, picks = dev(cu, logits), cu.alloc((n,), np.int32)
    wd, fd = dev(cu, where), dev(cu, fp)
    cu.adjust_rows(x, wd, fd, np.concatenate(adj), np.concatenate(bias))
    np.testing.assert_array_equal(host(cu, x), adjusted)
    cu.sample_rows(picks, x, wd, fd, dev(cu, ip), n)
    assert host(cu, picks).tolist() == want


_SAMPLE_PTX = """
import json, re, sys
import numbaformer.backends.cuda
from numba import cuda, types
import numba.cuda.dispatcher as d
d.get_current_device = lambda: type("F", (), {"compute_capability": (9, 0)})()  # offline only
from numbaformer.backends.cuda import sample
a = lambda t: t[::1]
sig = (a(types.int32), a(types.float32), a(types.int32), a(types.int32), a(types.float64),
       a(types.int64), a(types.int32), a(types.int32), a(types.uint8), a(types.int32),
       a(types.uint64), types.int64)
a2 = lambda t: t[:, ::1]
rows_sig = (a(types.int32), a2(types.float32), a2(types.int32), a2(types.float64), a2(types.int64),
            a2(types.int32), a2(types.uint64), a(types.int32))
try:
    ptx, _ = cuda.compile_ptx(sample._sample_kernel.py_func, sig, cc=(9, 0), launch_bounds=1024)
    rows_ptx, _ = cuda.compile_ptx(sample._sample_rows_kernel.py_func, rows_sig, cc=(9, 0),
                                   launch_bounds=1024)
except Exception as e:  # only a missing toolchain (NVRTC, NVVM, libdevice) skips; bugs fail
    if type(e).__name__ not in ("DynamicLibNotFoundError", "FileNotFoundError", "NvvmSupportError",
                                "CudaSupportError", "ImportError", "OSError"):
        raise
    print(json.dumps({"skip": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}))
    sys.exit()
print(json.dumps({k: {"maxntid": re.findall(r"\\.maxntid (\\d+)", p),
                      "shared": sum(map(int, re.findall(r"\\.shared .*\\[(\\d+)\\]", p)))}
                  for k, p in (("one", ptx), ("rows", rows_ptx))}))
"""


@pytest.mark.skipif(ON_GPU, reason="offline compile check (the GPU run compiles it for real)")
def test_sample_kernel_compiles_for_sm90():
    """The sampling kernels (one sequence's, a batch's rows) through NVVM for sm_90 (no GPU): they
    type on the real target, their launch bound is blocks of 1024 threads, and their static
    shared memory fits in 48 KiB."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _SAMPLE_PTX], capture_output=True, text=True,
                          env=dict(os.environ, NUMBA_ENABLE_CUDASIM="0"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = __import__("json").loads(done.stdout.splitlines()[-1])
    if "skip" in got:
        pytest.skip(f"NVVM unavailable: {got['skip']}")
    for k in ("one", "rows"):
        assert got[k]["maxntid"] == ["1024"] and 40 * 1024 < got[k]["shared"] <= 48 * 1024, got


@pytest.mark.skipif(not ON_GPU, reason="times the kernel on the GPU")
def test_sample_kernel_time(cu, record_figure):
    """Microseconds per sampling step (one kernel launch in a graph) at real vocabulary sizes, for
    the lead's profile: greedy, the CLI defaults, top-p alone, no truncation, penalties."""
    settings = {"greedy": dict(temperature=0.0),
                "defaults (k40 p.95 min-p.05)": dict(),
                "top-p .9 alone": dict(top_k=0, min_p=0.0, top_p=0.9),
                "no truncation": dict(top_k=0, top_p=1.0, min_p=0.0),
                "penalties + defaults": dict(repeat_penalty=1.1, frequency_penalty=0.1)}
    from sampling_cases import op_state
    for n_vocab in (49152, 128256):
        logits = (np.random.default_rng(0).standard_normal(n_vocab) * 3).astype(np.float32)
        for name, kw in settings.items():
            p = SamplingParams(seed=1, **kw)
            st = op_state(cu, p, list(range(64)), n_vocab, n_ctx=128)
            x = cu.to_device(logits)
            ids, pos = cu.to_device(np.zeros(1, np.int32)), cu.to_device(np.array([63], np.int32))
            us = cu.time_us(lambda: cu.sample(x, ids, pos, st, 0), reps=50)
            record_figure(f"sample kernel, vocab {n_vocab}, {name}", f"{us:.1f} us")
            assert us < 2000


# --- the pool ---------------------------------------------------------------------------------------

def test_pool_reuses_buckets(cu):
    p = cu.pool
    a = p.alloc((1000,))
    before = p.stats()
    p.release(a)
    b = p.alloc((900,))                 # same 4 KiB bucket
    s = p.stats()
    assert s["hits"] == before["hits"] + 1 and s["misses"] == before["misses"]
    assert np.all(host(cu, b) == 0)     # zero-filled again
    p.release(b)
    assert p.stats()["bytes_in_use"] == before["bytes_in_use"] - 4096


# --- the memory check before upload -----------------------------------------------------------------

def test_memory_estimate_and_refusal(smollm2):
    from numbaformer.backends.cuda.backend import WORKSPACE_BYTES, check_fits, memory_needed
    from numbaformer.backends.cuda.layout import device_bytes
    need = memory_needed(smollm2, 8192, 512)
    weights = sum(device_bytes(t) for t in smollm2.weights.matrices())      # the GPU layout
    assert weights > sum(t.nbytes for t in smollm2.weights.matrices())
    assert need >= weights + smollm2.config.kv_cache_bytes(8192, 2) + WORKSPACE_BYTES
    check_fits(need, need, 2 * need, 8192)                      # exactly enough: fine
    with pytest.raises(MemoryError) as e:
        check_fits(need, need - 1, 2 * need, 8192)
    msg = str(e.value)
    assert "\n" not in msg and f"{need / 2**30:.2f} GiB" in msg and "context 8192" in msg


def test_batch_memory_estimate_and_refusal(smollm2):
    """The batched path's extra memory: its KV pool (f16: 2 bytes a value, f32: 4), the row
    buffers, per-sequence logits; a refusal names the sequences, the pool and both sizes."""
    from numbaformer.backends.cuda.backend import batch_memory_needed, check_fits
    cfg = smollm2.config
    f16 = batch_memory_needed(cfg, 16 * 1024, 512, 16)
    f32 = batch_memory_needed(cfg, 16 * 1024, 512, 16, kv_bytes=4)
    assert f32 - f16 == cfg.kv_cache_bytes(16 * 1024, 2)
    assert f16 > cfg.kv_cache_bytes(16 * 1024, 2) + 4 * 16 * cfg.n_vocab + 4 * 512 * 2 * cfg.n_ff
    assert batch_memory_needed(cfg, 16 * 1024, 512, 64) > f16
    with pytest.raises(MemoryError) as e:
        check_fits(f16, f16 - 1, 2 * f16, 0, "16 sequences at once need about 1.00 GiB more")
    assert str(e.value).startswith("16 sequences at once need") and "is free" in str(e.value)
