"""Picking tokens on the GPU, so only int32 ids cross to the host: the argmax of the logits and
`advance` (greedy steps fed to one another inside a multi-step graph), and the whole sampling chain
(`sample`: penalties, top-k, top-p, min-p, temperature, a seeded draw) in one kernel per step."""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, float64, int32, int64, uint32, uint64

from ... import rng
from ..base import (F_FREQUENCY, F_MIN_P_D, F_PRESENCE, F_REPEAT, F_TEMP, F_TOP_P, I_LAST_N,
                    I_SEED, I_STOP_POS, I_TOP_K, ID_BITS)
from ._jit import cuda_kernel, cuda_kernel_bounded
from .intrinsics import as_f32, f32_bits, shfl_up_sync, shfl_xor_sync
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


@cuda.jit(device=True, inline=True)
def _block_argmax(out, r, logits):
    """out[r] = first index of the maximum of logits (1-D) by the whole block: thread t scans
    logits[t::blockDim]; warps reduce (value, index) pairs by shuffles, lane 0 parks each warp's
    best in shared memory, warp 0 reduces those."""
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
            out[r] = bi


@cuda_kernel
def _argmax_kernel(out, logits):
    """One block: out[0] = the argmax of logits (n_vocab,)."""
    _block_argmax(out, 0, logits)


@cuda_kernel
def _argmax_rows_kernel(out, logits):
    """Block r: out[r] = the argmax of logits[r] (rows, n_vocab)."""
    r = cuda.blockIdx.x
    _block_argmax(out, r, logits[r])


def argmax(out, logits, stream) -> None:
    """out[0] (int32) = first index of the maximum of logits (n_vocab,) f32."""
    _argmax_kernel[1, ARGMAX_THREADS, stream](out, logits)


def argmax_rows(out, logits, stream) -> None:
    """out[r] (int32) = first index of the maximum of logits[r], logits (m, n_vocab) f32 C-order."""
    m = logits.shape[0]
    if out.shape[0] < m or logits.ndim != 2:
        raise ValueError(f"argmax of rows: out {out.shape}, logits {logits.shape}")
    if m:
        _argmax_rows_kernel[m, ARGMAX_THREADS, stream](out, logits)


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


# --- the sampling chain: one single-block kernel per decode step ---------------------------------

SAMPLE_THREADS = 1024         # the one block (a multiple of 32 dividing BINS; <= the bound 1024)
SAMPLE_CAP = 2048             # candidates sorted in shared memory (a power of two, 32..BINS)
DIGIT = 11                    # bits of a radix digit
BINS = 1 << DIGIT             # bins of one histogram level
TOP_SHIFT = 38                # key >> 38: the top 11 bits of d's float32 bits (sign bit 0)
MASS_ONE = float(1 << 44)     # untempered masses exp(-d) in fixed point: integer sums, exact
MASS_RANGE = 31.0             # exp(-d) * MASS_ONE < 1 past it: the mass is 0, skip its atomic
ID_MASK = (1 << ID_BITS) - 1
MAX_KEY = (1 << 63) - 1       # above every key: "no boundary"

_philox = cuda.jit(device=True)(rng.philox4x32)
_uniform24 = cuda.jit(device=True)(rng.uniform24)
_LO = np.uint64(0xFFFFFFFF)
_INF32 = np.float32(np.inf)


@cuda.jit(device=True, inline=True)
def _dist(lg, m):
    """float32 distance m - lg below the top logit m; NaN and -inf logits are infinitely far."""
    d = m - lg
    return d if d >= float32(0) else _INF32


@cuda.jit(device=True, inline=True)
def _key(d, i):
    """The sampling order as one integer: d's float32 bits (monotone for d >= 0), then the id."""
    return (uint64(f32_bits(d)) << uint64(ID_BITS)) | uint64(i)


@cuda.jit(device=True, inline=True)
def _key_dist(key):
    return as_f32(key >> uint64(ID_BITS))


@cuda.jit(device=True, inline=True)
def _mass(d):
    """exp(-d) in units of 2^-44 (d >= 0; exp in float32)."""
    return uint64(math.exp(-d) * float32(MASS_ONE))


@cuda.jit(device=True, inline=True)
def _gumbel(seed, index, token):
    """-log(-log(u)) in float32 for vocabulary id `token` at token index `index` (rng.py)."""
    z = uint64(0)
    t = uint64(token)
    w0, w1, w2, w3 = _philox(t >> uint64(2), uint64(index), z, z, seed & _LO, seed >> uint64(32))
    q = token & 3
    w = w0 if q == 0 else (w1 if q == 1 else (w2 if q == 2 else w3))
    return -math.log(-math.log(float32(_uniform24(w))))


