"""Chat templates: render `tokenizer.chat_template` (Jinja2) in a sandbox with size and time caps.

The template runs in Jinja2's ImmutableSandboxedEnvironment (the settings Hugging Face uses:
trim_blocks, lstrip_blocks, loopcontrols; `raise_exception`, `strftime_now`, a non-escaping
`tojson`). A model file is untrusted input, so the render is bounded while it runs, not after:
- output: chunks from `template.generate()` are counted; past `max_chars` the render stops;
- single operations: `*`, `**`, `+`, `%`, `~`, method calls and filters that could build a string,
  list or int larger than `max_chars` are refused before they allocate (`range` is the sandbox's,
  at most 100,000 items);
- time: the deadline is checked on every loop iteration (each `for` iterable is wrapped at code
  generation), call, filter, attribute lookup and output chunk: silent loops stop too.
Every failure is a ChatTemplateError with a one-line message.
"""
from __future__ import annotations

import datetime
import functools
import json
import re
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

from jinja2 import TemplateSyntaxError, Undefined, nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .gguf_file import GGUFError

DEFAULT_MAX_CHARS = 1 << 20
DEFAULT_TIMEOUT_S = 2.0
MAX_INT_BITS = 1 << 16          # larger integers (from *, **) are refused: their arithmetic is slow
NO_TEMPLATE_NOTICE = "no chat template in the model; using ChatML"

_notice_shown = False
_DIGITS = re.compile(r"\d+")
_PRINTF_SPEC = re.compile(r"%[#0\- +]*[\d*.]*")                       # '%08.3f', '%*d'
_FORMAT_SPEC = re.compile(r"\{[^{}]*:([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")  # '{:>8}', '{:{w}}'
# str methods and filters whose integer arguments set an output size (width, count of pieces)
_WIDTH_FUNCS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "wordwrap",
                          "batch", "slice"})


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or hit a cap. The message is one line."""


class _TemplateRaised(Exception):
    """raise_exception() called by the template."""


class _Caps:
    """The limits of one render: max_chars for any string/list/output, a monotonic deadline."""

    def __init__(self, max_chars: int, timeout_s: float):
        self.max_chars, self.timeout_s = max_chars, timeout_s
        self.deadline = time.monotonic() + timeout_s

    def refuse(self, what: str) -> None:
        raise ChatTemplateError(f"chat template: {what} exceeds the limit of {self.max_chars}")

    def size(self, n: int, what: str) -> None:
        if n > self.max_chars:
            self.refuse(f"{what} ({n})")

    def clock(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"chat template: rendering took longer than {self.timeout_s} s")

    def format_widths(self, fmt: Any, args: Iterable, what: str) -> None:
        """Refuse formatting whose widths exceed the cap: '%0999999d', '{:999999}', and widths
        taken from the arguments ('%*d', '{:{}}') when an integer argument exceeds it."""
        if not isinstance(fmt, str):
            return
        specs = [*_PRINTF_SPEC.findall(fmt), *_FORMAT_SPEC.findall(fmt)]
        for digits in _DIGITS.findall("".join(specs)):
            self.size(int(digits) if len(digits) < 12 else 10**12, what)
        if any("*" in spec or "{" in spec for spec in specs):
            for a in args:
                if isinstance(a, int):
                    self.size(abs(a), what)

    def result(self, value: Any, what: str) -> Any:
        if isinstance(value, (str, list, tuple, dict)):
            self.size(len(value), what)
        return value


def _seq_len(x: Any) -> int | None:
    return len(x) if isinstance(x, (str, list, tuple)) else None


def _check_binop(caps: _Caps, op: str, left: Any, right: Any) -> None:
    """Size of `left op right` bounded before it is computed."""
    caps.clock()
    ints = [isinstance(v, int) and not isinstance(v, bool) for v in (left, right)]
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if _seq_len(seq) is not None and isinstance(n, int):
                caps.size(_seq_len(seq) * max(n, 0), f"'{op}' on a {type(seq).__name__}")
        if all(ints) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            caps.refuse(f"integer '*' over {MAX_INT_BITS} bits")
    elif op == "**" and all(ints) and right > 0 and abs(left) > 1:
        if right * left.bit_length() > MAX_INT_BITS:
            caps.refuse(f"integer '**' over {MAX_INT_BITS} bits")
    elif op == "+" and _seq_len(left) is not None and _seq_len(right) is not None:
        caps.size(_seq_len(left) + _seq_len(right), f"'+' on a {type(left).__name__}")
    elif op == "%":
        caps.format_widths(left, _format_args(right), "'%' formatting width")


def _format_args(given: Any) -> Iterable:
    """The values a '%' (or format_map) substitutes: a mapping's values, a tuple, or one value."""
    if isinstance(given, Mapping):
        return given.values()
    return given if isinstance(given, tuple) else (given,)


