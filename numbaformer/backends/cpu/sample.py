"""The sampling chain as one CPU op (base.py `sample`): penalties, top-k, top-p, min-p, a Gumbel-max
draw keyed by (seed, position, id), then the chain's bookkeeping, in one njit call.

The same semantics as sampling.py's host sampler and the CUDA kernel (backends/cuda/sample.py):
candidates in order of the float32 distance d = max - logit, then id; untempered masses exp(-d)
in float64. Costs O(n_vocab) for the penalties, the argmax and the distances, plus a partition
(top-k) or a filter (min-p) and a sort of the survivors: about 1 ms at 128k ids on one core.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from ... import rng
from ..base import (F_FREQUENCY, F_MIN_P_D, F_PRESENCE, F_REPEAT, F_TEMP, F_TOP_P, I_LAST_N,
                    I_SEED, I_STOP_POS, I_TOP_K)
from ._jit import cpu_jit

_philox = njit(rng.philox4x32)
_uniform24 = njit(rng.uniform24)
_LO = np.uint64(0xFFFFFFFF)


@njit
def gumbel(seed, index, token):
    """-log(-log(u)) (float64) of vocabulary id `token` at token index `index` (rng.py's layout)."""
    t = np.uint64(token)
    z = np.uint64(0)
    w0, w1, w2, w3 = _philox(t >> np.uint64(2), np.uint64(index), z, z, seed & _LO,
                             seed >> np.uint64(32))
    j = token & 3
    w = w0 if j == 0 else (w1 if j == 1 else (w2 if j == 2 else w3))
    return -math.log(-math.log(_uniform24(w)))


@njit
def _penalize(logits, counts, fp):
    """llama.cpp's penalties on every id with a count, in float32 as the host does."""
    rp, pres = np.float32(fp[F_REPEAT]), np.float32(fp[F_PRESENCE])
    freq = np.float32(fp[F_FREQUENCY])
    for t in range(logits.shape[0]):
        c = counts[t]
        if c > 0:
            v = logits[t]
            v = v / rp if v > 0 else v * rp
            logits[t] = v - np.float32(c) * freq - pres


@njit
def _draw(logits, m, fp, ip, index):
    """The truncated, tempered draw (temperature > 0, max logit m finite)."""
    n = logits.shape[0]
    d = np.empty(n, np.float32)
    for i in range(n):
        v = m - logits[i]
        d[i] = v if v >= 0 else np.inf          # NaN and -inf logits: never candidates
    k = ip[I_TOP_K]
    if k <= 0 or k > n:
        k = n
    dmin = fp[F_MIN_P_D]
    if k < n:
        ids = np.flatnonzero(d <= np.partition(d, k - 1)[k - 1])
    else:
        ids = np.flatnonzero(d.astype(np.float64) <= dmin)
    ids = ids[np.argsort(d[ids], kind="mergesort")][:k]       # (distance, id): stable over ids
    dd = d[ids].astype(np.float64)
    keep = ids.shape[0]
    if fp[F_TOP_P] < 1.0:
        e = np.exp(-dd)
        z = e.sum() if k < n else np.exp(-d.astype(np.float64)).sum()
        keep = min(keep, np.searchsorted(np.cumsum(e), fp[F_TOP_P] * z) + 1)
    keep = min(keep, max(1, np.sum(dd <= dmin)))
    seed = np.uint64(ip[I_SEED])
    best, pick = -np.inf, ids[0]
    for r in range(keep):
        s = -dd[r] / fp[F_TEMP] + gumbel(seed, index, ids[r])
        if s > best:
            best, pick = s, ids[r]
    return pick


@cpu_jit()
def _sample_kernel(out, logits, ids, pos, fp, ip, hist, counts, eog, j):
    """base.py's `sample`: logits (n_vocab,) f32 (penalized in place), ids, pos (1,) i32, the
    SamplerState arrays, step j."""
    if j > 0 and out[1] != 0:
        return
    last_n = ip[I_LAST_N]
    if last_n != 0:
        _penalize(logits, counts, fp)
    pick = 0
    for i in range(1, logits.shape[0]):
        if logits[i] > logits[pick]:
            pick = i
    p = pos[0] + 1                              # the position of the token being sampled
    if fp[F_TEMP] > 0 and np.isfinite(logits[pick]):
        pick = _draw(logits, logits[pick], fp, ip, p)
    if p < hist.shape[0]:
        hist[p] = pick
    if last_n != 0:                             # the window moves on by one token
        counts[pick] += 1
        if last_n > 0 and p - last_n >= 0:
            counts[hist[p - last_n]] -= 1
    out[2 + j] = pick
    out[0] = j + 1
    if eog[pick] != 0 or p >= ip[I_STOP_POS]:
        out[1] = 1
    else:
        out[1] = 0
        ids[0] = pick
        pos[0] = p


def sample(logits, ids, pos, st, j: int) -> None:
    """base.py's `sample` on host arrays (st: SamplerState)."""
    _sample_kernel(st.out, logits, ids, pos, st.fparams, st.iparams, st.hist, st.counts, st.eog, j)
