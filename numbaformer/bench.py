"""llama-bench style throughput: pp (prompt tokens/s) and tg (generated tokens/s), mean +- sd."""
from __future__ import annotations

import statistics
import time

import numpy as np

from .model import DECODE_CHUNK


def _time_pp(model, n: int, rng) -> float:
    ids = rng.integers(0, model.cfg.n_vocab, n)
    model.ops.synchronize()
    t0 = time.perf_counter()
    model.forward(ids, 0)
    model.ops.synchronize()
    return time.perf_counter() - t0


def _time_tg(model, n: int, rng) -> float:
    """n greedy decode steps from position 0, DECODE_CHUNK per graph replay (as generation runs
    them), the picks read by the host after each replay."""
    tok = int(rng.integers(0, model.cfg.n_vocab))
    model.ops.synchronize()
    t0 = time.perf_counter()
    pos = 0
    while pos < n:
        k = min(DECODE_CHUNK, n - pos)
        tok = model.decode_greedy(tok, pos, k)[-1]
        pos += k
    return time.perf_counter() - t0


def run_bench(engine, n_prompt: int = 512, n_gen: int = 128, reps: int = 3,
              seed: int = 0) -> list[dict]:
    """One row per test, as llama-bench's JSON: tokens_per_s is the mean over reps."""
    model, rng = engine.model, np.random.default_rng(seed)
    if max(n_prompt, n_gen) > model.n_ctx:
        raise ValueError(f"test sizes {n_prompt}/{n_gen} exceed the context {model.n_ctx}")
    rows = []
    for test, n, fn in (("pp", n_prompt, _time_pp), ("tg", n_gen, _time_tg)):
        if n <= 0:
            continue
        fn(model, n, rng)            # warm-up at full size: compiles every kernel the test uses
        tps = [n / fn(model, n, rng) for _ in range(reps)]
        rows.append({
            "model": engine.config.name, "size_bytes": int(sum(
                t.n_bytes for t in engine.mf.gguf.tensors.values())),
            "params": int(sum(t.n_elements for t in engine.mf.gguf.tensors.values())),
            "type": engine.mf.gguf.tensors["blk.0.ffn_down.weight"].type_name,
            "device": engine.backend.name, "test": f"{test}{n}",
            "tokens_per_s": round(statistics.mean(tps), 2),
            "stddev": round(statistics.stdev(tps), 2) if len(tps) > 1 else 0.0,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| model | size | params | type | device | test | t/s |"
    lines = [head, "|---|---:|---:|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size_bytes'] / 2**20:.1f} MiB | "
                     f"{r['params'] / 1e6:.1f} M | {r['type']} | {r['device']} | {r['test']} | "
                     f"{r['tokens_per_s']:.2f} ± {r['stddev']:.2f} |")
    return "\n".join(lines)
