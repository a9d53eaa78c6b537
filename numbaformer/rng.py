"""The sampler's counter-based random numbers: Philox-4x32-10 (Salmon et al., SC'11; Random123).

A draw is a pure function of (seed, token index, vocabulary id), so the same seed gives the same
text whatever the order the numbers are asked for in: one decode step per graph replay or sixteen,
the host or the device. The sampler (sampling.py, backends/*/sample.py) uses one uniform per
candidate token (Gumbel-max), from

    counter = (id >> 2, index, 0, 0), key = (seed & 0xFFFFFFFF, seed >> 32), word id & 3

so four neighbouring ids share one Philox block. `philox4x32` is written once, as arithmetic on
np.uint64 values holding 32-bit words (a 32 x 32-bit product never overflows them), so the same
code runs on numpy scalars, on numpy arrays (the host sampler, vectorized over candidates), under
`numba.njit` (the CPU backend) and under `cuda.jit(device=True)` (the CUDA backend and its
simulator). No branch, no call: each backend wraps it with its own jit decorator.
"""
from __future__ import annotations

import numpy as np

_M0 = np.uint64(0xD2511F53)          # Philox-4x32 multipliers
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)          # Weyl key increments
_W1 = np.uint64(0xBB67AE85)
_LO = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)
_8 = np.uint64(8)
ROUNDS = 10
INV_2_24 = 2.0 ** -24                # uniform24: ((word >> 8) + 0.5) * 2^-24, in (0, 1)


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 of the counter (c0, c1, c2, c3) under the key (k0, k1): four 32-bit words.
    Every argument and result is np.uint64 (scalars or arrays) holding a value below 2^32."""
    for r in range(ROUNDS):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = ((p1 >> _32) ^ c1 ^ k0, p1 & _LO, (p0 >> _32) ^ c3 ^ k1, p0 & _LO)
        k0 = (k0 + _W0) & _LO
        k1 = (k1 + _W1) & _LO
    return c0, c1, c2, c3


def uniform24(word):
    """A Philox word -> float64 in (0, 1): its top 24 bits plus one half, times 2^-24 (exact in
    float32 too)."""
    return ((word >> _8) + 0.5) * INV_2_24
