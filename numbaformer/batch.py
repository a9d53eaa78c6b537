"""Offline batch generation: a JSON-lines file of requests, run together through the engine.

Each line is one JSON object: `{"prompt": "..."}` or `{"messages": [{"role", "content"}, ...]}`
(through the model's chat template), plus optional fields: max_tokens, temperature, top_k, top_p,
min_p, repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty, seed, stop (a string
or a list of strings) and id (any JSON value, echoed in the result). Blank lines are skipped.

`parse_requests(text, defaults)` checks every line without a model; `prepare(engine, requests)`
renders and tokenizes them (still before any work); both raise ValueError "line N: ...".
`run_batch(engine, requests, parallel)` runs them `parallel` at a time (engine.add_request /
step), stop strings checked on the host after each step, and returns one BatchResult per request
in input order.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields, replace

from .generate import StopMatcher
from .progress import Bar
from .sampling import SamplingParams, make_sampler

SAMPLING_FIELDS = {f.name: f.type for f in fields(SamplingParams)}
_INT_FIELDS = {"top_k", "repeat_last_n", "seed", "max_tokens"}
FIELDS = set(SAMPLING_FIELDS) | {"prompt", "messages", "max_tokens", "stop", "id"}


@dataclass
class Request:
    """One line's request: its line number, prompt (text, or chat messages), sampling and
    limits; prompt_ids once prepared."""

    line: int
    prompt: str | None = None
    messages: list | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 128                   # -1: until an end-of-generation id or the context
    stop: tuple[str, ...] = ()
    id: object = None
    prompt_ids: list[int] = field(default_factory=list)


@dataclass
class BatchResult:
    """What one request gave: the text (cut before a stop string), the generated ids, why it
    ended ("stop" or "length"), and when (seconds from the start of the run)."""

    request: Request
    text: str = ""
    ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    start_s: float = 0.0                    # its first step began
    first_s: float = 0.0                    # its first token came
    end_s: float = 0.0

    def as_dict(self) -> dict:
        r, n = self.request, len(self.ids)
        decode_s = self.end_s - self.first_s
        out = {"line": r.line, "text": self.text, "ids": self.ids,
               "finish_reason": self.finish_reason,
               "timings": {"prompt_tokens": len(r.prompt_ids), "generated_tokens": n,
                           "start_s": round(self.start_s, 4),
                           "ttft_s": round(self.first_s - self.start_s, 4),
                           "total_s": round(self.end_s - self.start_s, 4),
                           "decode_tps": round((n - 1) / decode_s, 2)
                           if n > 1 and decode_s > 0 else 0.0}}
        return out if r.id is None else {"id": r.id, **out}


# --- reading and checking -------------------------------------------------------------------------

def _number(key: str, value, line: int):
    """A JSON number for field key (an integer for the integer fields; never a bool)."""
    want_int = key in _INT_FIELDS
    ok = isinstance(value, int) if want_int else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise ValueError(f"line {line}: '{key}' must be {'an integer' if want_int else 'a number'}"
                         f", not {json.dumps(value)[:40]}")
    return value


def _stops(value, line: int) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"line {line}: 'stop' must be a string or a list of strings")
    return tuple(s for s in stops if s)


def parse_line(text: str, line: int, defaults: Request) -> Request:
    """One line -> a Request over `defaults` (its params, max_tokens, stop); ValueError
    "line N: ..." for anything no request can be made of."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"line {line}: not JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"line {line}: expected a JSON object, found {type(obj).__name__}")
    unknown = sorted(set(obj) - FIELDS)
    if unknown:
        raise ValueError(f"line {line}: unknown field '{unknown[0]}' (fields: "
                         f"{', '.join(sorted(FIELDS))})")
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError(f"line {line}: give 'prompt' or 'messages', not both or none")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if "prompt" in obj and not isinstance(prompt, str):
        raise ValueError(f"line {line}: 'prompt' must be a string")
    if "messages" in obj and not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages)):
        raise ValueError(f"line {line}: 'messages' must be a non-empty list of objects with "
                         f"string 'role' and 'content'")
    nums = {k: _number(k, v, line) for k, v in obj.items() if k in SAMPLING_FIELDS
            or k == "max_tokens"}
    max_tokens = nums.pop("max_tokens", defaults.max_tokens)
    if max_tokens < -1:
        raise ValueError(f"line {line}: 'max_tokens' must be >= -1 (-1: no limit), "
                         f"not {max_tokens}")
    params = replace(defaults.params, **nums)
    try:
        params.validate()
    except ValueError as e:
        raise ValueError(f"line {line}: {e}") from None
    stop = _stops(obj["stop"], line) if "stop" in obj else defaults.stop
    return Request(line, prompt, messages, params, max_tokens, stop, obj.get("id"))


