"""backends/cuda/graph.py and launch.py: the simulator fallbacks (NUMBA_ENABLE_CUDASIM=1), and on a real
GPU (`pytest -m cuda`) graph capture and replay, capture errors, PreparedLaunch, FastKernel (every
kernel's launch path), and the dynamic shared memory opt-in; offline (NVVM), both launchers'
marshalling against the PTX parameter list."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import numbaformer.backends.cuda  # noqa: F401  (numpy shim before numba.cuda)
from numba import cuda
from numba.cuda.core import config
from numbaformer.backends.cuda.graph import CudaGraph, GraphError, compile_for, graphs_supported
from numbaformer.backends.cuda.launch import (FastKernel, PreparedLaunch, fast_kernel,
                                              set_max_dynamic_shared_memory)

SIM = config.ENABLE_CUDASIM
GPU = not SIM and cuda.is_available()
needs_sim = pytest.mark.skipif(not SIM, reason="runs under NUMBA_ENABLE_CUDASIM=1")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (not the simulator)")


@cuda.jit
def _accumulate(counter, value):
    """One thread: counter[0] += value[0]; both (1,) int64. The value is read from device memory, so a
    replayed graph sees what the host wrote there since."""
    if cuda.grid(1) == 0:
        counter[0] += value[0]


@cuda.jit
def _axpy(out, x, a, n):
    """out[i] = a * x[i] + out[i], one thread per element; (n,) float32."""
    i = cuda.grid(1)
    if i < n:
        out[i] = a * x[i] + out[i]


@cuda.jit
def _dynamic_shared_sum(out, n_words):
    """One block: its threads fill n_words int32 of dynamic shared memory with 0..n_words-1 (strided
    by blockDim), sync so all are written, then thread 0 sums them into out[0]."""
    smem = cuda.shared.array(0, np.int32)
    for j in range(cuda.threadIdx.x, n_words, cuda.blockDim.x):
        smem[j] = j
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        total = 0
        for j in range(n_words):
            total += smem[j]
        out[0] = total


def capture_and_replay(n_launches, values):
    """Capture n_launches of _accumulate, replay once per value with value[0] set before each replay;
    returns the counter right after capture and at the end (expected 0 and n_launches * sum)."""
    stream = cuda.stream()
    counter = cuda.to_device(np.zeros(1, np.int64), stream=stream)
    value = cuda.to_device(np.zeros(1, np.int64), stream=stream)
    compile_for(_accumulate, counter, value)

    def step():
        for _ in range(n_launches):
            _accumulate[1, 1, stream](counter, value)

    with CudaGraph() as graph:
        graph.capture(stream, step)
        after_capture = counter.copy_to_host(stream=stream)
        for v in values:
            value.copy_to_device(np.array([v], np.int64), stream=stream)
            graph.launch(stream)
        final = counter.copy_to_host(stream=stream)
        stream.synchronize()
    return after_capture[0], final[0]


# ---- simulator ----

@needs_sim
def test_sim_graph_calls_fn_on_each_launch():
    assert not graphs_supported()
    values = [3, -1, 7]
    assert capture_and_replay(20, values) == (0, 20 * sum(values))


@needs_sim
def test_sim_graph_misuse():
    graph = CudaGraph()
    with pytest.raises(GraphError):
        graph.launch(0)
    with pytest.raises(ValueError):
        graph.capture(0, lambda: None, mode="loose")
    graph.capture(0, lambda: None)
    with pytest.raises(GraphError):
        graph.capture(0, lambda: None)
    graph.close()
    graph.capture(0, lambda: None)


@needs_sim
def test_sim_prepared_launch():
    n = 40
    x = np.arange(n, dtype=np.float32)
    out = cuda.to_device(np.zeros(n, np.float32))
    launch = PreparedLaunch(_axpy, 2, 32, 0, (out, cuda.to_device(x), np.float32(2.0), n))
    launch()
    launch.set_arg(2, np.float32(-1.0))
    launch()
    np.testing.assert_array_equal(out.copy_to_host(), x)  # 2x - x


# ---- GPU ----

def per_launch_us(stream, fn, reps=2000):
    """Host microseconds a call of fn (a launch on stream), over reps calls, the stream drained."""
    stream.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    stream.synchronize()
    return (time.perf_counter() - t) / reps * 1e6


@pytest.mark.cuda
@needs_gpu
def test_gpu_graph_replays_300_launches_reading_device_values():
    assert graphs_supported()
    values = [1, 5, -2, 1000, 7, 0, 3, 11, -9, 2]
    assert capture_and_replay(300, values) == (0, 300 * sum(values))


@pytest.mark.cuda
@needs_gpu
def test_gpu_capture_error_is_raised_and_stream_stays_usable():
    stream = cuda.stream()
    graph = CudaGraph()
    with pytest.raises(Exception):
        graph.capture(stream, stream.synchronize)  # synchronizing a capturing stream is illegal
    graph.close()
    counter = cuda.to_device(np.zeros(1, np.int64), stream=stream)
    value = cuda.to_device(np.ones(1, np.int64), stream=stream)
    compile_for(_accumulate, counter, value)
    graph.capture(stream, lambda: _accumulate[1, 1, stream](counter, value))
    graph.launch(stream)
    stream.synchronize()
    graph.close()
    assert counter.copy_to_host()[0] == 1


@pytest.mark.cuda
@needs_gpu
def test_gpu_prepared_launch_matches_numba(record_figure):
    """PreparedLaunch gives numba's launch results, its arguments replaced in place; its cost per
    launch beside the dispatcher's is a recorded figure, not an assertion (a timing, which a busy
    host can invert: speed is for the benchmarks, scripts/gpu_launch_check.py and bench --kernels)."""
    n, stream = 1 << 20, cuda.stream()
    x = cuda.to_device(np.arange(n, dtype=np.float32), stream=stream)
    out = cuda.to_device(np.zeros(n, np.float32), stream=stream)
    grid = (n + 255) // 256
    launch = PreparedLaunch(_axpy, grid, 256, stream, (out, x, np.float32(2.0), n))
    launch()
    launch.set_arg(2, np.float32(-1.0))
    launch()
    stream.synchronize()
    np.testing.assert_array_equal(out.copy_to_host(), np.arange(n, dtype=np.float32))

    counter, value = (cuda.to_device(np.zeros(1, np.int64), stream=stream) for _ in "cv")
    small = PreparedLaunch(_accumulate, 1, 32, stream, (counter, value))
    dispatcher = _accumulate[1, 32, stream]
    t_numba = per_launch_us(stream, lambda: dispatcher(counter, value))
    t_prepared = per_launch_us(stream, small)
    record_figure("per launch: numba dispatcher / PreparedLaunch",
                  f"{t_numba:.1f} / {t_prepared:.1f} us")
    assert counter.copy_to_host()[0] == 4000              # every timed launch ran


@cuda.jit
def _mixed(out, x, w, a, n, flag, b, u):
    """out[i] = a * x[i] + w[i, 1] + b (+ u if flag), i < n; every kind of argument FastKernel packs:
    arrays of 1 and 2 dimensions (one a strided view), float32/float64/int32/uint32/Python int/bool."""
    i = cuda.grid(1)
    if i < n:
        v = a * x[i] + w[i, 1] + b
        out[i] = v + u if flag else v


@needs_sim
def test_sim_fast_kernel_is_the_dispatcher():
    assert fast_kernel(_axpy) is _axpy


@pytest.mark.cuda
@needs_gpu
def test_gpu_fast_kernel_matches_numba(record_figure):
    """FastKernel gives numba's launch results (the same bits, every argument kind, one signature
    prepared once, a host array copied as numba's launch does); its cost per launch is a recorded
    figure (the H200 run of 2026-12-03 found the timing inverted once under a 16-process build)."""
    n, stream = 1000, cuda.stream()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(np.float32)
    w = rng.standard_normal((n, 6)).astype(np.float32)
    dx, dw = cuda.to_device(x, stream=stream), cuda.to_device(w, stream=stream)
    fast = FastKernel(_mixed)
    for flag, u, a in ((True, 7, np.float32(2.5)), (False, 3, np.float32(-1.0))):
        want = cuda.device_array(n, np.float32, stream=stream)
        got = cuda.device_array(n, np.float32, stream=stream)
        args = (dx, dw[:, ::2], a, n, flag, 0.25, np.uint32(u))    # w[:, ::2]: 'A' layout
        _mixed[(n + 127) // 128, 128, stream](want, *args)
        fast[(n + 127) // 128, 128, stream](got, *args)
        stream.synchronize()
        np.testing.assert_array_equal(got.copy_to_host(), want.copy_to_host())
        ref = float(a) * x.astype(np.float64) + w[:, 2] + 0.25 + (u if flag else 0)
        err = np.abs(got.copy_to_host() - ref).max()          # float32 rounding of values ~10
        assert err <= 4e-7 * np.abs(ref).max(), err
    assert len(fast._signatures) == 1                    # one signature, prepared once
    out = cuda.to_device(np.zeros(4, np.float32), stream=stream)
    fast[1, 32, stream](out, np.ones(4, np.float32), dw, np.float32(1), 4, True, 0.0, np.uint32(0))
    stream.synchronize()                                 # a host array: numba's launch copies it
    np.testing.assert_allclose(out.copy_to_host(), 1 + w[:4, 1] + 0)

    counter = cuda.to_device(np.zeros(1, np.int64), stream=stream)
    value = cuda.to_device(np.ones(1, np.int64), stream=stream)
    fast_acc = FastKernel(_accumulate)

    t_numba = per_launch_us(stream, lambda: _accumulate[1, 32, stream](counter, value))
    t_fast = per_launch_us(stream, lambda: fast_acc[1, 32, stream](counter, value))
    record_figure("per launch: numba dispatcher / FastKernel", f"{t_numba:.1f} / {t_fast:.1f} us")
    assert counter.copy_to_host()[0] == 4000


@pytest.mark.cuda
@needs_gpu
def test_gpu_dynamic_shared_memory_over_48k_needs_the_opt_in():
    n_words, stream = 24 * 1024, cuda.stream()  # 96 KiB
    out = cuda.to_device(np.zeros(1, np.int32), stream=stream)
    with pytest.raises(Exception):
        _dynamic_shared_sum[1, 256, stream, 4 * n_words](out, n_words)
        stream.synchronize()
    set_max_dynamic_shared_memory(_dynamic_shared_sum, 4 * n_words, out, n_words)
    _dynamic_shared_sum[1, 256, stream, 4 * n_words](out, n_words)
    stream.synchronize()
    assert out.copy_to_host()[0] == n_words * (n_words - 1) // 2


# ---- offline: PreparedLaunch's marshalling against the PTX parameter list (NVVM, no GPU) ----

_MARSHAL_SCRIPT = """
import ctypes, json, re, sys, types as pytypes
import numpy as np
import numbaformer.backends.cuda
from numba import cuda, types
import numba.cuda.codegen, numba.cuda.dispatcher
numba.cuda.codegen.CUDACodeLibrary._ensure_cc = lambda self, cc: cc or (9, 0)  # offline only
numba.cuda.dispatcher.get_current_device = lambda: type("F", (), {"compute_capability": (9, 0)})()
from numbaformer.backends.cuda.launch import _array_values, _param_codes, _to_ctype

