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


# --- many sequences at once (llama-batched-bench's table) --------------------------------------

def _batched_engine(engine, n_seqs: int, n_prompt: int, n_gen: int):
    """An Engine on engine's model with its batched path built for n_seqs sequences of n_prompt +
    n_gen tokens (every prompt prefilled in one step when the step's rows allow)."""
    from .blocks import BLOCK_SIZE
    from .engine import Engine
    e = Engine(engine.mf, engine.model, engine.load_s)
    per_seq = -(-(n_prompt + n_gen + 1) // BLOCK_SIZE)
    e.start_batching(n_seqs, max(n_seqs, min(n_seqs * n_prompt, 1 << 14)), n_seqs * per_seq)
    return e


def _batched_run(e, n_seqs: int, n_prompt: int, n_gen: int, rng) -> tuple[float, float, int]:
    """n_seqs random prompts of n_prompt tokens, then n_gen decode steps of all of them, through
    the engine's batched path (end-of-generation ids ignored; their blocks freed at the end).
    Returns (prefill s: until every sequence has its first token, decode s: the steps after,
    tokens those steps made)."""
    seqs = [e.batching.seqs[e.add_request(rng.integers(0, e.config.n_vocab, n_prompt).tolist(),
                                          n_gen + 1, stop_ids=())] for _ in range(n_seqs)]
    t0 = time.perf_counter()
    while any(not s.output_ids for s in seqs):
        e.step()
    t1 = time.perf_counter()
    made = sum(len(s.output_ids) for s in seqs)
    while e.has_unfinished():
        e.step()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, sum(len(s.output_ids) for s in seqs) - made


def run_parallel_bench(engine, parallel: list[int], n_prompt: int = 128, n_gen: int = 128,
                       seed: int = 0) -> list[dict]:
    """llama-batched-bench's measurement through the engine's batched path: for each count B,
    B sequences of n_prompt tokens prefilled together (chunks of up to 16384 rows a step), then
    n_gen decode steps of all B. One row per B: prefill and decode time and tokens/s (aggregate
    over the B sequences), and the whole run's."""
    if not getattr(engine.backend, "paged_kv", False):
        raise ValueError(f"bench --parallel needs a paged KV cache, which the "
                         f"{engine.backend.name} backend does not have yet (use --device cpu)")
    if n_prompt < 1 or n_gen < 1 or n_prompt + n_gen + 1 > engine.model.n_ctx:
        raise ValueError(f"bench --parallel needs -p >= 1 and -n >= 1 within the context "
                         f"{engine.model.n_ctx}")
    rng = np.random.default_rng(seed)
    rows = []
    for b in parallel:
        e = _batched_engine(engine, b, n_prompt, n_gen)
        # warm-up: the very run to be timed, on the same engine, so that the kernels of its
        # products' shapes are compiled and the CUDA graphs of its steps (keyed by the batched
        # model, its batch size and steps per replay) captured before the clock starts, as in
        # a serving engine's steady state (a new engine per run timed their capture: the
        # seventh session's H200 figures of 66 / 954 / 1,887 tok/s at 1 / 16 / 64)
        _batched_run(e, b, n_prompt, n_gen, rng)
        t_pp, t_tg, n_tg = _batched_run(e, b, n_prompt, n_gen, rng)
        total = t_pp + t_tg
        rows.append({"device": engine.backend.name, "n_prompt": n_prompt, "n_gen": n_gen,
                     "parallel": b, "n_kv": b * (n_prompt + n_gen),
                     "prefill_s": round(t_pp, 4), "prefill_tps": round(b * n_prompt / t_pp, 2),
                     "decode_s": round(t_tg, 4), "decode_tps": round(n_tg / t_tg, 2),
                     "total_s": round(total, 4),
                     "total_tps": round((b * n_prompt + n_tg) / total, 2)})
    return rows


def format_parallel_table(rows: list[dict]) -> str:
    """llama-batched-bench's table: PP, TG, B, N_KV, then time and tokens/s of the prefill
    (S_PP), the decode (S_TG: the B sequences' aggregate) and the whole (S)."""
    cols = ("PP", "TG", "B", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s", "T s", "S t/s")
    keys = ("n_prompt", "n_gen", "parallel", "n_kv", "prefill_s", "prefill_tps", "decode_s",
            "decode_tps", "total_s", "total_tps")
    lines = ["|" + "|".join(f" {c:>8} " for c in cols) + "|",
             "|" + "|".join("-" * 10 for _ in cols) + "|"]
    for r in rows:
        cells = [f"{r[k]:.3f}" if isinstance(r[k], float) and k.endswith("_s") else
                 f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append("|" + "|".join(f" {c:>8} " for c in cells) + "|")
    return "\n".join(lines)
