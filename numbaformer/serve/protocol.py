"""The OpenAI request bodies as pydantic models (strict types, ranges), and the error envelope.

Every bad request becomes an APIError: a 4xx with OpenAI's body
`{"error": {"message", "type", "param", "code"}}`, `param` naming the field ("temperature",
"messages[0].content"). What pydantic cannot know (the vocabulary, the context) is checked by
`check_limits` once the model is loaded.
"""
from __future__ import annotations

import math
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_STOPS = 4
MAX_STOP_CHARS = 1000      # matching is O(length) per token on the engine thread
MAX_TOP_LOGPROBS = 20
INT64_MIN, UINT64_MAX = -(1 << 63), (1 << 64) - 1


class APIError(Exception):
    """An error answered in OpenAI's envelope: status, message, param, type, code."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def param_of(loc) -> str | None:
    """pydantic's error location -> the field path a client knows: ('body', 'messages', 0,
    'content') -> 'messages[0].content'; union member tags ('str', 'list[int]') are dropped."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (part in _UNION_TAGS or "[" in part or "-" in part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Sampling(_Strict):
    """The fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=INT64_MIN, le=UINT64_MAX)
    stop: Union[str, list[str], None] = Field(None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    n: int = 1
    user: str | None = None
    ignore_eos: bool = False            # llama-server's and vLLM's: generate past end-of-turn

    def stops(self) -> list[str]:
        s = self.stop
        return [] if s is None else [s] if isinstance(s, str) else list(s)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def n_logprobs(self) -> int | None:
        """How many alternatives per token: None when logprobs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    def n_logprobs(self) -> int | None:
        return self.logprobs


def check_request(req: _Sampling) -> None:
    """The checks pydantic's field types do not express (one choice, stop strings, logprob
    combinations); APIError 400 naming the field."""
    if req.n != 1:
        raise APIError(400, f"n must be 1 (one choice per request), not {req.n}", "n")
    stops = req.stops()
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop takes at most {MAX_STOPS} strings, not {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise APIError(400, "stop strings must not be empty", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop strings are at most {MAX_STOP_CHARS} characters", "stop")
    if isinstance(req, ChatRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    else:
        if req.echo:
            raise APIError(400, "echo is not supported", "echo")
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], (str, list)) \
                and len(req.prompt) != 1:
            raise APIError(400, f"one prompt per request, not {len(req.prompt)}", "prompt")


def parse_logit_bias(bias: dict[str, float] | None, n_vocab: int) -> dict[int, float]:
    """{"token id": bias} -> {id: bias}, each id in the vocabulary and bias in [-100, 100]."""
    out = {}
    for key, value in (bias or {}).items():
        try:
            tid = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids, not {key!r}",
                           "logit_bias") from None
        if not 0 <= tid < n_vocab:
            raise APIError(400, f"logit_bias token id {tid} is outside the vocabulary "
                                f"(0..{n_vocab - 1})", "logit_bias")
        if not (math.isfinite(value) and -100 <= value <= 100):
            raise APIError(400, f"logit_bias values must be in [-100, 100], not {value}",
                           "logit_bias")
        out[tid] = float(value)
    return out


def check_prompt_ids(ids: list[int], n_vocab: int) -> None:
    if not ids:
        raise APIError(400, "the prompt is empty", "prompt")
    bad = next((i for i in ids if not 0 <= i < n_vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (0..{n_vocab - 1})",
                       "prompt")


def check_limits(n_prompt: int, max_tokens: int | None, n_ctx: int, param: str) -> int:
    """The max_tokens to run: the prompt must leave room in the context (400
    context_length_exceeded otherwise, before any work), and max_tokens must fit what is left
    (default: all of it)."""
    room = n_ctx - n_prompt
    if room < 1:
        raise APIError(400, f"the prompt has {n_prompt} tokens; this model's context holds "
                            f"{n_ctx} (and needs room for at least one more)",
                       "messages" if param == "messages" else "prompt",
                       code="context_length_exceeded")
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise APIError(400, f"max_tokens {max_tokens} plus the prompt's {n_prompt} tokens "
                            f"exceed the context of {n_ctx}", "max_tokens",
                       code="context_length_exceeded")
    return max_tokens
