"""backends/cuda/matmul_wide.py: widen (the GPU layout -> bf16 rows) against gguf's dequantized
weights rounded to bf16, every type; the bf16 GEMM on widened weights against NumPy float64 within
the tensor-core GEMM's bound and bitwise against matmul_mma.gemm (the path it replaces for long
passes), every epilogue; the backend's prefill ops through it.

Under the simulator the tiles are patched small (one warp: 16 tokens x 16 rows; widen blocks of 8
rows and 32 threads); with NUMBAFORMER_TEST_GPU=1 the real ones run at real sizes (marked `cuda`).
"""
from __future__ import annotations

import numpy as np
import pytest
import reference as R
from ptx_tools import offline_ptx, ptxas_info
from test_cuda_matmul_mma import (ALL_TYPES, ON_GPU, SMALL, bf16, bf16_bound, block_max, check,
                                  rand_weights, real)
from test_cuda_matmul_mma import run_gemm as mma_gemm

from numbaformer.quants import GGML_TYPES, TYPE_IDS

pytestmark = pytest.mark.cuda if ON_GPU else []


@pytest.fixture
def cu(cuda_toy_shapes, monkeypatch):
    from numbaformer.backends.cuda import matmul_wide
    from numbaformer.backends.cuda.backend import CUDABackend
    if not ON_GPU or SMALL:
        monkeypatch.setattr(matmul_wide, "WIDE_TILES", ((16, 16, 1, 1, 32, 4),))
        monkeypatch.setattr(matmul_wide, "WIDEN_ROWS", 8)
        monkeypatch.setattr(matmul_wide, "WIDEN_THREADS", 32)
    return CUDABackend()


def as_f64(bits):
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_widen_every_type(cu, name):
    """Every weight is gguf's value rounded to bf16 (to nearest, 8 significant bits: within 2^-8
    of it, relative),
    give or take the f32 rounding of the decoder's arithmetic (2^-21 of the block's largest
    magnitude); rows into the middle of a larger scratch leave the rest alone. 24 rows (3 widen
    blocks), the columns over 2 raw units, the last one short for the small blocks."""
    qt = TYPE_IDS[name]
    big = GGML_TYPES[qt].block_size == 256
    rows, cols = real((24, 512 if big else 352), (2048 + 40, 4096))
    W, w = rand_weights(cu, qt, rows, cols, seed=qt + 100)
    wb = cu.alloc((rows + 5, cols), np.uint16)
    wb.copy_to_device(np.full((rows + 5, cols), 0x7FC1, np.uint16))      # a NaN pattern
    from numbaformer.backends.cuda import matmul_wide
    matmul_wide.widen(wb, w, cu.stream, 3)
    host = cu.to_host(wb)
    assert np.all(host[:3] == 0x7FC1) and np.all(host[3 + rows:] == 0x7FC1)
    got = as_f64(host[3:3 + rows])
    bound = 2.0**-8 * np.abs(W) + 2.0**-21 * block_max(W, qt)
    assert np.all(np.abs(got - W) <= bound), np.max(np.abs(got - W) / (bound + 1e-30))
    assert np.mean(got == bf16(W.astype(np.float32))) > 0.99       # mostly bf16(W) exactly
    with pytest.raises(ValueError, match="widen"):
        matmul_wide.widen(wb, w, cu.stream, 6)                       # past the end


def wide_gemm(be, x, w, up=None, **kw):
    from numbaformer.backends.cuda import matmul_mma, matmul_wide
    xb = be.alloc(x.shape, np.uint16)
    matmul_mma.to_bf16(xb, be.to_device(x), be.stream)
    wb = be.alloc((w.rows * (2 if up is not None else 1), w.cols), np.uint16)
    matmul_wide.widen_pair(wb, w, be.stream, up)
    out = kw.pop("out", None)
    if out is None:
        out = be.alloc((x.shape[0], w.rows))
    matmul_wide.gemm(out, xb, wb, w.rows, be.stream, swiglu=up is not None, **kw)
    return be.to_host(out)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q8_0", "Q4_1", "F16"])
