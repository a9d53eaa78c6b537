"""Kernel launches cheaper than numba's dispatcher, for launches that are not graph-captured (prefill
of varying length, the step before capture), and the dynamic shared memory opt-in numba lacks.

numba's `kernel[grid, block, stream, smem](*args)` types every argument, looks up the overload,
converts each argument to a list of Python ints and ctypes values, builds a LaunchConfig and calls
cuda.core's launch, on every call (docs/numba-cuda-notes.md). PreparedLaunch does all of that once and
keeps a ctypes array of pointers to the argument values; a call is one cuLaunchKernel through
cuda.bindings. The marshalling is numba's own (`_Kernel._prepare_args`, private in numba-cuda 0.30.4),
and the resulting sizes are checked against the driver's view of the kernel's parameters, so a change
of numba's layout fails at preparation rather than corrupting a launch.
"""
import ctypes
import os
import struct

import numpy as np

from ._sim import SIMULATOR
from numba.cuda.errors import normalize_kernel_dimensions

from numbaformer.backends.cuda.graph import check, compile_for

if not SIMULATOR:
    from cuda.bindings import driver


def _to_ctype(value):
    """numba's flat argument items -> ctypes objects: Python bools are 1-byte C bools, Python ints are
    the 8-byte array fields (meminfo, parent, nitems, itemsize, data, shape, strides) and pointers."""
    if isinstance(value, bool):
        return ctypes.c_bool(value)
    if isinstance(value, int):
        return ctypes.c_int64(value)
    return value


class PreparedLaunch:
    """kernel[griddim, blockdim, stream, sharedmem](*args), resolved once; call it to launch.

    args are device arrays and scalars (host arrays are refused: numba would copy them per launch).
    set_arg(k, value) replaces argument k (same numba type) in the prepared buffer, e.g. a position.
    The device arrays are kept alive by this object. Under the simulator, a call is the numba launch.
    """

    def __init__(self, kernel, griddim, blockdim, stream, args, sharedmem=0):
        self._kernel, self._stream, self._args = kernel, stream, list(args)
        self._config = (griddim, blockdim, stream, sharedmem)
        if SIMULATOR:
            return
        self._compiled = compile_for(kernel, *args)
        self._slots = [self._marshal(k, v) for k, v in enumerate(args)]  # per argument: ctypes values
        flat = [s for slots in self._slots for s in slots]
        cufunc = self._compiled._codelibrary.get_cufunc()
        for k, slot in enumerate(flat):
            _, size = check(driver.cuKernelGetParamInfo(cufunc.handle, k), "cuKernelGetParamInfo")
            if size != ctypes.sizeof(slot):
                raise TypeError(f"{cufunc.name}: parameter {k} is {size} bytes, numba gave "
                                f"{ctypes.sizeof(slot)}")
        if driver.cuKernelGetParamInfo(cufunc.handle, len(flat))[0] == driver.CUresult.CUDA_SUCCESS:
            raise TypeError(f"{cufunc.name}: the kernel takes more than {len(flat)} parameters")
        self._pointers = (ctypes.c_void_p * len(flat))(*map(ctypes.addressof, flat))
        grid, block = normalize_kernel_dimensions(griddim, blockdim)
        self._launch_args = (driver.CUfunction(int(cufunc.handle)), *grid, *block, sharedmem,
                             driver.CUstream(int(stream.handle) if stream else 0),
                             ctypes.addressof(self._pointers), 0)

    def _marshal(self, k, value):
        ty = self._compiled.argument_types[k]
        if self._kernel.typeof_pyval(value) != ty:
            raise TypeError(f"argument {k}: expected {ty}, got {self._kernel.typeof_pyval(value)}")
        retr, flat = [], []
        self._compiled._prepare_args(ty, value, self._stream, retr, flat)
        if retr:
            raise TypeError(f"argument {k}: PreparedLaunch takes device arrays, not host arrays")
        return [_to_ctype(v) for v in flat]

    def set_arg(self, k, value):
        if not SIMULATOR:
            for dst, src in zip(self._slots[k], self._marshal(k, value)):
                ctypes.memmove(ctypes.addressof(dst), ctypes.addressof(src), ctypes.sizeof(dst))
        self._args[k] = value  # keeps a new device array alive

    def __call__(self):
        if SIMULATOR:
            self._kernel[self._config](*self._args)  # the simulator's kernel keeps the last config
            return
        check(driver.cuLaunchKernel(*self._launch_args), "cuLaunchKernel")


def set_max_dynamic_shared_memory(kernel, nbytes, *args):
    """Allow launches of `kernel` (compiled for args' types) with up to nbytes of dynamic shared memory.

    Launches asking for more than 48 KiB fail (CUDA_ERROR_INVALID_VALUE) until this opt-in is set;
    the most is the device's MAX_SHARED_MEMORY_PER_BLOCK_OPTIN (227 KiB on sm_90) minus the kernel's
    static shared memory. numba-cuda 0.30.4 has no API for it: this sets
    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES on the kernel's CUkernel for the current device,
    the way numba sets the carveout (cudadrv/driver.py `set_shared_memory_carveout`). No-op under the
    simulator.
    """
    if SIMULATOR:
        return
    cufunc = compile_for(kernel, *args)._codelibrary.get_cufunc()
    attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    check(driver.cuKernelSetAttribute(attr, nbytes, cufunc.handle, cufunc.device.id),
          "cuKernelSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)")


