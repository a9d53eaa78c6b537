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