def test_wide_gemm_against_numpy_and_bitwise_the_in_kernel_gemm(cu, name):
    """20 tokens (2 token tiles, the last partial), 24 rows (2 row tiles, the last partial),
    several k-tiles: within the bf16 bound of NumPy float64, and the very bits of
    matmul_mma.gemm (same bf16 weights, same mma sequence along k, same epilogue)."""
    qt = TYPE_IDS[name]
    big = GGML_TYPES[qt].block_size == 256
    n, rows, cols = real((20, 24, 512 if big else 96), (333, 2048 + 40, 4096))
    W, w = rand_weights(cu, qt, rows, cols, seed=qt + 200)
    x = np.random.default_rng(2).standard_normal((n, cols)).astype(np.float32)
    got = wide_gemm(cu, x, w)
    check(got, x, W, qt)
    np.testing.assert_array_equal(got.view(np.uint32), mma_gemm(cu, x, w).view(np.uint32))


@pytest.mark.parametrize("name", ["Q4_K", "Q4_0"])
def test_wide_gemm_epilogues(cu, name):
    """Bias, residual in place, SwiGLU (gate and up widened into one scratch): bitwise the
    in-kernel GEMM's, and SwiGLU within the bound carried through silu."""
    qt = TYPE_IDS[name]
    big = GGML_TYPES[qt].block_size == 256
    n, rows, cols = real((18, 24, 256 if big else 64), (600, 2048 + 8, 4096))
    rng = np.random.default_rng(19)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    W, w = rand_weights(cu, qt, rows, cols, seed=20)
    bias = rng.standard_normal(rows).astype(np.float32)
    a = wide_gemm(cu, x, w, bias=cu.to_device(bias))
    np.testing.assert_array_equal(a, mma_gemm(cu, x, w, bias=cu.to_device(bias)))
    check(a, x, W, qt, extra=bias)
    x0 = rng.standard_normal((n, rows)).astype(np.float32)
    res = cu.to_device(x0)
    a = wide_gemm(cu, x, w, out=res, residual=res)
    res = cu.to_device(x0)
    np.testing.assert_array_equal(a, mma_gemm(cu, x, w, out=res, residual=res))
    U, u = rand_weights(cu, qt, rows, cols, seed=21)
    got = wide_gemm(cu, x, w, up=u)
    np.testing.assert_array_equal(got, mma_gemm(cu, x, w, up=u))
    g, v = x.astype(np.float64) @ W.T, x.astype(np.float64) @ U.T
    eg, ev = bf16_bound(x, W, qt), bf16_bound(x, U, qt)
    ref = R.silu(g) * v
    bound = 1.1 * eg * (np.abs(v) + ev) + np.abs(R.silu(g)) * ev + 2.0**-20 * np.abs(ref)
    assert np.all(np.abs(got - ref) <= bound)


@pytest.mark.parametrize("tile", [
    (32, 32, 2, 2, 64, 2),       # 4 warps, double buffering, a last k-tile half zero-filled
    (16, 32, 1, 2, 32, 3),       # 2 warps along rows
    (32, 16, 2, 1, 32, 5),       # more stages than k-tiles
])
def test_wide_gemm_other_tiles(cu, tile):
    if ON_GPU and not SMALL:
        pytest.skip("the real tiles are the test on the GPU")
    qt = TYPE_IDS["Q8_0"]
    W, w = rand_weights(cu, qt, 40, 96, seed=22)
    x = np.random.default_rng(23).standard_normal((20, 96)).astype(np.float32)
    got = wide_gemm(cu, x, w, tile=tile)
    check(got, x, W, qt)
    np.testing.assert_array_equal(got, mma_gemm(cu, x, w))


def test_wide_gemm_checks_shapes(cu):
    from numbaformer.backends.cuda import matmul_wide
    xb = cu.alloc((4, 64), np.uint16)
    with pytest.raises(ValueError, match="wide GEMM"):
        matmul_wide.gemm(cu.alloc((4, 8)), xb, cu.alloc((8, 32), np.uint16), 8, cu.stream)
    with pytest.raises(ValueError, match="wide GEMM"):
        matmul_wide.gemm(cu.alloc((4, 8)), xb, cu.alloc((8, 64), np.uint16), 8, cu.stream,
                         swiglu=True)