# --- every launch through a cheaper path ------------------------------------------------------------
# On the lent H200 host (2026-12-02) numba-cuda's `kernel[grid, block, stream, smem](*args)` spent
# ~100-150 us of Python a launch in a 512-token prefill (the CUDA Array Interface shim, a context
# lookup and a StridedMemoryView per array argument, a LaunchConfig, cuda.core's launch): 362 launches
# of a SmolLM2 prefill took 58 ms of host time for ~12 ms of GPU work. FastKernel does numba's typing
# and marshalling once per argument signature and then packs the values itself.

_SCALAR_CODES = {8: "b", 16: "h", 32: "i", 64: "q"}


def _param_codes(ty):
    """struct codes of the kernel parameters numba passes for one argument of numba type `ty` (its
    `_Kernel._prepare_args`), or None for a type FastKernel leaves to numba (records, tuples, ...)."""
    from numba.core import types
    if isinstance(ty, types.Array):
        return "q" * (5 + 2 * ty.ndim)     # meminfo, parent, size, itemsize, data, shape, strides
    if isinstance(ty, types.Boolean):
        return "?"
    if isinstance(ty, types.Integer):
        c = _SCALAR_CODES.get(ty.bitwidth)
        return None if c is None else (c if ty.signed else c.upper())
    if ty == types.float32:
        return "f"
    if ty == types.float64:
        return "d"
    return None


def _array_values(a):
    """The values numba passes for a device array (its `_prepare_args`): meminfo and parent (0),
    size, itemsize, the data pointer, the shape, the strides in bytes."""
    ptr = a.device_ctypes_pointer.value or 0
    return (0, 0, a.size, a.dtype.itemsize, ptr, *a.shape, *a.strides)


def _describe(kernel, a):
    """(numba type, parameter values) of a launch argument, or None where numba's own launch must
    handle it (host arrays, which numba copies, and anything but device arrays and scalars). A device
    array's description is kept on the array object: its type, pointer, shape and strides are fixed."""
    d = getattr(a, "_nf_launch", None)
    if d is not None:
        return d
    if isinstance(a, DeviceNDArrayBase):
        d = (kernel.typeof_pyval(a), _array_values(a))
        try:
            a._nf_launch = d
        except AttributeError:
            pass
        return d
    t = type(a)
    if t is int:
        return (_INT64, (a,)) if -(1 << 63) <= a < (1 << 63) else None
    if t is float:
        return _FLOAT64, (a,)
    if t is bool:
        return _BOOLEAN, (a,)
    if isinstance(a, (np.integer, np.floating, np.bool_)):
        ty = kernel.typeof_pyval(a)
        return (ty, (a,)) if _param_codes(ty) else None
    return None


class _Signature:
    """One compiled overload's launch: the CUfunction, the struct format of its parameters (each in
    an 8-byte slot of one buffer), the buffer and the array of pointers into it."""

    def __init__(self, compiled, argtypes, codes):
        self.fmt = "<" + "".join(c + "x" * (8 - struct.calcsize("<" + c)) for c in codes)
        self.buf = ctypes.create_string_buffer(8 * len(codes))
        base = ctypes.addressof(self.buf)
        self.ptrs = (ctypes.c_void_p * max(1, len(codes)))(*[base + 8 * i
                                                              for i in range(len(codes))])
        self.ptrs_addr = ctypes.addressof(self.ptrs)
        cufunc = compiled._codelibrary.get_cufunc()
        for k, c in enumerate(codes):
            _, size = check(driver.cuKernelGetParamInfo(cufunc.handle, k), "cuKernelGetParamInfo")
            if size != struct.calcsize("<" + c):
                raise TypeError(f"{cufunc.name}: parameter {k} is {size} bytes, FastKernel packs "
                                f"{struct.calcsize('<' + c)}")
        if driver.cuKernelGetParamInfo(cufunc.handle, len(codes))[0] == \
                driver.CUresult.CUDA_SUCCESS:
            raise TypeError(f"{cufunc.name}: the kernel takes more than {len(codes)} parameters")
        self.func = driver.CUfunction(int(cufunc.handle))


