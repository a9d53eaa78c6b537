"""The tensor-core GEMM at decode batch sizes (issue 10): how far a batched decode step's products
are from the weight-read ceiling, per shape, batch size and tile/k-tile, beside the one-row fast
mat-vec (gemv) of the same matrix. GB/s = the matrix's bytes in the GPU layout / time, against
the device-to-device copy bandwidth measured in the same run.

usage (from the repository root, on the device, after <shared>/gpu/device-env.sh):
    python3 scripts/gpu_gemm_small.py [--type Q4_K] [--n 1,4,16,64] [--variants 64x64x2x2/32/2/1,...]
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_mma_check as C  # noqa: E402  (sets up the paths and the numpy shim)

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

from numbaformer.backends.cuda import gemv  # noqa: E402
from numbaformer.backends.cuda.matmul import _opt_in  # noqa: E402
from numbaformer.backends.cuda import matmul_mma as MMA  # noqa: E402
from numbaformer.quants import TYPE_IDS  # noqa: E402

SHAPES = (("q/o", 4096, 4096), ("k/v", 1024, 4096), ("down", 4096, 14336), ("gate", 14336, 4096))


def copy_gbps() -> float:
    a = cuda.device_array(1 << 28, np.uint8, stream=C.STREAM)
    b = cuda.device_array(1 << 28, np.uint8, stream=C.STREAM)
    ms = C.time_ms(lambda: b.copy_to_device(a, stream=C.STREAM))
    return 2 * a.nbytes / ms / 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--type", default="Q4_K")
    ap.add_argument("--n", default="1,4,16,64")
    ap.add_argument("--variants", default="64x64x2x2/32/2/1")
    ap.add_argument("--decode-tiles", default="64x64x2x2,16x64x1x4")
    a = ap.parse_args()
    C.STREAM = cuda.stream()
    qt = TYPE_IDS[a.type]
    bw = copy_gbps()
    print(f"copy bandwidth {bw:.0f} GB/s; {a.type}; GB/s of the weights (% of copy)")
    rows_out = []
    for name, rows, cols in SHAPES:
        w, _ = C.weights(qt, rows, cols, dequant=False)
        gb = w.data.nbytes / 1e9
        x1 = cuda.to_device(np.random.default_rng(0).standard_normal((1, cols)).astype(np.float32))
        o1 = cuda.device_array((1, rows), np.float32)
        ms = C.time_ms(lambda: gemv.gemv([o1], [w], x1, C.STREAM, mode="store", opt_in=_opt_in))
        rows_out.append(f"{name:5} {rows}x{cols} gemv n=1: {ms * 1e3:7.1f} us "
                        f"{gb / ms * 1e3:6.0f} GB/s ({gb / ms * 1e5 / bw:4.1f} %)")
        for v in a.variants.split(","):
            C.set_variant(v)
            cells = []
            for n in (int(k) for k in a.n.split(",")):
                x = np.random.default_rng(n).standard_normal((n, cols)).astype(np.float32)
                xd = cuda.to_device(x, stream=C.STREAM)
                xb = cuda.device_array((n, cols), np.uint16, stream=C.STREAM)
                MMA.to_bf16(xb, xd, C.STREAM)
                out = cuda.device_array((n, rows), np.float32, stream=C.STREAM)
                ms = C.time_ms(lambda: MMA.gemm(out, xb, w, C.STREAM))
                cells.append(f"n={n} {ms * 1e3:6.1f} us {gb / ms * 1e5 / bw:4.1f}%")
            rows_out.append(f"      gemm {v:18} " + " | ".join(cells))
        C.set_variant("64x64x2x2/32/2/1")
        for dt in a.decode_tiles.split(","):
            MMA.DECODE_TILE = tuple(int(v) for v in dt.split("x"))
            rows_out.append(decode_row(w, rows, cols, gb, bw, a.n, dt))
    print("\n".join(rows_out))
    return 0


def decode_row(w, rows, cols, gb, bw, ns, dt) -> str:
    splits = MMA.decode_splits(w, False, gemv._n_sms())
    part = cuda.device_array(64 * 64 * rows, np.float32)
    cells = []
    for n in (int(k) for k in ns.split(",")):
        xb = cuda.device_array((n, cols), np.uint16, stream=C.STREAM)
        MMA.to_bf16(xb, cuda.to_device(np.ones((n, cols), np.float32)), C.STREAM)
        out = cuda.device_array((n, rows), np.float32, stream=C.STREAM)
        pv = part[:splits * n * rows].reshape(splits, n, rows)
        ms = C.time_ms(lambda: MMA.gemm(out, xb, w, C.STREAM, part=pv))
        cells.append(f"n={n} {ms * 1e3:6.1f} us {gb / ms * 1e5 / bw:4.1f}%")
    return f"      decode {dt:9}, {splits:2} k-slices " + " | ".join(cells)


if __name__ == "__main__":
    raise SystemExit(main())
