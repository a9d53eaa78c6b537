#!/usr/bin/env python3
"""Per-kernel GPU throughput: GEMV GB/s against the measured copy bandwidth (the fast 8-bit path
and the exact f32 one), GEMM FLOP/s against the fp32 peak, for every quant type, at Llama-3-8B
shapes.

usage: python scripts/gpu_bench.py [--types Q4_K,Q6_K,...] [--paths fast,exact] [--json OUT.json]
Weights are random bytes with sane fp16 scales; each timing rotates over enough copies of the
weights to defeat the L2 cache, runs after a warm-up, and is the median of CUDA-event timings of a
captured CUDA graph of several launches (host launch overhead excluded, as in decode).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import numbaformer.backends.cuda  # noqa: E402,F401  (numpy shim, decoder registration)
from numba import cuda  # noqa: E402

from numbaformer.backends.cuda import elementwise  # noqa: E402
from numbaformer.backends.cuda import gemv as G  # noqa: E402
from numbaformer.backends.cuda import gemv_q8 as Q8  # noqa: E402
from numbaformer.backends.cuda import matmul as M  # noqa: E402
from numbaformer.backends.cuda.backend import upload_matrix  # noqa: E402
from numbaformer.backends.cuda.layout import device_bytes  # noqa: E402
from numbaformer.backends.cuda.gemv import fast_path  # noqa: E402
from numbaformer.backends.cuda.graph import CudaGraph  # noqa: E402
from numbaformer.quants import DECODERS, GGML_TYPES, TYPE_IDS  # noqa: E402
from numbaformer.synthetic import random_blocks  # noqa: E402
from numbaformer.weights import QTensor  # noqa: E402

FP32_PEAK_TFLOPS = {"H100": 66.9, "H200": 66.9}      # SXM datasheet, dense fp32 (non-tensor)
L2_DEFEAT_BYTES = 256 << 20
STREAM = cuda.stream()


def time_ms(fn, reps: int = 20, warmup: int = 3, per_graph: int = 10) -> float:
    """Median GPU time of one fn() (which launches on STREAM): per_graph calls are captured into a
    CUDA graph and replayed between two events, so host launch overhead is not counted."""
    for _ in range(warmup):
        fn()
    STREAM.synchronize()
    g = CudaGraph()
    g.capture(STREAM, lambda: [fn() for _ in range(per_graph)])
    start, stop = cuda.event(), cuda.event()
    times = []
    for _ in range(reps):
        start.record(STREAM)
        g.launch(STREAM)
        stop.record(STREAM)
        stop.synchronize()
        times.append(cuda.event_elapsed_time(start, stop) / per_graph)
    g.close()
    return float(np.median(times))


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB as complex128 elements (16 bytes per thread), bytes read +
    written per second (GB/s): the copy kernel bench --kernels measures against too."""
    n = (1 << 31) // 16
    a = cuda.device_array(n, np.complex128)
    b = cuda.device_array(n, np.complex128)
    ms = time_ms(lambda: elementwise.copy16(b, a, STREAM), reps=10, per_graph=2)
    return 2 * n * 16 / ms / 1e6


