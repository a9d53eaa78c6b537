"""The CUDA backend's kernel decorator: cuda.jit(cache=True) into the CUDA kernel cache folder."""
from numba import cuda

from ..kernel_cache import cached

cuda_kernel = cached("cuda", cuda.jit(cache=True))
