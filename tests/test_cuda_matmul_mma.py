"""backends/cuda/matmul_mma.py, the tensor-core GEMM of prefill, against NumPy float64 of gguf's
dequantized weights, every type, with awkward sizes (tokens, rows and the shared dimension crossing
tiles, raw units and warps), every epilogue, and the backend ops that use it.

Under the simulator (CI) the tiles are patched small (one warp: 16 tokens x 16 rows, k-tiles of 32
values) and mma.py's warp emulations run; with NUMBAFORMER_TEST_GPU=1 the real tiles run at real
sizes (marked `cuda`).

The bound, from the rounding the path does: x and the dequantized weight are each rounded to bf16
(8 significant bits, to nearest: relative error <= 2^-8 each), their product is exact in the tensor
core, and the f32 sum of K products errs by at most K 2^-23 of the sum of magnitudes (2^-23, not
2^-24: the tensor core may truncate). So |out - x.W| <= (2^-7 + 2^-16 + K 2^-23 (1 + 2^-8)^2)
sum_k |x_k||W_k| (bf16_bound); the weight's f32 value may differ from gguf's by the f32 rounding
of the decoder's arithmetic (d*q - m), a few 2^-24 of the block's largest magnitude (B), which
adds 2^-21 sum_k |x_k| B_k. Under the simulator the path is also held to NumPy of the bf16-rounded
operands, to the f32 summation alone (the emulation rounds the same way).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import reference as R
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from ptx_tools import offline_ptx, ptxas_info

from numbaformer.quants import DECODERS, GGML_TYPES, TYPE_IDS
from numbaformer.synthetic import random_blocks
from numbaformer.weights import QTensor

ON_GPU = os.environ.get("NUMBAFORMER_TEST_GPU") == "1"
SMALL = os.environ.get("NUMBAFORMER_TEST_SMALL") == "1"
pytestmark = pytest.mark.cuda if ON_GPU else []
ALL_TYPES = [GGML_TYPES[t].name for t in DECODERS]


@pytest.fixture
def cu(cuda_toy_shapes):
    """The CUDA backend; under the simulator with conftest's toy tiles (the tensor-core GEMM's:
    one warp of 16 tokens x 16 rows, k-tiles of 32)."""
    from numbaformer.backends.cuda.backend import CUDABackend
    return CUDABackend()


def real(toy, gpu):
    return gpu if ON_GPU and not SMALL else toy


def rand_weights(be, qtype, rows, cols, seed):
    raw = random_blocks(qtype, rows * cols // GGML_TYPES[qtype].block_size, cols ** -0.5,
                        seed=seed).reshape(rows, -1)
    W = gguf_dequantize(raw, GGMLQuantizationType(qtype)).astype(np.float64)
    return W, be.upload_matrix(QTensor("w", qtype, rows, cols, raw))


def bf16(a):
    """float32 values rounded to bf16 (to nearest, even), as float64."""
    b = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    r = (((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16).astype(np.uint32)
    return r.view(np.float32).astype(np.float64)


def block_max(W, qtype):
    bs = GGML_TYPES[qtype].block_size if GGML_TYPES[qtype].block_size > 1 else 32
    a = np.abs(W).reshape(W.shape[0], -1, bs).max(axis=2)
    return np.repeat(a, bs, axis=1)


def bf16_bound(x, W, qtype):
    """The module docstring's bound on |out - x @ W.T| for each output, (n, rows)."""
    K = W.shape[1]
    ax = np.abs(x.astype(np.float64))
    rel = 2.0**-7 + 2.0**-16 + K * 2.0**-23 * (1 + 2.0**-8) ** 2
    return rel * (ax @ np.abs(W).T) + 2.0**-21 * (ax @ block_max(W, qtype).T) + 1e-30


def check(got, x, W, qtype, extra=0.0):
    """got ~ x @ W.T + extra within bf16_bound (+ the f32 rounding of the epilogue's add); under
    the simulator also within the f32 summation of bf16(x) @ bf16(W).T."""
    ref = x.astype(np.float64) @ W.T + extra
    bound = bf16_bound(x, W, qtype) + 2.0**-23 * np.abs(ref)
    err = np.abs(got - ref)
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.2f}"
    if not ON_GPU:
        xb, Wb = bf16(x), bf16(W.astype(np.float32))
        tight = (xb @ Wb.T + extra)
        tb = W.shape[1] * 2.0**-23 * (np.abs(xb) @ np.abs(Wb).T) + 2.0**-23 * np.abs(tight) + 1e-30
        terr = np.abs(got - tight)
        assert np.all(terr <= tb), f"bf16-rounded operands: max err/bound {np.max(terr / tb):.2f}"
    return np.max(err / bound)


