"""Decode mat-vecs (one token), fused with what surrounds them in the graph.

Two kernels with one structure: the fast one (gemv_q8.q8_kernel) and the exact one here
(`_gemv_kernel(qtype, n_mat, norm, mode, warps)`), chosen by `fast_path(qtype, exact)`:
  prologue  x is staged in shared memory once per block; with `norm`, as rmsnorm(x) * w (the block
            reduces x^2 itself), so a norm never costs a launch of its own. The fast kernel stages
            it as 8-bit integers per 32 values for the quantized types, as f32 for the float
            types; the exact kernel as f32, with its 16-value sums for the K-quant min terms;
  rows      up to three matrices of one type and width (Q, K, V) form one virtual range of row
            pairs; blocks are persistent (a grid of a few blocks per SM) and their warps walk the
            pairs with a grid stride, so the staging is paid a few times per SM, not per row;
  row dot   fast kernel (gemv_q8.UNITS and F32_UNITS): 16-byte units of the row's q plane straight
            into registers, dp4a against the q8 activations (f32 FMAs for the float types, which
            are exact and take it always); exact kernel (the quantized types with `exact`, Q2_K,
            Q3_K): each row streams through a per-warp shared segment of whole blocks gathered
            into GGUF order from the planes, dotted with the type's dot32 from quants.py;
  epilogue  mode 0: store; 1: + bias; 2: + residual (out may be the residual); 3 (SwiGLU): the two
            matrices are gate and up, out[r] = silu(gate[r] . x) * (up[r] . x).
Weights: rows in the GPU layout (layout.py), (rows, pitch) uint8 with uint32 views.
"""
from __future__ import annotations

import functools
import os

import numpy as np
from numba import cuda, float32, uint8

from ...quants import GGML_TYPES, Q8_0, QK
from ._jit import cuda_kernel
from .launch import dtype_view
from .decoders import DECODERS
from . import gemv_q8, rows_mma
from .gemv_q8 import (F32_UNITS, UNITS, finish_pair, pair_ranges, pair_views, q8_kernel,
                      smem_words, stage_f32)
from .intrinsics import syncwarp
from .layout import gather_block
from .reduce import WARP, warp_sum

