"""CPU backend: numba.njit(parallel=True, cache=True) ops over the model graph's op table."""
from __future__ import annotations

import numpy as np

from ..base import Backend
from . import attention, elementwise, embed, matmul, norm, rope


class CPUBackend(Backend):
    """Weights stay memory-mapped in their GGUF form; activations are numpy arrays."""

    name = "cpu"
    default_kv_type = "f32"

    def kv_dtype(self, kv_type: str):
        """f32 storage either way: numba has no float16 on the CPU ("f16" rounds on store)."""
        return np.float32

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
    @staticmethod
    def kv_store(cache, layer, k, v, pos):
        attention.kv_store(cache.k, cache.v, layer, k, v, pos, cache.kv_type == "f16")

    @staticmethod
    def attention(out, q, cache, layer, pos, scale):
        attention.attention(out, q, cache.k, cache.v, layer, pos, scale)
    silu_mul = staticmethod(elementwise.silu_mul)
    add = staticmethod(elementwise.add)

    @staticmethod
    def argmax(out, logits):
        out[0] = np.argmax(logits)

    def stats(self) -> dict:
        return {"threads": self.n_threads}
