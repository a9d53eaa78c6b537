#!/usr/bin/env python3
"""llama.cpp's CPU throughput on a GGUF file, llama-bench style, through llama-cpp-python's C API:
the anchor that `numbaformer bench --device cpu` is compared with.

    python scripts/llamacpp_cpu_bench.py [MODEL] [-t 2] [-p 512] [-n 128] [-r 3] [--json]

pp<P>: one llama_decode of P random token ids from an empty cache (n_batch = n_ubatch = P), prompt
tokens/s. tg<N>: N single-token llama_decode calls from an empty cache, each on the previous step's
token (random ids: as llama-bench, no sampling), generated tokens/s. Each test runs once to warm up,
then R times; the figure is the mean (and sd) of the R rates, as llama-bench and `numbaformer bench`
report. MODEL defaults to numbaformer's default model in its cache.

Needs llama-cpp-python (not a numbaformer dependency), in any environment; for a native CPU build:
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python --no-binary llama-cpp-python
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import llama_cpp as L


def default_model() -> str:
    base = os.environ.get("NUMBAFORMER_CACHE") or os.path.expanduser("~/.cache/numbaformer")
    return os.path.join(base, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


class Context:
    """A llama.cpp model and context with n_threads for both decode and prefill."""

    def __init__(self, path: str, n_threads: int, n_ctx: int, n_batch: int):
        L.llama_backend_init()
        L.llama_log_set(_QUIET, None)
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        if not self.model:
            raise SystemExit(f"error: llama.cpp could not load {path}")
        p = L.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, n_batch, n_batch
        p.n_threads = p.n_threads_batch = n_threads
        self.ctx = L.llama_init_from_model(self.model, p)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.mem = L.llama_get_memory(self.ctx)

    def clear(self) -> None:
        L.llama_memory_clear(self.mem, True)

    def decode(self, ids) -> None:
        arr = (L.llama_token * len(ids))(*ids)
        if L.llama_decode(self.ctx, L.llama_batch_get_one(arr, len(ids))) != 0:
            raise SystemExit("error: llama_decode failed")

    def time_pp(self, n: int, rng) -> float:
        ids = [rng.randrange(self.n_vocab) for _ in range(n)]
        self.clear()
        t0 = time.perf_counter()
        self.decode(ids)
        L.llama_synchronize(self.ctx)
        return time.perf_counter() - t0

    def time_tg(self, n: int, rng) -> float:
        tok = rng.randrange(self.n_vocab)
        self.clear()
        t0 = time.perf_counter()
        for _ in range(n):
            self.decode([tok])
            L.llama_synchronize(self.ctx)
        return time.perf_counter() - t0

    def close(self) -> None:
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


@L.llama_log_callback
def _QUIET(level, text, user_data):       # llama.cpp's load log off
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=default_model())
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="one JSON list of rows on stdout")
    a = ap.parse_args()
    import random
    rng = random.Random(0)
    c = Context(a.model, a.threads, max(a.n_prompt, a.n_gen, 1), max(a.n_prompt, 1))
    rows = []
    try:
        for test, n, fn in (("pp", a.n_prompt, c.time_pp), ("tg", a.n_gen, c.time_tg)):
            if n <= 0:
                continue
            fn(n, rng)                                 # warm-up at full size
            tps = [n / fn(n, rng) for _ in range(a.reps)]
            rows.append({"engine": f"llama.cpp (llama-cpp-python {L.__version__})",
                         "model": os.path.basename(a.model), "threads": a.threads,
                         "test": f"{test}{n}", "tokens_per_s": round(statistics.mean(tps), 2),
                         "stddev": round(statistics.stdev(tps), 2) if len(tps) > 1 else 0.0})
    finally:
        c.close()
    if a.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['engine']} | {r['model']} | {r['threads']} threads | {r['test']} | "
                  f"{r['tokens_per_s']:.2f} ± {r['stddev']:.2f} tok/s")


if __name__ == "__main__":
    main()