def test_backend_long_passes_take_the_wide_path_with_the_same_bits(cu, monkeypatch):
    """With matmul_wide on from n - 1 tokens, the backend's prefill ops (norm_matmul + bias,
    matmul_add, norm_swiglu) over n tokens give bitwise what the in-kernel tensor-core GEMM gives;
    a pass of n - 3 tokens does not widen (the scratch is not even allocated)."""
    from numbaformer.backends.cuda import matmul_mma, matmul_wide
    qt = TYPE_IDS["Q4_K"]
    n, d, ff = real((9, 256, 24), (600, 4096, 2048))
    monkeypatch.setattr(matmul_mma, "ENABLED", True)
    monkeypatch.setattr(matmul_wide, "WIDE_MIN_TOKENS", n - 1)
    rng = np.random.default_rng(24)
    x = rng.standard_normal((n, d)).astype(np.float32)
    nw = cu.to_device(rng.uniform(0.5, 1.5, d).astype(np.float32))
    _, wq = rand_weights(cu, qt, 24, d, seed=25)
    _, wg = rand_weights(cu, qt, ff, d, seed=26)
    _, wu = rand_weights(cu, qt, ff, d, seed=27)
    bias = cu.to_device(rng.standard_normal(24).astype(np.float32))

    def run(m):
        outs = [cu.alloc((m, 24))]
        cu.norm_matmul(outs, cu.to_device(x[:m]), nw, 1e-5, [wq], [bias], cu.alloc((m, d)))
        out = cu.alloc((m, ff))
        cu.norm_swiglu(out, cu.to_device(x[:m]), nw, 1e-5, wg, wu, cu.alloc((m, d)),
                       cu.alloc((m, ff)))
        acc = cu.to_device(x[:m, :24].copy())
        cu.matmul_add(acc, cu.to_device(x[:m]), wq, cu.alloc((m, 24)))
        return [cu.to_host(a) for a in (outs[0], out, acc)]

    monkeypatch.setattr(matmul_wide, "ENABLED", False)
    ref = run(n)
    monkeypatch.setattr(matmul_wide, "ENABLED", True)
    run(n - 3)
    assert cu._wb is None                                    # n - 3 tokens: the in-kernel path
    for a, b in zip(run(n), ref):
        np.testing.assert_array_equal(a, b)
    assert cu._wb is not None and cu._wb.size >= 2 * ff * d


@pytest.mark.skipif(ON_GPU, reason="an offline check (CI); device time is for the GPU checks")
def test_ptx_wide_kernels(record_figure):
    """The GEMM of every WIDE_TILES tile (store, and SwiGLU on the first) compiles to PTX with
    mma.sync, ldmatrix and cp.async and, where ptxas is installed, assembles for sm_90 without
    spilling; widen of every type uses cp.async and 16-byte global stores."""
    from numbaformer.backends.cuda import matmul_wide as M
    ptx = offline_ptx(f"""
from numbaformer.backends.cuda import matmul_wide as M
from numbaformer.quants import TYPE_IDS
A = types.Array
sig = (A(f32, 2, "C"), A(u16, 2, "C"), A(u16, 2, "C"), A(f32, 2, "C"), types.int64)
for i, (bm, bn, wm, wn, bk, st) in enumerate(M.WIDE_TILES):
    for ep in (0, 3) if i < 2 else (0,):
        k = M._gemm_kernel(bm, bn, bk, wm, wn, st, ep, M.WIDE_MIN_BLOCKS)
        ptx[f"gemm {{bm}}x{{bn}} {{wm * wn}} warps ep {{ep}}"] = compile(k, sig)
wsig = (A(u32, 2, "C"), A(u8, 2, "C"), A(u16, 2, "C"), types.int64)
for name in {ALL_TYPES!r}:
    ptx[f"widen {{name}}"] = compile(M._widen_kernel(TYPE_IDS[name], M.WIDEN_ROWS,
                                                     M.WIDEN_THREADS), wsig)
""")
    if "skip" in ptx:
        pytest.skip(ptx["skip"])
    assert len(ptx) == len(M.WIDE_TILES) + 2 + len(ALL_TYPES)
    figures = []
    for name, text in ptx.items():
        ops = ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
               "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "cp.async.wait_group") \
            if name.startswith("gemm") else ("cp.async.cg.shared.global", "st.global.v4")
        for op in ops + ("cp.async.commit_group", "bar.sync"):
            assert op in text, (name, op)
        info = ptxas_info(text)
        if info is None:
            pytest.skip("no ptxas: PTX checked, registers and spills not")
        if name.startswith("gemm"):
            figures.append(f"{name} {info['registers']} regs")
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (name, info)
    record_figure("wide GEMM registers (sm_90, ptxas)", ", ".join(figures))


