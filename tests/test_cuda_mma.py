"""backends/cuda/mma.py: every tensor-core primitive against NumPy on random tiles, the fragments
laid out by this file's own reading of the PTX ISA (not the module's tables). Under the simulator
(CI) the module's warp-level emulations run; with NUMBAFORMER_TEST_GPU=1 the same checks run on the
GPU (marked `cuda`). Offline, a kernel using every primitive compiles to PTX with each instruction
present and, where ptxas is installed, assembles for sm_90 without spills."""
from __future__ import annotations

import os

import numpy as np
import pytest
from ptx_tools import offline_ptx, ptxas_info

import numbaformer.backends.cuda  # noqa: F401  (numpy shim before numba.cuda)
from numba import cuda, float32, int32, uint32
from numba.cuda.core import config
from numbaformer.backends.cuda.mma import (cp_async16, cp_async_commit, cp_async_wait,
                                           ldmatrix_x1, ldmatrix_x2, ldmatrix_x2_trans,
                                           ldmatrix_x4, ldmatrix_x4_trans, load_shared_u32x4,
                                           mma_bf16, mma_f16, mma_s8, mma_s8_k16, pack_bf16x2,
                                           pack_f16x2, store_shared_u32x4)

SIM = config.ENABLE_CUDASIM
ON_GPU = os.environ.get("NUMBAFORMER_TEST_GPU") == "1"
pytestmark = pytest.mark.cuda if ON_GPU else []
needs_sim = pytest.mark.skipif(not SIM, reason="checks the simulator's emulation")


# ---- fragments, written from the PTX ISA's tables ("Matrix fragments for mma.m16n8k16 with
# ---- floating point type", "... with integer type", "mma.m16n8k32"), element by element ----

def lane_gt(lane):
    return lane >> 2, lane % 4                        # groupID, threadID_in_group


def frag_a(A, kind):
    """A (16, k) -> (32, n_elements) per lane, element i = a_i of the ISA."""
    n = {"f16": 8, "s8": 16, "s8k16": 8}[kind]
    out = np.zeros((32, n), dtype=A.dtype)
    for lane in range(32):
        g, t = lane_gt(lane)
        for i in range(n):
            if kind == "f16":
                row = g if i in (0, 1, 4, 5) else g + 8
                col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
            elif kind == "s8":
                row = g if i < 4 or 8 <= i < 12 else g + 8
                col = t * 4 + (i & 3) + (16 if i >= 8 else 0)
            else:
                row = g if i < 4 else g + 8
                col = t * 4 + (i & 3)
            out[lane, i] = A[row, col]
    return out


def frag_b(B, kind):
    """B (k, 8) -> (32, n_elements): b_i of the ISA."""
    n = {"f16": 4, "s8": 8, "s8k16": 4}[kind]
    out = np.zeros((32, n), dtype=B.dtype)
    for lane in range(32):
        g, t = lane_gt(lane)
        for i in range(n):
            if kind == "f16":
                row = t * 2 + (i & 1) + (8 if i >= 2 else 0)
            else:
                row = t * 4 + (i & 3) + (16 if i >= 4 else 0)
            out[lane, i] = B[row, g]
    return out


def frag_c(C):
    out = np.zeros((32, 4), dtype=C.dtype)
    for lane in range(32):
        g, t = lane_gt(lane)
        for i in range(4):
            out[lane, i] = C[g + 8 * (i >= 2), t * 2 + (i & 1)]
    return out


def unfrag_c(D):
    out = np.zeros((16, 8), dtype=D.dtype)
    for lane in range(32):
        g, t = lane_gt(lane)
        for i in range(4):
            out[g + 8 * (i >= 2), t * 2 + (i & 1)] = D[lane, i]
    return out


def regs(values, bits):
    """(32, n) elements of `bits` bits (uint16 bit patterns or int8) -> (32, n*bits/32) uint32
    registers, lowest element in the low bits."""
    dtype = np.uint16 if bits == 16 else np.int8
    return np.ascontiguousarray(values.astype(dtype)).view(np.uint32)