def run_gemm(be, x, w, **kw):
    from numbaformer.backends.cuda import matmul_mma
    xb = be.alloc(x.shape, np.uint16)
    matmul_mma.to_bf16(xb, be.to_device(x), be.stream)
    out = kw.pop("out", None)
    if out is None:
        out = be.alloc((x.shape[0], w.rows))
    matmul_mma.gemm(out, xb, w, be.stream, **kw)
    return be.to_host(out)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_gemm_every_type(cu, name, record_figure):
    """20 tokens (2 token tiles, the last partial), 24 rows (2 row tiles, the last partial), the
    shared dimension over several k-tiles and raw units (K-quants: 2 blocks of 8 tiles; others 3
    tiles)."""
    qt = TYPE_IDS[name]
    big = GGML_TYPES[qt].block_size == 256
    n, rows, cols = real((20, 24, 512 if big else 96), (333, 2048 + 40, 4096))
    W, w = rand_weights(cu, qt, rows, cols, seed=qt)
    x = np.random.default_rng(1).standard_normal((n, cols)).astype(np.float32)
    x[:, :32] *= 1e-4                                  # a quiet stretch: the bound is relative
    ratio = check(run_gemm(cu, x, w), x, W, qt)
    record_figure(f"tensor-core GEMM {name} {n}x{rows}x{cols}", f"max err/bound {ratio:.3f}")


@pytest.mark.parametrize("name,tile,bk,lookahead", [
    ("Q4_K", (32, 32, 2, 2), 32, 1),    # 4 warps: 2 along tokens, 2 along rows; double buffering
    ("Q4_K", (16, 32, 1, 2), 64, 3),    # 2 warps along rows; 4 k-tiles per K-quant block
    ("Q8_0", (32, 16, 2, 1), 64, 2),    # 96 values: a last k-tile of 32 (zero-filled half), and
    #                                     raw units of 2 blocks, the last one short
    ("Q8_0", (16, 16, 1, 1), 32, 3),    # a raw unit per k-tile, 4 in flight
    ("Q6_K", (16, 16, 1, 1), 128, 2),   # 2 k-tiles per block: 8 ldmatrix k-steps per tile
])
def test_gemm_other_tiles(cu, monkeypatch, name, tile, bk, lookahead):
    from numbaformer.backends.cuda import matmul_mma
    if ON_GPU and not SMALL:
        pytest.skip("the real tiles are the test on the GPU")
    monkeypatch.setattr(matmul_mma, "MMA_BK", bk)
    monkeypatch.setattr(matmul_mma, "MMA_LOOKAHEAD", lookahead)
    qt = TYPE_IDS[name]
    cols = 512 if GGML_TYPES[qt].block_size == 256 else 96
    W, w = rand_weights(cu, qt, 24, cols, seed=7)
    x = np.random.default_rng(8).standard_normal((20, cols)).astype(np.float32)
    check(run_gemm(cu, x, w, tile=tile), x, W, qt)


@pytest.mark.parametrize("name", ["Q4_K", "Q4_0"])
def test_gemm_epilogues(cu, name):
    """Bias; residual in place (out is the residual); SwiGLU of gate and up in one GEMM, against
    silu(g) u with the bound carried through silu (|silu'| <= 1.1)."""
    qt = TYPE_IDS[name]
    big = GGML_TYPES[qt].block_size == 256
    n, rows, cols = real((18, 24, 256 if big else 64), (77, 2048 + 8, 4096))
    rng = np.random.default_rng(9)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    W, w = rand_weights(cu, qt, rows, cols, seed=10)
    bias = rng.standard_normal(rows).astype(np.float32)
    check(run_gemm(cu, x, w, bias=cu.to_device(bias)), x, W, qt, extra=bias)
    x0 = rng.standard_normal((n, rows)).astype(np.float32)
    res = cu.to_device(x0)
    check(run_gemm(cu, x, w, out=res, residual=res), x, W, qt, extra=x0)
    U, u = rand_weights(cu, qt, rows, cols, seed=11)
    got = run_gemm(cu, x, w, up=u)
    g, v = x.astype(np.float64) @ W.T, x.astype(np.float64) @ U.T
    eg, ev = bf16_bound(x, W, qt), bf16_bound(x, U, qt)
    ref = R.silu(g) * v
    bound = 1.1 * eg * (np.abs(v) + ev) + np.abs(R.silu(g)) * ev + 2.0**-20 * np.abs(ref)
    err = np.abs(got - ref)
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.2f}"


