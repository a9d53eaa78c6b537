#!/usr/bin/env python3
"""Time every op of one decode step (and one prefill chunk) on the GPU with CUDA events.

usage: python scripts/gpu_profile.py MODEL [--ctx 1024] [--prefill 512] [--pos 256]
Ops are launched directly (no graph) with an event pair around each, so launch gaps are excluded;
matmuls are keyed by weight name and report GB/s of weight bytes read.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import numpy as np  # noqa: E402

from numbaformer.backends.cuda.backend import CUDABackend  # noqa: E402
from numbaformer.loader import load_model_file  # noqa: E402
from numbaformer.model import Model  # noqa: E402
from numba import cuda  # noqa: E402

SKIP = {"alloc", "to_device", "to_host", "copy_in", "synchronize", "replay", "upload", "stats",
        "check_memory", "kv_dtype"}


class Timed:
    """Wraps a backend: every op call is bracketed by CUDA events on the backend's stream."""

    def __init__(self, ops):
        self.ops, self.events = ops, []

    def __getattr__(self, name):
        f = getattr(self.ops, name)
        if not callable(f) or name in SKIP:
            return f

        def timed(*args, **kw):
            key = name
            for a in args:
                if hasattr(a, "qtype") and hasattr(a, "name"):
                    key = f"{name}:{a.name.split('.')[-2]}:{a.type_name}"
                    nbytes = a.nbytes
                    break
            else:
                nbytes = 0
            e0, e1 = cuda.event(), cuda.event()
            e0.record(self.ops.stream)
            f(*args, **kw)
            e1.record(self.ops.stream)
            self.events.append((key, e0, e1, nbytes))
        return timed

    def report(self, title):
        cuda.synchronize()
        agg = defaultdict(lambda: [0, 0.0, 0])
        for key, e0, e1, nb in self.events:
            a = agg[key]
            a[0] += 1
            a[1] += cuda.event_elapsed_time(e0, e1) * 1e3
            a[2] += nb
        total = sum(a[1] for a in agg.values())
        print(f"\n{title}: {total:.0f} us in {len(self.events)} launches")
        for key, (n, us, nb) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
            bw = f"{nb / us / 1e3:8.0f} GB/s" if nb else ""
            print(f"  {key:34s} {n:4d}x {us:9.1f} us {us / n:8.2f} us/call {bw}")
        self.events.clear()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--pos", type=int, default=256)
    a = ap.parse_args()
    mf = load_model_file(a.model)
    m = Model(mf, CUDABackend(), n_ctx=a.ctx, n_batch=a.prefill)
    m.warmup()
    ids = np.random.default_rng(0).integers(0, mf.config.n_vocab, a.prefill)
    m.forward(ids, 0)
    t = Timed(m.ops)
    m.ops = t
    m.forward(ids, 0)
    t.report(f"prefill {a.prefill} tokens")
    # decode: record the calls of one step, then time each call alone as a CUDA graph of REPS
    # copies (no host launch gaps), and time whole replays of the real decode graph
    m.ops = t.ops
    m.ops.copy_in(m.buf.ids, np.array([1], np.int32))
    m.ops.copy_in(m.buf.pos, np.array([a.pos], np.int32))
    rec = Recorder(t.ops)
    m.ops = rec
    m._run(m.buf.rows(1), True)
    m.ops = t.ops
    agg = defaultdict(lambda: [0, 0.0, 0])
    for key, fn, args, kw, nbytes in rec.calls:
        us = graph_time_us(t.ops.stream, lambda: fn(*args, **kw))
        agg[key][0] += 1
        agg[key][1] += us
        agg[key][2] += nbytes
    total = sum(v[1] for v in agg.values())
    print(f"\ndecode step at position {a.pos}: {total:.0f} us of kernels in {len(rec.calls)} ops")
    for key, (n, us, nb) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        bw = f"{nb / us / 1e3:8.0f} GB/s" if nb else ""
        print(f"  {key:34s} {n:4d}x {us:9.1f} us {us / n:8.2f} us/call {bw}")
    m.forward([1], a.pos, greedy=True)
    e0, e1 = cuda.event(), cuda.event()
    e0.record(m.ops.stream)
    for _ in range(20):
        m.ops.replay(("decode", True), None)
    e1.record(m.ops.stream)
    e1.synchronize()
    print(f"decode graph replay: {cuda.event_elapsed_time(e0, e1) / 20 * 1e3:.0f} us per step")


REPS = 20


def graph_time_us(stream, fn) -> float:
    """GPU time of one fn() (launches on `stream`): REPS copies captured in a graph, replayed."""
    from numbaformer.backends.cuda.graph import CudaGraph
    g = CudaGraph()
    g.capture(stream, lambda: [fn() for _ in range(REPS)])
    g.launch(stream)                              # warm
    e0, e1 = cuda.event(), cuda.event()
    e0.record(stream)
    g.launch(stream)
    e1.record(stream)
    e1.synchronize()
    g.close()
    return cuda.event_elapsed_time(e0, e1) * 1e3 / REPS


class Recorder(Timed):
    """Wraps a backend: records (key, op, args, kwargs, weight bytes) of every op call, then runs it."""

    def __init__(self, ops):
        super().__init__(ops)
        self.calls = []

    def __getattr__(self, name):
        f = getattr(self.ops, name)
        if not callable(f) or name in SKIP:
            return f

        def record(*args, **kw):
            key, nbytes = name, 0
            for a in args:
                for w in (a if isinstance(a, (tuple, list)) else (a,)):
                    if hasattr(w, "qtype") and hasattr(w, "name"):
                        key = f"{name}:{w.name.split('.')[-2]}:{w.type_name}"
                        nbytes += w.nbytes
            self.calls.append((key, f, args, kw, nbytes))
            f(*args, **kw)
        return record

if __name__ == "__main__":
    main()
