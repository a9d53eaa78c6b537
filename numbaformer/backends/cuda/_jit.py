"""The CUDA backend's kernel decorator: cuda.jit(cache=True) into the CUDA kernel cache folder."""
from numba import cuda

from ..kernel_cache import cached
from .launch import fast_kernel


def launched_fast(decorator):
    """decorator (a cuda.jit) whose kernels launch through launch.FastKernel."""
    return lambda fn: fast_kernel(decorator(fn))


cuda_kernel = launched_fast(cached("cuda", cuda.jit(cache=True)))


def cuda_kernel_bounded(max_threads: int):
    """cuda_kernel with launch bounds (PTX .maxntid): the compiler keeps the kernel within the
    registers that blocks of max_threads leave each thread (64 at 1024). The simulator has no such
    option (nor registers)."""
    try:
        deco = cuda.jit(cache=True, launch_bounds=max_threads)
    except TypeError:       # the simulator's jit (config.ENABLE_CUDASIM may have been re-read
        return cuda_kernel  # from a changed environment since numba.cuda was imported)
    return launched_fast(cached("cuda", deco))


def forceinline_device(fn):
    """cuda.jit(device=True, forceinline=True): inlined by NVVM (alwaysinline) rather than at
    numba's IR level, so a device function called from many places is compiled once. The
    simulator's jit has no such option."""
    try:
        return cuda.jit(device=True, forceinline=True)(fn)
    except TypeError:
        return cuda.jit(device=True)(fn)