def bf16_bits(x):
    """Round float32 to bf16 (to nearest, even): the uint16 bit patterns. NaN -> 0x7FFF."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FFF), r)


def bf16_value(bits):
    return (np.asarray(bits, np.uint32) << 16).view(np.float32).astype(np.float64)


def random_bf16(rng, shape):
    return bf16_bits(rng.standard_normal(shape).astype(np.float32))


def random_f16(rng, shape):
    return rng.standard_normal(shape).astype(np.float16).view(np.uint16)


# ---- kernels: one warp; lane l reads its registers from row l ----

@cuda.jit
def _mma_kernel(d16, dh, d8, d8k16, a16, b16, ah, bh, a8, b8, a8k, b8k, cf, ci):
    l = cuda.threadIdx.x
    r = mma_bf16(a16[l, 0], a16[l, 1], a16[l, 2], a16[l, 3], b16[l, 0], b16[l, 1],
                 cf[l, 0], cf[l, 1], cf[l, 2], cf[l, 3])
    d16[l, 0], d16[l, 1], d16[l, 2], d16[l, 3] = r
    r = mma_f16(ah[l, 0], ah[l, 1], ah[l, 2], ah[l, 3], bh[l, 0], bh[l, 1],
                cf[l, 0], cf[l, 1], cf[l, 2], cf[l, 3])
    dh[l, 0], dh[l, 1], dh[l, 2], dh[l, 3] = r
    s = mma_s8(a8[l, 0], a8[l, 1], a8[l, 2], a8[l, 3], b8[l, 0], b8[l, 1],
               ci[l, 0], ci[l, 1], ci[l, 2], ci[l, 3])
    d8[l, 0], d8[l, 1], d8[l, 2], d8[l, 3] = s
    s = mma_s8_k16(a8k[l, 0], a8k[l, 1], b8k[l, 0], ci[l, 0], ci[l, 1], ci[l, 2], ci[l, 3])
    d8k16[l, 0], d8k16[l, 1], d8k16[l, 2], d8k16[l, 3] = s


def run_mma(seed=0):
    rng = np.random.default_rng(seed)
    A, B = random_bf16(rng, (16, 16)), random_bf16(rng, (16, 8))
    Ah, Bh = random_f16(rng, (16, 16)), random_f16(rng, (16, 8))
    A8, B8 = (rng.integers(-128, 128, s).astype(np.int8) for s in ((16, 32), (32, 8)))
    A8k, B8k = (rng.integers(-128, 128, s).astype(np.int8) for s in ((16, 16), (16, 8)))
    C = rng.standard_normal((16, 8)).astype(np.float32)
    Ci = rng.integers(-2**31, 2**31, (16, 8)).astype(np.int32)
    Ci[0, 0], Ci[0, 1] = 2**31 - 1, -2**31                       # the sum must wrap
    args = [regs(frag_a(A, "f16"), 16), regs(frag_b(B, "f16"), 16),
            regs(frag_a(Ah, "f16"), 16), regs(frag_b(Bh, "f16"), 16),
            regs(frag_a(A8, "s8"), 8), regs(frag_b(B8, "s8"), 8),
            regs(frag_a(A8k, "s8k16"), 8), regs(frag_b(B8k, "s8k16"), 8),
            frag_c(C), frag_c(Ci)]
    outs = [cuda.to_device(np.zeros((32, 4), dt)) for dt in (np.float32, np.float32, np.int32,
                                                              np.int32)]
    _mma_kernel[1, 32](*outs, *map(cuda.to_device, args))
    got = [unfrag_c(o.copy_to_host()) for o in outs]
    fa, fb = bf16_value(A), bf16_value(B)
    ha, hb = Ah.view(np.float16).astype(np.float64), Bh.view(np.float16).astype(np.float64)
    wrap = lambda v: v.astype(np.int64).astype(np.int32)          # noqa: E731
    want = [fa @ fb + C, ha @ hb + C, wrap(A8.astype(np.int64) @ B8 + Ci),
            wrap(A8k.astype(np.int64) @ B8k + Ci)]
    scale = [np.abs(fa) @ np.abs(fb) + np.abs(C), np.abs(ha) @ np.abs(hb) + np.abs(C)]
    return got, want, scale


def test_mma_every_form_against_numpy():
    """bf16 and f16 m16n8k16 (f32 accumulators), s8 m16n8k32 and m16n8k16 (s32, wrapping): D from
    lane fragments equals NumPy's A @ B + C (float: to f32 summation, 16 terms)."""
    for seed in range(2):
        got, want, scale = run_mma(seed)
        for g, w, s in zip(got[:2], want[:2], scale):
            assert np.all(np.abs(g - w) <= 32 * 2.0**-24 * s)
        np.testing.assert_array_equal(got[2], want[2])
        np.testing.assert_array_equal(got[3], want[3])