def _amplified_len(name: str, value: Any, args: tuple, kwargs: dict) -> int:
    """Upper bound on the result length of the string operations that can multiply their input."""
    if not isinstance(value, str):
        return 0
    if name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        old, new = args[:2]
        hits = value.count(old) if old else len(value) + 1
        return len(value) + hits * max(0, len(new) - len(old))
    if name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        return len(value) + value.count("\t") * (tab if isinstance(tab, int) else 0)
    if name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return len(value) + (value.count("\n") + 1) * per_line
    if name == "wordwrap":
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring")
        return len(value) + (len(value) + 1) * (len(wrap) if isinstance(wrap, str) else 1)
    return 0


def _checked_join(caps: _Caps, sep: Any, items: Any) -> list:
    """Materialize the items of a join and bound the joined length."""
    items = list(items)
    caps.size(len(items), "join")
    if isinstance(sep, str):
        total = len(sep) * max(len(items) - 1, 0)
        total += sum(len(x) for x in items if isinstance(x, str))
        caps.size(total, "join")
    return items


def _check_call_args(caps: _Caps, name: str, value: Any, args: tuple, kwargs: dict) -> None:
    """The deadline, then the size checks for a call of `name` on `value` (str method or filter)."""
    caps.clock()
    if name == "format_map" and args:
        caps.format_widths(value, _format_args(args[0]), "'format_map' width")
    elif name == "format":
        caps.format_widths(value, (*args, *kwargs.values()), "'format' width")
    if name in _WIDTH_FUNCS:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int):
                caps.size(abs(a), f"'{name}' width")
    caps.size(_amplified_len(name, value, args, kwargs), f"'{name}'")


def _guard_filter(caps: _Caps, name: str, func):
    """Wrap a Jinja filter with the size checks (before and after the call)."""
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        head, (value, *rest) = args[:skip], args[skip:]
        if name == "join":
            sep = rest[0] if rest else kwargs.get("d", "")
            value = _checked_join(caps, sep, value)
        _check_call_args(caps, name, value, tuple(rest), kwargs)
        return caps.result(func(*head, value, *rest, **kwargs), f"'{name}' result")

    return guarded


class _Undefined(Undefined):
    """Undefined that raises at once when it stands for an attribute the sandbox refused, so
    `{{ ''.__class__ }}` is an error rather than empty text."""

    __slots__ = ()

    def _refuse_unsafe(self) -> None:
        if self._undefined_exception is SecurityError:
            self._fail_with_undefined_error()

    def __str__(self) -> str:
        self._refuse_unsafe()
        return super().__str__()

    def __iter__(self):
        self._refuse_unsafe()
        return super().__iter__()

    def __bool__(self) -> bool:
        self._refuse_unsafe()
        return super().__bool__()

    def __len__(self) -> int:
        self._refuse_unsafe()
        return super().__len__()


