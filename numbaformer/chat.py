"""Interactive chat: the model's template over the whole history, reusing the cached prefix."""
from __future__ import annotations

import sys

from .chat_template import render_model_chat
from .generate import plural, stream_generate
from .sampling import SamplingParams, make_sampler


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


HELP = ("commands: /help this list, /clear forget the conversation (the system message stays); "
        "Ctrl-C stops a reply, Ctrl-D quits")


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_chat(engine, params: SamplingParams, *, system: str | None = None,
             max_tokens: int = 512, stats: bool = False, read=input, write=None) -> None:
    """Read a line, answer it, repeat. Ctrl-C stops a reply (or clears the line at the prompt),
    Ctrl-D quits; '/help' lists the commands, '/clear' forgets the conversation. max_tokens -1:
    no limit but the context. stats: the speed of each reply on stderr. `write` defaults to the
    sys.stdout of the call (not of the import)."""
    write = write or sys.stdout.write
    tok, model = engine.tokenizer, engine.model
    sampler = make_sampler(params)
    base = [{"role": "system", "content": system}] if system else []
    messages, cached = list(base), []
    _note("chat: Ctrl-D quits, Ctrl-C stops a reply, /help lists the commands")
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n")
            continue
        command = line.strip()
        if command == "/help":
            _note(HELP)
            continue
        if command == "/clear":
            messages, cached = list(base), []
            _note("(conversation cleared)")
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        ids = _prompt_ids(engine, messages)
        if len(ids) >= model.n_ctx:
            _note("note: the conversation filled the context; starting over")
            messages, cached = list(base) + [messages[-1]], []
            ids = _prompt_ids(engine, messages)
            if len(ids) >= model.n_ctx:
                _note("error: that message alone is longer than the context")
                messages.pop()
                continue
        n_cached = min(_common_prefix(cached, ids), len(ids) - 1)
        res = stream_generate(model, tok, ids, sampler, max_tokens=max_tokens,
                              on_text=lambda s: (write(s), sys.stdout.flush()),
                              n_cached=n_cached)
        write("\n")
        _after_reply(engine, res, stats)
        messages.append({"role": "assistant", "content": res.text})
        if res.ids:
            cached = ids + res.ids[:-1]     # the last sampled token never ran through the model
        else:                               # Ctrl-C in the prefill: only the old prefix is whole
            cached = ids[:n_cached]


def _prompt_ids(engine, messages: list[dict]) -> list[int]:
    return engine.tokenizer.encode(render_model_chat(engine.mf.gguf.metadata, engine.tokenizer,
                                                     messages), add_special=True, parse_special=True)


def _after_reply(engine, res, stats: bool) -> None:
    """What the chat says on stderr after a reply: that the context filled up, and the speed."""
    if res.finish_reason == "context":
        _note(f"note: the reply stopped: the context is full ({plural(engine.model.n_ctx)}); "
              f"/clear starts over, -c raises it (this model takes up to "
              f"{engine.config.n_ctx_train})")
    if stats:
        _note(f"[{res.finish_reason}] {res.stats.summary()}")