@cuda.jit
def _ldmatrix_kernel(out, tile, row_of):
    """tile (64 chunks of 4 words) -> shared by 16-byte stores; each ldmatrix form with lane l
    giving chunk row_of[l]; out (5, 32, 4) uint32 (unused words 0). Also the 16-byte shared
    load: out[5, l] = chunk l of the shared tile."""
    sm = cuda.shared.array(256, uint32)
    l = cuda.threadIdx.x
    for c in range(l, 64, 32):
        store_shared_u32x4(sm, c, tile[4 * c], tile[4 * c + 1], tile[4 * c + 2], tile[4 * c + 3])
    cuda.syncthreads()
    i = row_of[l]
    out[0, l, 0], out[0, l, 1], out[0, l, 2], out[0, l, 3] = ldmatrix_x4(sm, i)
    out[1, l, 0], out[1, l, 1] = ldmatrix_x2(sm, i)
    out[2, l, 0] = ldmatrix_x1(sm, i)
    out[3, l, 0], out[3, l, 1], out[3, l, 2], out[3, l, 3] = ldmatrix_x4_trans(sm, i)
    out[4, l, 0], out[4, l, 1] = ldmatrix_x2_trans(sm, i)
    out[5, l, 0], out[5, l, 1], out[5, l, 2], out[5, l, 3] = load_shared_u32x4(sm, l)


def test_ldmatrix_every_form_against_numpy():
    """Lane l addresses a random chunk (one 8-value row) of a shared tile; lane (g, t) receives,
    per matrix m, row g's values 2t, 2t+1 (transposed: row 2t's and 2t+1's value g)."""
    rng = np.random.default_rng(3)
    tile = rng.integers(0, 2**32, 256, dtype=np.uint64).astype(np.uint32)
    row_of = rng.permutation(64)[:32].astype(np.int32)
    out = cuda.to_device(np.zeros((6, 32, 4), np.uint32))
    _ldmatrix_kernel[1, 32](out, cuda.to_device(tile), cuda.to_device(row_of))
    got = out.copy_to_host()
    vals = tile.view(np.uint16).reshape(64, 8)                     # chunk -> its 8 values
    for form, (n, trans) in enumerate([(4, False), (2, False), (1, False), (4, True), (2, True)]):
        for lane in range(32):
            g, t = lane_gt(lane)
            for m in range(n):
                rows = vals[row_of[8 * m:8 * m + 8]]               # matrix m's 8 rows
                lo, hi = (rows[2 * t, g], rows[2 * t + 1, g]) if trans else \
                    (rows[g, 2 * t], rows[g, 2 * t + 1])
                assert got[form, lane, m] == int(lo) | int(hi) << 16, (form, lane, m)
            assert not got[form, lane, n:].any()
    np.testing.assert_array_equal(got[5], tile.reshape(64, 4)[:32])


@cuda.jit
def _cp_async_kernel(out, before, src):
    """Thread l copies chunk l of src to shared chunk (5 l) % 32 (group 1) and chunk 32 + l to
    chunk 32 + l (group 2); `before` records its first destination right after the copies were
    issued; out = the shared array after both waits and a barrier (thread l writes chunk l)."""
    sm = cuda.shared.array(256, uint32)
    l = cuda.threadIdx.x
    for c in range(4):
        sm[4 * l + c] = 0
        sm[128 + 4 * l + c] = 0
    cuda.syncthreads()
    d = (5 * l) % 32
    cp_async16(sm, d, src, l)
    cp_async_commit()
    cp_async16(sm, 32 + l, src, 32 + l)
    cp_async_commit()
    before[l] = sm[4 * d]
    cp_async_wait(1)                   # the first group is complete for this thread
    out[1, l] = sm[4 * d] == src[4 * l]
    cp_async_wait(0)
    cuda.syncthreads()                 # every thread's copies visible to all
    for c in range(4):
        out[0, 4 * l + c] = sm[4 * l + c]
        out[0, 128 + 4 * l + c] = sm[128 + 4 * l + c]


