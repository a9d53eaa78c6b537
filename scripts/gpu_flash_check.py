#!/usr/bin/env python3
"""One device run for flash attention (issue 9, point 3): the flash kernel (backends/cuda/flash.py)
against the FP32 prefill kernel and the float64 reference within its rounding bound, its time per
layer of the Llama-3-8B shape (32 heads, 8 KV heads, head_dim 128, f16 cache) at 512 and 4096
tokens against the FP32 kernel, and its TFLOP/s (causal flops: 4 head_dim per (query, visible key)
per head) against the f16 mma.sync peak measured in the same run. A short table comes last; the
issue's floor is <= 0.1 ms per layer at 512 tokens.

usage (from the repository root, on the device; < 3 minutes on an H200):
    source <shared>/gpu/device-env.sh
    python3 scripts/gpu_flash_check.py [--variants 4/64/1,4/32/1,8/64/1,4/64/2] [--budget 150]
        [--json OUT]
    NUMBA_ENABLE_CUDASIM=1 python scripts/gpu_flash_check.py --small --variants 1/16/1
        (the script's logic at toy sizes under the simulator, no GPU)

A variant is WARPS/BN/MIN_BLOCKS (flash.FLASH_WARPS, FLASH_BN, FLASH_MIN_BLOCKS); the first is
checked at both lengths, every variant is timed at both. Timings: the median of CUDA-event timings
of a captured CUDA graph of several launches. Each kernel compiles on first use (~10 s on the host
CPU); steps that would start after --budget seconds are skipped.
"""
from __future__ import annotations

import argparse
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
from numba import cuda  # noqa: E402

from numbaformer.backends.cuda import attention as FP32  # noqa: E402
from numbaformer.backends.cuda import flash as FLASH  # noqa: E402
from gpu_mma_check import mma_peak, time_ms as _time_ms  # noqa: E402  (the same timing)

SMALL = "--small" in sys.argv
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
N_HEAD, N_KV, HD = (4, 1, 16) if SMALL else (32, 8, 128)
LENGTHS = (33, 40) if SMALL else (512, 4096)
CHECK_GROUPS = 1 if SMALL else 2          # KV groups held to float64 at the longest length
STREAM = None
T0 = time.time()


def time_ms(fn, reps: int = 5, per_graph: int = 10) -> float:
    return _time_ms(fn, reps, per_graph, stream=STREAM)


class Problem:
    """A one-layer f16 cache of n tokens (random K, V), the queries and positions 0..n-1, on the
    device; the host copies (K, V as the cache holds them) for the reference."""

    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.n = n
        self.k = rng.standard_normal((N_KV, n, HD)).astype(np.float16)
        self.v = rng.standard_normal((N_KV, n, HD)).astype(np.float16)
        self.q = rng.standard_normal((n, N_HEAD * HD)).astype(np.float32)
        self.pos = np.arange(n, dtype=np.int32)
        # (1, n_kv, n_ctx = n, head_dim); copies: k[None] has a 0 stride, which numba types
        # as a non-contiguous array (layout A), and the kernel takes C arrays as the cache is
        self.dk = cuda.to_device(self.k[None].copy())
        self.dv = cuda.to_device(self.v[None].copy())
        self.dq = cuda.to_device(self.q)
        self.dpos = cuda.to_device(self.pos)
        self.out = cuda.device_array(self.q.shape, np.float32)
        self.scale = 1 / np.sqrt(HD)

    def flash(self):
        FLASH.flash_attention(self.out, self.dq, self.dk, self.dv, 0, self.dpos, self.scale,
                              STREAM)

    def fp32(self):
        FP32.prefill_attention(self.out, self.dq, self.dk, self.dv, 0, self.dpos, self.scale,
                               STREAM)

    def result(self, fn) -> np.ndarray:
        fn()
        got = self.out.copy_to_host(stream=STREAM)
        STREAM.synchronize()
        return got

    def flops(self) -> float:
        return 4.0 * HD * N_HEAD * float(np.sum(self.pos.astype(np.float64) + 1))


def set_variant(v: str) -> None:
    w, bn, mb = (int(x) for x in v.split("/"))
    FLASH.FLASH_WARPS, FLASH.FLASH_BN, FLASH.FLASH_MIN_BLOCKS = w, bn, mb


