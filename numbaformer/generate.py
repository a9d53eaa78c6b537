"""Generation: `generate_step()` yields tokens; helpers stream text and collect results.

The CLI (and any server) consume the same stream. On a backend that samples on the device (CUDA),
the whole sampling chain runs there unless log-probs are asked for: DECODE_CHUNK steps per graph
replay, each pick fed to the next step on the device, the ids read once per chunk. Elsewhere,
greedy decoding without penalties keeps the logits on the device too; any other setting copies
each step's logits to the host sampler.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .model import DECODE_CHUNK
from .sampling import log_softmax


def plural(n: int, noun: str = "token") -> str:
    """'1 token', '2 tokens', '0 tokens'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass
class GenerationStats:
    load_s: float = 0.0
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    finish_reason: str = ""

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first generated token comes out of the prefill; the rest are decode steps
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"load_s": round(self.load_s, 4), "prompt_tokens": self.prompt_tokens,
                "prefill_tps": round(self.prefill_tps, 2),
                "generated_tokens": self.generated_tokens,
                "decode_tps": round(self.decode_tps, 2), "ttft_s": round(self.ttft_s, 4)}

    def summary(self) -> str:
        """One line: prompt and generation speed, time to the first token, load time (if set)."""
        load = f" | load {self.load_s:.2f} s" if self.load_s else ""
        return (f"prompt: {plural(self.prompt_tokens)}, {self.prefill_tps:.1f} tok/s | "
                f"generated: {plural(self.generated_tokens)}, {self.decode_tps:.1f} tok/s | "
                f"first token {self.ttft_s * 1000:.0f} ms{load}")


@dataclass(frozen=True)
class Step:
    """One generated token; logprob/top only when asked for."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def generate_step(model, prompt_ids: Sequence[int], sampler, *, max_tokens: int,
                  eog_ids: Iterable[int] = (), logprobs: int = 0,
                  stats: GenerationStats | None = None, n_cached: int = 0) -> Iterator[Step]:
    """Prefill prompt_ids (the first n_cached of which are already in the KV cache, from an
    earlier call), then yield sampled tokens until an end-of-generation id (yielded, then stop;
    finish_reason "stop"), max_tokens ("length"; -1: no limit, as llama.cpp's -n -1), or the end
    of the context ("context"). Sets stats.finish_reason."""
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty: generation needs at least one token")
    stats = stats if stats is not None else GenerationStats()
    eog = frozenset(eog_ids)
    params = sampler.params
    chain = logprobs == 0 and model.samples_on_device
    on_device = not chain and params.greedy and not params.has_penalties and logprobs == 0
    history = list(prompt_ids)
    n_cached = min(n_cached, len(history) - 1)          # at least one token must run
    pos, feed = n_cached, history[n_cached:]
    stats.prompt_tokens = len(feed)
    t0 = time.perf_counter()
    stats.finish_reason = "length"
    if chain:
        model.start_sampling(sampler, history, eog, max_tokens)
    i = 0
    while max_tokens < 0 or i < max_tokens:
        if pos + len(feed) > model.n_ctx:
            stats.finish_reason = "context"
            break
        steps = _next_steps(model, sampler, history, feed, pos, i, max_tokens, logprobs,
                            "chain" if chain else "greedy" if on_device else None)
        for step in steps:
            pos += len(feed)
            now = time.perf_counter()
            if i == 0:
                stats.prefill_s = stats.ttft_s = now - t0
                t_decode = now
            else:
                stats.decode_s = now - t_decode
            i += 1
            stats.generated_tokens = i
            history.append(step.id)
            feed = [step.id]
            if step.id in eog:
                stats.finish_reason = "stop"
                yield step
                return
            yield step


def _next_steps(model, sampler, history, feed, pos: int, i: int, max_tokens: int, logprobs: int,
                device: str | None) -> list[Step]:
    """The next token(s): after the prefill (i > 0) a chunk of decode steps in one replay when the
    device picks ("chain": the sampling chain; "greedy": argmax), else one step."""
    if device and i > 0:
        left = max_tokens - i if max_tokens >= 0 else DECODE_CHUNK
        n = min(DECODE_CHUNK, left, model.n_ctx - pos)
        if device == "chain":
            return [Step(t) for t in model.decode_chunk(feed[0], pos, n)]
        return [Step(t) for t in model.decode_greedy(feed[0], pos, n)]
    if device == "chain":
        model.forward(feed, pos, sample=True)
        return [Step(t) for t in model.sampled()]
    logits = model.forward(feed, pos, greedy=device == "greedy")
    if device == "greedy":
        return [Step(model.greedy_token())]
    return [_sample_host(model.ops.to_host(logits)[0], sampler, history, logprobs)]


def _sample_host(logits: np.ndarray, sampler, history: list[int], k: int) -> Step:
    raw = logits.copy() if k else None
    tok = sampler(logits, history, index=len(history))
    if not k:
        return Step(tok)
    lp = log_softmax(raw)
    top = np.argsort(-lp, kind="stable")[:k]
    return Step(tok, float(lp[tok]), [(int(t), float(lp[t])) for t in top])


class StopMatcher:
    """Streams text while holding back any tail that could still grow into a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what is safe to print now. Sets `stopped` at a full match."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            cut = min(i for i, _ in hits)
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = max((self._overlap(s) for s in self.stops), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _overlap(self, stop: str) -> int:
        """Length of the longest suffix of pending that is a proper prefix of stop."""
        for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:n]):
                return n
        return 0


@dataclass
class GenerationResult:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    logprobs: list[dict] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)


def stream_generate(model, tokenizer, prompt_ids: Sequence[int], sampler, *, max_tokens: int,
                    stop: Sequence[str] = (), ignore_eos: bool = False, logprobs: int = 0,
                    on_text: Callable[[str], None] | None = None,
                    stats: GenerationStats | None = None, n_cached: int = 0) -> GenerationResult:
    """Generate, calling on_text with UTF-8-safe text pieces as they become final; stop strings
    end the text before them. Ctrl-C ends it cleanly with finish_reason 'interrupted'."""
    from .tokenizer import StreamDecoder

    res = GenerationResult(stats=stats if stats is not None else GenerationStats())
    eog = () if ignore_eos else tokenizer.eog_ids
    decoder = StreamDecoder(tokenizer, prev_id=prompt_ids[-1] if len(prompt_ids) else None)
    matcher = StopMatcher(stop)
    pieces: list[str] = []

    def emit(text: str) -> None:
        if text:
            pieces.append(text)
            if on_text:
                on_text(text)

    try:
        for step in generate_step(model, prompt_ids, sampler, max_tokens=max_tokens, eog_ids=eog,
                                  logprobs=logprobs, stats=res.stats, n_cached=n_cached):
            res.ids.append(step.id)
            if step.logprob is not None:
                res.logprobs.append({"id": step.id, "logprob": step.logprob,
                                     "top": [list(t) for t in step.top]})
            if step.id in eog:
                break
            emit(matcher.push(decoder.push(step.id)))
            if matcher.stopped:
                res.stats.finish_reason = "stop"
                break
        emit(matcher.push(decoder.flush()))
        emit(matcher.flush())
    except KeyboardInterrupt:
        res.stats.finish_reason = "interrupted"
    res.finish_reason = res.stats.finish_reason
    res.text = "".join(pieces)
    return res
