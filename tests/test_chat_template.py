"""numbaformer.chat_template: exact renders, sandbox, size and time caps, the ChatML fallback."""
import json
import time
import tracemalloc

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from vocab_files import read_metadata, unpack_vocab

import numbaformer.chat_template as chat_template
from numbaformer.chat_template import ChatTemplateError, render_chat, render_model_chat
from numbaformer.gguf_file import GGUFError
from numbaformer.tokenizer import Tokenizer

# tokenizer.chat_template of SmolLM2-135M-Instruct (checked against the file when it is present)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2_DEFAULT_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                          "trained by Hugging Face<|im_end|>\n")
USER = [{"role": "user", "content": "What is 2+2?"}]
SYSTEM_USER = [{"role": "system", "content": "Answer briefly."}, *USER]
TIMEOUT_S = 2.0
MAX_PEAK_BYTES = 32 << 20     # Python allocations while a capped template renders

# templates that try to reach Python internals or mutate their inputs
ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{% if ''.__class__ %}x{% endif %}",
    "{{ messages.append }}",
    "{% set _ = messages.append({'role': 'x'}) %}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__['__builtins__'] }}",
    "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
]

# templates that would build about 200 MB, each stopped by a size cap before it allocates much
HUGE = [
    "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
    "{{ 'x' * 200000000 }}",
    "{{ 'x' * 1000 * 1000 * 200 }}",
    "{{ [0] * 200000000 }}",
    "{{ 10 ** 200000000 }}",
    "{% set ns = namespace(s='x' * 1000000) %}{% for i in range(200) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}",
    "{% set ns = namespace(s='x' * 1000000) %}{% for i in range(200) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}",
    "{% set ns = namespace(l=[0]) %}{% for i in range(200) %}{% set ns.l = ns.l + ns.l %}"
    "{% endfor %}",
    "{{ range(100000)|join('x' * 2000) }}",
    "{{ range(20000)|map('string')|join('x' * 10000) }}",
    "{{ ('x' * 10000).join(range(20000)|map('string')) }}",
    "{{ 'x'|center(200000000) }}",
    "{{ 'x'.ljust(200000000) }}",
    "{{ ('a\n' * 500000)|indent(400) }}",
    "{{ ('x' * 1000000).replace('x', 'x' * 200) }}",
    "{{ '%0200000000d' % 1 }}",
    "{{ '{:200000000}'.format(1) }}",
    "{{ '%0200000000d'|format(1) }}",
    "{{ '%*d' % (200000000, 1) }}",
    "{{ '{:{}}'.format(1, 200000000) }}",
    "{{ ('\t' * 1000000).expandtabs(tabsize=1000) }}",
    "{{ range(100000)|list|tojson(separators=(',' * 2000, ':')) }}",
    "{{ messages|tojson(indent=200000000) }}",
]

# loop, filter and operator semantics that the guards must leave as plain Jinja has them
SEMANTICS = (
    "{% for m in messages if m.role != 'system' %}{{ loop.index }}/{{ loop.length }}"
    " {{ loop.first }} {{ loop.last }} {{ loop.revindex }}"
    " {{ loop.previtem.role if loop.previtem else '-' }}"
    " {{ loop.cycle('a', 'b') }} {{ m.content }}\n{% else %}none{% endfor %}"
    "{% for k, v in {'x': 1, 'y': [1, 2]}|dictsort %}{{ k }}={{ v|tojson }};{% endfor %}\n"
    "{% for x in [[1, [2, [3]]], 4] recursive %}{% if x is iterable %}[{{ loop(x) }}]"
    "{% else %}{{ x }}@{{ loop.depth }},{% endif %}{% endfor %}\n"
    "{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}{% if i == 5 %}{% break %}"
    "{% endif %}{{ i }}{% endfor %}\n"
    "{% set ns = namespace(n=0) %}{% for i in range(3) %}{% for j in range(3) %}"
    "{% set ns.n = ns.n + i * j %}{% endfor %}{% endfor %}{{ ns.n }} {{ '%05d' % 42 }}"
    " {{ '{:>6}'.format('ab') }} {{ 'a,b'.split(',')|join('|') }} {{ 'x' ~ 1 ~ none }}"
    " {{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|list }}"
    " {{ (messages[-1].content * 2)[:5] }} {{ 2 ** 10 }} {{ [1] + [2] }} {{ 'é<>'|tojson }}"
    " {{ '%s has 2000000 items' % 'x' }} {{ '{} {:>6.2f}'.format(123456789012, 2.5) }}"
    " {{ 12345678|string }} {{ messages[0]|tojson(indent=2) }} {{ 'a\tb'.expandtabs(4) }}")


