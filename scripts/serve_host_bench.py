#!/usr/bin/env python3
"""`numbaformer serve`'s host side alone: what the HTTP handlers, the engine thread's turn between
steps (scheduling, delivering each job's tokens: detokenizing, stop strings, the asyncio hand-off)
and SSE streaming cost, with the model replaced by an engine whose step takes --step-ms and picks
fixed text tokens. The tokenizer and context are the model file's; the engine loop, bridge and
app are the server's own. Then scripts/bench_serve.py drives it as it drives a real server.

usage: python scripts/serve_host_bench.py -m MODEL.gguf [-np 64] [--step-ms 0] [-c 64] [-n 128]
           [--output-len 128] [--temperature 0]

The output rate with --step-ms 0 is the most the server's host side can carry on this machine;
with --step-ms set to a GPU's step time (e.g. 28 for an 8B model at 64 sequences on an H200), the
TPOT above it is the host's share of each token.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))


class FakeEngine:
    """The Engine surface the bridge and the app use; step() sleeps step_ms and gives every
    running sequence one token (a fixed cycle of text tokens), finishing it at max_tokens."""

    def __init__(self, mf, n_ctx: int, step_ms: float):
        from numbaformer.blocks import BlockManager
        self.mf, self.tokenizer, self.config = mf, mf.tokenizer, mf.config
        self.model = SimpleNamespace(n_ctx=n_ctx)
        self.backend = SimpleNamespace(name="fake")
        self.step_s = step_ms / 1000
        words = [t for t in (self.tokenizer.encode(" the quick brown fox jumps over a lazy dog",
                                                   add_special=False))]
        self.cycle = words or [1]
        self.batching = SimpleNamespace(seqs={}, scheduler=SimpleNamespace(running=[], waiting=[]),
                                        blocks=BlockManager(1024, 16))
        self.steps = 0

    def start_batching(self, *a, **k):
        return self.batching

    def warmup_batching(self):
        pass

    def add_request(self, ids, max_tokens, sampler=None, stop_ids=None):
        from numbaformer.scheduler import RUNNING, Sequence
        seq = Sequence(list(ids), max_tokens=max_tokens, sampler=sampler)
        seq.status = RUNNING
        self.batching.seqs[seq.seq_id] = seq
        self.batching.scheduler.running.append(seq)
        return seq.seq_id

    def has_unfinished(self):
        return bool(self.batching.scheduler.running)

    def abort(self, sid):
        from numbaformer.scheduler import FINISHED
        seq = self.batching.seqs.pop(sid, None)
        if seq is not None:
            seq.status = FINISHED
            self.batching.scheduler.running.remove(seq)

    def step(self, max_steps=None):
        from numbaformer.scheduler import FINISHED
        if self.step_s:
            time.sleep(self.step_s)
        self.steps += 1
        done = []
        for seq in list(self.batching.scheduler.running):
            seq.token_ids.append(self.cycle[len(seq.output_ids) % len(self.cycle)])
            if len(seq.output_ids) >= seq.max_tokens:
                seq.status, seq.finish_reason = FINISHED, "length"
                self.batching.scheduler.running.remove(seq)
                self.batching.seqs.pop(seq.seq_id)
                done.append(seq)
        return done


def serve(args) -> None:
    from numbaformer.loader import load_model_file
    from numbaformer.serve.app import Settings, run
    mf = load_model_file(args.model)
    sys.exit(run(lambda: FakeEngine(mf, args.ctx, args.step_ms), host="127.0.0.1",
                 port=args.port, n_seqs=args.parallel, max_batched_tokens=8192,
                 settings=Settings(model_name="fake", max_queue=1024)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-np", "--parallel", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--step-ms", type=float, default=0.0)
    ap.add_argument("-c", "--concurrency", type=int, default=64)
    ap.add_argument("-n", "--num-requests", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--temperature", default="0")
    ap.add_argument("--port", type=int, default=8089)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args)
        return 0
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", "-m", args.model, "-np",
           str(args.parallel), "--ctx", str(args.ctx), "--step-ms", str(args.step_ms), "--port",
           str(args.port)]
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            print("error: the fake server did not come up", file=sys.stderr)
            return 2
        p = subprocess.run([sys.executable, os.path.join(HERE, "bench_serve.py"), "--url", url,
                            "-c", str(args.concurrency), "-n", str(args.num_requests),
                            "--input-len", "32", "--output-len", str(args.output_len),
                            "--temperature", args.temperature, "--json"],
                           capture_output=True, text=True)
        if p.returncode:
            print(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "bench failed",
                  file=sys.stderr)
            return 1
        r = json.loads(p.stdout)
        r["step_ms"] = args.step_ms
        print(json.dumps(r))
        return 0
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    sys.exit(main())
