"""The CPU backend's kernel decorator: njit(cache=True) into the CPU kernel cache folder."""
from numba import njit

from ..kernel_cache import cached


def cpu_jit(**options):
    """@njit(cache=True, **options), cached under the CPU backend's source-hash folder."""
    return cached("cpu", njit(cache=True, **options))
