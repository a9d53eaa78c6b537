"""Interactive chat: the model's template over the whole history, reusing the cached prefix."""
from __future__ import annotations

import sys

from .chat_template import render_model_chat
from .generate import stream_generate
from .sampling import SamplingParams, make_sampler


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_chat(engine, params: SamplingParams, *, system: str | None = None,
             max_tokens: int = 512, read=input, write=None) -> None:
    """Read a line, answer it, repeat. Ctrl-C stops a reply (or clears the line at the prompt),
    Ctrl-D quits, '/clear' forgets the conversation. `write` defaults to the sys.stdout of the
    call (not of the import)."""
    write = write or sys.stdout.write
    tok, model = engine.tokenizer, engine.model
    sampler = make_sampler(params)
    base = [{"role": "system", "content": system}] if system else []
    messages, cached = list(base), []
    print("chat: Ctrl-D quits, Ctrl-C stops a reply, /clear forgets the conversation",
          file=sys.stderr)
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n")
            continue
        if line.strip() == "/clear":
            messages, cached = list(base), []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.encode(render_model_chat(engine.mf.gguf.metadata, tok, messages),
                         add_special=True, parse_special=True)
        if len(ids) >= model.n_ctx:
            print("note: the conversation filled the context; starting over", file=sys.stderr)
            messages, cached = list(base) + [messages[-1]], []
            ids = tok.encode(render_model_chat(engine.mf.gguf.metadata, tok, messages),
                             add_special=True, parse_special=True)
            if len(ids) >= model.n_ctx:
                print("error: that message alone is longer than the context", file=sys.stderr)
                messages.pop()
                continue
        n_cached = min(_common_prefix(cached, ids), len(ids) - 1)
        res = stream_generate(model, tok, ids, sampler, max_tokens=max_tokens,
                              on_text=lambda s: (write(s), sys.stdout.flush()),
                              n_cached=n_cached)
        write("\n")
        messages.append({"role": "assistant", "content": res.text})
        if res.ids:
            cached = ids + res.ids[:-1]     # the last sampled token never ran through the model
        else:                               # Ctrl-C in the prefill: only the old prefix is whole
            cached = ids[:n_cached]