def test_cp_async_groups_and_waits():
    rng = np.random.default_rng(4)
    src = rng.integers(1, 2**32, 256, dtype=np.uint64).astype(np.uint32)
    out = cuda.to_device(np.zeros((2, 256), np.uint32))
    before = cuda.to_device(np.ones(32, np.uint32))
    _cp_async_kernel[1, 32](out, before, cuda.to_device(src))
    got = out.copy_to_host()
    want = np.zeros(256, np.uint32)
    for l in range(32):
        want[4 * ((5 * l) % 32):4 * ((5 * l) % 32) + 4] = src[4 * l:4 * l + 4]
    want[128:] = src[128:]
    np.testing.assert_array_equal(got[0], want)
    assert got[1, :32].all()           # after wait_group 1: this thread's first copy has landed
    if SIM:                            # the emulation holds copies until their wait
        assert not before.copy_to_host().any()


@cuda.jit
def _pack_kernel(out, x):
    i = cuda.grid(1)
    if i < out.shape[1]:
        out[0, i] = pack_bf16x2(x[2 * i], x[2 * i + 1])
        out[1, i] = pack_f16x2(x[2 * i], x[2 * i + 1])


def test_pack_rounds_to_nearest_even():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(4096) * np.exp2(rng.integers(-20, 20, 4096))).astype(np.float32)
    bits = x.view(np.uint32)
    bits[:8] = [0x3F808000, 0x3F818000, 0x3F80FFFF, 0xBF808001, 0x7F7FFFFF, 0x00000001,
                0x80000000, 0x7F800000]                             # ties to even, carries, edges
    x[8:16] = [65504.0, 65520.0, 2.0**-25, 1e9, -1e-9, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 0]
    out = cuda.to_device(np.zeros((2, 2048), np.uint32))
    _pack_kernel[(2048 + 255) // 256, 256](out, cuda.to_device(x))
    got = out.copy_to_host()
    np.testing.assert_array_equal(got[0].view(np.uint16), bf16_bits(x))
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(got[1].view(np.uint16), x.astype(np.float16).view(np.uint16))


# ---- one kernel through every primitive: cp.async -> ldmatrix -> mma, as a GEMM stages a tile ----

@cuda.jit
def _tile_kernel(d, x, w, wt):
    """x, w: (16, 16) uint32, two 16-row tiles of 64 bytes per row; wt: (32, 8) uint32, w's bf16
    view transposed (32 k-rows of 16 n values). Staged to shared by cp.async, then, from ldmatrix
    fragments: d[0] = x @ w^T in bf16 (k = 32: two mma_bf16 per n-tile), d[1] the same with B
    from wt by ldmatrix .trans, d[2] in f16, d[3] = x @ w^T in s8 (k = 64: two mma_s8), d[4] the
    same by four mma_s8_k16 (A by ldmatrix_x2, B by ldmatrix_x1). d (5, 16, 16) f32."""
    xs = cuda.shared.array(256, uint32)
    ws = cuda.shared.array(256, uint32)
    ts = cuda.shared.array(256, uint32)
    l = cuda.threadIdx.x
    for c in range(l, 64, 32):
        cp_async16(xs, c, x, c)
        cp_async16(ws, c, w, c)
        cp_async16(ts, c, wt, c)
    cp_async_commit()
    cp_async_wait(0)
    cuda.syncthreads()
    g = l // 4
    t = l % 4
    for form in range(4):
        for nt in range(2):
            c0 = c1 = c2 = c3 = float32(0)
            i0 = i1 = i2 = i3 = int32(0)
            for ks in range(2):
                a0, a1, a2, a3 = ldmatrix_x4(xs, (l & 15) * 4 + 2 * ks + (l >> 4))
                if form == 1:
                    b0, b1, _, _ = ldmatrix_x4_trans(ts, (16 * ks + (l & 15)) * 2 + nt)
                else:
                    b0, b1 = ldmatrix_x2(ws, (8 * nt + (l & 7)) * 4 + 2 * ks + ((l >> 3) & 1))
                if form == 2:
                    c0, c1, c2, c3 = mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)
                elif form == 3:
                    i0, i1, i2, i3 = mma_s8(a0, a1, a2, a3, b0, b1, i0, i1, i2, i3)
                else:
                    c0, c1, c2, c3 = mma_bf16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)
            if form == 3:
                c0, c1, c2, c3 = float32(i0), float32(i1), float32(i2), float32(i3)
            col = 8 * nt + 2 * t
            d[form, g, col], d[form, g, col + 1], d[form, g + 8, col], d[form, g + 8, col + 1] = \
                c0, c1, c2, c3
    for nt in range(2):
        i0 = i1 = i2 = i3 = int32(0)
        for ks in range(4):
            a0, a1 = ldmatrix_x2(xs, (l & 15) * 4 + ks)
            b0 = ldmatrix_x1(ws, (8 * nt + (l & 7)) * 4 + ks)
            i0, i1, i2, i3 = mma_s8_k16(a0, a1, b0, i0, i1, i2, i3)
        col = 8 * nt + 2 * t
        d[4, g, col], d[4, g, col + 1], d[4, g + 8, col], d[4, g + 8, col + 1] = \
            float32(i0), float32(i1), float32(i2), float32(i3)


