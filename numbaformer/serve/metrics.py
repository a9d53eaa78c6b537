"""Prometheus metrics of the server (prometheus-client, a registry of its own): requests running
and waiting, KV blocks in use, prefix-cache hits, tokens in and out, TTFT and per-token latency.
Set from the engine thread (prometheus-client's metrics are thread-safe), read by GET /metrics.
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

P = "numbaformer_"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge(P + "requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge(P + "requests_waiting", "Sequences queued for the batch",
                             registry=r)
        self.blocks_used = Gauge(P + "kv_blocks_used", "KV cache blocks in use", registry=r)
        self.blocks_total = Gauge(P + "kv_blocks_total", "KV cache blocks in the pool",
                                  registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens admitted", registry=r)
        self.cached_tokens = Counter(P + "prefix_cache_hit_tokens",
                                     "Prompt tokens found in the prefix cache", registry=r)
        self.hit_rate = Gauge(P + "prefix_cache_hit_rate",
                              "Prefix-cache hit tokens / prompt tokens, since start", registry=r)
        self.generated = Counter(P + "generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter(P + "requests", "Requests ended, by finish reason",
                                ["finish_reason"], registry=r)
        self.http_errors = Counter(P + "http_errors", "Error responses, by status", ["status"],
                                   registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(P + "time_per_output_token_seconds",
                              "Time between tokens after the first", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self._totals = [0, 0]                   # prompt tokens, prefix-cache hit tokens

    def gauges(self, running: int, waiting: int, used: int, total: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.blocks_used.set(used)
        self.blocks_total.set(total)

    def tokens(self, job, first: bool, n: int, now: float) -> None:
        """n new tokens of job at time now (its first ones when `first`)."""
        self.generated.inc(n)
        if first:
            self.ttft.observe(now - job.t_submit)
            self.prompt_tokens.inc(len(job.prompt_ids))
            self.cached_tokens.inc(job.seq.num_cached_tokens)
            self._totals[0] += len(job.prompt_ids)
            self._totals[1] += job.seq.num_cached_tokens
            self.hit_rate.set(self._totals[1] / self._totals[0])
            n -= 1
        if n > 0 and job.t_last:
            for _ in range(n):
                self.tpot.observe((now - job.t_last) / n)

    def finished(self, reason: str) -> None:
        self.requests.labels(reason).inc()

    def error(self, status: int) -> None:
        self.http_errors.labels(str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