class _GuardedCode(CodeGenerator):
    """Compiles `a ~ b` through environment.guarded_concat (its length checked first) and every
    `for` iterable through environment.ticking (the deadline checked on each iteration)."""

    def visit_For(self, node: nodes.For, frame) -> None:
        node.iter = nodes.Call(nodes.EnvironmentAttribute("ticking"), [node.iter], [], None, None,
                               lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.guarded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """Hugging Face's tojson (same signature): json.dumps, non-ASCII kept, no HTML escaping.
    indent and separators are bounded: they are repeated for every item."""
    if indent is not None and not (isinstance(indent, int) and 0 <= indent <= 16):
        raise ChatTemplateError(f"chat template: tojson indent {indent!r} is not in [0, 16]")
    if separators is not None and sum(map(len, separators)) > 16:
        raise ChatTemplateError("chat template: tojson separators exceed 16 characters")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    """Hugging Face's strftime_now global: the local time formatted (Llama 3.x, Mistral use it)."""
    return datetime.datetime.now().strftime(fmt)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox with every amplifying operation checked against one render's caps."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _GuardedCode

    def __init__(self, caps: _Caps):
        super().__init__(trim_blocks=True, lstrip_blocks=True, undefined=_Undefined,
                         extensions=["jinja2.ext.loopcontrols"])
        self.caps = caps
        self.globals.pop("lipsum", None)
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(caps, name, f) for name, f in self.filters.items()}

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(self.caps, operator, left, right)
        return self.caps.result(super().call_binop(context, operator, left, right),
                                f"'{operator}' result")

    def ticking(self, iterable: Any):
        """Yield the items of a template loop, checking the deadline before each."""
        for item in iterable:
            self.caps.clock()
            yield item

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.caps.clock()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.caps.clock()
        return super().getitem(obj, argument)

    def guarded_concat(self, parts: tuple) -> str:
        strings = [str(p) for p in parts]
        self.caps.size(sum(map(len, strings)), "'~'")
        return "".join(strings)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        caps = __self.caps
        target = getattr(__obj, "__wrapped__", __obj)
        owner, name = getattr(target, "__self__", None), getattr(target, "__name__", "call")
        if isinstance(owner, str) and name == "join" and len(args) == 1:
            args = (_checked_join(caps, owner, args[0]),)
        _check_call_args(caps, name, owner, args, kwargs)
        return caps.result(super().call(__context, __obj, *args, **kwargs), f"'{name}' result")


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _render_sandboxed(template: str, variables: dict, caps: _Caps) -> str:
    env = _Sandbox(caps)
    compiled = env.from_string(template)
    out, size = [], 0
    for chunk in compiled.generate(**variables):
        size += len(chunk)
        if size > caps.max_chars:
            raise ChatTemplateError(f"chat template: output exceeds {caps.max_chars} characters")
        out.append(chunk)
        caps.clock()
    return "".join(out)


def _chatml(messages: list, add_generation_prompt: bool) -> str:
    global _notice_shown
    if not _notice_shown:
        print(f"numbaformer: {NO_TEMPLATE_NOTICE}", file=sys.stderr)
        _notice_shown = True
    parts = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ChatTemplateError(f"chat message {i}: expected string 'role' and 'content', "
                                    f"found {type(role).__name__} and {type(content).__name__}")
        parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def render_chat(template: str | None, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", max_chars: int = DEFAULT_MAX_CHARS,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Render a chat template (Jinja2 source) over `messages` (dicts with 'role' and 'content').

    With no template (None or ""), ChatML is used and a notice is printed once on stderr.
    The render stops with ChatTemplateError once the output passes `max_chars`, one operation
    would build more than `max_chars` items, or `timeout_s` seconds have passed.
    """
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise ChatTemplateError("chat messages: expected a list of dicts")
    if not template:
        return _chatml(messages, add_generation_prompt)
    caps = _Caps(max_chars, timeout_s)
    variables = dict(messages=messages, add_generation_prompt=add_generation_prompt,
                     bos_token=bos_token, eos_token=eos_token)
    try:
        return _render_sandboxed(template, variables, caps)
    except ChatTemplateError:
        raise
    except _TemplateRaised as e:
        raise ChatTemplateError(f"chat template raised an error: {_one_line(e)}") from None
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: "
                                f"{_one_line(e.message)}") from None
    except SecurityError as e:
        raise ChatTemplateError(f"chat template refused: {_one_line(e)}") from None
    except Exception as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: "
                                f"{_one_line(e)}") from None


def render_model_chat(meta: Mapping[str, Any], tokenizer, messages: list[dict], *,
                      add_generation_prompt: bool = True, **caps: Any) -> str:
    """render_chat with the model's `tokenizer.chat_template` and its BOS/EOS texts."""
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise GGUFError(f"key 'tokenizer.chat_template': expected a string, found "
                        f"{type(template).__name__}")
    bos = tokenizer.piece(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.piece(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                       bos_token=bos, eos_token=eos, **caps)