def test_every_primitive_in_one_tile_kernel():
    rng = np.random.default_rng(6)
    X = rng.integers(0, 2**32, (16, 16), dtype=np.uint64).astype(np.uint32)
    W = rng.integers(0, 2**32, (16, 16), dtype=np.uint64).astype(np.uint32)
    for M in (X, W):                   # bf16 and f16 views finite and moderate: exponent 0x3F/0x3C
        h = M.view(np.uint16)
        h &= np.uint16(0x83FF)
        h |= np.uint16(0x3C00)
    wt = np.ascontiguousarray(W.view(np.uint16).T).view(np.uint32)  # (32, 8)
    d = cuda.to_device(np.zeros((5, 16, 16), np.float32))
    _tile_kernel[1, 32](d, cuda.to_device(X), cuda.to_device(W), cuda.to_device(wt))
    got = d.copy_to_host()
    xb, wb = bf16_value(X.view(np.uint16)), bf16_value(W.view(np.uint16))
    xh = X.view(np.float16).astype(np.float64)
    wh = W.view(np.float16).astype(np.float64)
    x8, w8 = X.view(np.int8).astype(np.float64), W.view(np.int8).astype(np.float64)
    for k, (a, b) in enumerate([(xb, wb), (xb, wb), (xh, wh)]):
        ref = a @ b.T
        assert np.all(np.abs(got[k] - ref) <= 64 * 2.0**-24 * (np.abs(a) @ np.abs(b).T)), k
    np.testing.assert_array_equal(got[3], x8 @ w8.T)
    np.testing.assert_array_equal(got[4], x8 @ w8.T)


@pytest.mark.skipif(ON_GPU, reason="an offline check (CI); device time is for the GPU checks")
def test_ptx_every_primitive_no_spills():
    """NVVM emits each instruction; ptxas (if installed) assembles for sm_90 without spilling."""
    ptx = offline_ptx("""
import test_cuda_mma as t
A2 = types.Array
ptx["tile"] = compile(t._tile_kernel, (A2(f32, 3, "C"), A2(u32, 2, "C"), A2(u32, 2, "C"), A2(u32, 2, "C")))
ptx["pack"] = compile(t._pack_kernel, (A2(u32, 2, "C"), A2(f32, 1, "C")))
ptx["ldmatrix"] = compile(t._ldmatrix_kernel, (A2(u32, 3, "C"), A2(u32, 1, "C"), A2(i32, 1, "C")))
""")
    tile = ptx["tile"]
    for op in ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
               "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
               "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32",
               "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32",
               "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "ldmatrix.sync.aligned.m8n8.x2.shared.b16",
               "ldmatrix.sync.aligned.m8n8.x1.shared.b16",
               "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
               "cp.async.cg.shared.global", "cp.async.commit_group", "cp.async.wait_group 0"):
        assert op in tile, op
    assert "cvt.rn.bf16x2.f32" in ptx["pack"] and "cvt.rn.f16x2.f32" in ptx["pack"]
    for op in ("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16", "st.shared.v4.u32",
               "ld.shared.v4.u32"):
        assert op in ptx["ldmatrix"], op
    for name, text in ptx.items():
        info = ptxas_info(text)
        if info is None:
            pytest.skip("no ptxas: PTX checked, registers and spills not")
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (name, info)