def plain_jinja(template, **variables):
    """The same template in an unguarded ImmutableSandboxedEnvironment (Hugging Face's setup)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(template).render(**variables)


def test_smollm2_template_system_and_user():
    text = render_chat(SMOLLM2_TEMPLATE, SYSTEM_USER)
    assert text == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_template_default_system():
    assert render_chat(SMOLLM2_TEMPLATE, USER, add_generation_prompt=False) == (
        SMOLLM2_DEFAULT_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n")


def test_smollm2_template_from_the_model_file(smollm2_path):
    meta = read_metadata(smollm2_path)
    assert meta["tokenizer.chat_template"] == SMOLLM2_TEMPLATE
    tok = Tokenizer.from_metadata(meta)
    text = render_model_chat(meta, tok, USER)
    assert text == render_chat(SMOLLM2_TEMPLATE, USER)
    assert tok.encode(text)[:3] == [1, 9690, 198]     # '<|im_start|>' 'system' '\n', no BOS


def test_render_model_chat_passes_bos_and_eos(tmp_path):
    meta = read_metadata(unpack_vocab("llama-spm", tmp_path))
    tok = Tokenizer.from_metadata(meta)
    meta["tokenizer.chat_template"] = "{{ bos_token }}[{{ messages[0].content }}]{{ eos_token }}"
    text = render_model_chat(meta, tok, USER)
    assert text == "<s>[What is 2+2?]</s>"
    assert tok.encode(text)[:2] == [1, 518]            # one BOS: the template's
    with pytest.raises(GGUFError, match="tokenizer.chat_template"):
        render_model_chat({**meta, "tokenizer.chat_template": 5}, tok, USER)


def test_guards_keep_jinja_semantics():
    messages = [*SYSTEM_USER, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "ok"}]
    text = render_chat(SEMANTICS, messages)
    assert text == plain_jinja(SEMANTICS, messages=messages)
    assert "1/3 True False 3 - a What is 2+2?" in text and "[1@2,[2@3,[3@4,]]]4@1," in text


def test_raise_exception_is_a_chat_template_error():
    template = ("{% if messages[0].role != 'user' %}{{ raise_exception('roles must alternate') }}"
                "{% endif %}")
    with pytest.raises(ChatTemplateError, match="raised an error: roles must alternate"):
        render_chat(template, SYSTEM_USER)
    assert render_chat(template, USER) == ""


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_escapes_are_refused(template):
    with pytest.raises(ChatTemplateError, match="unsafe") as err:
        render_chat(template, [{"role": "user", "content": "hi"}])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("template", HUGE)
def test_huge_outputs_are_stopped_by_the_size_caps(template):
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(ChatTemplateError, match="exceed|not in") as err:
            render_chat(template, USER, timeout_s=TIMEOUT_S)
        elapsed, peak = time.monotonic() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < TIMEOUT_S                      # a size cap, not the clock, stopped it
    assert peak < MAX_PEAK_BYTES                    # before the 200 MB were allocated
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("template", [
    "{% set r = range(100000)|list %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% for i in range(100000) %}{% endfor %}{{ f(n) }}{% endmacro %}{{ f(0) }}",
])
def test_endless_loops_hit_the_time_cap(template):
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="longer than 0.3 s|recursion"):
        render_chat(template, USER, timeout_s=0.3)
    assert time.monotonic() - start < 0.3 + 1.0


def test_output_cap_is_configurable():
    assert render_chat("{{ 'x' * 10 }}", USER, max_chars=10) == "x" * 10
    with pytest.raises(ChatTemplateError, match="exceeds"):
        render_chat("{{ 'x' * 11 }}", USER, max_chars=10)
    with pytest.raises(ChatTemplateError, match="output exceeds 10 characters"):
        render_chat("{% for m in messages %}{{ '123456' }}{% endfor %}", USER * 2, max_chars=10)


def test_syntax_and_runtime_errors_are_one_line():
    with pytest.raises(ChatTemplateError, match="syntax error at line 2") as err:
        render_chat("ok\n{% for x in %}", USER)
    assert "\n" not in str(err.value)
    with pytest.raises(ChatTemplateError, match="failed: UndefinedError"):
        render_chat("{{ messages[0].content.nope.deeper }}", USER)
    with pytest.raises(ChatTemplateError, match="list of dicts"):
        render_chat(SMOLLM2_TEMPLATE, "hello")


def test_tojson_keeps_text_unescaped():
    assert render_chat("{{ messages[0]|tojson }}", [{"role": "user", "content": "é <b>&"}]) == (
        '{"role": "user", "content": "é <b>&"}')


def test_chatml_fallback_is_exact_and_noticed_once(monkeypatch, capsys):
    monkeypatch.setattr(chat_template, "_notice_shown", False)
    expected = ("<|im_start|>system\nAnswer briefly.<|im_end|>\n"
                "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(None, SYSTEM_USER) == expected
    assert render_chat("", SYSTEM_USER, add_generation_prompt=False) == expected[:-len(
        "<|im_start|>assistant\n")]
    err = capsys.readouterr().err
    assert err.count("no chat template in the model; using ChatML") == 1
    with pytest.raises(ChatTemplateError, match="chat message 0"):
        render_chat(None, [{"role": "user", "content": ["a", "b"]}])