GEMV_WARPS = 8
BLOCKS_PER_SM = 4
# A batched step's decode rows, up to ROWS_MAX of them, take gemv_rows (the fast mat-vec over
# many activation rows) instead of the tensor-core GEMM (NUMBAFORMER_DECODE_ROWS=0: never);
# ROWS_GROUP activation rows share a block's weight loads (the rest re-read them from L2 in
# another grid row). H200, 8B Q4_K shapes, one step's products (scripts/gpu_rows_bench.py):
# 1 / 4 / 16 / 64 rows 2.65 / 8.3 / 30.7 / 117 ms at group 8 (16: 2.65 / 8.3 / 51.6 / 197),
# the GEMM's 35.0 / 34.6 / 35.7 / 33.6: the crossover is past 16 rows
ROWS = os.environ.get("NUMBAFORMER_DECODE_ROWS", "1") == "1"
ROWS_MAX = 16
ROWS_GROUP = int(os.environ.get("NUMBAFORMER_ROWS_GROUP", "8"))
ROWS_GROUP_MAX = 16       # the largest group compiled (tests/test_cuda_ops.py checks its spills)
# rows past the count computed, not branched around, and no bound checks where a row's units
# are whole batches (gemv_q8._row_tree, unit_ops' `full`): the rows' dots share one basic block
# and NVVM shares their row-independent part (PTX 27 % smaller at Q4_K, 48 % at Q6_K) at the cost
# of registers (Q4_K group 8: 121 -> 212); not timed yet: off
ROWS_CLAMP = os.environ.get("NUMBAFORMER_ROWS_CLAMP", "0") == "1"
# Q4_K and Q6_K decode rows on the s8 tensor cores (rows_mma.py), for ROWS_MMA_MIN to ROWS_MMA_MAX
# rows; their sums in another order than the one-row mat-vec's (not its bits). H200, one 8B Q4_K
# step's products (scripts/gpu_rows_bench.py, 2026-12-02, sixth session), ms at 1 / 4 / 16 / 32 /
# 64 rows: tensor cores (rows_mma VERSION 3, 2 tiles a warp, 8 warps a block) 4.67 / 4.72 / 6.87 /
# 11.9 / 23.9, the dp4a rows kernel 2.65 / 8.24 / 31.4 / 61.7 / 122, the GEMM 35.9 / 35.4 / 35.3 /
# 35.0 / 33.7: the tensor cores up to rows_mma.MAX_ROWS. From one row on, although the dp4a kernel
# is faster at 1 and 2: a sequence's logits are then the same bits alone or in a batch of up to 64
# decode rows (as a seeded request's text must be; the dp4a kernel below 3 rows would make a lone
# row's bits differ from a batched one's)
ROWS_MMA = os.environ.get("NUMBAFORMER_ROWS_MMA", "1") == "1"
# NUMBAFORMER_ROWS_MMA_MAX sets the crossover: past it the step's rows take the tensor-core GEMM,
# on widened weights from matmul_wide.WIDE_MIN_TOKENS rows on (the seventh session's prefill
# figures suggest ~11 ms a 64-row 8B step there: widen ~5.7 ms, the bf16 weights' read ~5; to be
# measured with `bench --parallel` at a lower crossover and NUMBAFORMER_WIDE_MIN_TOKENS)
ROWS_MMA_MIN = 1
ROWS_MMA_MAX = int(os.environ.get("NUMBAFORMER_ROWS_MMA_MAX", "64"))
# quantized types: x quantized by a kernel of its own, read from L2 by every block, instead of each
# block staging it, with Q4_K/Q5_K pair units (gemv_q8.PAIR_UNITS) then. H200 probe, % of copy
# bandwidth at 14336x4096 / 4096x14336 (scripts/gpu_probe.py, 2026-12-02): Q4_K 38.3/29.4 staged,
# 36.9/36.3 prequantized with pairs; Q8_0 67.0/46.8 -> 65.9/54.0; Q6_K 42.1/37.5 -> 38.0/42.2;
# Q4_1 55.2/41.5 -> 49.7/42.4. A win for long rows only (the staging of 14336 columns costs more
# than a 4096-column row saves), so: NUMBAFORMER_PREQUANT=0/1 (default 1) ..
PREQUANT = os.environ.get("NUMBAFORMER_PREQUANT", "1") == "1"
PREQUANT_MIN_COLS = 8192       # .. for rows this long ..
PREQUANT_MIN_BYTES = 8 << 20   # .. in launches reading this much (a small model's mat-vecs are
                               # latency-bound: a second launch would cost more than the staging)
SEGMENT_BYTES = 1024     # weight bytes a warp stages per step (exact path)
MODES = {"store": 0, "bias": 1, "residual": 2, "swiglu": 3}


def fast_path(qtype: int, exact: bool = False) -> bool:
    """Whether a mat-vec of this type takes the fast kernel (gemv_q8.py): the float types always
    (their units dot f32 activations: exact), the quantized types with a unit dot unless asked to
    be exact (8-bit activations)."""
    return qtype in F32_UNITS or (not exact and qtype in UNITS)


