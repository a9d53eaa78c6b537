"""The engine thread and the bridge to it: the one thread that loads the model and runs it.

HTTP handlers (on the asyncio loop) hand a `Job` to `Bridge.submit` and await its asyncio queue;
they never touch the model. The engine thread loops: take new jobs and cancellations from a
thread-safe inbox, `Engine.add_request` / `Engine.abort`, `Engine.step()`, then give each job the
tokens its sequence gained in the step as a `Delta` (text made final, log-probs, finish reason)
through `loop.call_soon_threadsafe`. A job that was cancelled (its client went away) is aborted
between two steps: its blocks are free within one step. (mlx-lm's server, vLLM's engine core.)
"""
from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..sampling import SamplingParams, log_softmax, make_sampler
from ..scheduler import FINISHED
from .openai import Delta, TextStream
from .protocol import APIError

IDLE_WAIT_S = 0.1


def request_sampler(params: SamplingParams, bias: dict[int, float], n_logprobs: int | None,
                    record: list) -> Callable:
    """make_sampler(params) with OpenAI's logit_bias added to the logits first, and, when
    n_logprobs is not None, each pick's log-prob and its n_logprobs best alternatives (from the
    biased logits, before penalties and temperature) appended to `record`."""
    inner = make_sampler(params)
    ids = np.fromiter(bias, np.int64, len(bias))
    vals = np.fromiter(bias.values(), np.float32, len(bias))

    def sample(logits: np.ndarray, history=(), index=None) -> int:
        if len(ids):
            logits[ids] += vals
        raw = logits.copy() if n_logprobs is not None else None
        tid = inner(logits, history, index)
        if raw is not None:
            lp = log_softmax(raw)
            top = np.argsort(-lp, kind="stable")[:n_logprobs] if n_logprobs else []
            record.append((tid, float(lp[tid]), [(int(a), float(lp[a])) for a in top]))
        return tid

    sample.params, sample.seed = params, inner.seed
    sample.bias = (ids, vals) if len(ids) else None          # the device adds it first too
    sample.device_ok = n_logprobs is None                    # log-probs: the host's record
    return sample


def plain_greedy(job: "Job") -> bool:
    """Whether job's picks are the argmax of the raw logits (temperature 0, no penalties, no
    logit_bias, no log-probs): the engine then takes them from the device's argmax of each row
    (the same pick as np.argmax of the same logits) with no sampler, so that no logits row
    crosses to the host (an 8B model's 128k-entry rows: 33 MB a step at 64 sequences) and such
    steps may run several a replay (Bridge's decode_steps)."""
    p = job.params
    return p.greedy and not p.has_penalties and not job.logit_bias and job.n_logprobs is None


