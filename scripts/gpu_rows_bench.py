"""The many-rows decode mat-vec (gemv.gemv_rows, issue 10) at the 8B shapes: each row's outputs
checked bit for bit against the one-row mat-vec of that row alone, then timed per shape, row count
and group (activation rows sharing a block's weight loads) beside the one-row mat-vec and the
tensor-core GEMM of the same rows. GB/s = the matrix's bytes in the GPU layout / time, against the
device-to-device copy bandwidth of the same run. Last: one decode step's products (32 layers of
q, k, v, o, gate+up, down and the Q6_K output head) per row count and group, and the group that
is fastest at 16 rows on a line of its own ("best: g=8", "best: mma w=4", for scripts).

usage (from the repository root, on the device, after <shared>/gpu/device-env.sh):
    python3 scripts/gpu_rows_bench.py [--type Q4_K] [--n 1,4,8,16,32,64] [--groups 4,8,16]
                                      [--clamp 0,1] [--mma 0,8,8v3t1,8v3t2]
    (--mma: 0 is the dp4a kernel, W rows_mma's tensor-core kernels with W warps a block, WvV3tT
    its VERSION 3 Q4_K kernel with T 16-row tiles a warp)
"""
from __future__ import annotations

import argparse
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_mma_check as C  # noqa: E402  (sets up the paths and the numpy shim)

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

from numbaformer.backends.cuda import elementwise, gemv, rows_mma  # noqa: E402
from numbaformer.backends.cuda import matmul_mma as MMA  # noqa: E402
from numbaformer.backends.cuda.backend import upload_matrix  # noqa: E402
from numbaformer.backends.cuda.matmul import _opt_in  # noqa: E402
from numbaformer.quants import GGML_TYPES, Q6_K, Q8_0, TYPE_IDS  # noqa: E402
from numbaformer.synthetic import random_blocks  # noqa: E402
from numbaformer.weights import QTensor  # noqa: E402

# name, rows, cols, matrices (2: gate and up with the SwiGLU epilogue), per layer
SHAPES = (("q/o", 4096, 4096, 1, 2), ("k/v", 1024, 4096, 1, 2), ("gate+up", 14336, 4096, 2, 1),
          ("down", 4096, 14336, 1, 1))
N_LAYER = 32
if C.SIM:                  # the script's logic at toy sizes under the simulator
    SHAPES = (("q/o", 32, 512, 1, 2), ("gate+up", 16, 512, 2, 1))
    OUTPUT = ("output", 10, 256, 1, 0)
    gemv.GEMV_WARPS = 1
    MMA.MMA_TILES, MMA.MMA_BK, MMA.BF16_THREADS = ((16, 16, 1, 1),), 32, 32
else:
    OUTPUT = ("output", 128256, 4096, 1, 0)


def copy_gbps() -> float:
    a = cuda.device_array(1 << 28, np.uint8, stream=C.STREAM)
    b = cuda.device_array(1 << 28, np.uint8, stream=C.STREAM)
    ms = C.time_ms(lambda: b.copy_to_device(a, stream=C.STREAM))
    return 2 * a.nbytes / ms / 1e6


def weights(qtype: int, rows: int, cols: int, seed: int) -> QTensor:
    """A random-weight matrix on the device in the GPU layout (gate and up: two seeds, so the
    second is not read from L2)."""
    host = random_blocks(qtype, rows * cols // GGML_TYPES[qtype].block_size, cols ** -0.5,
                         seed=seed).reshape(rows, -1)
    return QTensor("w", qtype, rows, cols, upload_matrix(host, qtype, cols, C.STREAM))


def label(variant) -> str:
    g, clamp, mma, version, tiles = variant
    if not mma:
        return f"g={g}{' clamp' if clamp else ''}"
    return f"mma w={mma}" + (f" v3 t={tiles}" if version == 3 else "")


_UP: dict = {}


def run_rows(ws, xa, n, outs):
    """The step's product as the backend runs it: SwiGLU in the dp4a kernel's epilogue, or on
    the tensor cores (ROWS_MMA) two products and silu_mul."""
    if len(ws) == 2 and gemv.rows_on_tensor_cores(ws, n):
        key = (n, ws[1].rows)
        if key not in _UP:
            _UP[key] = cuda.device_array((n, ws[1].rows), np.float32, stream=C.STREAM)
        gemv.gemv_rows(outs, ws[:1], xa, n, C.STREAM)
        gemv.gemv_rows([_UP[key]], ws[1:], xa, n, C.STREAM)
        elementwise.silu_mul(outs[0][:n], outs[0][:n], _UP[key], C.STREAM)
        return
    mode = "swiglu" if len(ws) == 2 else "store"
    gemv.gemv_rows(outs, ws, xa, n, C.STREAM, mode=mode)


