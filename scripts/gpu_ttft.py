"""Time to first token: a prompt of N random token ids through `generate_step` (chunked prefill,
then the first pick), from the call to the first token on the host; mean and spread over reps.

    python3 scripts/gpu_ttft.py -m FILE [--device cuda] [-p 2000] [-r 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from numbaformer.engine import load_engine
from numbaformer.generate import generate_step
from numbaformer.sampling import SamplingParams, make_sampler


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("-p", "--n-prompt", type=int, default=2000)
    ap.add_argument("-r", "--reps", type=int, default=5)
    ap.add_argument("--n-batch", type=int, default=None, help="default: the backend's")
    a = ap.parse_args()
    e = load_engine(a.model, device=a.device, n_ctx=a.n_prompt + 16, n_batch=a.n_batch,
                    quiet=True)
    rng = np.random.default_rng(0)
    sampler = make_sampler(SamplingParams(temperature=0))
    times = []
    for r in range(a.reps + 1):
        ids = rng.integers(0, e.config.n_vocab, a.n_prompt).tolist()
        e.model.ops.synchronize()
        t0 = time.perf_counter()
        next(iter(generate_step(e.model, ids, sampler, max_tokens=1)))
        if r:                                   # the first run compiles and warms up
            times.append(time.perf_counter() - t0)
    ms = [t * 1e3 for t in times]
    sd = statistics.stdev(ms) if len(ms) > 1 else 0.0
    print(f"ttft {a.n_prompt} tokens ({e.backend.name}, n_batch {e.model.n_batch}): "
          f"{statistics.mean(ms):.1f} ± {sd:.1f} ms ({a.n_prompt / statistics.mean(times):.0f} "
          f"prompt tok/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
