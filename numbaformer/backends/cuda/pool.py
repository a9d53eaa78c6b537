"""Device-array buffer pool: power-of-two size buckets, reuse, statistics.

Everything the CUDA backend allocates after the weights (activations, KV cache, scratch) comes from
here. A released buffer goes back to its bucket and serves the next request of that bucket without a
cudaMalloc; `stats()` reports hits, misses, bytes in use and the peak.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
from numba import cuda

MIN_BUCKET = 256


def bucket_size(nbytes: int) -> int:
    """The power of two (>= 256) that holds nbytes."""
    return max(MIN_BUCKET, 1 << (max(nbytes, 1) - 1).bit_length())


class DevicePool:
    def __init__(self, stream):
        self.stream = stream
        self._free: dict[int, list] = defaultdict(list)     # bucket -> raw uint8 device arrays
        self._owner: dict[int, tuple[int, object]] = {}     # id(view) -> (bucket, raw)
        self.hits = self.misses = self.in_use = self.peak = self.reserved = 0

    def alloc(self, shape, dtype=np.float32, zero: bool = True):
        """A device array of `shape`/`dtype` carved from a pooled bucket (zero-filled by default)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        b = bucket_size(nbytes)
        if self._free[b]:
            raw = self._free[b].pop()
            self.hits += 1
        else:
            raw = cuda.device_array(b, dtype=np.uint8, stream=self.stream)
            self.misses += 1
            self.reserved += b
        view = raw[:nbytes].view(dtype).reshape(shape) if nbytes else raw[:0].view(dtype)
        if zero and nbytes:
            _memset0(raw, nbytes, self.stream)
        self._owner[id(view)] = (b, raw)
        self.in_use += b
        self.peak = max(self.peak, self.in_use)
        return view

    def release(self, view) -> None:
        """Return a pooled array's bucket for reuse (the array must not be used afterwards)."""
        b, raw = self._owner.pop(id(view))
        self._free[b].append(raw)
        self.in_use -= b

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "bytes_in_use": self.in_use,
                "peak_bytes": self.peak, "reserved_bytes": self.reserved}


def _memset0(raw, nbytes: int, stream) -> None:
    from ._sim import SIMULATOR
    if SIMULATOR:
        raw[:nbytes] = 0
        return
    from numba.cuda.cudadrv import driver
    driver.device_memset(raw, 0, nbytes, stream=stream)