def kern(out, x, w, a, n, flag, h):
    i = cuda.grid(1)
    if flag and i < n:
        out[i] = a * x[i] + w[i, 0] + h

class FakeDeviceArray:  # what _prepare_args (and FastKernel's _array_values) read from one
    __cuda_memory__ = True
    def __init__(self, a):
        self._strided_memory_view_shim = pytypes.SimpleNamespace(size=a.size, dtype=a.dtype,
            ptr=1 << 40, shape=a.shape, _layout=pytypes.SimpleNamespace(strides_in_bytes=a.strides))
        self.size, self.dtype, self.shape, self.strides = a.size, a.dtype, a.shape, a.strides
        self.device_ctypes_pointer = ctypes.c_void_p(1 << 40)

argtypes = (types.float32[::1], types.float32[::1], types.float32[:, ::1], types.float32, types.int32,
            types.boolean, types.float16)
values = (*(FakeDeviceArray(np.zeros(s, np.float32)) for s in (8, 8, (8, 3))), np.float32(2),
          np.int32(8), True, np.float16(1.5))
try:
    compiled = numba.cuda.dispatcher._Kernel(kern, argtypes)
except Exception as e:  # only a missing toolchain (NVRTC, NVVM, libdevice) skips; bugs fail
    if type(e).__name__ not in ("DynamicLibNotFoundError", "FileNotFoundError", "NvvmSupportError",
                                "CudaSupportError", "ImportError", "OSError"):
        raise
    print(json.dumps({"skip": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}))
    sys.exit()