@pytest.mark.parametrize("name,cols,splits,tile", [("Q4_K", 1024, 3, None), ("Q8_0", 96, 2, None),
                                                   ("Q6_K", 512, 2, (16, 64, 1, 4))])
def test_split_decode_product(cu, monkeypatch, name, cols, splits, tile):
    """The decode product (part=: DECODE_TILE, or a 16-token tile; split-K over whole raw units,
    slices of uneven length; Q8_0: 3 units in 2 slices) with every epilogue within the GEMM's
    bounds, and a row's bits the same alone or beside others."""
    from numbaformer.backends.cuda import gemv, matmul_mma
    if tile:
        monkeypatch.setattr(matmul_mma, "DECODE_TILE", tile)
    if not ON_GPU:
        monkeypatch.setattr(gemv, "_n_sms", lambda: 1)
        monkeypatch.setattr(matmul_mma, "SPLIT_BLOCKS_PER_SM", splits)
    qt = TYPE_IDS[name]
    rows = real(24, 4096)
    W, w = rand_weights(cu, qt, rows, cols, seed=12)
    assert ON_GPU or matmul_mma.decode_splits(w, False, gemv._n_sms()) == splits
    rng = np.random.default_rng(13)
    x = rng.standard_normal((5, cols)).astype(np.float32)
    part = cu.alloc((64, 8, 2 * rows))
    got = run_gemm(cu, x, w, part=part)
    check(got, x, W, qt)
    np.testing.assert_array_equal(run_gemm(cu, x[2:3], w, part=part)[0], got[2])
    bias = rng.standard_normal(rows).astype(np.float32)
    check(run_gemm(cu, x, w, bias=cu.to_device(bias), part=part), x, W, qt, extra=bias)
    x0 = rng.standard_normal((5, rows)).astype(np.float32)
    res = cu.to_device(x0)
    check(run_gemm(cu, x, w, out=res, residual=res, part=part), x, W, qt, extra=x0)
    U, u = rand_weights(cu, qt, rows, cols, seed=14)
    got = run_gemm(cu, x, w, up=u, part=part)
    g, v = x.astype(np.float64) @ W.T, x.astype(np.float64) @ U.T
    eg, ev = bf16_bound(x, W, qt), bf16_bound(x, U, qt)
    ref = R.silu(g) * v
    bound = 1.1 * eg * (np.abs(v) + ev) + np.abs(R.silu(g)) * ev + 2.0**-20 * np.abs(ref)
    assert np.all(np.abs(got - ref) <= bound)
    with pytest.raises(ValueError, match="partial sums"):
        run_gemm(cu, x, w, part=cu.alloc((1, 1, 1)))


def test_to_bf16_rounds_and_norms(cu):
    from numbaformer.backends.cuda import matmul_mma
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((3, 96)) * 10.0 ** rng.integers(-3, 4, (3, 96))).astype(np.float32)
    xb = cu.alloc(x.shape, np.uint16)
    matmul_mma.to_bf16(xb, cu.to_device(x), cu.stream)
    got = cu.to_host(xb).astype(np.uint32) << 16
    np.testing.assert_array_equal(got.view(np.float32), bf16(x).astype(np.float32))
    nw = rng.uniform(0.5, 1.5, 96).astype(np.float32)
    matmul_mma.to_bf16(xb, cu.to_device(x), cu.stream, cu.to_device(nw), 1e-5)
    got = (cu.to_host(xb).astype(np.uint32) << 16).view(np.float32)
    ref = R.rmsnorm(x, nw, 1e-5)
    assert np.all(np.abs(got - ref) <= (2.0**-8 + 2.0**-20) * np.abs(ref))


