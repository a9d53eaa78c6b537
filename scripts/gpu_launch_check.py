#!/usr/bin/env python3
"""Whether FastKernel (backends/cuda/launch.py, every kernel's launch) gives numba's results: run a
model's prefill, its greedy decode and a batched step in this process and save what they give, then
compare two such saves made with NUMBAFORMER_FAST_LAUNCH=1 and =0 (same kernels, same arguments:
the same bits are expected).

usage: NUMBAFORMER_FAST_LAUNCH=0 python scripts/gpu_launch_check.py MODEL --save /tmp/numba.npz
       python scripts/gpu_launch_check.py MODEL --save /tmp/fast.npz --against /tmp/numba.npz
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import numpy as np  # noqa: E402

from numbaformer.backends.cuda.backend import CUDABackend  # noqa: E402
from numbaformer.loader import load_model_file  # noqa: E402
from numbaformer.model import Model  # noqa: E402


def run(path: str) -> dict:
    from numbaformer.engine import Engine
    mf = load_model_file(path)
    ops = CUDABackend()
    m = Model(mf, ops, n_ctx=2048, n_batch=512)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, mf.config.n_vocab, 700)             # two passes of 512 and 188
    got = {"prefill": ops.to_host(m.forward(ids, 0, greedy=True)).copy()}
    tok = m.greedy_token()
    got["decode"] = np.array(m.decode_greedy(tok, len(ids), 16), np.int64)
    e = Engine(mf, m, 0.0)
    e.start_batching(max_seqs=4, max_batched_tokens=512)
    seqs = [e.add_request(list(rng.integers(0, mf.config.n_vocab, 40 + 30 * s)), max_tokens=12,
                          stop_ids=()) for s in range(4)]
    seqs = [e.batching.seqs[i] for i in seqs]
    while e.has_unfinished():
        e.step()
    got["batched"] = np.array([t for s in seqs for t in s.output_ids], np.int64)
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--save", required=True)
    ap.add_argument("--against")
    a = ap.parse_args()
    got = run(a.model)
    np.savez(a.save, **got)
    fast = os.environ.get("NUMBAFORMER_FAST_LAUNCH", "1")
    print(f"FAST_LAUNCH={fast}: prefill logits max {np.abs(got['prefill']).max():.3f}, decode "
          f"{got['decode'][:8].tolist()}.., batched {len(got['batched'])} tokens")
    if a.against:
        ref = np.load(a.against)
        same = {k: np.array_equal(got[k], ref[k]) for k in got}
        print("launch check:", ", ".join(f"{k} {'same bits' if v else 'DIFFERENT'}"
                                         for k, v in same.items()))
        sys.exit(0 if all(same.values()) else 1)


if __name__ == "__main__":
    main()
