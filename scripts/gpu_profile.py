#!/usr/bin/env python3
"""Time every op of one decode step (and one prefill chunk) on the GPU with CUDA events.

usage: python scripts/gpu_profile.py MODEL [--ctx 1024] [--prefill 512] [--batch N] [--pos 256]
                                         [--no-decode] [--cprofile] [--batched 16,64]
(--cprofile: the prefill forward's host time by function, cProfile, before the per-op events;
--batched: for each count B, B sequences of 128 prompt tokens through the batched engine, then
a decode step's wall time per token as the engine runs it, its graph's replay on the GPU, and
its ops launched one by one, each timed by events)
(--batch: prompt tokens a pass, default the backend's, as `numbaformer bench` runs it)
Prefill: ops are launched directly (no graph) with an event pair around each, so launch gaps are
excluded; matmuls are keyed by weight name and report GB/s of weight bytes read. Decode: the table
of `numbaformer bench --kernels` (numbaformer.profile), then the whole decode graph's replay.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import numpy as np  # noqa: E402

from numbaformer.backends.cuda.backend import CUDABackend  # noqa: E402
from numbaformer.loader import load_model_file  # noqa: E402
from numbaformer.model import Model  # noqa: E402
from numbaformer.profile import SKIP, profile_decode  # noqa: E402
from numba import cuda  # noqa: E402


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
            h0 = time.perf_counter()
            f(*args, **kw)
            host = time.perf_counter() - h0
            e1.record(self.ops.stream)
            self.events.append((key, e0, e1, nbytes, host))
        return timed

    def report(self, title):
        cuda.synchronize()
        agg = defaultdict(lambda: [0, 0.0, 0, 0.0])
        for key, e0, e1, nb, host in self.events:
            a = agg[key]
            a[0] += 1
            a[1] += cuda.event_elapsed_time(e0, e1) * 1e3
            a[2] += nb
            a[3] += host * 1e6
        total = sum(a[1] for a in agg.values())
        host = sum(a[3] for a in agg.values())
        print(f"\n{title}: {total:.0f} us in {len(self.events)} launches ({host:.0f} us of host "
              f"time in the op calls)")
        for key, (n, us, nb, hu) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
            bw = f"{nb / us / 1e3:8.0f} GB/s" if nb else ""
            print(f"  {key:34s} {n:4d}x {us:9.1f} us {us / n:8.2f} us/call host {hu / n:7.1f} "
                  f"us/call {bw}")
        self.events.clear()


def profile_batched(m, mf, count: int, prompt: int = 128) -> None:
    """`count` sequences of `prompt` random tokens through the batched engine (its defaults:
    graph buckets, several steps a replay), then: the wall time per generated token of engine
    steps; one decode-only step's graph replayed alone on the GPU; its ops launched one by one,
    each bracketed by CUDA events."""
    from numbaformer.engine import Engine
    prompt = min(prompt, m.n_ctx // 4)
    e = Engine(mf, m, 0.0)
    bt = e.start_batching(max_seqs=count, max_batched_tokens=max(count, min(16384,
                                                                           count * prompt)))
    rng = np.random.default_rng(count)
    for _ in range(count):
        e.add_request(list(rng.integers(0, mf.config.n_vocab, prompt)), max_tokens=10 ** 6,
                      stop_ids=())
    sched = bt.scheduler
    while sched.waiting or any(s.in_prompt for s in sched.running):
        e.step()
    for _ in range(3):                                   # compiles, graphs captured
        e.step()
    made = sum(len(s.output_ids) for s in sched.running)
    m.ops.synchronize()
    t0 = time.perf_counter()
    for _ in range(4):
        e.step()
    m.ops.synchronize()
    wall = time.perf_counter() - t0
    tokens = sum(len(s.output_ids) for s in sched.running) - made
    bm = bt.model
    batch = sched.schedule()                             # one decode-only step, run below
    size, _ = bm._stage_batch(batch)
    def step():
        bm.ops.replay(("batch_decode", id(bm), size), lambda: bm._batch_step(size, size))
    step()                                               # (captured on its first call)
    e0, e1 = cuda.event(), cuda.event()
    e0.record(bm.ops.stream)
    for _ in range(10):
        step()
    e1.record(bm.ops.stream)
    e1.synchronize()
    replay_us = cuda.event_elapsed_time(e0, e1) / 10 * 1e3
    print(f"\nbatched decode, {count} sequences (bucket {size}): engine steps "
          f"{wall / tokens * count * 1e3:.2f} ms a step ({tokens / wall:.0f} tok/s, host work "
          f"included); one step's graph replayed alone {replay_us:.0f} us on the GPU")
    t = Timed(bm.ops)
    bm.ops = t
    try:
        bm._batch_step(size, size)
    finally:
        bm.ops = t.ops
    t.report(f"batched decode step, {count} sequences, ops launched one by one")
    e.batching = None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--pos", type=int, default=256)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--batched", default="")
    a = ap.parse_args()
    mf = load_model_file(a.model)
    ops = CUDABackend()
    m = Model(mf, ops, n_ctx=a.ctx, n_batch=a.batch or ops.default_n_batch)
    m.warmup()
    ids = np.random.default_rng(0).integers(0, mf.config.n_vocab, a.prefill)
    m.forward(ids, 0)
    walls = []
    for _ in range(3):
        m.ops.synchronize()
        t0 = time.perf_counter()
        m.forward(ids, 0)
        m.ops.synchronize()
        walls.append(time.perf_counter() - t0)
    print(f"prefill {a.prefill} tokens, n_batch {m.n_batch}, ctx {a.ctx}: wall "
          f"{min(walls) * 1e3:.2f} ms ({a.prefill / min(walls):.0f} tok/s), launched directly")
    if a.cprofile:
        import cProfile
        import pstats
        pr = cProfile.Profile()
        m.ops.synchronize()
        pr.enable()
        m.forward(ids, 0)
        pr.disable()
        m.ops.synchronize()
        pstats.Stats(pr).sort_stats("tottime").print_stats(16)
        pstats.Stats(pr).sort_stats("cumulative").print_stats(30)
    t = Timed(m.ops)
    m.ops = t
    m.forward(ids, 0)
    t.report(f"prefill {a.prefill} tokens")
    m.ops = t.ops
    for count in [int(c) for c in a.batched.split(",") if c]:
        profile_batched(m, mf, count)
    if a.no_decode:
        return
    # decode: every op of one step timed alone (graph-captured copies), bytes and % of copy BW
    m.ops = t.ops
    prof = profile_decode(m, a.pos)
    print()
    print(prof.table(f"decode step at position {a.pos}"))
    m.forward([1], a.pos, greedy=True)
    e0, e1 = cuda.event(), cuda.event()
    e0.record(m.ops.stream)
    for _ in range(20):
        m.ops.replay(("decode", True), None)
    e1.record(m.ops.stream)
    e1.synchronize()
    print(f"decode graph replay: {cuda.event_elapsed_time(e0, e1) / 20 * 1e3:.0f} us per step")


if __name__ == "__main__":
    main()
