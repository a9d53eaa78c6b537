"""CUDA graphs over numba kernel launches: capture the launches a function makes on a stream once, then
replay them all with one driver call (about 1 us a kernel instead of about 18 us through numba's
dispatcher, measured on an H200; see ../shared/gpu/README.md).

    compile_for(_rmsnorm_kernel, out, x, w, eps)   # compile + load every kernel before capture
    graph = CudaGraph()
    graph.capture(stream, lambda: forward_step(stream))
    for _ in range(n):
        pos_host[0] = pos; pos_dev.copy_to_device(pos_host, stream=stream)   # inputs live on the device
        graph.launch(stream)

What a captured function must not do (each breaks or silently corrupts the capture; the sources are in
numba-cuda 0.30.4, see docs/numba-cuda-notes.md):
- launch a kernel for the first time with a new signature: that compiles, loads a module and, with
  CUDA_NRT_STATS, synchronizes the context (dispatcher.py `CUDADispatcher.compile`, `_Kernel.bind`).
  Call compile_for() or run the step once before capturing.
- pass host (NumPy) arrays, or foreign arrays with a `__cuda_array_interface__` stream, to a kernel:
  numba allocates, copies and copies back (args.py `InOut.to_device`) or synchronizes the foreign
  stream (devicearray.py `_to_strided_memory_view`).
- use `debug=True` kernels (a synchronous read of the error flag after each launch, `_Kernel.launch`).
- allocate (`cuda.device_array`, `cuda.to_device`), free, copy synchronously (`copy_to_host()` without
  a stream), synchronize, or touch the legacy default stream (stream 0) in any way.
Every argument value is frozen into the graph: device pointers and scalars as they were at capture.
What changes per replay (position, token id) must be read by the kernels from device memory that the
host updates between replays (stream-ordered, on the same stream). Device arrays used by the graph must
outlive it. Numba's deferred deallocation is held off during capture (`cuda.defer_cleanup()`), since a
flush would call cuMemFree.

Under the simulator (NUMBA_ENABLE_CUDASIM=1) there are no graphs: capture() only keeps fn and launch()
calls it, so code written against CudaGraph runs and gives the same results there.
"""
from numba import cuda
from ._sim import SIMULATOR

if not SIMULATOR:
    from cuda.bindings import driver

_MODES = ("global", "thread_local", "relaxed")


class GraphError(RuntimeError):
    """A CUDA driver call for graph capture or replay failed."""


def graphs_supported():
    """True when real CUDA graphs can be used: not the simulator, and a CUDA GPU with a driver."""
    return not SIMULATOR and cuda.is_available()


def compile_for(kernel, *args):
    """Compile `kernel` (a numba @cuda.jit dispatcher) for these arguments' types and load its module
    on the current context, without launching it, so that a launch inside a capture does neither.
    Returns the compiled kernel object (numba's `_Kernel`); under the simulator returns `kernel`."""
    if SIMULATOR:
        return kernel
    compiled = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
    compiled.bind()  # a disk-cache hit is not loaded until its first launch; load it now
    return compiled


def _error_text(err):
    return f"{driver.cuGetErrorName(err)[1].decode()} ({driver.cuGetErrorString(err)[1].decode()})"


def check(result, what):
    """Unpack a cuda.bindings driver call's (CUresult, *values); raise GraphError unless it succeeded.
    Returns the single value, the tuple of values, or None."""
    err, *values = result
    if err != driver.CUresult.CUDA_SUCCESS:
        raise GraphError(f"{what} failed: {_error_text(err)}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def stream_handle(stream):
    """The driver CUstream of a numba Stream (`cuda.stream()` or `cuda.external_stream(ptr)`).
    numba-cuda 0.30.4 keeps it as `Stream.handle`, a cuda.bindings CUstream (cudadrv/driver.py)."""
    handle = int(stream.handle)
    if handle in (0, int(driver.CU_STREAM_LEGACY)):
        raise ValueError("graph capture needs a created stream (cuda.stream()), not the legacy "
                         "default stream")
    return driver.CUstream(handle)


class CudaGraph:
    """One captured sequence of launches on one stream, replayed with launch().

    capture(stream, fn, mode="thread_local") begins stream capture, calls fn() (which launches numba
    kernels on `stream`; nothing runs), ends capture and instantiates the graph. `mode` is the CUDA
    capture mode: while capturing, "global" forbids unsafe calls (allocation, synchronous copies,
    synchronization) on every thread of the process, "thread_local" only on this thread (default: a
    server thread elsewhere may still allocate), "relaxed" on none (a mistake then surfaces later).
    launch(stream) replays on `stream` (any created stream of the same context), asynchronously.
    close() frees the graph; the object is also a context manager.
    Under the simulator, capture() keeps fn and launch() calls fn().
    """

    def __init__(self):
        self._graph = self._exec = self._fn = None

    def capture(self, stream, fn, mode="thread_local"):
        if self._exec is not None or self._fn is not None:
            raise GraphError("this CudaGraph already holds a capture; close() it first")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if SIMULATOR:
            self._fn = fn
            return
        handle = stream_handle(stream)
        cu_mode = getattr(driver.CUstreamCaptureMode, f"CU_STREAM_CAPTURE_MODE_{mode.upper()}")
        check(driver.cuStreamBeginCapture(handle, cu_mode), "cuStreamBeginCapture")
        try:
            with cuda.defer_cleanup():
                fn()
        except BaseException:
            err, graph = driver.cuStreamEndCapture(handle)  # leave the stream usable, then re-raise
            if err == driver.CUresult.CUDA_SUCCESS and int(graph):
                driver.cuGraphDestroy(graph)
            raise
        err, graph = driver.cuStreamEndCapture(handle)
        if err != driver.CUresult.CUDA_SUCCESS or not int(graph):
            raise GraphError(f"stream capture failed, {_error_text(err)}: fn made a call that is "
                             "illegal while capturing (see graph.py's docstring)")
        self._graph = graph
        try:
            self._exec = check(driver.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        except GraphError:
            self.close()
            raise

    def launch(self, stream):
        if self._fn is not None:
            self._fn()
            return
        if self._exec is None:
            raise GraphError("launch() before capture()")
        check(driver.cuGraphLaunch(self._exec, stream_handle(stream)), "cuGraphLaunch")

    def node_count(self) -> int | None:
        """Nodes (kernel launches, copies) of the captured graph; None under the simulator."""
        if self._graph is None:
            return None
        err, _, n = driver.cuGraphGetNodes(self._graph, 0)
        return int(n) if err == driver.CUresult.CUDA_SUCCESS else None

    def close(self):
        if self._exec is not None:
            check(driver.cuGraphExecDestroy(self._exec), "cuGraphExecDestroy")
        if self._graph is not None:
            check(driver.cuGraphDestroy(self._graph), "cuGraphDestroy")
        self._graph = self._exec = self._fn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
