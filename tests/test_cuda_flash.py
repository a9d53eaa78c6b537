"""backends/cuda/flash.py, flash attention for prefill on f16 tensor cores, against the float64
attention of tests/reference.py over the values the f16 cache holds: awkward lengths (1, 7, 33
tokens), a chunk starting mid-cache, GQA groups 1, 3, 4, head_dim 16 and 32 under the simulator
(one warp of 16 rows, key tiles of 16: conftest's cuda_toy_shapes), the 8B shape (32 heads, 8 KV
heads, head_dim 128) at 512 and 4096 tokens on the GPU (NUMBAFORMER_TEST_GPU=1, marked `cuda`).

The bound (flash_bound), from the rounding the path does, per query row and output value, with
u = 2^-11 (f16, to nearest) and w_j the exact softmax weights over the visible keys j:
- Q * scale * log2 e is rounded to f16 (relative u, or 2^-25 absolute below f16's normal range,
  after an f32 product: 2^-24), K is the cache's own f16 value, the products are exact and the
  f32 sums err by at most head_dim 2^-23 of the sum of magnitudes; exp2 and the f32 subtraction
  of the max add a few 2^-22: every score s_j is off by at most
  E = max_j [scale sum_d ((u + 2^-24 + hd 2^-23) |q_d k_jd| + 2^-25 |k_jd|)] + 2^-20 (1 + max|s|);
- scores off by at most E move each weight by a factor within e^(+-2E): |dw_j| <= (e^2E - 1) w_j;
- P is rounded to f16 for P V (relative u, absolute 2^-25 under 2^-14, in a frame whose
  normalizer is >= 1) while l sums the f32 values: u sum_j w_j |v_j| + 2^-25 sum_j |v_j|;
- the f32 sums of O and l over n_keys keys and the rescalings: (n_keys + 4) 2^-23 sum_j w_j |v_j|.
So |out - ref| <= ((e^2E - 1)(1 + u) + u + (n_keys + 4) 2^-23) sum_j w_j |v_j| + 2^-25 sum_j |v_j|.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import reference as R
from ptx_tools import offline_ptx, ptxas_info

ON_GPU = os.environ.get("NUMBAFORMER_TEST_GPU") == "1"
pytestmark = pytest.mark.cuda if ON_GPU else []
U = 2.0**-11


@pytest.fixture
def cu(cuda_toy_shapes):
    """The CUDA backend; under the simulator with the toy tiles (flash: 1 warp, 16-key tiles)."""
    from numbaformer.backends.cuda.backend import CUDABackend
    return CUDABackend()


def flash_bound(q, k, v, q_pos, k_pos, n_head, n_kv, hd, scale):
    """The module docstring's bound on |out - R.attention(...)|, (n, n_head*hd), head by head."""
    n, group = len(q_pos), n_head // n_kv
    qh = q.astype(np.float64).reshape(n, n_head, hd)
    kh = k.astype(np.float64).reshape(len(k_pos), n_kv, hd)
    vh = np.abs(v.astype(np.float64).reshape(len(k_pos), n_kv, hd))
    vis = np.asarray(k_pos)[None, :] <= np.asarray(q_pos)[:, None]          # (n, m)
    n_keys = vis.sum(axis=1, keepdims=True)
    out = np.zeros((n, n_head, hd))
    for h in range(n_head):
        g = h // group
        s = qh[:, h] @ kh[:, g].T * scale
        mag = np.abs(qh[:, h]) @ np.abs(kh[:, g]).T * scale
        ksum = np.abs(kh[:, g]).sum(axis=1)[None, :] * scale
        err = (U + 2.0**-24 + hd * 2.0**-23) * mag + 2.0**-25 * ksum
        smax = np.where(vis, np.abs(s), 0).max(axis=1, keepdims=True) * 1.4426950408889634
        E = np.where(vis, err, 0).max(axis=1, keepdims=True) + 2.0**-20 * (1 + smax)
        s = np.where(vis, s, -np.inf)
        w = np.exp(s - s.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        rel = np.expm1(2 * E) * (1 + U) + U + (n_keys + 4) * 2.0**-23
        out[:, h] = rel * (w @ vh[:, g]) + 2.0**-25 * (vis @ vh[:, g])
    return out.reshape(n, n_head * hd) + 1e-30


def filled_cache(cu, kv_type, n_prev, n_new, n_head, n_kv, hd, n_ctx, seed, q_mag=1.0):
    """A one-layer cache holding n_prev + n_new tokens' K, V (written in two chunks) and the
    queries: (cache, q, k, v, pos), k and v as the cache holds them (f16-rounded for f16)."""
    from numbaformer.kvcache import KVCache
    cfg = type("C", (), {"n_layer": 1, "n_head_kv": n_kv, "head_dim": hd})
    cache = KVCache(cu, cfg, n_ctx, kv_type)
    rng = np.random.default_rng(seed)
    n = n_prev + n_new
    k = rng.standard_normal((n, n_kv * hd)).astype(np.float32)
    v = rng.standard_normal((n, n_kv * hd)).astype(np.float32)
    q = (q_mag * rng.standard_normal((n, n_head * hd))).astype(np.float32)
    if kv_type == "f16":
        k, v = k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
    pos = np.arange(n, dtype=np.int32)
    for a, b in ((0, n_prev), (n_prev, n)):
        if b > a:
            cu.kv_store(cache, 0, cu.to_device(k[a:b]), cu.to_device(v[a:b]),
                        cu.to_device(pos[a:b]))
    return cache, q, k, v, pos


def run_flash(cu, cache, q, pos, n_prev, hd):
    from numbaformer.backends.cuda import flash
    qn = q[n_prev:]
    out = cu.alloc(qn.shape)
    flash.flash_attention(out, cu.to_device(qn), cache.k, cache.v, 0, cu.to_device(pos[n_prev:]),
                          1 / np.sqrt(hd), cu.stream)
    return cu.to_host(out)


def check(got, q, k, v, pos, n_prev, n_head, n_kv, hd, groups=None):
    """got (the chunk's rows) within flash_bound of the float64 reference, for every KV group or
    the first and last `groups` of them (the float64 work at 4096 tokens); returns max err/bound."""
    assert np.all(np.isfinite(got))
    group, ratio = n_head // n_kv, 0.0
    kv = n_kv if groups is None else groups
    for g in sorted({*range(kv), *range(n_kv - kv, n_kv)}):
        qc, kc = slice(g * group * hd, (g + 1) * group * hd), slice(g * hd, (g + 1) * hd)
        qg, kg, vg = q[:, qc], k[:, kc], v[:, kc]
        ref = R.attention(qg, kg, vg, pos, pos, group, 1, hd)[n_prev:]
        bound = flash_bound(qg[n_prev:], kg, vg, pos[n_prev:], pos, group, 1, hd, 1 / np.sqrt(hd))
        err = np.abs(got[:, qc] - ref)
        assert np.all(err <= bound), f"group {g}: max err/bound {np.max(err / bound):.3f} at " \
                                     f"{np.unravel_index(np.argmax(err / bound), err.shape)}"
        ratio = max(ratio, float(np.max(err / bound)))
    return ratio


TOY = [  # (n_prev, n_new, n_head, n_kv, head_dim): lengths 1, 7, 33; groups 1, 3, 4; mid-cache
    (0, 1, 2, 2, 16), (0, 7, 3, 1, 16), (0, 33, 4, 1, 16), (20, 13, 6, 2, 32), (5, 7, 4, 4, 32)]
REAL = [(0, 512, 32, 8, 128), (0, 4096, 32, 8, 128), (3584, 512, 32, 8, 128), (0, 333, 32, 8, 64)]


@pytest.mark.parametrize("n_prev, n_new, n_head, n_kv, hd", REAL if ON_GPU else TOY)
def test_flash_against_float64(cu, n_prev, n_new, n_head, n_kv, hd, record_figure):
    """The kernel alone over an f16 cache filled in two chunks, the queries of the second chunk
    (a chunk starting mid-cache where n_prev > 0; the cache a few rows longer than used)."""
    cache, q, k, v, pos = filled_cache(cu, "f16", n_prev, n_new, n_head, n_kv, hd,
                                       n_prev + n_new + 5, seed=n_new + hd)
    got = run_flash(cu, cache, q, pos, n_prev, hd)
    ratio = check(got, q, k, v, pos, n_prev, n_head, n_kv, hd,
                  groups=2 if n_prev + n_new > 1024 else None)
    record_figure(f"flash attention err/bound ({n_prev}+{n_new} tokens, {n_head}/{n_kv} heads, "
                  f"hd {hd})", f"{ratio:.3f}")


def test_flash_large_scores_and_garbage_past_the_end(cu):
    """Peaked softmax (queries 8x: scores of tens, most weights underflow f16 P) and cache rows past
    the last position holding NaN and inf: the zero-filled tail keeps them out."""
    from numbaformer.backends.cuda import flash
    n_head, n_kv, hd = (4, 2, 16) if not ON_GPU else (32, 8, 128)
    n_new = 19 if not ON_GPU else 700
    cache, q, k, v, pos = filled_cache(cu, "f16", 0, n_new, n_head, n_kv, hd, n_new + 40,
                                       seed=3, q_mag=8.0)
    junk = np.full((1, n_kv, 40, hd), np.nan, np.float16)
    junk[..., ::2] = np.inf
    kh, vh = cu.to_host(cache.k), cu.to_host(cache.v)
    kh[:, :, n_new:], vh[:, :, n_new:] = junk, junk
    cache.k.copy_to_device(kh)
    cache.v.copy_to_device(vh)
    assert flash.supported(q, cache.k)
    got = run_flash(cu, cache, q, pos, 0, hd)
    check(got, q, k, v, pos, 0, n_head, n_kv, hd)


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_backend_attention_flag_exact_and_f32_cache(cu, monkeypatch, kv_type):
    """CUDABackend.attention with n > 1: with flash.ENABLED (NUMBAFORMER_FLASH=1; off by default
    until measured) an f16 cache goes through the flash kernel, within its bound; with `exact`, or
    an f32 cache, the FP32 kernel runs (the flash kernel is not called) within 2e-5."""
    from numbaformer.backends.cuda import flash
    monkeypatch.setattr(flash, "ENABLED", True)
    calls = []
    real_flash = flash.flash_attention
    monkeypatch.setattr(flash, "flash_attention", lambda *a: calls.append(1) or real_flash(*a))
    n_prev, n_new, n_head, n_kv, hd = (6, 9, 4, 2, 16) if not ON_GPU else (700, 77, 32, 8, 128)
    cache, q, k, v, pos = filled_cache(cu, kv_type, n_prev, n_new, n_head, n_kv, hd,
                                       n_prev + n_new, seed=11)
    ref = R.attention(q, k, v, pos, pos, n_head, n_kv, hd)[n_prev:]
    for exact in (False, True):
        cu.exact = exact
        try:
            out = cu.alloc((n_new, n_head * hd))
            cu.attention(out, cu.to_device(q[n_prev:]), cache, 0, cu.to_device(pos[n_prev:]),
                         1 / np.sqrt(hd))
            got = cu.to_host(out)
        finally:
            cu.exact = False
        took_flash = len(calls) == 1
        calls.clear()
        if kv_type == "f16" and not exact:
            assert took_flash
            check(got, q, k, v, pos, n_prev, n_head, n_kv, hd)
            assert np.max(np.abs(got - ref)) > 2e-5            # f16 rounding: not the FP32 path
        else:
            assert not took_flash
            np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)


