"""backends/cuda/intrinsics.py: each Python fallback against an independent NumPy reference; the same
names inside simulated kernels (NUMBA_ENABLE_CUDASIM=1); the PTX instruction each emits, compiled
offline by NVVM (no GPU); and each against its fallback on a real GPU (`pytest -m cuda`)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import numbaformer.backends.cuda  # noqa: F401  (numpy shim before numba.cuda)
from numba import cuda
from numba.cuda.core import config
from numbaformer.backends.cuda.intrinsics import (dp4a, f16_bits_to_f32, load_u32x2, load_u32x4,
                                                  prmt, shf_r, shfl_down_sync, shfl_sync,
                                                  shfl_up_sync, shfl_xor_sync)

SIM = config.ENABLE_CUDASIM
GPU = not SIM and cuda.is_available()
needs_sim = pytest.mark.skipif(not SIM, reason="runs under NUMBA_ENABLE_CUDASIM=1")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (not the simulator)")
FULL = 0xFFFFFFFF
EDGE = np.array([0, 1, 0x7F, 0x80, 0xFF, 0x7F7F7F7F, 0x80808080, 0xFFFFFFFF, 0x01FF80FE],
                dtype=np.uint32)


# ---- independent references (vectorized NumPy) ----

def ref_f16(h):
    return (np.asarray(h, dtype=np.uint32) & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32)


def ref_dp4a(a, b, c):
    prod = a.view(np.int8).reshape(-1, 4).astype(np.int64) * b.view(np.int8).reshape(-1, 4)
    return (prod.sum(axis=1) + c).astype(np.int32)  # int64 -> int32 wraps like the hardware


def ref_prmt(a, b, sel):
    src = np.concatenate([a.view(np.uint8).reshape(-1, 4), b.view(np.uint8).reshape(-1, 4)], axis=1)
    nib = (sel.astype(np.uint32)[:, None] >> (4 * np.arange(4, dtype=np.uint32))) & 0xF
    byte = np.take_along_axis(src, (nib & 7).astype(np.int64), axis=1)
    sign = np.where(byte & 0x80, 0xFF, 0).astype(np.uint8)
    out = np.where(nib & 8, sign, byte).astype(np.uint8)
    return np.ascontiguousarray(out).view(np.uint32).ravel()


def ref_shf_r(lo, hi, n):
    wide = (hi.astype(np.uint64) << np.uint64(32)) | lo.astype(np.uint64)
    return (wide >> (n.astype(np.uint64) & np.uint64(31))).astype(np.uint32)


def ref_shuffles(x):
    """Rows: shfl_sync lane 3, xor 5, down 4, up 4, xor-butterfly warp sum, per thread of x."""
    i = np.arange(x.size)
    lane, base = i % 32, i - i % 32
    down = np.where(lane + 4 < 32, i + 4, i)
    up = np.where(lane >= 4, i - 4, i)
    sums = x.reshape(-1, 32).sum(axis=1).repeat(32)
    return np.stack([x[base + 3], x[base + (lane ^ 5)], x[down], x[up], sums])


def operands(n, seed=0):
    rng = np.random.default_rng(seed)
    a, b = (rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32) for _ in range(2))
    c = rng.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32)
    a[:EDGE.size], b[:EDGE.size] = EDGE, EDGE[::-1]
    c[:3] = [2**31 - 1, -2**31, 0]  # accumulator at the int32 limits: the sum must wrap
    return a, b, c


def fallback(fn, *arrays):
    return np.array([fn(*vals) for vals in zip(*arrays)])


# ---- the fallbacks compute what their docstrings say ----

def test_f16_fallback_exact_for_all_65536_inputs():
    h = np.arange(65536, dtype=np.uint32) | (np.uint32(0xABCD) << np.uint32(16))  # high bits ignored
    got, want = fallback(f16_bits_to_f32, h).astype(np.float32), ref_f16(h)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))  # -0.0, subnormals


def test_integer_fallbacks_match_references():
    a, b, c = operands(4096)
    assert fallback(dp4a, a, b, c).astype(np.int32).tolist() == ref_dp4a(a, b, c).tolist()
    assert fallback(prmt, a, b, c).astype(np.uint32).tolist() == ref_prmt(a, b, c).tolist()
    assert fallback(shf_r, a, b, c).astype(np.uint32).tolist() == ref_shf_r(a, b, c).tolist()
    assert dp4a(0x7F7F7F7F, 0x7F7F7F7F, 2**31 - 1) == np.int32(-2**31 + 4 * 127 * 127 - 1)
    assert prmt(0x33221100, 0x77665544, 0x3210) == 0x33221100  # identity
    assert prmt(0x0080FF01, 0, 0x8888) == 0               # sign of byte 0 (0x01) x4
    assert prmt(0x0080FF01, 0, 0x9999) == 0xFFFFFFFF      # sign of byte 1 (0xFF) x4
    assert shf_r(0x89ABCDEF, 0x01234567, 36) == 0x789ABCDE  # shift 36 wraps to 4


def test_load_fallbacks_return_consecutive_words():
    w = np.arange(16, dtype=np.uint32)
    assert load_u32x4(w, 2) == (8, 9, 10, 11)
    assert load_u32x2(w, 5) == (10, 11)


# ---- kernels shared by the simulator and GPU tests ----

@cuda.jit
def _loads_kernel(out4, out2, w):
    """Thread i reads words 4i..4i+3 once as a v4 load and once as two v2 loads."""
    i = cuda.grid(1)
    if i < out4.size // 4:
        a, b, c, d = load_u32x4(w, i)
        out4[4 * i], out4[4 * i + 1], out4[4 * i + 2], out4[4 * i + 3] = a, b, c, d
        e, f = load_u32x2(w, 2 * i)
        g, h = load_u32x2(w, 2 * i + 1)
        out2[4 * i], out2[4 * i + 1], out2[4 * i + 2], out2[4 * i + 3] = e, f, g, h


@cuda.jit
def _f16_kernel(out, h):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = f16_bits_to_f32(h[i])


@cuda.jit
def _int_kernel(d, p, s, a, b, c):
    i = cuda.grid(1)
    if i < d.size:
        d[i] = dp4a(a[i], b[i], c[i])
        p[i] = prmt(a[i], b[i], c[i])
        s[i] = shf_r(a[i], b[i], c[i])


@cuda.jit
def _shuffle_kernel(out, x):
    """One value per thread; whole warps (blockDim a multiple of 32) all take part."""
    i = cuda.grid(1)
    v = x[i]
    out[0, i] = shfl_sync(FULL, v, 3)
    out[1, i] = shfl_xor_sync(FULL, v, 5)
    out[2, i] = shfl_down_sync(FULL, v, 4)
    out[3, i] = shfl_up_sync(FULL, v, 4)
    offset = 16
    while offset:
        v += shfl_xor_sync(FULL, v, offset)
        offset //= 2
    out[4, i] = v


def run_all(n_words, f16_bits, a, b, c, x, block=32):
    """Launch every kernel; returns host results keyed like the references."""
    w = np.random.default_rng(1).integers(0, 2**32, n_words, dtype=np.uint64).astype(np.uint32)
    out4, out2 = (cuda.to_device(np.zeros_like(w)) for _ in range(2))
    _loads_kernel[(n_words // 4 + block - 1) // block, block](out4, out2, cuda.to_device(w))
    f = cuda.device_array(f16_bits.size, np.float32)
    _f16_kernel[(f16_bits.size + block - 1) // block, block](f, cuda.to_device(f16_bits))
    d, p, s = cuda.device_array(a.size, np.int32), *(cuda.device_array(a.size, np.uint32) for _ in "ps")
    _int_kernel[(a.size + block - 1) // block, block](d, p, s, *map(cuda.to_device, (a, b, c)))
    sh = cuda.device_array((5, x.size), np.float32)
    _shuffle_kernel[x.size // 64, 64](sh, cuda.to_device(x))
    return dict(w=w, out4=out4.copy_to_host(), out2=out2.copy_to_host(), f16=f.copy_to_host(),
                dp4a=d.copy_to_host(), prmt=p.copy_to_host(), shf_r=s.copy_to_host(),
                shfl=sh.copy_to_host())


def check_results(r, f16_bits, a, b, c, x, want):
    """want(name, fallback, *arrays) -> expected array: the reference or the fallback itself."""
    assert np.array_equal(r["out4"], r["w"]) and np.array_equal(r["out2"], r["w"])
    exp = want(ref_f16, f16_bits_to_f32, f16_bits).astype(np.float32)
    nan = np.isnan(exp)
    assert np.array_equal(np.isnan(r["f16"]), nan)
    assert np.array_equal(r["f16"][~nan].view(np.uint32), exp[~nan].view(np.uint32))
    assert np.array_equal(r["dp4a"], want(ref_dp4a, dp4a, a, b, c).astype(np.int32))
    assert np.array_equal(r["prmt"], want(ref_prmt, prmt, a, b, c).astype(np.uint32))
    assert np.array_equal(r["shf_r"], want(ref_shf_r, shf_r, a, b, c).astype(np.uint32))
    assert np.array_equal(r["shfl"], ref_shuffles(x))


@needs_sim
def test_simulated_kernels_use_the_fallbacks():
    f16_bits = np.array([0, 0x8000, 1, 0x3C00, 0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x03FF, 0xC000],
                        dtype=np.uint32)
    a, b, c = operands(40)
    x = np.arange(64, dtype=np.float32)
    r = run_all(64, f16_bits, a, b, c, x)
    check_results(r, f16_bits, a, b, c, x, lambda ref, fb, *arrays: ref(*arrays))


@needs_sim
def test_simulated_shuffle_outside_mask_is_an_error():
    @cuda.jit
    def half_warp(out):
        i = cuda.grid(1)
        out[i] = shfl_xor_sync(0xFFFF, i, 16)  # lanes 0-15 read lanes 16-31, outside the mask

    with pytest.raises(RuntimeError, match="outside mask"):
        half_warp[1, 32](np.zeros(32, np.int64))


@pytest.mark.cuda
@needs_gpu
def test_gpu_intrinsics_match_fallbacks():
    f16_bits = np.arange(65536, dtype=np.uint32)
    a, b, c = operands(1 << 16)
    x = np.random.default_rng(2).integers(-1000, 1000, 1024).astype(np.float32)
    r = run_all(1 << 14, f16_bits, a, b, c, x, block=256)
    check_results(r, f16_bits, a, b, c, x, lambda ref, fb, *arrays: fallback(fb, *arrays))


# ---- PTX, compiled offline by NVVM in a subprocess with the simulator off ----

_PTX_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import numbaformer.backends.cuda
from numba import cuda, types
import numba.cuda.dispatcher as d
d.get_current_device = lambda: type("F", (), {"compute_capability": (9, 0)})()  # offline only
import test_cuda_intrinsics as t
u, i, f = types.uint32[::1], types.int32[::1], types.float32[::1]
sigs = {"_loads_kernel": (u, u, u), "_f16_kernel": (f, u), "_int_kernel": (i, u, u, u, u, i),
        "_shuffle_kernel": (types.float32[:, ::1], f)}
try:
    ptx = {k: cuda.compile_ptx(getattr(t, k).py_func, s, cc=(9, 0))[0] for k, s in sigs.items()}
except Exception as e:  # only a missing toolchain (NVRTC, NVVM, libdevice) skips; bugs fail
    if type(e).__name__ not in ("DynamicLibNotFoundError", "FileNotFoundError", "NvvmSupportError",
                                "CudaSupportError", "ImportError", "OSError"):
        raise
    ptx = {"skip": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
print(json.dumps(ptx))
"""


def test_ptx_has_the_instructions():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    done = subprocess.run([sys.executable, "-c", _PTX_SCRIPT, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ptx = json.loads(done.stdout.splitlines()[-1])
    if "skip" in ptx:
        pytest.skip(f"NVVM unavailable: {ptx['skip']}")
    loads = ptx["_loads_kernel"]
    assert loads.count("ld.global.nc.v4.u32") == 1 and loads.count("ld.global.nc.v2.u32") == 2
    assert "cvt.f32.f16" in ptx["_f16_kernel"]
    for op in ("dp4a.s32.s32", "prmt.b32", "shf.r.wrap.b32"):
        assert op in ptx["_int_kernel"], op
    for mode in ("idx", "bfly", "down", "up"):
        assert f"shfl.sync.{mode}.b32" in ptx["_shuffle_kernel"], mode