def test_backend_prefill_takes_tensor_cores_and_exact_the_fp32_path(cu, monkeypatch):
    """With the tensor-core GEMM enabled (matmul_mma.ENABLED, NUMBAFORMER_MMA=1: off by default
    until measured on a GPU), CUDABackend's prefill ops (matmul + bias, matmul_add, norm_matmul
    of Q/K/V, norm_swiglu) go through it within its bf16 bound; with `exact` they keep the FP32
    GEMM's 16 f32 roundoffs, a bound the bf16 path would break."""
    from numbaformer.backends.cuda import matmul_mma
    monkeypatch.setattr(matmul_mma, "ENABLED", True)
    qt = TYPE_IDS["Q4_K"]
    n, d, ff = real((5, 256, 24), (77, 4096, 2048))
    rng = np.random.default_rng(13)
    x = rng.standard_normal((n, d)).astype(np.float32)
    nw = rng.uniform(0.5, 1.5, d).astype(np.float32)
    Wq, wq = rand_weights(cu, qt, 24, d, seed=14)
    Wg, wg = rand_weights(cu, qt, ff, d, seed=15)
    Wu, wu = rand_weights(cu, qt, ff, d, seed=16)
    bias = rng.standard_normal(24).astype(np.float32)
    xn = R.rmsnorm(x, nw, 1e-5)
    for exact in (False, True):
        cu.exact = exact
        try:
            outs = [cu.alloc((n, 24))]
            cu.norm_matmul(outs, cu.to_device(x), cu.to_device(nw), 1e-5, [wq],
                           [cu.to_device(bias)], cu.alloc((n, d)))
            got_q = cu.to_host(outs[0])
            out = cu.alloc((n, ff))
            cu.norm_swiglu(out, cu.to_device(x), cu.to_device(nw), 1e-5, wg, wu,
                           cu.alloc((n, d)), cu.alloc((n, ff)))
            got_s = cu.to_host(out)
            acc = cu.to_device(x[:, :24].copy())
            cu.matmul_add(acc, cu.to_device(x), wq, cu.alloc((n, 24)))
            got_r = cu.to_host(acc)
        finally:
            cu.exact = False
        ref_q = xn @ Wq.T + bias
        ref_s = R.silu(xn @ Wg.T) * (xn @ Wu.T)
        ref_r = x[:, :24] + x.astype(np.float64) @ Wq.T
        fp32 = 64 * 2.0**-24 * (np.abs(xn) @ np.abs(Wq).T + np.abs(bias))
        if exact:
            assert np.all(np.abs(got_q - ref_q) <= fp32 + 2e-6 * np.abs(ref_q))
            np.testing.assert_allclose(got_s, ref_s, rtol=0, atol=1e-4 * np.abs(ref_s).max())
            np.testing.assert_allclose(got_r, ref_r, rtol=0, atol=1e-5 * np.abs(ref_r).max())
        else:
            bq = bf16_bound(xn, Wq, qt) + 2.0**-20 * np.abs(ref_q)
            assert np.all(np.abs(got_q - ref_q) <= bq)
            assert np.max(np.abs(got_q - ref_q) / fp32) > 1        # bf16, not the FP32 path
            eg, eu = bf16_bound(xn, Wg, qt), bf16_bound(xn, Wu, qt)
            g, v = xn @ Wg.T, xn @ Wu.T
            bs = 1.1 * eg * (np.abs(v) + eu) + np.abs(R.silu(g)) * eu + 2.0**-20 * np.abs(ref_s)
            assert np.all(np.abs(got_s - ref_s) <= bs)
            br = bf16_bound(x, Wq, qt) + 2.0**-22 * (np.abs(ref_r) + np.abs(x[:, :24]))
            assert np.all(np.abs(got_r - ref_r) <= br)


PTX_TYPES = ["Q4_K", "Q6_K", "Q8_0", "Q4_0", "F16", "BF16", "F32", "Q3_K"]
SPILL_512 = 16         # bytes a thread the 512-thread kernels of BIG_TILE_TYPES may spill


