"""Warp-shuffle and shared-memory reductions (device functions), after numba's reduction.py."""
from __future__ import annotations

import math

from numba import cuda, float32

from .intrinsics import shfl_xor_sync

WARP = 32
FULL_MASK = 0xFFFFFFFF


@cuda.jit(device=True)
def warp_sum(v):
    """Sum of v over the 32 lanes of the warp, in every lane (butterfly: 5 shuffles)."""
    for off in (16, 8, 4, 2, 1):
        v += shfl_xor_sync(FULL_MASK, v, off)
    return v


@cuda.jit(device=True)
def warp_max(v):
    for off in (16, 8, 4, 2, 1):
        v = max(v, shfl_xor_sync(FULL_MASK, v, off))
    return v


@cuda.jit(device=True)
def block_sum(v, sh):
    """Sum of v over the block, returned to every thread. sh: shared float32 (>= 32,) scratch.
    Each warp reduces by shuffles, lane 0 parks the warp's sum in sh, then every warp re-reduces
    the parked sums (so no second broadcast is needed)."""
    lane = cuda.threadIdx.x % WARP
    v = warp_sum(v)
    if lane == 0:
        sh[cuda.threadIdx.x // WARP] = v
    cuda.syncthreads()                     # every warp's sum is in sh
    n_warps = (cuda.blockDim.x + WARP - 1) // WARP
    v = sh[lane] if lane < n_warps else float32(0)
    v = warp_sum(v)
    cuda.syncthreads()                     # sh is free again for the caller's next reduction
    return v


@cuda.jit(device=True)
def block_max(v, sh):
    """Max of v over the block, in every thread; same scheme as block_sum."""
    lane = cuda.threadIdx.x % WARP
    v = warp_max(v)
    if lane == 0:
        sh[cuda.threadIdx.x // WARP] = v
    cuda.syncthreads()
    n_warps = (cuda.blockDim.x + WARP - 1) // WARP
    v = sh[lane] if lane < n_warps else float32(-math.inf)
    v = warp_max(v)
    cuda.syncthreads()
    return v