@functools.lru_cache(maxsize=None)
def _weights(qtype: int, rows: int, cols: int, copies: int):
    t = GGML_TYPES[qtype]
    host = random_blocks(qtype, rows * cols // t.block_size, cols ** -0.5).reshape(rows, -1)
    return [QTensor("w", qtype, rows, cols, upload_matrix(host, qtype, cols))
            for _ in range(copies)]


def bench_gemv(qtype: int, rows: int, cols: int, exact: bool) -> dict:
    """Bytes counted: the weights as the kernel reads them (GPU layout, padding included)."""
    nbytes = device_bytes(QTensor("w", qtype, rows, cols, None))
    copies = max(1, -(-L2_DEFEAT_BYTES // nbytes))
    ws = _weights(qtype, rows, cols, copies)
    x = cuda.to_device(np.random.default_rng(1).standard_normal((1, cols)).astype(np.float32))
    out = cuda.device_array((1, rows), np.float32)
    it = iter(range(1 << 30))

    def run():
        M.matmul(out, x, ws[next(it) % copies], STREAM, exact=exact)
    ms = time_ms(run, reps=30, per_graph=2 * copies)
    path = "fast" if fast_path(qtype, exact) else "exact"
    return {"kernel": f"gemv {path}", "type": GGML_TYPES[qtype].name, "shape": f"{rows}x{cols}",
            "ms": round(ms, 4), "GB/s": round(nbytes / ms / 1e6, 1)}


def bench_gemm(qtype: int, rows: int, cols: int, n: int) -> dict:
    ws = _weights(qtype, rows, cols, 1)
    x = cuda.to_device(np.random.default_rng(1).standard_normal((n, cols)).astype(np.float32))
    out = cuda.device_array((n, rows), np.float32)
    ms = time_ms(lambda: M.matmul(out, x, ws[0], STREAM), reps=10, per_graph=2)
    return {"kernel": f"gemm n={n}", "type": GGML_TYPES[qtype].name, "shape": f"{rows}x{cols}",
            "ms": round(ms, 3), "TFLOP/s": round(2 * n * rows * cols / ms / 1e9, 2)}


SWEEP = [(w, b, u, s) for w, u, s in ((8, 4, 1), (8, 4, 2), (8, 2, 1), (8, 2, 2), (4, 4, 1),
                                         (4, 4, 2)) for b in (2, 4)]


def sweep(types, bw: float) -> None:
    """% of copy bandwidth of the fast mat-vec per launch configuration (warps per block, blocks
    per SM, units per batch, warps per row pair), both 8B shapes."""
    saved = G.GEMV_WARPS, G.BLOCKS_PER_SM, Q8.UNROLL, Q8.SPLIT, Q8.SPLIT_BELOW
    for tn in types:
        for w, b, u, s in SWEEP:
            G.GEMV_WARPS, G.BLOCKS_PER_SM, Q8.UNROLL, Q8.SPLIT = w, b, u, s
            Q8.SPLIT_BELOW = 1 << 30 if s > 1 else 0
            pct = [100 * bench_gemv(TYPE_IDS[tn], *shape, exact=False)["GB/s"] / bw
                   for shape in ((14336, 4096), (4096, 14336))]
            print(f"sweep {tn} warps={w} blocks/SM={b} unroll={u} split={s}: "
                  + " ".join(f"{p:.1f}%" for p in pct), flush=True)
    G.GEMV_WARPS, G.BLOCKS_PER_SM, Q8.UNROLL, Q8.SPLIT, Q8.SPLIT_BELOW = saved


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default=",".join(GGML_TYPES[t].name for t in DECODERS))
    ap.add_argument("--paths", default="fast,exact", help="mat-vec paths to time")
    ap.add_argument("--gemm-types", default="Q4_K,Q8_0")
    ap.add_argument("--sweep", default="", help="types whose fast mat-vec is timed at every "
                    "(warps per block, blocks per SM, units per batch) in SWEEP, then exit")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else dev.name
    bw = copy_bandwidth()
    peak = next((v for k, v in FP32_PEAK_TFLOPS.items() if k in name), None)
    rows = []
    if a.sweep:
        print(f"device: {name}; copy bandwidth {bw:.0f} GB/s")
        sweep(a.sweep.split(","), bw)
        return 0
    for tn in a.types.split(","):
        qt = TYPE_IDS[tn]
        paths = [p for p in a.paths.split(",") if p == "exact" or fast_path(qt)]
        for path in paths:
            for shape in ((14336, 4096), (4096, 14336)):
                r = bench_gemv(qt, *shape, exact=path == "exact")
                r["% of copy BW"] = round(100 * r["GB/s"] / bw, 1)
                rows.append(r)
                print("  ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    for tn in filter(None, a.gemm_types.split(",")):
        r = bench_gemm(TYPE_IDS[tn], 14336, 4096, 512)
        if peak:
            r["% of fp32 peak"] = round(100 * r["TFLOP/s"] / peak, 1)
        rows.append(r)
    print(f"device: {name}; copy bandwidth {bw:.0f} GB/s; fp32 peak {peak} TFLOP/s (datasheet)")
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "copy_GBps": bw, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