def parse_requests(text: str, defaults: Request | None = None) -> list[Request]:
    """Every non-blank line of a JSON-lines text as a Request (line numbers from 1); the first
    bad line raises ValueError naming it; no line at all is an error too."""
    defaults = defaults or Request(0)
    reqs = [parse_line(s, i, defaults) for i, s in enumerate(text.splitlines(), start=1)
            if s.strip()]
    if not reqs:
        raise ValueError("no requests: every line is blank")
    return reqs


def prepare(engine, requests: list[Request], chat: bool = False,
            system: str | None = None) -> None:
    """Set each request's prompt_ids: messages through the model's chat template (with chat,
    a prompt too, as the user's message after `system`), then the tokenizer; ValueError
    "line N: ..." for a template error or a prompt the context cannot hold."""
    from .chat_template import render_model_chat
    tok, n_ctx = engine.tokenizer, engine.model.n_ctx
    for r in requests:
        msgs = r.messages
        if msgs is None and chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": r.prompt}]
        try:
            text = r.prompt if msgs is None else render_model_chat(
                engine.mf.gguf.metadata, tok, msgs)
        except ValueError as e:
            raise ValueError(f"line {r.line}: {e}") from None
        r.prompt_ids = tok.encode(text, add_special=True, parse_special=True)
        if not r.prompt_ids:
            raise ValueError(f"line {r.line}: the prompt is empty (no tokens)")
        if len(r.prompt_ids) >= n_ctx:
            raise ValueError(f"line {r.line}: the prompt has {len(r.prompt_ids)} tokens; the "
                             f"context holds {n_ctx} (use -c to raise it)")


# --- running --------------------------------------------------------------------------------------