flat = []
for ty, v in zip(argtypes, values):
    compiled._prepare_args(ty, v, 0, [], flat)
sizes = {"u64": 8, "b64": 8, "u32": 4, "b32": 4, "f32": 4, "u16": 2, "b16": 2, "u8": 1, "b8": 1}
import struct
codes = "".join(_param_codes(t) or "?" for t in argtypes[:6])       # (FastKernel leaves f16 to numba)
mine = [v for a in values[:3] for v in _array_values(a)] + [2.0, 8, True]
print(json.dumps({"ptx": [sizes[t] for t in re.findall(r"\\.param \\.(\\w+)", compiled.inspect_asm((9, 0)))],
                  "slots": [ctypes.sizeof(_to_ctype(v)) for v in flat],
                  "fast": [struct.calcsize("<" + c) for c in codes], "f16": _param_codes(argtypes[6]),
                  "same_values": [getattr(v, "value", v) for v in flat][:len(mine)] == mine}))
"""


def test_prepared_launch_marshalling_matches_ptx_params():
    done = subprocess.run([sys.executable, "-c", _MARSHAL_SCRIPT], capture_output=True, text=True,
                          env=dict(os.environ, NUMBA_ENABLE_CUDASIM="0"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    if "skip" in got:
        pytest.skip(f"NVVM unavailable: {got['skip']}")
    assert got["slots"] == got["ptx"] and len(got["ptx"]) == 7 + 7 + 9 + 4  # an array: 5 + 2 * ndim
    # FastKernel: its struct codes' sizes are the PTX parameters', its array values are numba's
    assert got["fast"] == got["ptx"][:-1] and got["f16"] is None and got["same_values"]
