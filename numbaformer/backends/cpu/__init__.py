"""CPU backend: numba.njit(parallel=True, cache=True) ops over the model graph's op table."""
from __future__ import annotations

import numpy as np

from ..base import Backend
from ..kernel_cache import configure as _configure_kernel_cache

_configure_kernel_cache()

from . import attention, elementwise, embed, matmul, norm, rope  # noqa: E402  (after the cache)


class CPUBackend(Backend):
    """Weights stay memory-mapped in their GGUF form; activations are numpy arrays."""

    name = "cpu"
    kv_dtype = np.float32          # numba has no float16 arithmetic on the CPU

    def __init__(self, n_threads: int | None = None):
        import numba
        if n_threads:
            numba.set_num_threads(max(1, min(n_threads, numba.config.NUMBA_NUM_THREADS)))
        self.n_threads = numba.get_num_threads()

    def alloc(self, shape, dtype=np.float32):
        return np.zeros(shape, dtype=dtype)

    def to_device(self, host):
        return np.ascontiguousarray(host)

    def to_host(self, arr):
        return np.array(arr)

    def copy_in(self, dst, host):
        dst[:len(host)] = host

    embed = staticmethod(embed.embed)
    rmsnorm = staticmethod(norm.rmsnorm)
    matmul = staticmethod(matmul.matmul)
    rope = staticmethod(rope.rope)
    kv_store = staticmethod(attention.kv_store)
    attention = staticmethod(attention.attention)
    silu_mul = staticmethod(elementwise.silu_mul)
    add = staticmethod(elementwise.add)

    @staticmethod
    def argmax(out, logits):
        out[0] = np.argmax(logits)

    def stats(self) -> dict:
        return {"threads": self.n_threads}