@pytest.mark.skipif(ON_GPU, reason="an offline check (CI); device time is for the GPU checks")
@pytest.mark.parametrize("tile", [0, 1])
def test_ptx_gemm_per_type(tile, record_figure):
    """The kernels of the first two tiles (MMA_TILES[0] 256 x 128 on 16 warps, [1] 128 x 128 on 8;
    MMA_BK, MMA_LOOKAHEAD, MMA_MIN_BLOCKS, store epilogue) of each type compile to PTX with
    mma.sync, ldmatrix and cp.async, and where ptxas is installed assemble for sm_90: the 8-warp
    kernels without spilling to local memory; the 16-warp ones of BIG_TILE_TYPES, the types that
    take them (512 threads: at most 128 registers a thread), with at most SPILL_512 bytes of spill
    stores a thread (4 at Q4_K when the tile was measured at 182 against 122 TFLOP/s of the
    128-token tile on the H200, spills included); the SwiGLU ones for Q4_K too; the split-K
    decode product's (DECODE_TILE, partial sums) without spilling. Two cases (tile 0; tile 1 and
    the split-K ones), so that parallel test workers compile them side by side."""
    from numbaformer.backends.cuda.matmul_mma import BIG_TILE_TYPES
    ptx = offline_ptx(f"""
from numbaformer.backends.cuda import matmul_mma as M
from numbaformer.quants import TYPE_IDS
A = types.Array
sig = (A(f32, 2, "C"), A(u8, 2, "C"), A(u8, 2, "C"), A(u16, 2, "C"), A(u16, 2, "C"),
       A(u16, 2, "C"), A(f32, 2, "C"))
for bm, bn, wm, wn in M.MMA_TILES[{tile}:{tile} + 1]:
    for name, ep in [(n, 0) for n in {PTX_TYPES!r}] + [("Q4_K swiglu", 3)]:
        k = M._gemm_kernel(TYPE_IDS[name.split()[0]], bm, bn, M.MMA_BK, wm, wn, ep,
                           M.MMA_LOOKAHEAD, M.MMA_MIN_BLOCKS)
        ptx[f"{{name}} {{wm * wn}} warps"] = compile(k, sig)
sig3 = (A(f32, 3, "A"), A(u8, 2, "C"), A(u8, 2, "C"), A(u16, 2, "C"), A(u16, 2, "C"),
        A(u16, 2, "C"), A(f32, 3, "A"))
bm, bn, wm, wn = M.DECODE_TILE
for name, ep in [("Q4_K", 0), ("Q6_K", 0), ("Q8_0", 0), ("Q4_K swiglu", 3)][:4 * {tile}]:
    k = M._gemm_kernel(TYPE_IDS[name.split()[0]], bm, bn, M.MMA_BK, wm, wn, ep,
                       M.MMA_LOOKAHEAD, M.MMA_MIN_BLOCKS, True)
    ptx[f"{{name}} split decode"] = compile(k, sig3)
""")
    figures = []
    for name, text in ptx.items():
        for op in ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                   "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "cp.async.cg.shared.global",
                   "cp.async.commit_group", "cp.async.wait_group", "bar.sync"):
            assert op in text, (name, op)
        assert ("cvt.rn.bf16x2.f32" in text) == ("BF16" not in name), name   # BF16: as they are
        info = ptxas_info(text)
        if info is None:
            pytest.skip("no ptxas: PTX checked, registers and spills not")
        figures.append(f"{name} {info['registers']} regs {info['spill_stores']} spills")
        if name.endswith(" 16 warps"):
            if TYPE_IDS[name.split()[0]] in BIG_TILE_TYPES:
                assert info["spill_stores"] <= SPILL_512, (name, info)
        else:
            assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (name, info)
    record_figure(f"tensor-core GEMM registers, tile {tile} (sm_90, ptxas)", ", ".join(figures))


def test_pick_tile_fills_the_gpu():
    """The largest tile whose grid gives every SM a block (0.9 per SM), else the smallest: the
    8B shapes on 132 SMs; the 16-warp tile only for BIG_TILE_TYPES."""
    from numbaformer.backends.cuda.matmul_mma import BIG_TILE_TYPES, MMA_TILES, pick_tile
    assert MMA_TILES[0] == (256, 128, 4, 4) and MMA_TILES[1] == (128, 128, 2, 4)
    q4k, q6k = TYPE_IDS["Q4_K"], TYPE_IDS["Q6_K"]
    assert q4k in BIG_TILE_TYPES and q6k not in BIG_TILE_TYPES
    assert pick_tile(512, 4096, False, 132, q4k) == (128, 128, 2, 4)   # 256: 64 blocks; 128: 128
    assert pick_tile(512, 14336, False, 132, q4k) == (256, 128, 4, 4)  # 224 blocks
    assert pick_tile(512, 14336, True, 132, q4k) == (256, 128, 4, 4)   # SwiGLU: 64 rows a block
    assert pick_tile(512, 14336, True, 132, q6k) == (128, 128, 2, 4)   # Q6_K spills at 16 warps
    assert pick_tile(512, 1024, False, 132, q4k) == (64, 64, 2, 2)     # K/V: 128 blocks
    assert pick_tile(5, 576, False, 132, q4k) == MMA_TILES[-1]
