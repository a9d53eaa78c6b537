#!/usr/bin/env python3
"""One device run for the tensor-core work (issue 9, points 1-2): the primitives' GPU checks, the
tensor-core GEMM against NumPy at 512x4096x14336, and its effective TFLOP/s (2 M N K / t) at
512x4096x14336 and 512x14336x4096 for several types, against the bf16 mma.sync peak measured in
the same run by a tight mma loop and against today's FP32 GEMM. A short table comes last; the
issue's gate is >= 150 TFLOP/s on the 512x4096x14336 Q4_K product.

usage (from the repository root, on the device):
    source <shared>/gpu/device-env.sh
    python3 scripts/gpu_mma_check.py [--types Q4_K,Q8_0,Q6_K,F16] [--check-types Q4_K,Q8_0,Q6_K,F16]
        [--variants 128x128x2x4/32/2/1,128x128x2x4/64/1/1,...] [--budget 180] [--json OUT]
    NUMBA_ENABLE_CUDASIM=1 python scripts/gpu_mma_check.py --small --variants 16x16x1x1/32/2/1
        (the script's logic at toy sizes under the simulator, no GPU)

A variant is BMxBNxWMxWN/BK/LOOKAHEAD/MIN_BLOCKS (matmul_mma.MMA_TILES[0], MMA_BK,
MMA_LOOKAHEAD, MMA_MIN_BLOCKS); every variant is timed on Q4_K at both shapes, the first one is
also the configuration the other types are timed and checked with. Each kernel compiles on first
use (~5-10 s each on the host CPU); steps that would start after --budget seconds are skipped.
Timings: the median of CUDA-event timings of a captured CUDA graph of several launches (no host
launch overhead); the weights stay in L2 between launches, which is immaterial for a product of
this size (its weights are read in ~10 us of a ~0.4 ms kernel).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
os.environ.setdefault("NUMBAFORMER_TEST_GPU", "1")

import numpy as np  # noqa: E402

import numbaformer.backends.cuda  # noqa: E402,F401  (numpy shim before numba.cuda)
from numba import cuda, float32, uint32  # noqa: E402

from numbaformer.backends.cuda import matmul as FP32  # noqa: E402
from numbaformer.backends.cuda import matmul_mma as MMA  # noqa: E402
from numbaformer.backends.cuda.backend import upload_matrix  # noqa: E402
from numbaformer.backends.cuda.graph import CudaGraph  # noqa: E402
from numbaformer.backends.cuda.mma import mma_bf16, mma_f16  # noqa: E402
from numbaformer.quants import GGML_TYPES, TYPE_IDS  # noqa: E402
from numbaformer.synthetic import random_blocks  # noqa: E402
from numbaformer.weights import QTensor  # noqa: E402

STREAM = None                                     # cuda.stream(), made by main()
SMALL = "--small" in sys.argv                     # toy sizes: a smoke run under the simulator
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
M_TOK = 20 if SMALL else 512
SHAPES = ((24, 512), (40, 256)) if SMALL else ((4096, 14336), (14336, 4096))  # (N, K)
DEFAULT_VARIANTS = ("128x128x2x4/32/2/1", "128x128x2x4/64/1/1", "128x128x2x4/32/3/1",
                    "128x128x2x4/32/2/2", "128x64x4x2/32/2/2")
T0 = time.time()


def time_ms(fn, reps: int = 5, per_graph: int = 10, stream=None) -> float:
    """Median GPU time of one fn() (launching on `stream`, default STREAM), from a CUDA graph of
    per_graph calls (under the simulator: the host time of one call)."""
    if SIM:
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    stream = stream or STREAM
    fn()
    stream.synchronize()
    g = CudaGraph()
    g.capture(stream, lambda: [fn() for _ in range(per_graph)])
    g.launch(stream)
    start, stop = cuda.event(), cuda.event()
    times = []
    for _ in range(reps):
        start.record(stream)
        g.launch(stream)
        stop.record(stream)
        stop.synchronize()
        times.append(cuda.event_elapsed_time(start, stop) / per_graph)
    g.close()
    return float(np.median(times))


# ---- the mma.sync peak (bf16, or f16 for gpu_flash_check.py): 8 independent accumulator chains
# ---- per warp, registers only ----

PEAK_ITERS = 512
PEAK_ONES = {"bf16": 0x3F803F80, "f16": 0x3C003C00}     # pairs of 1.0 in each format


@functools.lru_cache(maxsize=None)
def _mma_peak_kernel(form: str):
    mma = {"bf16": mma_bf16, "f16": mma_f16}[form]
    ones = uint32(PEAK_ONES[form])

    @cuda.jit
    def peak(out, n_iter):
        tid = cuda.threadIdx.x
        a = ones ^ uint32(tid)                       # pairs near 1.0, lane-dependent
        b = ones ^ uint32(tid >> 2)
        acc = cuda.local.array(32, float32)
        for k in range(32):
            acc[k] = float32(0)
        for _ in range(n_iter):
            for c in range(8):
                acc[4 * c], acc[4 * c + 1], acc[4 * c + 2], acc[4 * c + 3] = mma(
                    a, a, a, a, b, b, acc[4 * c], acc[4 * c + 1], acc[4 * c + 2], acc[4 * c + 3])
        s = float32(0)
        for k in range(32):
            s += acc[k]
        out[cuda.blockIdx.x * cuda.blockDim.x + tid] = s

    return peak


def mma_peak(form: str = "bf16", stream=None) -> float:
    """TFLOP/s of m16n8k16 mma.sync of `form` (4096 flop each) on every SM: 4 blocks of 8 warps."""
    stream = stream or STREAM
    blocks = 1 if SIM else cuda.get_current_device().MULTIPROCESSOR_COUNT * (1 if SMALL else 4)
    threads = 32 if SMALL else 256
    iters = 2 if SMALL else PEAK_ITERS
    out = cuda.device_array(blocks * threads, np.float32)
    k = _mma_peak_kernel(form)
    ms = time_ms(lambda: k[blocks, threads, stream](out, iters), reps=5, per_graph=2,
                 stream=stream)
    return blocks * threads // 32 * iters * 8 * 4096 / ms / 1e9


# ---- the GEMM ----

_WEIGHTS: dict = {}


def weights(qtype: int, rows: int, cols: int, dequant: bool):
    """A random-weight QTensor on the device (GPU layout) and, if asked, its float64 values."""
    key = (qtype, rows, cols)
    if key not in _WEIGHTS:
        t = GGML_TYPES[qtype]
        host = random_blocks(qtype, rows * cols // t.block_size, cols ** -0.5,
                             seed=qtype).reshape(rows, -1)
        _WEIGHTS[key] = (host, QTensor("w", qtype, rows, cols, upload_matrix(host, qtype, cols,
                                                                             STREAM)))
    host, w = _WEIGHTS[key]
    if not dequant:
        return w, None
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize
    return w, dequantize(host, GGMLQuantizationType(qtype)).astype(np.float64)


def activations(cols: int):
    x = np.random.default_rng(cols).standard_normal((M_TOK, cols)).astype(np.float32)
    xd = cuda.to_device(x, stream=STREAM)
    xb = cuda.device_array((M_TOK, cols), np.uint16, stream=STREAM)
    MMA.to_bf16(xb, xd, STREAM)
    return x, xd, xb


def set_variant(v: str):
    tile, bk, la, mb = v.split("/")
    MMA.MMA_TILES = (tuple(int(k) for k in tile.split("x")),)
    MMA.MMA_BK, MMA.MMA_LOOKAHEAD, MMA.MMA_MIN_BLOCKS = int(bk), int(la), int(mb)


def check_gemm(qtype: int) -> str:
    """The 512x4096x14336 product against NumPy float64 of gguf's dequantized weights, within the
    bound of tests/test_cuda_matmul_mma.py (bf16 roundings, f32 sum); 'err/bound R'."""
    rows, cols = SHAPES[0]
    w, W = weights(qtype, rows, cols, dequant=True)
    x, _, xb = activations(cols)
    out = cuda.device_array((M_TOK, rows), np.float32, stream=STREAM)
    MMA.gemm(out, xb, w, STREAM)
    got = out.copy_to_host(stream=STREAM)
    STREAM.synchronize()
    ref = x.astype(np.float64) @ W.T
    ax, aw = np.abs(x), np.abs(W).astype(np.float32)
    bs = GGML_TYPES[qtype].block_size if GGML_TYPES[qtype].block_size > 1 else 32
    B = np.repeat(aw.reshape(rows, -1, bs).max(axis=2), bs, axis=1)
    rel = 2.0**-7 + 2.0**-16 + cols * 2.0**-23 * (1 + 2.0**-8) ** 2
    bound = rel * (ax @ aw.T) + 2.0**-21 * (ax @ B.T) + 2.0**-23 * np.abs(ref) + 1e-30
    ratio = float(np.max(np.abs(got - ref) / bound))
    if not np.isfinite(ratio) or ratio > 1:
        raise AssertionError(f"err/bound {ratio:.3f}")
    return f"err/bound {ratio:.3f}"


def time_gemm(qtype: int, rows: int, cols: int) -> tuple[float, float]:
    """(ms of the GEMM, ms of the bf16 rounding of its input) at M_TOK x rows x cols."""
    w, _ = weights(qtype, rows, cols, dequant=False)
    _, xd, xb = activations(cols)
    out = cuda.device_array((M_TOK, rows), np.float32, stream=STREAM)
    ms = time_ms(lambda: MMA.gemm(out, xb, w, STREAM))
    conv = time_ms(lambda: MMA.to_bf16(xb, xd, STREAM))
    return ms, conv


def time_fp32(qtype: int, rows: int, cols: int) -> float:
    w, _ = weights(qtype, rows, cols, dequant=False)
    _, xd, _ = activations(cols)
    out = cuda.device_array((M_TOK, rows), np.float32, stream=STREAM)
    return time_ms(lambda: FP32.matmul(out, xd, w, STREAM), reps=3, per_graph=2)


# ---- the primitives: tests/test_cuda_mma.py's checks, on the GPU ----

def primitives() -> str:
    import test_cuda_mma as t
    names = ["test_mma_every_form_against_numpy", "test_ldmatrix_every_form_against_numpy",
             "test_cp_async_groups_and_waits", "test_pack_rounds_to_nearest_even",
             "test_every_primitive_in_one_tile_kernel"]
    for n in names:
        getattr(t, n)()
    return f"{len(names)} checks ok"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="Q4_K,Q8_0,Q6_K,F16", help="types timed at both shapes")
    ap.add_argument("--check-types", default="Q4_K,Q8_0,Q6_K,F16",
                    help="types checked against NumPy at 512x4096x14336")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--fp32-types", default="Q4_K", help="types the FP32 GEMM is timed for")
    ap.add_argument("--budget", type=float, default=180.0, help="seconds; later steps skip")
    ap.add_argument("--json", default=None)
    ap.add_argument("--small", action="store_true", help="toy sizes (a smoke run)")
    a = ap.parse_args()
    global STREAM
    STREAM = cuda.stream()
    if SMALL:          # toy launch shapes of the simulator tests (conftest.cuda_toy_shapes)
        FP32.GEMM_BM, FP32.GEMM_BN, FP32.GEMM_TM, FP32.GEMM_TN, MMA.BF16_THREADS = 8, 8, 2, 2, 32
    dev = cuda.get_current_device()
    name = getattr(dev, "name", "simulator")
    name = name.decode() if isinstance(name, bytes) else name
    rows_out: list[dict] = []

    def step(kind, what, fn):
        if time.time() - T0 > a.budget:
            r = {"kind": kind, "what": what, "result": "skipped (budget)"}
        else:
            t = time.time()
            try:
                r = {"kind": kind, "what": what, **fn()}
            except Exception as e:
                traceback.print_exc()
                r = {"kind": kind, "what": what, "result": f"FAIL {type(e).__name__}: "
                     f"{str(e).splitlines()[0][:80] if str(e) else ''}"}
            r["s"] = round(time.time() - t, 1)
        rows_out.append(r)
        print(json.dumps(r), flush=True)
        return r

    step("primitives", "mma/ldmatrix/cp.async/pack", lambda: {"result": primitives()})
    peak_r = step("peak", "bf16 mma.sync loop", lambda: {"TFLOP/s": round(mma_peak(), 1)})
    peak = peak_r.get("TFLOP/s")
    variants = [v for v in a.variants.split(",") if v]
    q4k = TYPE_IDS["Q4_K"]
    fp32 = {}
    for tn in filter(None, a.fp32_types.split(",")):
        for rows, cols in SHAPES:
            def run(tn=tn, rows=rows, cols=cols):
                ms = time_fp32(TYPE_IDS[tn], rows, cols)
                fp32[tn, rows, cols] = ms
                return {"ms": round(ms, 3), "TFLOP/s": round(2 * M_TOK * rows * cols / ms / 1e9, 1)}
            step("fp32 gemm", f"{tn} {M_TOK}x{rows}x{cols}", run)

    def timed(tn, rows, cols, v):
        set_variant(v)
        ms, conv = time_gemm(TYPE_IDS[tn], rows, cols)
        tf = 2 * M_TOK * rows * cols / ms / 1e9
        r = {"variant": v, "ms": round(ms, 4), "TFLOP/s": round(tf, 1),
             "with to_bf16": round(2 * M_TOK * rows * cols / (ms + conv) / 1e9, 1)}
        if peak:
            r["% peak"] = round(100 * tf / peak, 1)
        if (tn, rows, cols) in fp32:
            r["x fp32"] = round(fp32[tn, rows, cols] / ms, 1)
        return r

    first = variants[0] if variants else DEFAULT_VARIANTS[0]

    def chk(tn):
        set_variant(first)
        return {"variant": first, "result": check_gemm(TYPE_IDS[tn])}

    checks = [tn for tn in a.check_types.split(",") if tn]
    types = [tn for tn in a.types.split(",") if tn]
    # what the gate needs first, then the other types, then the other variants
    for rows, cols in SHAPES:
        step("mma gemm", f"Q4_K {M_TOK}x{rows}x{cols}", lambda r=rows, c=cols:
             timed("Q4_K", r, c, first))
    if "Q4_K" in checks:
        step("check", f"Q4_K {M_TOK}x{SHAPES[0][0]}x{SHAPES[0][1]} vs NumPy", lambda: chk("Q4_K"))
    for tn in types:
        if tn != "Q4_K":
            for rows, cols in SHAPES:
                step("mma gemm", f"{tn} {M_TOK}x{rows}x{cols}", lambda tn=tn, r=rows, c=cols:
                     timed(tn, r, c, first))
    for tn in checks:
        if tn != "Q4_K":
            step("check", f"{tn} {M_TOK}x{SHAPES[0][0]}x{SHAPES[0][1]} vs NumPy",
                 lambda tn=tn: chk(tn))
    for v in variants[1:]:
        for rows, cols in SHAPES:
            step("mma gemm", f"Q4_K {M_TOK}x{rows}x{cols}", lambda v=v, r=rows, c=cols:
                 timed("Q4_K", r, c, v))

    gate = [r for r in rows_out if r["kind"] == "mma gemm"
            and r["what"] == f"Q4_K {M_TOK}x{SHAPES[0][0]}x{SHAPES[0][1]}" and "TFLOP/s" in r]
    best = max(gate, key=lambda r: r["TFLOP/s"]) if gate else None
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "rows": rows_out}, f, indent=1)
    print(f"\ngpu_mma_check on {name}, {time.time() - T0:.0f} s; bf16 mma.sync peak "
          f"{peak} TFLOP/s (this run)")
    print(f"{'kind':<11}{'what':<26}{'variant':<20}{'ms':>8}{'TFLOP/s':>9}{'%peak':>7}"
          f"{'x fp32':>8}  result")
    for r in rows_out:
        print(f"{r['kind']:<11}{r['what'][:25]:<26}{r.get('variant', ''):<20}"
              f"{r.get('ms', ''):>8}{r.get('TFLOP/s', ''):>9}{r.get('% peak', ''):>7}"
              f"{r.get('x fp32', ''):>8}  {r.get('result', '')}")
    ok = best is not None and best["TFLOP/s"] >= 150
    print(f"gate (Q4_K {M_TOK}x{SHAPES[0][0]}x{SHAPES[0][1]} >= 150 TFLOP/s): "
          f"{'PASS' if ok else 'MISS'} best {best['TFLOP/s'] if best else '-'} "
          f"({best['variant'] if best else 'no timing'})")
    failed = any(str(r.get("result", "")).startswith("FAIL") for r in rows_out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