def test_wide_pick_tile_fills_the_gpu():
    """The 8B shapes at 512 tokens on 132 SMs take the tiles measured best for them."""
    from numbaformer.backends.cuda.matmul_wide import WIDE_TILES, pick_tile
    assert pick_tile(512, 14336, False, 132) == WIDE_TILES[0] == (256, 128, 4, 4, 32, 3)
    assert pick_tile(512, 14336, True, 132) == WIDE_TILES[0]          # 64 rows a block: 448
    assert pick_tile(512, 4096, False, 132) == WIDE_TILES[1] == (128, 128, 4, 4, 64, 3)
    assert pick_tile(512, 1024, False, 132) == WIDE_TILES[2] == (64, 128, 2, 4, 32, 4)


def test_resident_widened_weights_widen_once_with_the_same_bits(cu, monkeypatch):
    """With RESIDENT_BYTES room for the gate/up pair (used first) but not for Q too, the pair is
    widened on its first pass only and kept (the same bits as the scratch path); Q, past the
    budget, is widened into the scratch every pass."""
    from numbaformer.backends.cuda import matmul_mma, matmul_wide
    qt = TYPE_IDS["Q4_K"]
    n, d, ff = real((9, 256, 24), (600, 4096, 2048))
    monkeypatch.setattr(matmul_mma, "ENABLED", True)
    monkeypatch.setattr(matmul_wide, "ENABLED", True)
    monkeypatch.setattr(matmul_wide, "WIDE_MIN_TOKENS", n)
    rng = np.random.default_rng(28)
    x = cu.to_device(rng.standard_normal((n, d)).astype(np.float32))
    nw = cu.to_device(rng.uniform(0.5, 1.5, d).astype(np.float32))
    _, wq = rand_weights(cu, qt, 24, d, seed=29)
    _, wg = rand_weights(cu, qt, ff, d, seed=30)
    _, wu = rand_weights(cu, qt, ff, d, seed=31)
    widens = []
    real_widen = matmul_wide.widen
    monkeypatch.setattr(matmul_wide, "widen", lambda wb, w, *a: widens.append(id(w)) or
                        real_widen(wb, w, *a))

    def run():
        out = cu.alloc((n, ff))
        cu.norm_swiglu(out, x, nw, 1e-5, wg, wu, cu.alloc((n, d)), cu.alloc((n, ff)))
        outs = [cu.alloc((n, 24))]
        cu.norm_matmul(outs, x, nw, 1e-5, [wq], [None], cu.alloc((n, d)))
        return cu.to_host(outs[0]), cu.to_host(out)

    ref = run()                                          # RESIDENT_BYTES 0: scratch only
    assert widens == [id(wg), id(wu), id(wq)] and cu._resident_bytes == 0
    monkeypatch.setattr(matmul_wide, "RESIDENT_BYTES", 2 * 2 * ff * d)
    widens.clear()
    first, second = run(), run()
    assert widens == [id(wg), id(wu), id(wq), id(wq)]    # the pair once, Q each pass
    assert cu._resident_bytes == 2 * 2 * ff * d
    for a, b, c in zip(ref, first, second):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