@dataclass(eq=False)
class Job:
    """One request as the engine thread sees it."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    stops: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    n_logprobs: int | None = None
    ignore_eos: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    queue: asyncio.Queue | None = None
    # engine-thread state
    seq: object = None
    text: TextStream | None = None
    picks: list = field(default_factory=list)
    n_seen: int = 0
    t_submit: float = field(default_factory=time.perf_counter)
    t_last: float = 0.0
    done: bool = False
    released: bool = False                          # the handler's side is over (app.py)

    def send(self, delta: Delta) -> None:
        if delta.finish_reason or delta.error:
            self.done = True
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)
        except RuntimeError:                # the event loop is closed: nobody is waiting
            pass


class Bridge:
    """Owns the engine thread. load(): builds the Engine (on that thread); n_seqs and
    max_batched_tokens: the batched path's limits; metrics: serve.metrics.Metrics or None;
    on_fail(message): called (on the engine thread) when loading fails; decode_steps: greedy
    decode steps one device replay may run when every running request is plain greedy and none
    waits (1: a step per turn, each token streamed as it is picked; more: less host time per
    token, tokens streamed in bursts, a cancellation or stop string seen up to that many steps
    late)."""

    def __init__(self, load: Callable, n_seqs: int, max_batched_tokens: int, metrics=None,
                 on_fail: Callable[[str], None] | None = None, decode_steps: int = 1):
        self._load, self.n_seqs, self.max_batched_tokens = load, n_seqs, max_batched_tokens
        self.decode_steps = decode_steps
        self.metrics, self.on_fail = metrics, on_fail
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.ready = threading.Event()
        self.engine = None
        self.failure: str | None = None
        self.jobs: dict[int, Job] = {}          # seq_id -> job, while it runs
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="numbaformer-engine", daemon=True)

    # --- called from the event loop ------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.inbox.put(("add", job))

    def cancel(self, job: Job) -> None:
        """The client is gone: abort the job's sequence (its blocks freed) at the next step."""
        if not job.done:
            self.inbox.put(("cancel", job))

    def stop(self, timeout: float = 5.0) -> None:
        self._stop = True
        self.inbox.put(("stop", None))
        if self.thread.is_alive():
            self.thread.join(timeout)

    # --- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._load()
            self.engine.start_batching(self.n_seqs, self.max_batched_tokens)
            self._warmup()
        except BaseException as e:                     # one line, and the server goes down
            self.failure = str(e).splitlines()[0] if str(e) else type(e).__name__
            if self.on_fail:
                self.on_fail(self.failure)
            return
        self.ready.set()
        print(f"numbaformer serve: ready ({self.engine.backend.name}, context "
              f"{self.engine.model.n_ctx}, {self.n_seqs} sequences at once)", file=sys.stderr,
              flush=True)
        while not self._stop:
            self._drain(block=not self.engine.has_unfinished())
            if self._stop:
                break
            if self.engine.has_unfinished():
                self._step()
            self._gauges()
        for job in list(self.jobs.values()):           # shutting down: end what is left
            self._end(job, Delta(finish_reason="length", prompt_tokens=len(job.prompt_ids),
                                 completion_tokens=job.n_seen))

    def _warmup(self) -> None:
        """The batched path's steps (prefill, decode and mixed: Engine.warmup_batching) before
        /health says ready: their kernels compile now, not in the first requests (a fresh kernel
        cache took seconds there), and a backend that cannot run them (no paged KV cache) fails
        the load in one line instead of every request."""
        self.engine.warmup_batching()

    def _drain(self, block: bool) -> None:
        """Take everything in the inbox (waiting up to IDLE_WAIT_S for the first when idle)."""
        try:
            item = self.inbox.get(timeout=IDLE_WAIT_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, job = item
            if kind == "add":
                self._add(job)
            elif kind == "cancel":
                self._abort(job)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, job: Job) -> None:
        if job.done:                                    # cancelled before it was added
            return
        eng = self.engine
        eog = frozenset() if job.ignore_eos else eng.tokenizer.eog_ids
        job.text = TextStream(eng.tokenizer, job.prompt_ids, job.stops, eog)
        try:
            sampler = None if plain_greedy(job) else \
                request_sampler(job.params, job.logit_bias, job.n_logprobs, job.picks)
            sid = eng.add_request(job.prompt_ids, job.max_tokens, sampler, stop_ids=eog)
        except ValueError as e:
            job.send(Delta(error=APIError(400, str(e), "prompt")))
            return
        job.seq = eng.batching.seqs[sid]
        self.jobs[sid] = job

    def _abort(self, job: Job) -> None:
        if job.seq is not None and self.jobs.pop(job.seq.seq_id, None) is not None:
            self.engine.abort(job.seq.seq_id)
            if self.metrics:
                self.metrics.finished("abort")
        job.done = True

    def _step(self) -> None:
        try:
            self.engine.step(self.decode_steps)
            now = time.perf_counter()
            for job in list(self.jobs.values()):
                self._deliver(job, now)
        except Exception as e:              # never expected: end every job, keep serving
            print(f"numbaformer serve: engine step failed: {type(e).__name__}: {e}",
                  file=sys.stderr)
            for job in list(self.jobs.values()):
                self.engine.abort(job.seq.seq_id)
                self._end(job, Delta(error=APIError(500, "internal error in the engine step",
                                                     type="server_error")))

    def _deliver(self, job: Job, now: float) -> None:
        """The tokens job's sequence gained in this step, as one Delta."""
        seq = job.seq
        new = seq.output_ids[job.n_seen:]
        if not new and seq.status != FINISHED:
            return
        parts, tokens, eog = [], [], job.text.eog
        first = job.n_seen == 0
        for tid in new:
            i = job.n_seen
            job.n_seen += 1
            parts.append(job.text.push(tid))
            if job.n_logprobs is not None and tid not in eog and i < len(job.picks):
                tokens.append(job.picks[i])
            if job.text.stopped:
                break
        finish = None
        if job.text.stopped:
            finish = "stop"
            if seq.status != FINISHED:
                self.engine.abort(seq.seq_id)
        elif seq.status == FINISHED:
            finish = "stop" if seq.finish_reason == "stop" else "length"
            parts.append(job.text.finish())
        if self.metrics and new:
            self.metrics.tokens(job, first, len(new), now)
        job.t_last = now
        delta = Delta("".join(parts), tokens, finish, len(job.prompt_ids), job.n_seen)
        if finish:
            self._end(job, delta)
        else:
            job.send(delta)

    def _end(self, job: Job, delta: Delta) -> None:
        if job.seq is not None:
            self.jobs.pop(job.seq.seq_id, None)
        if self.metrics and delta.finish_reason:
            self.metrics.finished(delta.finish_reason)
        job.send(delta)

    def _gauges(self) -> None:
        if self.metrics:
            b = self.engine.batching
            self.metrics.gauges(len(b.scheduler.running), len(b.scheduler.waiting),
                                len(b.blocks.blocks) - b.blocks.n_free, len(b.blocks.blocks))

    # --- for tests and /metrics ----------------------------------------------------------------
    def blocks_in_use(self) -> int:
        b = self.engine.batching
        return len(b.blocks.blocks) - b.blocks.n_free