def segment_blocks(qtype: int) -> int:
    """Blocks per staged segment: whole blocks (16-byte multiple), as many as fit SEGMENT_BYTES."""
    cb = GGML_TYPES[qtype].chunk_bytes
    k = 1
    while (k * cb) % 16:
        k += 1
    return k * max(1, SEGMENT_BYTES // (k * cb))


@functools.lru_cache(maxsize=None)
def _staged_row_dot(qtype: int, seg_blocks: int):
    """A device function (row8, cols, xs, xsum, seg, lane) -> this lane's partial dot."""
    dot32 = DECODERS[qtype][1]
    cb = GGML_TYPES[qtype].chunk_bytes
    cpb = GGML_TYPES[qtype].chunks_per_block
    gather = gather_block(qtype)

    @cuda.jit(device=True)
    def row_dot(row8, cols, xs, xsum, seg, lane):
        """The row streams through the warp's segment `seg` seg_blocks blocks at a time, in GGUF
        order: lane i gathers block i of the segment from the planes, a syncwarp publishes them,
        the lane dots chunks lane, lane+32, .. of the segment, and a syncwarp frees it."""
        n_blocks = cols // QK // cpb
        acc = float32(0)
        for b0 in range(0, n_blocks, seg_blocks):
            for i in range(lane, min(seg_blocks, n_blocks - b0), WARP):
                gather(row8, n_blocks, b0 + i, seg[i * cb:])
            syncwarp()                                  # segment visible to every lane
            nc = min(seg_blocks, n_blocks - b0) * cpb
            for c in range(lane, nc, WARP):
                acc += dot32(seg, (c // cpb) * cb, c % cpb, xs, QK * (b0 * cpb + c), 16, xsum)
            syncwarp()                                  # segment consumed: free to refill
        return acc

    return row_dot


@functools.lru_cache(maxsize=None)
def _pair_dot(qtype: int):
    """(device function pair_dot(row_a8, row_b8, same, cols, sm, seg, lane) -> two partial dots of
    the exact path, the staged segment's bytes). sm holds f32 x' and its 16-value sums."""
    sb = segment_blocks(qtype)
    row_dot = _staged_row_dot(qtype, sb)

    @cuda.jit(device=True)
    def staged_pair(row_a8, row_b8, same, cols, sm, seg, lane):
        """Partial dots of two rows, one after the other (row_b skipped when `same`)."""
        xsum = sm[cols:]
        a = row_dot(row_a8, cols, sm, xsum, seg, lane)
        b = a if same else row_dot(row_b8, cols, sm, xsum, seg, lane)
        return a, b
    return staged_pair, sb * GGML_TYPES[qtype].chunk_bytes


def smem_bytes(qtype: int, cols: int, exact: bool) -> int:
    """Dynamic shared memory of a mat-vec launch: the staged activations."""
    return 4 * (smem_words(qtype, cols) if fast_path(qtype, exact) else cols + cols // 16)


@functools.lru_cache(maxsize=None)
def _gemv_kernel(qtype: int, n_mat: int, norm: bool, mode: int, warps: int):
    """The exact mat-vec kernel (f32 activations, staged rows)."""
    pair_dot, seg_bytes = _pair_dot(qtype)
    threads = warps * WARP

    @cuda_kernel
    def _gemv(o0, o1, o2, w0, w1, w2, v0, v1, v2, e0, e1, e2, x, norm_w, eps):
        """Matrices w0..w{n_mat-1} (uint32 rows; v0.. the same as uint8) share x (1, cols):
        out_m[0, r] = w_m[r] . x' (+ e_m per mode), x' = x or rmsnorm(x) * norm_w. Warps take row
        pairs: virtual pair p runs over w0's pairs (rows 2q, 2q+1), then w1's, then w2's, with a
        grid stride. SwiGLU: pair r is (gate[r], up[r]) and o0[0, r] = silu(gate[r] . x') *
        (up[r] . x')."""
        sm = cuda.shared.array(0, float32)
        segs = cuda.shared.array((warps, seg_bytes), uint8)
        red = cuda.shared.array(32, float32)
        tid = cuda.threadIdx.x
        cols = x.shape[1]
        stage_f32(sm, x, norm_w, eps, norm, red, threads)
        cuda.syncthreads()                               # activations staged
        lane = tid % WARP
        wi = tid // WARP
        seg = segs[wi]
        p0, p1, n_pairs = pair_ranges(w0, w1, w2, n_mat, mode == 3)
        rows0, rows1, rows2 = w0.shape[0], w1.shape[0], w2.shape[0]
        for p in range(cuda.blockIdx.x * warps + wi, n_pairs, cuda.gridDim.x * warps):
            ra, rb, ra8, rb8, last = pair_views(p, p0, p1, mode == 3, w0, w1, w2, v0, v1, v2)
            a, b = pair_dot(ra8, rb8, last, cols, sm, seg, lane)
            a = warp_sum(a)
            b = warp_sum(b)
            if lane == 0:
                finish_pair(p, p0, p1, mode, a, b, o0, o1, o2, e0, e1, e2, rows0, rows1, rows2,
                            0)

    return _gemv


_GRID_CAPS: dict = {}


def grid_cap(k, threads: int, smem: int) -> int:
    """Blocks of a grid that are all resident at once: SMs x min(BLOCKS_PER_SM, what the compiled
    kernel's registers and shared memory allow). A persistent grid larger than that runs a second,
    partial wave (a Q6_K kernel at 92 registers fits 2 blocks of 256 threads per SM, not 4). Before
    the first launch has compiled k, BLOCKS_PER_SM is taken (the results do not depend on the
    grid: each pair is one warp group's, in a fixed order)."""
    cap = _GRID_CAPS.get((k, threads, smem))
    if cap is None:
        kernels = list(getattr(k, "overloads", {}).values())
        if not kernels or not hasattr(kernels[0], "max_cooperative_grid_blocks"):
            return _n_sms() * BLOCKS_PER_SM
        fit = min(kk.max_cooperative_grid_blocks(threads, smem) for kk in kernels)
        cap = _GRID_CAPS[(k, threads, smem)] = max(1, min(fit, _n_sms() * BLOCKS_PER_SM))
    return cap


@functools.lru_cache(maxsize=None)
def _n_sms() -> int:
    from ._sim import SIMULATOR
    if SIMULATOR:
        return 1
    return cuda.get_current_device().MULTIPROCESSOR_COUNT


_QBUFS: dict = {}


def _prequant(x, norm_w, eps, qtype, stream):
    """x's q8 activations (or rmsnorm(x) * norm_w's) by quant_kernel into a buffer kept per width
    (allocated on first use, outside any graph capture: the first call of a step runs eagerly)."""
    cols = x.shape[1]
    buf = _QBUFS.get(cols)
    if buf is None:
        buf = _QBUFS[cols] = cuda.device_array(smem_words(qtype, cols), np.float32)
    quantize_rows(buf.reshape(1, buf.size), x, norm_w, eps, stream)
    return buf


def rows_words(cols: int) -> int:
    """Words of a row of q8 activations for the rows kernels (quantize_rows' out, gemv_rows' xa):
    smem_words(Q8_0, cols) rounded up to 4, so that every row starts 16-byte aligned, as the
    kernels' 16-byte loads of xq need (cols 576, SmolLM2's width: 198 words, odd rows of xa only
    8-byte aligned, a misaligned-address fault on the H200)."""
    return -(-smem_words(Q8_0, cols) // 4) * 4


def quantize_rows(out, x, norm_w, eps, stream) -> None:
    """out (n, rows_words(cols)) f32 = the q8 activations of x's n rows (of rmsnorm(x) * norm_w
    with norm_w), one grid row of quant_kernel blocks per row: each row's numbers are the staged
    ones."""
    n, cols = x.shape
    if out.shape[0] < n or out.shape[1] != rows_words(cols) or not out.is_c_contiguous():
        raise ValueError(f"q8 rows: out {out.shape}, need ({n}.., {rows_words(cols)}) contiguous")
    threads = GEMV_WARPS * WARP
    k = gemv_q8.quant_kernel(norm_w is not None, threads)
    blocks = -(-(cols // 4) // (4 * threads))
    k[(blocks, n), threads, stream](out, x, x[0] if norm_w is None else norm_w, np.float32(eps))


@functools.lru_cache(maxsize=None)
def _no_rope():
    """Stand-ins for the rope arguments of launches without rope (one kernel signature)."""
    return (cuda.to_device(np.zeros(1, np.int32)), cuda.to_device(np.zeros(1, np.float64)),
            cuda.to_device(np.zeros((1, 1, 1, 2), np.float16)), 0)


def _mat_args(outs, ws, extras, mode: int, filler) -> tuple:
    """The kernels' first twelve arguments: three outputs, the matrices as uint32 and as uint8
    views, three extras (bias arrays or the residual), each padded to three by repeating the
    first (extras by `filler`, or by the output in the residual mode)."""
    o = list(outs) + [outs[0]] * (3 - len(outs))
    w8 = [w.data for w in ws]
    w8 += [w8[0]] * (3 - len(ws))
    e = list(extras) if extras else []
    e += [o[0] if mode == 2 else filler] * (3 - len(e))
    return (*o, *[dtype_view(a, np.uint32) for a in w8], *w8, *e)


def _prequantized(ws, exact: bool) -> bool:
    """Whether gemv() quantizes x by a launch of its own for these matrices (long rows, much
    weight to read) rather than in each block's prologue."""
    qtype = ws[0].qtype
    return PREQUANT and fast_path(qtype, exact) and qtype not in F32_UNITS and \
        ws[0].cols >= PREQUANT_MIN_COLS and sum(w.data.nbytes for w in ws) >= PREQUANT_MIN_BYTES


def _pair_units(ws, exact: bool) -> bool:
    """Whether gemv()'s fast kernel takes a lane's units two at a time for these matrices."""
    return (gemv_q8.PAIR_UNITS or _prequantized(ws, exact)) and ws[0].qtype in gemv_q8.PAIR_DOTS


def rows_supported(ws, exact: bool = False) -> bool:
    """Whether gemv_rows takes these matrices: one type and width, the fast kernel on 8-bit
    activations (not the float types), and a batched-step switch that is on."""
    return ROWS and not exact and len({(w.qtype, w.cols) for w in ws}) == 1 and \
        fast_path(ws[0].qtype) and ws[0].qtype not in F32_UNITS


def rows_on_tensor_cores(ws, n: int) -> bool:
    """Whether gemv_rows takes each of these matrices on the s8 tensor cores (ROWS_MMA, n within
    ROWS_MMA_MIN .. ROWS_MMA_MAX, rows_mma.supported; gemv_rows merges launches where it can)."""
    return ROWS_MMA and ROWS_MMA_MIN <= n <= ROWS_MMA_MAX and \
        all(rows_mma.supported(w.qtype, w.rows, w.cols, n, 0) for w in ws)


def gemv_rows(outs, ws, xa, n: int, stream, *, mode: str = "store", extras=None) -> None:
    """The fast mat-vec over n activation rows at once (a batched step's decode rows):
    outs[m][:n] (n, rows_m) f32 from QTensors ws[m] (rows_supported) and xa[:n], their q8
    activations (quantize_rows); mode and extras as gemv()'s (the residual (n, rows) f32). On
    the dp4a rows kernel each weight row pair is read once per ROWS_GROUP activation rows and row
    t's outputs are the bits gemv() gives for x[t] alone (same units per lane, same pair units:
    _pair_units); for ROWS_MMA_MIN..ROWS_MMA_MAX rows of the matrices rows_mma takes, its
    tensor-core kernels, whose sums for a row do not depend on the other rows either but are
    added in another order (within float32 rounding of gemv()'s): Q/K/V and SwiGLU's gate/up
    in one launch where rows_mma.mergeable (SwiGLU otherwise on the dp4a kernel here; the
    backend's norm_swiglu runs two tensor-core products and silu_mul instead)."""
    n_mat, qtype, cols = len(ws), ws[0].qtype, ws[0].cols
    assert rows_supported(ws) and 1 <= n_mat <= 3 and xa.shape[0] >= n >= 1
    if xa.shape[1] != rows_words(cols) or not xa.is_c_contiguous() or \
            any(o.shape[0] < n for o in outs):
        raise ValueError(f"gemv_rows: xa {xa.shape}, need (>= {n}, {rows_words(cols)}) "
                         f"contiguous (quantize_rows), outputs of >= {n} rows")
    m = MODES[mode]
    if rows_on_tensor_cores(ws, n) and (m < 3 or rows_mma.mergeable(ws)):
        if m == 3:                                              # gate, up: SwiGLU in one launch
            return rows_mma.launch_swiglu(outs[0], ws[0], ws[1], xa, n, stream)
        if n_mat > 1 and rows_mma.mergeable(ws):                # one launch (Q, K, V)
            return rows_mma.launch_many(ws, outs, extras, xa, n, m, stream)
        for k, w in enumerate(ws):                              # a launch per matrix
            rows_mma.launch(w, outs[k:], extras[k:] if extras else None, xa, n, m, stream)
        return
    pairs = ws[0].rows if m == 3 else sum((w.rows + 1) // 2 for w in ws)
    group = min(ROWS_GROUP, ROWS_GROUP_MAX, 1 << (n - 1).bit_length())
    upb, bv = UNITS[qtype][2:]
    full = ROWS_CLAMP and (cols // bv * upb) % (WARP * gemv_q8.UNROLL) == 0
    k = gemv_q8.rows_kernel(qtype, n_mat, m, GEMV_WARPS, gemv_q8.UNROLL, _pair_units(ws, False),
                            group, ROWS_CLAMP, full)
    args = (*_mat_args(outs, ws, extras, m, xa[0]), xa, np.int64(cols), np.int64(n))
    grid = max(1, min(-(-pairs // GEMV_WARPS), grid_cap(k, GEMV_WARPS * WARP, 0)))
    k[(grid, -(-n // group)), GEMV_WARPS * WARP, stream](*args)


def rope_fusable(ws, exact: bool, rope_dim: int, head_dim: int) -> bool:
    """Whether Q, K, V (and their rope and cache store) can be one fast launch: one type and
    width, the fast kernel, rope over whole heads."""
    return (len({(w.qtype, w.cols) for w in ws}) == 1 and fast_path(ws[0].qtype, exact)
            and rope_dim == head_dim)


def gemv(outs, ws, x, stream, *, mode: str = "store", extras=None, norm_w=None, eps=0.0,
         opt_in=None, exact: bool = False, rope=None) -> None:
    """Fused decode mat-vec: outs[m] (1, rows_m) f32 from QTensors ws[m] (same type and width, GPU
    layout) and x (1, cols) f32; see the module docstring for `mode`, extras (bias arrays or the
    residual), norm_w (rmsnorm x with these weights first) and `exact` (f32 activations).
    mode "rope" (Q, K, V; extras: their biases or None; the fast kernel only, rope_fusable):
    rope = (pos, inv_freq, k_cache, v_cache, layer, head_dim, neox) rotates Q and K by pos[0]
    and writes K and V into the caches' row pos[0] too."""
    n_mat, qtype, cols = len(ws), ws[0].qtype, ws[0].cols
    assert all(w.qtype == qtype and w.cols == cols for w in ws) and 1 <= n_mat <= 3
    if mode == "rope":
        assert n_mat == 3 and fast_path(qtype, exact)
        m = 5 if extras else 4
    else:
        m = MODES[mode]
    pairs = ws[0].rows if m == 3 else sum((w.rows + 1) // 2 for w in ws)
    slots = _n_sms() * BLOCKS_PER_SM * GEMV_WARPS          # warps of a full grid
    split = 1
    prequant = _prequantized(ws, exact)
    if prequant:
        buf = _prequant(x, norm_w, eps, qtype, stream)
        norm_w, eps = buf, 0.0             # the kernel reads buf in norm_w's slot, no norm
    if fast_path(qtype, exact):
        if pairs < gemv_q8.SPLIT_BELOW * slots:
            split = min(gemv_q8.SPLIT, GEMV_WARPS)
        hd, neox = (rope[5], rope[6]) if rope else (0, False)
        k = q8_kernel(qtype, n_mat, norm_w is not None and not prequant, m, GEMV_WARPS,
                      gemv_q8.UNROLL, split, gemv_q8.PROBE, hd, neox, prequant,
                      _pair_units(ws, exact))
    else:
        k = _gemv_kernel(qtype, n_mat, norm_w is not None, m, GEMV_WARPS)
    args = (*_mat_args(outs, ws, extras, m, x[0]), x, x[0] if norm_w is None else norm_w,
            np.float32(eps))
    if fast_path(qtype, exact):
        if rope:
            pos, inv_freq, kc, vc, layer = rope[:5]
            args += (pos, inv_freq, kc, vc, np.int64(layer))
        else:
            pos, inv_freq, cache, layer = _no_rope()
            args += (pos, inv_freq, cache, cache, np.int64(layer))
    smem = 0 if prequant else smem_bytes(qtype, cols, exact)
    if opt_in is not None:
        opt_in(k, smem, *args)
    groups = GEMV_WARPS // split
    grid = max(1, min((pairs + groups - 1) // groups, grid_cap(k, GEMV_WARPS * WARP, smem)))
    k[grid, GEMV_WARPS * WARP, stream, smem](*args)