def check_bits(ws, x, xa, n, exact: bool = True) -> bool:
    """gemv_rows' rows == gemv() of each row alone (every 5th row and the last); not `exact`
    (the tensor-core form, another order of the sums): within 1e-4 of the row's largest value."""
    rows, mode = ws[0].rows, "swiglu" if len(ws) == 2 else "store"
    out = cuda.device_array((n, rows), np.float32, stream=C.STREAM)
    run_rows(ws, xa, n, [out])
    got = out.copy_to_host(stream=C.STREAM)
    for t in sorted({*range(0, n, 5), n - 1}):
        o1 = cuda.device_array((1, rows), np.float32, stream=C.STREAM)
        gemv.gemv([o1], ws, x[t:t + 1], C.STREAM, mode=mode, opt_in=_opt_in)
        one = o1.copy_to_host(stream=C.STREAM)[0]
        if exact and not np.array_equal(one, got[t]):
            return False
        if not exact and np.abs(one - got[t]).max() > 1e-4 * np.abs(one).max():
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--type", default="Q4_K")
    ap.add_argument("--n", default="1,4,8,16,32,64")
    ap.add_argument("--groups", default="4,8,16")
    ap.add_argument("--clamp", default="0", help="gemv.ROWS_CLAMP variants: 0, 1 or 0,1")
    ap.add_argument("--mma", default="0", help="gemv.ROWS_MMA variants: 0 off, else W[v3tT]: the "
                    "warps of a block of rows_mma's kernels (Q4_K, Q6_K on the s8 tensor cores), "
                    "v3tT: its VERSION 3 Q4_K kernel with T tiles a warp (e.g. 8,8v3t1,8v3t2)")
    a = ap.parse_args()
    C.STREAM = cuda.stream()
    gemv.ROWS = True
    qt = TYPE_IDS[a.type]
    ns = [int(k) for k in a.n.split(",")]
    mmas = [re.fullmatch(r"(\d+)(?:v(\d)t(\d))?", m).groups() for m in a.mma.split(",")]
    mmas = [(int(w), int(v or 2), int(t or 1)) for w, v, t in mmas]
    groups = [(int(g), c == "1", 0, 2, 1) for g in a.groups.split(",")
              for c in a.clamp.split(",")] if any(w == 0 for w, _, _ in mmas) else []
    groups += [(0, False, w, v, t) for w, v, t in mmas if w]
    bw = copy_gbps()
    print(f"copy bandwidth {bw:.0f} GB/s; {a.type}; us (% of copy bandwidth on the weights)")
    lines, ok = [], True
    step = {(g, n): 0.0 for g in groups + ["gemm", "gemv"] for n in ns}
    for name, rows, cols, n_mat, per_layer in SHAPES + (OUTPUT,):
        wqt = Q6_K if name == "output" else qt
        ws = [weights(wqt, rows, cols, seed) for seed in range(n_mat)]
        gb = sum(w.data.nbytes for w in ws) / 1e9
        count = N_LAYER * per_layer or 1
        x = cuda.to_device(np.random.default_rng(cols).standard_normal((max(ns), cols))
                           .astype(np.float32) * 2, stream=C.STREAM)
        xa = cuda.device_array((max(ns), gemv.rows_words(cols)), np.float32,
                               stream=C.STREAM)
        gemv.quantize_rows(xa, x, None, 0.0, C.STREAM)
        o1 = cuda.device_array((1, rows), np.float32, stream=C.STREAM)
        mode = "swiglu" if n_mat == 2 else "store"
        ms1 = C.time_ms(lambda: gemv.gemv([o1], ws, x[:1], C.STREAM, mode=mode, opt_in=_opt_in))
        lines.append(f"{name:8} {rows}x{cols}{' x2' if n_mat == 2 else ''} one-row gemv "
                     f"{ms1 * 1e3:7.1f} us ({gb / ms1 * 1e5 / bw:4.1f} %)")
        for n in ns:
            step[("gemv", n)] += count * n * ms1
        for g in groups:
            gemv.ROWS_GROUP, gemv.ROWS_CLAMP, gemv.ROWS_MMA = g[0] or 8, g[1], bool(g[2])
            rows_mma.WARPS = g[2] or rows_mma.WARPS
            rows_mma.VERSION, rows_mma.TILES = g[3], g[4]
            gemv.ROWS_MMA_MIN, gemv.ROWS_MMA_MAX = 1, rows_mma.MAX_ROWS      # every row count
            bits = check_bits(ws, x, xa, max(ns), exact=not g[2])
            ok &= bits
            cells = []
            for n in ns:
                out = cuda.device_array((n, rows), np.float32, stream=C.STREAM)
                ms = C.time_ms(lambda: run_rows(ws, xa, n, [out]))
                step[(g, n)] += count * ms
                cells.append(f"{n:2}: {ms * 1e3:6.1f} ({gb / ms * 1e5 / bw:4.1f}%)")
            lines.append(f"   rows {label(g):10} bits {'ok' if bits else 'DIFFER'}  "
                         + " ".join(cells))
        if name != "output":
            cells = []
            for n in ns:
                xb = cuda.device_array((n, cols), np.uint16, stream=C.STREAM)
                MMA.to_bf16(xb, x[:n], C.STREAM)
                out = cuda.device_array((n, rows), np.float32, stream=C.STREAM)
                kw = {"up": ws[1]} if n_mat == 2 else {}
                ms = C.time_ms(lambda: MMA.gemm(out, xb, ws[0], C.STREAM, **kw))
                step[("gemm", n)] += count * ms
                cells.append(f"{n:2}: {ms * 1e3:6.1f}")
            lines.append("   tensor-core GEMM  " + " ".join(cells))
    print("\n".join(lines))
    print(f"\none decode step's products, ms (8B shape, {N_LAYER} layers + output), "
          "aggregate tok/s bound")
    for k in groups + ["gemm", "gemv"]:
        name = "rows " + label(k) if isinstance(k, tuple) else ("GEMM" if k == "gemm" else
                                                                 "gemv per row")
        print(f"{name:16} " + " ".join(f"n={n}: {step[(k, n)]:6.2f} ms "
                                        f"{n / step[(k, n)] * 1e3:6.0f}/s" for n in ns))
    at = 16 if 16 in ns else ns[-1]
    best = min(groups, key=lambda g: step[(g, at)])
    print(f"best: {label(best)}")
    print("bits: every row equals the one-row mat-vec (mma: within 1e-4)" if ok else
          "bits: DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