@cuda.jit(device=True)
def _block_best(v, i, wv, wi):
    """The best (value, index) pair of the block (larger value, then smaller index), in every
    thread. wv, wi: shared (32,) scratch, free again on return."""
    lane = cuda.threadIdx.x % WARP
    v, i = _warp_best(v, i)
    if lane == 0:
        wv[cuda.threadIdx.x // WARP] = v
        wi[cuda.threadIdx.x // WARP] = i
    cuda.syncthreads()                     # every warp's best is parked
    if lane < cuda.blockDim.x // WARP:
        v = wv[lane]
        i = wi[lane]
    else:
        v = float32(-math.inf)
        i = int32(0x7FFFFFFF)
    v, i = _warp_best(v, i)
    cuda.syncthreads()                     # wv, wi free for the caller
    return v, i


@cuda.jit(device=True)
def _scan_bins(hc, hm, wc, wm):
    """Inclusive prefix sums, in place, of counts hc (BINS,) int32 and masses hm (BINS,) uint64 in
    shared memory. Thread t owns bins [t * per, (t + 1) * per): a serial scan of its run, a warp
    scan of the run totals (shuffles), the warps' totals parked in wc, wm (32,) and added up."""
    t = cuda.threadIdx.x
    lane, warp = t % WARP, t // WARP
    per = hc.shape[0] // cuda.blockDim.x
    c = int32(0)
    m = uint64(0)
    for b in range(t * per, t * per + per):
        c += hc[b]
        m += hm[b]
    ic, im = c, int64(m)
    for off in (1, 2, 4, 8, 16):
        oc = shfl_up_sync(FULL_MASK, ic, off)
        om = shfl_up_sync(FULL_MASK, im, off)
        if lane >= off:
            ic += oc
            im += om
    if lane == WARP - 1:
        wc[warp] = ic
        wm[warp] = im
    cuda.syncthreads()                     # every warp's total is parked
    for w in range(warp):
        ic += wc[w]
        im += wm[w]
    c = ic - c                             # this run's offset
    m = uint64(im) - m
    for b in range(t * per, t * per + per):
        c += hc[b]
        m += hm[b]
        hc[b] = c
        hm[b] = m
    cuda.syncthreads()                     # the scan is complete, wc and wm free


@cuda.jit(device=True)
def _find(hc, hm, by_mass, target_c, target_m, below_c, below_m, sv):
    """The first bin b of the scanned hc, hm whose cumulative count (or mass, as float64) plus
    below_c (below_m) reaches target_c (target_m); hc.shape[0] if none. sv: shared int64 scratch."""
    t = cuda.threadIdx.x
    n = hc.shape[0]
    if t == 0:
        sv[0] = n
    cuda.syncthreads()
    per = n // cuda.blockDim.x
    for b in range(t * per, t * per + per):
        if by_mass:
            hit = float64(below_m + hm[b]) >= target_m
            before = b > 0 and float64(below_m + hm[b - 1]) >= target_m
        else:
            hit = below_c + hc[b] >= target_c
            before = b > 0 and below_c + hc[b - 1] >= target_c
        if hit and not before:
            sv[0] = b
    cuda.syncthreads()
    b = sv[0]
    cuda.syncthreads()                     # sv free for the caller
    return b


@cuda.jit(device=True)
def _histogram(logits, m, shift, prefix, hc, hm):
    """Counts and masses of the keys with key >> (shift + DIGIT) == prefix, by digit
    (key >> shift) & (BINS - 1), into hc, hm (shared, zeroed here): one pass over the vocabulary,
    shared-memory atomics."""
    t = cuda.threadIdx.x
    for b in range(t, hc.shape[0], cuda.blockDim.x):
        hc[b] = 0
        hm[b] = 0
    cuda.syncthreads()                     # zeroed before any thread adds
    for i in range(t, logits.shape[0], cuda.blockDim.x):
        d = _dist(logits[i], m)
        key = _key(d, i)
        if key >> uint64(shift + DIGIT) == prefix:
            dg = int32((key >> uint64(shift)) & uint64(BINS - 1))
            cuda.atomic.add(hc, dg, 1)
            if d < float32(MASS_RANGE):
                cuda.atomic.add(hm, dg, _mass(d))
    cuda.syncthreads()                     # the histogram is complete


@cuda.jit(device=True)
def _gather(logits, m, shift, lo, hi, cand, sv):
    """The keys with lo <= key >> shift <= hi into cand (shared, unordered); returns how many
    (the caller knows from a histogram that they fit). One pass over the vocabulary."""
    t = cuda.threadIdx.x
    if t == 0:
        sv[1] = 0
    cuda.syncthreads()
    for i in range(t, logits.shape[0], cuda.blockDim.x):
        key = _key(_dist(logits[i], m), i)
        g = key >> uint64(shift)
        if g >= lo and g <= hi:
            k = cuda.atomic.add(sv, 1, 1)
            if k < cand.shape[0]:
                cand[k] = key
    cuda.syncthreads()
    n = sv[1]
    cuda.syncthreads()
    return n


@cuda.jit(device=True)
def _sort(cand, n, hc, hm):
    """Bitonic sort of cand[:n] (shared uint64) upward, padded with MAX_KEY to a power of two; then
    hc[r] = 1, hm[r] = the mass of cand[r] for r < n (0 past it), scanned: the count and mass of
    the first r + 1 candidates."""
    t = cuda.threadIdx.x
    size = 1
    while size < n:
        size <<= 1
    for r in range(n + t, size, cuda.blockDim.x):
        cand[r] = uint64(MAX_KEY)
    cuda.syncthreads()
    k = 2
    while k <= size:
        s = k >> 1
        while s > 0:
            for p in range(t, size >> 1, cuda.blockDim.x):
                a = 2 * p - (p & (s - 1))          # the lower element of this pair
                b = a + s
                up = (a & k) == 0
                x, y = cand[a], cand[b]
                if (x > y) == up:
                    cand[a] = y
                    cand[b] = x
            cuda.syncthreads()                     # each stage reads the previous one's result
            s >>= 1
        k <<= 1
    for r in range(t, hc.shape[0], cuda.blockDim.x):
        hc[r] = 1 if r < n else 0
        hm[r] = _mass(_key_dist(cand[r])) if r < n else uint64(0)
    cuda.syncthreads()


@cuda.jit(device=True)
def _select(logits, m, by_mass, target_c, target_m, h0c, h0m, hc, hm, cand, wc, wm, sv):
    """The key of the element at which the sampling order's cumulative count (or untempered mass)
    first reaches target_c (target_m), and the mass up to and including it. Radix select from
    the saved level-0 histogram h0c, h0m (global): at each level take the bin where the target
    falls; when it holds at most SAMPLE_CAP keys (at the latest after 4 levels: keys are
    unique), gather and sort it and find the element. One vocabulary pass per level, one for the
    gather."""
    t = cuda.threadIdx.x
    for b in range(t, BINS, cuda.blockDim.x):
        hc[b] = h0c[b]
        hm[b] = h0m[b]
    cuda.syncthreads()
    prefix = uint64(0)
    shift = TOP_SHIFT
    below_c = int32(0)
    below_m = uint64(0)
    for level in range(4):
        _scan_bins(hc, hm, wc, wm)
        b = _find(hc, hm, by_mass, target_c, target_m, below_c, below_m, sv)
        b = min(b, BINS - 1)
        ex_c = hc[b - 1] if b > 0 else int32(0)
        ex_m = hm[b - 1] if b > 0 else uint64(0)
        in_bin = hc[b] - ex_c
        below_c += ex_c
        below_m += ex_m
        prefix = (prefix << uint64(DIGIT)) | uint64(b)
        cuda.syncthreads()                 # hc, hm read by all before they are reused
        if in_bin <= cand.shape[0] or level == 3:
            n = _gather(logits, m, shift, prefix, prefix, cand, sv)
            _sort(cand, n, hc, hm)
            _scan_bins(hc, hm, wc, wm)
            r = min(_find(hc, hm, by_mass, target_c, target_m, below_c, below_m, sv), n - 1)
            key, mass = cand[r], below_m + hm[r]
            cuda.syncthreads()
            return key, mass
        shift -= DIGIT
        _histogram(logits, m, shift, prefix, hc, hm)
    return uint64(MAX_KEY), uint64(0)      # not reached


@cuda.jit(device=True)
def _draw_all(logits, m, bound, dmin, temp, seed, index, wv, wi):
    """Gumbel-max over every id with key <= bound and distance <= dmin (one pass; one Philox
    block per 4 ids). Returns the pick."""
    t = cuda.threadIdx.x
    n = logits.shape[0]
    bv = float32(-math.inf)
    bi = int32(n)
    z = uint64(0)
    for g in range(t, (n + 3) // 4, cuda.blockDim.x):
        have = False
        w0 = w1 = w2 = w3 = z
        for q in range(4):
            i = 4 * g + q
            if i < n:
                d = _dist(logits[i], m)
                if _key(d, i) <= bound and float64(d) <= dmin:
                    if not have:
                        w0, w1, w2, w3 = _philox(uint64(g), uint64(index), z, z, seed & _LO,
                                                 seed >> uint64(32))
                        have = True
                    w = w0 if q == 0 else (w1 if q == 1 else (w2 if q == 2 else w3))
                    s = -d / temp + -math.log(-math.log(float32(_uniform24(w))))
                    if s > bv:
                        bv = s
                        bi = i
    bv, bi = _block_best(bv, bi, wv, wi)
    return bi


@cuda.jit(device=True)
def _draw_sorted(cand, keep, temp, seed, index, wv, wi):
    """Gumbel-max over the sorted candidates cand[:keep]. Returns the pick."""
    bv = float32(-math.inf)
    bi = int32(0x7FFFFFFF)
    for r in range(cuda.threadIdx.x, keep, cuda.blockDim.x):
        key = cand[r]
        i = int32(key & uint64(ID_MASK))
        s = -_key_dist(key) / temp + _gumbel(seed, index, i)
        if s > bv or (s == bv and i < bi):
            bv = s
            bi = i
    bv, bi = _block_best(bv, bi, wv, wi)
    return bi


@cuda.jit(device=True)
def _first_beyond(cand, n, dmin, sv):
    """The first r < n with the distance of sorted cand[r] above dmin (n if none)."""
    t = cuda.threadIdx.x
    if t == 0:
        sv[0] = n
    cuda.syncthreads()
    for r in range(t, n, cuda.blockDim.x):
        if float64(_key_dist(cand[r])) > dmin and (r == 0 or
                                                   float64(_key_dist(cand[r - 1])) <= dmin):
            sv[0] = r
    cuda.syncthreads()
    r = sv[0]
    cuda.syncthreads()
    return r


@cuda.jit(device=True)
def _penalize_and_max(logits, counts, fp, penalize, wv, wi):
    """llama.cpp's penalties in place (float32, as the host) when `penalize`, and the (max, first
    argmax) of the result, in every thread."""
    rp = float32(fp[F_REPEAT])
    pres = float32(fp[F_PRESENCE])
    freq = float32(fp[F_FREQUENCY])
    bv = float32(-math.inf)
    bi = int32(logits.shape[0])
    for i in range(cuda.threadIdx.x, logits.shape[0], cuda.blockDim.x):
        v = logits[i]
        if penalize:
            c = counts[i]
            if c > 0:
                v = v / rp if v > float32(0) else v * rp
                v = v - float32(c) * freq - pres
                logits[i] = v
        if v > bv:                         # strict: the first index of a tie in this stride
            bv = v
            bi = i
    return _block_best(bv, bi, wv, wi)


@cuda.jit(device=True)
def _choose(logits, counts, fp, ip, index, penalize, h0c, h0m):
    """Steps 1-3 of _sample_kernel's chain for one vocabulary row, by the whole block: the pick
    (in every thread) from logits (penalized in place by counts when `penalize`), the parameters
    fp, ip (sampler_params), Philox keyed by `index` (the position of the token being sampled);
    h0c, h0m the row's global scratch. Its shared arrays are the calling kernel's (41 KiB)."""
    hc = cuda.shared.array(BINS, int32)
    hm = cuda.shared.array(BINS, uint64)
    cand = cuda.shared.array(SAMPLE_CAP, uint64)
    wv = cuda.shared.array(32, float32)
    wi = cuda.shared.array(32, int32)
    wc = cuda.shared.array(32, int32)
    wm = cuda.shared.array(32, int64)
    sv = cuda.shared.array(4, int64)
    t = cuda.threadIdx.x
    n = logits.shape[0]
    m, pick = _penalize_and_max(logits, counts, fp, penalize, wv, wi)
    temp = float32(fp[F_TEMP])
    seed = uint64(ip[I_SEED])
    k = ip[I_TOP_K]
    k_on = k > 0 and k < n
    top_p = fp[F_TOP_P]
    dmin = fp[F_MIN_P_D]
    if temp > float32(0) and m > float32(-math.inf) and m < float32(math.inf):
        if not k_on and top_p >= 1.0 and dmin == math.inf:
            pick = _draw_all(logits, m, uint64(MAX_KEY), dmin, temp, seed, index, wv, wi)
        else:
            _histogram(logits, m, TOP_SHIFT, uint64(0), hc, hm)
            for b in range(t, BINS, cuda.blockDim.x):
                h0c[b] = hc[b]
                h0m[b] = hm[b]
            _scan_bins(hc, hm, wc, wm)
            z = hm[BINS - 1]
            b_k = _find(hc, hm, False, k, 0.0, 0, uint64(0), sv) if k_on else BINS - 1
            b_m = min(BINS - 1, int32(f32_bits(float32(dmin)) >> uint32(DIGIT + 9)))
            b_p = BINS - 1
            if top_p < 1.0:
                up = hm[b_k] if k_on else z
                b_p = min(BINS - 1, _find(hc, hm, True, 0, top_p * float64(up), 0, uint64(0),
                                          sv))
            need = b_k if k_on and top_p < 1.0 else min(b_k, min(b_m, b_p))
            if hc[need] <= SAMPLE_CAP:     # small path
                cuda.syncthreads()
                c = _gather(logits, m, TOP_SHIFT, uint64(0), uint64(need), cand, sv)
                _sort(cand, c, hc, hm)
                _scan_bins(hc, hm, wc, wm)
                keep = min(k, c) if k_on else c
                if top_p < 1.0:
                    zk = hm[k - 1] if k_on else z
                    r = _find(hc, hm, True, 0, top_p * float64(zk), 0, uint64(0), sv)
                    keep = min(keep, r + 1)
                keep = max(1, min(keep, _first_beyond(cand, c, dmin, sv)))
                pick = _draw_sorted(cand, keep, temp, seed, index, wv, wi)
            else:                          # big path
                cuda.syncthreads()
                bound = uint64(MAX_KEY)
                zk = z
                if k_on:
                    bound, zk = _select(logits, m, False, k, 0.0, h0c, h0m, hc, hm, cand, wc,
                                        wm, sv)
                if top_p < 1.0:
                    bp, _ = _select(logits, m, True, 0, top_p * float64(zk), h0c, h0m, hc, hm,
                                    cand, wc, wm, sv)
                    bound = min(bound, bp)
                pick = _draw_all(logits, m, bound, dmin, temp, seed, index, wv, wi)
    return pick


@cuda_kernel_bounded(1024)
def _sample_kernel(out, logits, ids, pos, fp, ip, hist, counts, eog, h0c, h0m, j):
    """One block (SAMPLE_THREADS) runs base.py's `sample`; every thread strides the vocabulary
    (coalesced), so each step is one launch inside the decode graph.

    1. penalties in place and the max m / first argmax (one pass); temperature 0: the argmax.
    2. unless nothing truncates: a histogram over the top 11 bits of the float32 distance
       d = m - logit (count and fixed-point mass exp(-d) per bin, shared-memory atomics; one
       pass), saved to h0c, h0m; from its prefix sums, the bin holding each cut: top-k's (count
       k), min-p's (d = -log(min_p)), top-p's (mass top_p of the top-k bins' upper bound).
    3. small path, the survivors fit SAMPLE_CAP: gather every key up to the last bin needed (one
       pass), bitonic-sort them in shared memory, cut exactly there (prefix sums of counts and
       masses) and draw among them (Gumbel-max, Philox per candidate).
       big path: radix-select the top-k cut, then the top-p cut (_select: one pass a level, one
       to gather the final bin), then Gumbel-max over the whole vocabulary in one pass.
    4. thread 0 records the pick (hist, the penalty window, out) and feeds it to the next step.

    Cost (estimated, not yet timed: tests/test_cuda_ops.py::test_sample_kernel_time prints it on
    the GPU): one block issues about 128 thread-instructions a cycle, so a vocabulary pass of
    ~8-25 instructions an element (the logits are in L2, 4 bytes an element) takes ~4-12 us at
    128k ids (1.5-5 us at 49k). Greedy is one pass (~4 us); the small path three passes and a
    sort of at most 2048 keys (~25-30 us at 128k, ~10 us at 49k); no truncation is one pass
    with a Philox block per 4 ids (~20 us); the big path adds up to 4 passes per cut. 64
    registers a thread (launch bound 1024), 41 KiB of static shared memory. A graph replay of
    8 steps at 128k ids thus spends ~0.2 ms sampling, against ~20 ms of an 8B model's decode.
    """
    t = cuda.threadIdx.x
    if j > 0 and out[1] != 0:
        return                             # generation ended earlier in this chunk
    index = pos[0] + 1                     # the position of the token being sampled (read before
    last_n = ip[I_LAST_N]                  # any barrier: thread 0 moves pos on at the end)
    pick = _choose(logits, counts, fp, ip, index, last_n != 0, h0c, h0m)
    if t == 0:
        p = index
        if p < hist.shape[0]:
            hist[p] = pick
        if last_n != 0:                    # the penalty window moves on by one token
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


def sample(logits, ids, pos, st, scratch, j: int, stream) -> None:
    """base.py's `sample` on the GPU: one launch of one SAMPLE_THREADS block. logits (n_vocab,) f32
    (n_vocab <= 2^18), ids, pos (1,) i32 device views, st: SamplerState, scratch: (h0c (BINS,)
    i32, h0m (BINS,) u64) device arrays, j the step of the chunk."""
    if logits.shape[0] > 1 << ID_BITS:
        raise ValueError(f"the device sampler takes vocabularies up to {1 << ID_BITS} ids")
    _sample_kernel[1, SAMPLE_THREADS, stream](st.out, logits, ids, pos, st.fparams, st.iparams,
                                              st.hist, st.counts, st.eog, scratch[0],
                                              scratch[1], j)


@cuda_kernel_bounded(1024)
def _sample_rows_kernel(picks, logits, where, fp, ip, h0c, h0m, counts):
    """Block b: the sampling chain (steps 1-3 of _sample_kernel, no penalties) on logits row
    where[b, 0] with the parameters fp[b], ip[b], Philox keyed by where[b, 1]; picks[b] = the
    pick. A batched step's sampled rows in one launch: nothing is recorded or fed on (the host
    takes the picks, as it takes the greedy ones)."""
    b = cuda.blockIdx.x
    pick = _choose(logits[where[b, 0]], counts, fp[b], ip[b], where[b, 1], False, h0c[b], h0m[b])
    if cuda.threadIdx.x == 0:
        picks[b] = pick


@cuda_kernel
def _adjust_rows_kernel(logits, where, fp, adj, bias, n):
    """Entry i of n: logit adj[i, 1] of sampled row adj[i, 0] (batch row where[b, 0]) plus
    bias[i] when adj[i, 3] (OpenAI's logit_bias), then llama.cpp's penalties for a count adj[i, 2]
    > 0 in the window with fp[b]'s (as _penalize_and_max, float32): the host sampler's order
    (request_sampler's bias, then apply_penalties). Each (row, id) at most once."""
    i = cuda.grid(1)
    if i < n:
        b = adj[i, 0]
        tok = adj[i, 1]
        c = adj[i, 2]
        r = where[b, 0]
        v = logits[r, tok]
        if adj[i, 3] != 0:
            v = v + bias[i]
        if c > 0:
            rp = float32(fp[b, F_REPEAT])
            v = v / rp if v > float32(0) else v * rp
            v = v - float32(c) * float32(fp[b, F_FREQUENCY]) - float32(fp[b, F_PRESENCE])
        logits[r, tok] = v


def adjust_rows(logits, where, fp, adj, bias, n: int, stream) -> None:
    """logit_bias and penalties of a batch's sampled rows, n entries (adj (>= n, 4) int64: row
    into where, id, count in the penalty window, has a bias; bias (>= n,) f32), in place, before
    sample_rows. The caller has checked the entries (Model.batch_sample_ids)."""
    if n:
        _adjust_rows_kernel[-(-n // 128), 128, stream](logits, where, fp, adj, bias, n)


def sample_rows(picks, logits, where, fp, ip, scratch, n: int, stream) -> None:
    """The sampling chain of n rows of a batch in one launch of n SAMPLE_THREADS blocks: picks[b]
    (int32) from logits[where[b, 0]] ((rows, n_vocab) f32, n_vocab <= 2^18) with fp[b], ip[b]
    (sampler_params rows, penalties off) and the draw keyed by where[b, 1] (int32 (>= n, 2));
    scratch (h0c (>= n, BINS) i32, h0m (>= n, BINS) u64, counts (1,) i32). The caller has checked
    the rows (Model.batch_sample_ids)."""
    if logits.shape[1] > 1 << ID_BITS:
        raise ValueError(f"the device sampler takes vocabularies up to {1 << ID_BITS} ids")
    _sample_rows_kernel[n, SAMPLE_THREADS, stream](picks, logits, where, fp, ip, scratch[0],
                                                   scratch[1], scratch[2])
