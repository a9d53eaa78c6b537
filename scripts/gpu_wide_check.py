#!/usr/bin/env python3
"""One device run for the widened-weights prefill path (matmul_wide.py): per type and shape, the
in-kernel tensor-core GEMM (matmul_mma.gemm, today's path), widen (the GPU layout -> bf16) and the
bf16 GEMM on widened weights for several tiles, checked bitwise against the in-kernel GEMM (the
module's claim) and within the tests' bf16 bound of NumPy on the first type; effective TFLOP/s
(2 M N K over widen + GEMM) against the bf16 mma.sync peak measured in the same run. The issue's
gate: >= 150 TFLOP/s effective on the 512x4096x14336 Q4_K product. A table comes last.

usage (repository root, on the device, after source <shared>/gpu/device-env.sh):
    python3 scripts/gpu_wide_check.py [--types Q4_K,Q8_0,Q6_K,Q5_K,Q4_0,F16]
        [--variants 128x256x2x4/32/4,128x128x2x2/32/4,...] [--budget 240]
    NUMBA_ENABLE_CUDASIM=1 python3 scripts/gpu_wide_check.py --small   (toy sizes, no GPU)
A variant is BMxBNxWMxWN/BK/STAGES[/MIN_BLOCKS]; the first is timed on every type, the others on
Q4_K (which also runs its SwiGLU pair and the 8B shape's Q/O and K/V products).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_mma_check as G  # noqa: E402  (paths, the numpy shim, timing and weights helpers)

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402
from numbaformer.backends.cuda import matmul_mma as MMA  # noqa: E402
from numbaformer.backends.cuda import matmul_wide as WIDE  # noqa: E402
from numbaformer.quants import GGML_TYPES, TYPE_IDS  # noqa: E402

DEFAULT_VARIANTS = ("128x128x4x4/64/3", "256x128x4x4/32/3", "64x128x2x4/32/4",
                    "128x128x2x4/32/4", "128x128x4x4/32/4", "128x256x4x4/32/3",
                    "64x64x2x2/32/4", "256x128x4x4/64/3")
EXTRA_SHAPES = ((4096, 4096), (1024, 4096))      # Q4_K only: Q/O and K/V of the 8B shape


def set_variant(v: str):
    tile, bk, st, *mb = v.split("/")
    WIDE.WIDE_MIN_BLOCKS = int(mb[0]) if mb else 1
    return tuple(int(k) for k in tile.split("x")) + (int(bk), int(st))


def swiglu(qt: int, variants) -> str:
    """The FFN's gate and up pair (SwiGLU epilogue) at M x 14336 x 4096: in-kernel against two
    widens and the wide GEMM, bitwise."""
    S = G.STREAM
    rows, cols = G.SHAPES[1]
    w, _ = G.weights(qt, rows, cols, dequant=False)
    host, _ = G._WEIGHTS[(qt, rows, cols)]
    from numbaformer.backends.cuda.backend import upload_matrix
    from numbaformer.weights import QTensor
    u = QTensor("u", qt, rows, cols, upload_matrix(host[::-1].copy(), qt, cols, S))
    _, _, xb = G.activations(cols)
    flops = 2 * 2 * G.M_TOK * rows * cols
    ref = cuda.device_array((G.M_TOK, rows), np.float32, stream=S)
    ms_in = G.time_ms(lambda: MMA.gemm(ref, xb, w, S, up=u))
    base = ref.copy_to_host(stream=S)
    wb = cuda.device_array((2 * rows, cols), np.uint16, stream=S)
    out = cuda.device_array((G.M_TOK, rows), np.float32, stream=S)
    ms_w = G.time_ms(lambda: WIDE.widen_pair(wb, w, S, u))
    line = f"SwiGLU pair {G.M_TOK}x2x{rows}x{cols}: in-kernel {ms_in:.3f} ms " \
           f"{flops / ms_in / 1e9:.1f} TFLOP/s | 2 widens {ms_w:.4f} ms"
    for v in variants:
        tile = set_variant(v)
        try:
            WIDE.gemm(out, xb, wb, rows, S, swiglu=True, tile=tile)
            same = bool(np.array_equal(out.copy_to_host(stream=S).view(np.uint32),
                                       base.view(np.uint32)))
            ms = G.time_ms(lambda: WIDE.gemm(out, xb, wb, rows, S, swiglu=True, tile=tile))
        except Exception as e:                               # noqa: BLE001
            line += f" | {v}: FAIL {type(e).__name__}: {str(e)[:60]}"
            continue
        line += (f" | {v}: {ms:.3f} ms {flops / ms / 1e9:.1f}, +widen "
                 f"{flops / (ms + ms_w) / 1e9:.1f}{'' if same else ' NOT BITWISE'}")
    return line


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="Q4_K,Q8_0,Q6_K,Q5_K,Q4_0,F16")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--budget", type=float, default=240.0)
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args()
    G.STREAM = cuda.stream()
    S = G.STREAM
    if G.SMALL:
        MMA.MMA_TILES, MMA.BF16_THREADS = ((16, 16, 1, 1),), 32
        WIDE.WIDEN_ROWS, WIDE.WIDEN_THREADS = 8, 32
    variants = [v for v in a.variants.split(",") if v]
    if G.SMALL:
        variants = ["16x16x1x1/32/3", "32x32x2x2/32/2"]
    t0 = time.time()
    peak = G.mma_peak()
    print(f"bf16 mma.sync peak {peak:.1f} TFLOP/s", flush=True)
    table = []
    for ti, tn in enumerate(t for t in a.types.split(",") if t):
        qt = TYPE_IDS[tn]
        for rows, cols in G.SHAPES + (EXTRA_SHAPES if tn == "Q4_K" and not G.SMALL else ()):
            if time.time() - t0 > a.budget:
                table.append(f"{tn} {rows}x{cols}: skipped (budget)")
                continue
            flops = 2 * G.M_TOK * rows * cols
            w, W = G.weights(qt, rows, cols, dequant=ti == 0 and (rows, cols) == G.SHAPES[0])
            x, _, xb = G.activations(cols)
            ref_out = cuda.device_array((G.M_TOK, rows), np.float32, stream=S)
            ms_in = G.time_ms(lambda: MMA.gemm(ref_out, xb, w, S))
            wb = cuda.device_array((rows, cols), np.uint16, stream=S)
            ms_w = G.time_ms(lambda: WIDE.widen(wb, w, S))
            qbytes = w.data.size
            gbs = (qbytes + 2 * rows * cols) / ms_w / 1e6
            base = ref_out.copy_to_host(stream=S)
            out = cuda.device_array((G.M_TOK, rows), np.float32, stream=S)
            line = (f"{tn} {G.M_TOK}x{rows}x{cols}: in-kernel {ms_in:.3f} ms "
                    f"{flops / ms_in / 1e9:.1f} TFLOP/s | widen {ms_w:.4f} ms {gbs:.0f} GB/s")
            for v in (variants if tn == "Q4_K" else variants[:1]):
                tile = set_variant(v)
                try:
                    WIDE.gemm(out, xb, wb, rows, S, tile=tile)
                    got = out.copy_to_host(stream=S)
                    S.synchronize()
                    same = bool(np.array_equal(got.view(np.uint32), base.view(np.uint32)))
                    ms = G.time_ms(lambda: WIDE.gemm(out, xb, wb, rows, S, tile=tile))
                except Exception as e:                       # noqa: BLE001 (a variant's failure)
                    line += f" | {v}: FAIL {type(e).__name__}: {str(e)[:60]}"
                    continue
                eff = flops / (ms + ms_w) / 1e9
                line += (f" | {v}: {ms:.3f} ms {flops / ms / 1e9:.1f} TFLOP/s "
                         f"({100 * flops / ms / 1e9 / peak:.0f} %), +widen {eff:.1f}"
                         f"{'' if same else ' NOT BITWISE'}")
            if W is not None:
                ax, aw = np.abs(x), np.abs(W).astype(np.float32)
                ref = x.astype(np.float64) @ W.T
                bs = GGML_TYPES[qt].block_size if GGML_TYPES[qt].block_size > 1 else 32
                B = np.repeat(aw.reshape(rows, -1, bs).max(axis=2), bs, axis=1)
                rel = 2.0**-7 + 2.0**-16 + cols * 2.0**-23 * (1 + 2.0**-8) ** 2
                bound = rel * (ax @ aw.T) + 2.0**-21 * (ax @ B.T) + 2.0**-23 * np.abs(ref) + 1e-30
                WIDE.gemm(out, xb, wb, rows, S, tile=set_variant(variants[0]))
                got = out.copy_to_host(stream=S)
                S.synchronize()
                line += f" | vs NumPy err/bound {float(np.max(np.abs(got - ref) / bound)):.3f}"
            print(line, flush=True)
            table.append(line)
        if tn == "Q4_K" and time.time() - t0 < a.budget:
            table.append(swiglu(qt, variants))
            print(table[-1], flush=True)
    print(f"\n== wide path (M {G.M_TOK}; peak {peak:.1f} TFLOP/s; {time.time() - t0:.0f} s)")
    for line in table:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
