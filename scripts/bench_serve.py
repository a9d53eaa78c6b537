#!/usr/bin/env python3
"""Drive a running OpenAI-compatible server (`numbaformer serve`, `llama-server`, vLLM) with N
concurrent streams and report what vLLM's `bench serve` reports: request throughput, output tok/s,
TTFT, TPOT and inter-token latency (mean, p50, p99).

usage: python scripts/bench_serve.py --url http://127.0.0.1:8080 [-c 16] [-n 64]
           [--input-len 128] [--output-len 128] [--temperature 0] [--top-p 0.9]
           [--api-key KEY] [--model NAME] [--json]

Each request is a /v1/completions stream of token ids (random ids from 1000..11000, so every
server sees the same prompt length whatever its tokenizer) with max_tokens = --output-len and
`ignore_eos` where the server honors it; tokens are counted from the streamed chunks (one chunk per
token for numbaformer and llama-server) unless the server reports usage (include_usage).
TTFT: request sent -> first chunk with text; TPOT: (end - first token) / (tokens - 1) per request;
ITL: the gaps between chunks.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

import httpx


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one(client: httpx.AsyncClient, url: str, body: dict, out: list) -> None:
    t0 = time.perf_counter()
    stamps, tokens, ok = [], 0, False
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            out.append({"ok": False, "status": r.status_code})
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                ok = True
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    n = tokens or len(stamps)
    out.append({"ok": ok and bool(stamps), "ttft": stamps[0] - t0 if stamps else None,
                "tpot": (end - stamps[0]) / (n - 1) if n > 1 and stamps else None,
                "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": n,
                "latency": end - t0})


async def run(args) -> dict:
    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sem = asyncio.Semaphore(args.concurrency)
    results: list = []
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(headers=headers, timeout=None, limits=limits) as client:
        async def task(i: int):
            body = {"model": args.model, "prompt": [rng.randrange(1000, 11000)
                                                    for _ in range(args.input_len)],
                    "max_tokens": args.output_len, "temperature": args.temperature,
                    "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            if args.temperature > 0:            # a chat client's sampling: top-p, a seed a request
                body.update(top_p=args.top_p, seed=args.seed * 100003 + i)
            async with sem:
                await one(client, args.url, body, results)

        t0 = time.perf_counter()
        await asyncio.gather(*(task(i) for i in range(args.num_requests)))
        wall = time.perf_counter() - t0
    good = [r for r in results if r["ok"]]
    ms = 1000.0
    ttft = [r["ttft"] * ms for r in good]
    tpot = [r["tpot"] * ms for r in good if r["tpot"] is not None]
    itl = [x * ms for r in good for x in r["itl"]]
    out_tokens = sum(r["tokens"] for r in good)
    return {"concurrency": args.concurrency, "requests": len(results), "failed":
            len(results) - len(good), "duration_s": wall,
            "request_throughput": len(good) / wall, "output_tok_s": out_tokens / wall,
            **{f"{name}_{stat}_ms": fn(xs) for name, xs in (("ttft", ttft), ("tpot", tpot),
                                                             ("itl", itl))
               for stat, fn in (("mean", lambda v: sum(v) / len(v) if v else float("nan")),
                                ("p50", lambda v: percentile(v, 50)),
                                ("p99", lambda v: percentile(v, 99)))}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("-n", "--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy (default); more: sampled, with --top-p and a seed a request")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        res = asyncio.run(run(args))
    except httpx.HTTPError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res))
        return 0
    for k, v in res.items():
        print(f"{k:>24}: {v:.2f}" if isinstance(v, float) else f"{k:>24}: {v}")
    return 0 if not res["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
