"""Greedy decoding on the GPU: the argmax of the logits, so only one int32 crosses to the host, and
`advance`, which feeds it to the next decode step inside a multi-step graph."""
from __future__ import annotations

import math

from numba import cuda, float32, int32

from ._jit import cuda_kernel
from .intrinsics import shfl_xor_sync
from .reduce import FULL_MASK, WARP

ARGMAX_THREADS = 1024


@cuda.jit(device=True)
def _better(v, i, ov, oi):
    """(v, i) loses to (ov, oi): larger value wins, the smaller index breaks ties (as np.argmax)."""
    return ov > v or (ov == v and oi < i)


@cuda.jit(device=True, inline=True)
def _warp_best(bv, bi):
    """The best (value, index) pair of the warp, in every lane (butterfly shuffles)."""
    for off in (16, 8, 4, 2, 1):
        ov = shfl_xor_sync(FULL_MASK, bv, off)
        oi = shfl_xor_sync(FULL_MASK, bi, off)
        if _better(bv, bi, ov, oi):
            bv = ov
            bi = oi
    return bv, bi


@cuda_kernel
def _argmax_kernel(out, logits):
    """One block: thread t scans logits[t::blockDim]; warps reduce (value, index) pairs by
    shuffles, lane 0 parks each warp's best in shared memory, warp 0 reduces those."""
    t = cuda.threadIdx.x
    bv = float32(-math.inf)
    bi = int32(logits.shape[0])
    for i in range(t, logits.shape[0], cuda.blockDim.x):
        v = logits[i]
        if v > bv:                       # strict: keeps the first index of a tie in this stride
            bv = v
            bi = i
    sv = cuda.shared.array(32, float32)
    si = cuda.shared.array(32, int32)
    bv, bi = _warp_best(bv, bi)
    if t % WARP == 0:
        sv[t // WARP] = bv
        si[t // WARP] = bi
    cuda.syncthreads()                   # every warp's best is parked
    if t < WARP:
        n_warps = (cuda.blockDim.x + WARP - 1) // WARP
        bv = sv[t] if t < n_warps else float32(-math.inf)
        bi = si[t] if t < n_warps else int32(logits.shape[0])
        bv, bi = _warp_best(bv, bi)
        if t == 0:
            out[0] = bi


def argmax(out, logits, stream) -> None:
    """out[0] (int32) = first index of the maximum of logits (n_vocab,) f32."""
    _argmax_kernel[1, ARGMAX_THREADS, stream](out, logits)


@cuda_kernel
def _advance_kernel(ids, pos, next_id, out, j):
    """One thread: the next step's token is this step's pick, one position on."""
    if cuda.grid(1) == 0:
        t = next_id[0]
        ids[0] = t
        pos[0] += 1
        out[j] = t


def advance(ids, pos, next_id, out, j: int, stream) -> None:
    """ids[0] = next_id[0], pos[0] += 1, out[j] = next_id[0] (int32 device arrays), on the GPU."""
    _advance_kernel[1, 1, stream](ids, pos, next_id, out, j)
