"""OpenAI response shapes: the text of a request as it grows (`TextStream`: whole UTF-8, stop
strings held back), chat and completion responses, SSE chunks, usage and logprobs.

A request's output travels as `Delta`s: the text that became final in one engine step, the
tokens behind it with their log-probs, and at the end the finish reason. The non-streamed answer
is the deltas joined, so streamed and non-streamed text agree by construction.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ..generate import StopMatcher
from ..tokenizer import StreamDecoder


@dataclass
class Delta:
    text: str = ""
    tokens: list = field(default_factory=list)     # [(id, logprob | None, [(id, lp), ...])]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None


class TextStream:
    """Detokenizes one request's tokens (end-of-generation ids left out) and cuts the text before
    the first stop string, never releasing a tail that could still become one."""

    def __init__(self, tokenizer, prompt_ids, stops, eog_ids):
        self.decoder = StreamDecoder(tokenizer, skip_special=True, prev_id=prompt_ids[-1])
        self.matcher = StopMatcher(stops)
        self.eog = eog_ids

    def push(self, token_id: int) -> str:
        if token_id in self.eog:
            return ""
        return self.matcher.push(self.decoder.push(token_id))

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def finish(self) -> str:
        return self.matcher.push(self.decoder.flush()) + self.matcher.flush()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# --- logprobs --------------------------------------------------------------------------------

def _entry(tok, tid: int, lp: float) -> dict:
    return {"token": tok.token_text(tid), "logprob": lp, "bytes": list(tok.token_bytes(tid))}


def chat_logprobs(tok, tokens) -> list[dict]:
    """Chat's logprobs.content: one entry per token, with its top alternatives."""
    return [{**_entry(tok, t, lp), "top_logprobs": [_entry(tok, a, alp) for a, alp in top]}
            for t, lp, top in tokens]


def completion_logprobs(tok, tokens, offset: int = 0) -> dict:
    """The legacy completions logprobs object: tokens, token_logprobs, top_logprobs,
    text_offset (characters from the start of the completion)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, lp, top in tokens:
        text = tok.token_text(t)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({tok.token_text(a): alp for a, alp in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


# --- whole responses --------------------------------------------------------------------------

def chat_response(rid: str, model: str, text: str, finish: str, use: dict,
                  logprobs: list | None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None if logprobs is None else {"content": logprobs},
                         "finish_reason": finish}],
            "usage": use}


def completion_response(rid: str, model: str, text: str, finish: str, use: dict,
                        logprobs: dict | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                         "finish_reason": finish}],
            "usage": use}


# --- streaming --------------------------------------------------------------------------------

def sse(obj) -> str:
    """One server-sent event: `data: {json}` and a blank line."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None = None,
               logprobs: list | None = None, with_usage: bool = False) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta,
                        "logprobs": None if logprobs is None else {"content": logprobs},
                        "finish_reason": finish}]}
    if with_usage:
        out["usage"] = None
    return out


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None = None,
                     logprobs: dict | None = None, with_usage: bool = False) -> dict:
    out = {"id": rid, "object": "text_completion", "created": created, "model": model,
           "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                        "finish_reason": finish}]}
    if with_usage:
        out["usage"] = None
    return out


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict) -> dict:
    """The last chunk with stream_options.include_usage: no choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": use}


async def sse_events(deltas, tok, rid: str, model: str, *, chat: bool, include_usage: bool,
                     logprobs: bool):
    """The SSE stream of one request from its Deltas (an async iterator): for chat a first chunk
    with the role, a chunk per delta with text or tokens, a last one with the finish reason, the
    usage chunk when asked for, then `data: [DONE]`; an error mid-stream as an error event."""
    created, offset, use = int(time.time()), 0, include_usage
    if chat:
        yield sse(chat_chunk(rid, model, created, {"role": "assistant", "content": ""},
                             with_usage=use))
    async for d in deltas:
        if d.error:
            yield sse(d.error.body())
            return
        if d.text or d.tokens:
            if chat:
                lp = chat_logprobs(tok, d.tokens) if logprobs else None
                yield sse(chat_chunk(rid, model, created, {"content": d.text}, logprobs=lp,
                                     with_usage=use))
            else:
                lp = completion_logprobs(tok, d.tokens, offset) if logprobs else None
                yield sse(completion_chunk(rid, model, created, d.text, logprobs=lp,
                                           with_usage=use))
            offset += len(d.text)
        if d.finish_reason:
            yield sse(chat_chunk(rid, model, created, {}, d.finish_reason, with_usage=use)
                      if chat else
                      completion_chunk(rid, model, created, "", d.finish_reason, with_usage=use))
            if use:
                yield sse(usage_chunk(rid, model, created, "chat.completion.chunk" if chat else
                                      "text_completion",
                                      usage(d.prompt_tokens, d.completion_tokens)))
            yield SSE_DONE
            return


def whole_response(deltas: list[Delta], tok, rid: str, model: str, *, chat: bool,
                   logprobs: bool) -> dict:
    """The non-streamed response: the deltas' text joined, their tokens' log-probs, the last
    one's finish reason and counts."""
    last = deltas[-1]
    tokens = [t for d in deltas for t in d.tokens]
    use = usage(last.prompt_tokens, last.completion_tokens)
    text = "".join(d.text for d in deltas)
    if chat:
        return chat_response(rid, model, text, last.finish_reason, use,
                             chat_logprobs(tok, tokens) if logprobs else None)
    return completion_response(rid, model, text, last.finish_reason, use,
                               completion_logprobs(tok, tokens) if logprobs else None)