def pool_blocks(n_ctx: int, needs: list[int], parallel: int, block_size: int) -> int:
    """KV blocks for a run: enough for the `parallel` largest requests at once (positions
    each: prompt + max tokens), within the engine's default pool of parallel x 1024 positions
    (at least one full context)."""
    per_seq = -(-n_ctx // block_size)
    default = max(per_seq, parallel * min(per_seq, 1024 // block_size))
    blocks = sorted((min(per_seq, -(-n // block_size)) for n in needs), reverse=True)
    return max(blocks[0], min(default, sum(blocks[:parallel])))


class _Tracker:
    """One request under way: its engine sequence, the text so far and the stop strings."""

    def __init__(self, engine, req: Request, result: BatchResult, ignore_eos: bool):
        from .tokenizer import StreamDecoder
        n_ctx = engine.model.n_ctx
        limit = req.max_tokens if req.max_tokens >= 0 else n_ctx
        sampler = None if req.params.greedy and not req.params.has_penalties else \
            make_sampler(req.params)
        self.seq_id = engine.add_request(req.prompt_ids, limit, sampler,
                                         stop_ids=() if ignore_eos else None)
        self.seq = engine.batching.seqs[self.seq_id]
        self.eog = frozenset() if ignore_eos else engine.tokenizer.eog_ids
        self.decoder = StreamDecoder(engine.tokenizer, prev_id=req.prompt_ids[-1])
        self.matcher = StopMatcher(req.stop)
        self.result, self.pieces, self.seen, self.started = result, [], 0, False

    def update(self, now: float, step_start: float) -> bool:
        """Take the sequence's new tokens; whether a stop string has now ended it."""
        s, res = self.seq, self.result
        if not self.started and s.num_computed:
            res.start_s, self.started = step_start, True
        new = s.output_ids[self.seen:]
        if new and not self.seen:
            res.first_s = now
        self.seen += len(new)
        for t in new:
            res.ids.append(t)
            if t in self.eog:
                break
            self.pieces.append(self.matcher.push(self.decoder.push(t)))
            if self.matcher.stopped:
                return True
        return False

    def finish(self, reason: str, now: float) -> BatchResult:
        self.pieces += [self.matcher.push(self.decoder.flush()), self.matcher.flush()]
        res = self.result
        res.text, res.end_s = "".join(self.pieces), now
        res.finish_reason = "stop" if reason == "stop" or self.matcher.stopped else "length"
        return res


def run_batch(engine, requests: list[Request], parallel: int = 4, *,
              max_batched_tokens: int = 512, ignore_eos: bool = False,
              on_result=None) -> list[BatchResult]:
    """Run prepared requests (prompt_ids set) through the engine's batched path, up to
    `parallel` sequences a step and max_batched_tokens rows; returns their results in input
    order. on_result(result) is called as each one ends. The engine's batched path is built
    here (its first use) to fit the run. A progress bar on stderr counts finished requests."""
    if not getattr(engine.backend, "paged_kv", False):
        raise ValueError(f"batch generation needs a paged KV cache, which the "
                         f"{engine.backend.name} backend does not have yet (use --device cpu)")
    from .blocks import BLOCK_SIZE
    needs = [len(r.prompt_ids) + (r.max_tokens if r.max_tokens >= 0 else engine.model.n_ctx)
             for r in requests]
    engine.start_batching(parallel, max(max_batched_tokens, parallel),
                          pool_blocks(engine.model.n_ctx, needs, parallel, BLOCK_SIZE))
    results = [BatchResult(r) for r in requests]
    t0 = time.perf_counter()
    live = {}
    for r, res in zip(requests, results):
        tr = _Tracker(engine, r, res, ignore_eos)
        live[tr.seq_id] = tr
    with Bar(total=len(requests), desc="generating", unit="req", leave=False) as bar:
        while live:
            start = time.perf_counter() - t0
            done = {s.seq_id: s.finish_reason for s in engine.step()}
            now = time.perf_counter() - t0
            for sid, tr in list(live.items()):
                stopped = tr.update(now, start)
                if stopped:
                    engine.abort(sid)
                if stopped or sid in done:
                    res = live.pop(sid).finish(done.get(sid, "stop"), now)
                    bar.update(1)
                    if on_result:
                        on_result(res)
    return results


def summary(results: list[BatchResult]) -> str:
    """One line: requests, prompt and generated tokens, wall time, aggregate generation rate."""
    wall = max((r.end_s for r in results), default=0.0)
    n_gen = sum(len(r.ids) for r in results)
    n_prompt = sum(len(r.request.prompt_ids) for r in results)
    rate = n_gen / wall if wall > 0 else 0.0
    return (f"{len(results)} requests: {n_prompt} prompt tokens, {n_gen} generated in "
            f"{wall:.2f} s ({rate:.1f} tok/s aggregate)")


def in_order(requests: list[Request], write):
    """An on_result callback that calls write(result) in the order of `requests`: each result
    as soon as every earlier one has been written."""
    order, held, nxt = [r.line for r in requests], {}, [0]

    def on_result(res: BatchResult) -> None:
        held[res.request.line] = res
        while nxt[0] < len(order) and order[nxt[0]] in held:
            write(held.pop(order[nxt[0]]))
            nxt[0] += 1
    return on_result