@pytest.mark.skipif(ON_GPU, reason="an offline check (CI); device time is for the GPU checks")
@pytest.mark.parametrize("hd", [64, 128])
def test_ptx_flash(hd, record_figure):
    """The default kernel (FLASH_WARPS, FLASH_BN, FLASH_MIN_BLOCKS) for the 8B group (4) compiles
    to PTX with the f16 mma.sync, ldmatrix (plain and .trans) and cp.async, and where ptxas is
    installed assembles for sm_90 without spilling to local memory."""
    ptx = offline_ptx(f"""
from numbaformer.backends.cuda import flash as F
A = types.Array
sig = (A(f32, 2, "C"), A(f32, 2, "C"), A(types.float16, 4, "C"), A(types.float16, 4, "C"),
       types.int64, A(i32, 1, "C"), f32)
k = F._flash_kernel(F.FLASH_WARPS, F.FLASH_BN, {hd}, 4, F.FLASH_MIN_BLOCKS)
ptx["flash"] = compile(k, sig)
""")["flash"]
    for op in ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
               "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
               "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", "cp.async.cg.shared.global",
               "cp.async.commit_group", "cp.async.wait_group 0", "cvt.rn.f16x2.f32", "bar.sync",
               "shfl.sync.bfly", "ex2.approx"):
        assert op in ptx, op
    info = ptxas_info(ptx)
    if info is None:
        pytest.skip("no ptxas: PTX checked, registers and spills not")
    record_figure(f"flash attention hd {hd} (sm_90, ptxas)",
                  f"{info['registers']} regs, stack {info['stack']} B")
    assert info["spill_stores"] == 0 and info["spill_loads"] == 0, info