class FastKernel:
    """A numba CUDA kernel (dispatcher) whose launches `kernel[grid, block, stream, smem](*args)`
    cost a few microseconds of Python instead of numba's ~100: the first launch of an argument
    signature goes through numba (typing, compiling, loading) and checks that FastKernel's own
    packing of the arguments gives numba's parameter values and the kernel's parameter sizes; later
    launches pack the values with struct and call cuLaunchKernel. Launches it cannot take (the
    default stream, host arrays, tuples, records) go to numba's dispatcher, as does everything else
    (attributes pass through). One engine thread launches (STYLE rule 12): the packing buffer of a
    signature is shared. NUMBAFORMER_FAST_LAUNCH=0 leaves every launch to numba."""

    def __init__(self, dispatcher):
        self.__dict__["_dispatcher"] = dispatcher
        self.__dict__["_signatures"] = {}

    def __getattr__(self, name):
        return getattr(self._dispatcher, name)

    def __call__(self, *args, **kw):
        return self._dispatcher(*args, **kw)

    def __getitem__(self, config):
        if not isinstance(config, tuple) or not 2 <= len(config) <= 4:
            return self._dispatcher[config]
        return _Configured(self, *config)

    def _launch(self, grid, block, stream, smem, args):
        types_, values = [], []
        for a in args:
            d = _describe(self._dispatcher, a)
            if d is None:
                return self._dispatcher[grid, block, stream, smem](*args)
            types_.append(d[0])
            values.extend(d[1])
        key = tuple(types_)
        sig = self._signatures.get(key)
        if sig is None:
            sig = self._signatures[key] = self._prepare(key, args, stream, values)
        if sig is False:
            return self._dispatcher[grid, block, stream, smem](*args)
        struct.pack_into(sig.fmt, sig.buf, 0, *values)
        err, = driver.cuLaunchKernel(sig.func, *grid, *block, smem, _stream(stream),
                                     sig.ptrs_addr, 0)
        if err != driver.CUresult.CUDA_SUCCESS:
            check((err,), f"cuLaunchKernel ({self._dispatcher.py_func.__name__})")

    def _prepare(self, key, args, stream, values):
        """The signature's _Signature after checking FastKernel's typing and values against numba's
        own; False (numba launches it) for a type FastKernel does not pack."""
        numba_types = tuple(self._dispatcher.typeof_pyval(a) for a in args)
        codes = [_param_codes(t) for t in numba_types]
        if numba_types != key or None in codes:
            return False
        compiled = compile_for(self._dispatcher, *args)
        flat, retr = [], []
        for ty, v in zip(numba_types, args):
            compiled._prepare_args(ty, v, stream, retr, flat)
        theirs = [getattr(v, "value", v) for v in flat]
        theirs = [0 if t is None else t for t in theirs]     # an empty array's null pointer
        if retr or len(theirs) != len(values) or any(t != m for t, m in zip(theirs, values)):
            raise TypeError(f"{self._dispatcher.py_func.__name__}: FastKernel's parameter values "
                            f"{values} differ from numba's {theirs}")
        return _Signature(compiled, key, "".join(codes))


class _Configured:
    """kernel[grid, block, stream, smem]: call it with the arguments to launch."""
    __slots__ = ("kernel", "config", "grid", "block")

    def __init__(self, kernel, *config):
        self.kernel, self.config = kernel, config
        self.grid, self.block = _dim3(config[0]), _dim3(config[1])

    def __call__(self, *args):
        stream = self.config[2] if len(self.config) > 2 else 0
        if not stream or self.grid is None or self.block is None:   # numba's launch (and errors)
            return self.kernel._dispatcher[self.config](*args)
        return self.kernel._launch(self.grid, self.block, stream,
                                   self.config[3] if len(self.config) > 3 else 0, args)


def _dim3(d):
    """A grid or block dimension as three positive ints, or None (numba's launch then says why)."""
    d = (d,) if type(d) is int else tuple(d) if isinstance(d, (tuple, list)) else None
    if d is None or not 1 <= len(d) <= 3 or any(type(v) is not int or v < 1 for v in d):
        return None
    return d + (1,) * (3 - len(d))


def _stream(stream):
    """The cuda.bindings CUstream of a numba Stream, kept on the stream object."""
    h = getattr(stream, "_nf_cu", None)
    if h is None:
        h = driver.CUstream(int(stream.handle))
        stream._nf_cu = h
    return h


def derived(a, key, make):
    """make(a) (a view of device array a), made once per array and key and kept on the array: a
    view of a long-lived buffer (a weight, a scratch) taken at every launch costs numba ~20-60 us
    of Python each time."""
    views = getattr(a, "_nf_views", None)
    if views is None:
        views = a._nf_views = {}
    v = views.get(key)
    if v is None:
        v = views[key] = make(a)
    return v


def dtype_view(a, dtype):
    """a.view(dtype), made once (derived)."""
    return derived(a, dtype, lambda a: a.view(dtype))


def fast_kernel(dispatcher):
    """FastKernel(dispatcher) on a GPU; the dispatcher itself under the simulator or with
    NUMBAFORMER_FAST_LAUNCH=0."""
    if SIMULATOR or os.environ.get("NUMBAFORMER_FAST_LAUNCH", "1") == "0":
        return dispatcher
    return FastKernel(dispatcher)


if not SIMULATOR:
    from numba.core import types as _types
    from numba.cuda.cudadrv.devicearray import DeviceNDArrayBase
    _INT64, _FLOAT64, _BOOLEAN = _types.int64, _types.float64, _types.boolean