def check(p: Problem, groups: int) -> dict:
    """Flash against the FP32 kernel (every head) and against float64 within
    test_cuda_flash.flash_bound (the first and last `groups` KV groups)."""
    import reference as R
    from test_cuda_flash import flash_bound
    got = p.result(p.flash)
    ref32 = p.result(p.fp32)
    group = N_HEAD // N_KV
    ratio = 0.0
    for g in sorted({*range(groups), *range(N_KV - groups, N_KV)}):
        cols = slice(g * group * HD, (g + 1) * group * HD)
        q, k, v = p.q[:, cols], p.k[g].astype(np.float32), p.v[g].astype(np.float32)
        ref = R.attention(q, k, v, p.pos, p.pos, group, 1, HD)
        bound = flash_bound(q, k, v, p.pos, p.pos, group, 1, HD, p.scale)
        ratio = max(ratio, float(np.max(np.abs(got[:, cols] - ref) / bound)))
    d32 = float(np.max(np.abs(got - ref32)))
    ok = np.all(np.isfinite(got)) and ratio <= 1
    return {"result": f"{'ok' if ok else 'FAIL'} err/bound {ratio:.3f}, max|flash-fp32| {d32:.2e}"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="1/16/1" if SMALL else "4/64/1,4/32/1,8/64/1,4/64/2")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds; later steps skip")
    ap.add_argument("--json", default=None)
    ap.add_argument("--small", action="store_true", help="toy sizes (a smoke run)")
    a = ap.parse_args()
    global STREAM
    STREAM = cuda.stream()
    if SMALL:                   # toy launch shapes of the simulator tests (conftest)
        FP32.QTILE, FP32.KTILE, FP32.PREFILL_WARPS = 2, 4, 1
    dev = cuda.get_current_device()
    name = getattr(dev, "name", "simulator")
    name = name.decode() if isinstance(name, bytes) else name
    rows: list[dict] = []

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
        rows.append(r)
        print(json.dumps(r), flush=True)
        return r

    peak = step("peak", "f16 mma.sync loop",
                lambda: {"TFLOP/s": round(mma_peak("f16", STREAM), 1)}
                ).get("TFLOP/s")
    variants = [v for v in a.variants.split(",") if v]
    probs = {n: Problem(n, seed=n) for n in LENGTHS}
    fp32 = {}

    def timed(n, v=None):
        p = probs[n]
        if v is None:
            ms = time_ms(p.fp32, reps=3, per_graph=2 if n > 1024 else 10)
            fp32[n] = ms
        else:
            set_variant(v)
            ms = time_ms(p.flash)
        tf = p.flops() / ms / 1e9
        r = {"variant": v or "fp32", "ms": round(ms, 4), "TFLOP/s": round(tf, 1)}
        if peak:
            r["% peak"] = round(100 * tf / peak, 1)
        if v is not None and n in fp32:
            r["x fp32"] = round(fp32[n] / ms, 1)
        return r

    for n in LENGTHS:
        step("fp32", f"{n} tokens", lambda n=n: timed(n))
    for n in LENGTHS:
        step("flash", f"{n} tokens", lambda n=n: timed(n, variants[0]))
    for n in LENGTHS:
        step("check", f"{n} tokens", lambda n=n: (set_variant(variants[0]), {
            "variant": variants[0],
            **check(probs[n], N_KV if n == LENGTHS[0] else CHECK_GROUPS)})[1])
    for v in variants[1:]:
        for n in LENGTHS:
            step("flash", f"{n} tokens", lambda n=n, v=v: timed(n, v))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)
    print(f"\ngpu_flash_check on {name}, {time.time() - T0:.0f} s; {N_HEAD}/{N_KV} heads, "
          f"head_dim {HD}, f16 cache; f16 mma.sync peak {peak} TFLOP/s (this run)")
    print(f"{'kind':<7}{'what':<14}{'variant':<10}{'ms':>9}{'TFLOP/s':>9}{'%peak':>7}"
          f"{'x fp32':>8}  result")
    for r in rows:
        print(f"{r['kind']:<7}{r['what'][:13]:<14}{r.get('variant', ''):<10}"
              f"{r.get('ms', ''):>9}{r.get('TFLOP/s', ''):>9}{r.get('% peak', ''):>7}"
              f"{r.get('x fp32', ''):>8}  {r.get('result', '')}")
    short = [r for r in rows if r["kind"] == "flash" and r["what"] == f"{LENGTHS[0]} tokens"
             and "ms" in r]
    best = min(short, key=lambda r: r["ms"]) if short else None
    print(f"floor ({LENGTHS[0]} tokens <= 0.1 ms per layer): "
          f"{'PASS' if best and best['ms'] <= 0.1 else 'MISS'} best "
          f"{best['ms'] if best else '-'} ms ({best['variant'] if best else 'no timing'})")
    failed = any(str(r.get("result", "")).startswith("FAIL") for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
