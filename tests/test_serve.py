"""`numbaformer serve`, the protocol (a real server, SmolLM2 on the CPU, -np 2), driven by the
official openai client and by raw HTTP: the endpoints, streaming as the client reads it, stop
strings, sampling parameters, logit_bias, logprobs, and every kind of bad input answered with a
4xx in OpenAI's envelope (never a 5xx, never a traceback)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import httpx
import pytest
from serve_helpers import ALIAS, API_KEY, Server, sse_events

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

CTX = 512
MAX_BODY = 1 << 20
CHAT = [{"role": "user", "content": "Name three colors."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    s = Server(smollm2_path, tmp_path_factory.mktemp("serve") / "server.log", "-np", 2, "-c", CTX,
               "--max-body", MAX_BODY)
    try:
        yield s.started()
    finally:
        s.stop()
    assert "Traceback" not in s.output(), s.output()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def greedy_chat(client, **kw):
    return client.chat.completions.create(model=ALIAS, messages=kw.pop("messages", CHAT),
                                          max_tokens=kw.pop("max_tokens", 24), temperature=0,
                                          **kw)


def stream_chat(client, **kw):
    return list(client.chat.completions.create(model=ALIAS, messages=kw.pop("messages", CHAT),
                                               max_tokens=kw.pop("max_tokens", 24),
                                               temperature=0, stream=True, **kw))


# --- endpoints ---------------------------------------------------------------------------------

def test_health_is_503_while_loading_then_200(server):
    assert server.health_seen[-1] == 200
    assert 503 in server.health_seen, server.health_seen
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_models_lists_the_alias(client):
    models = client.models.list().data
    assert [m.id for m in models] == [ALIAS]


def test_chat_answers_with_the_template(client, smollm2):
    r = greedy_chat(client)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content.strip()
    assert c.finish_reason in ("stop", "length")
    assert r.model == ALIAS and r.object == "chat.completion"
    assert r.usage.prompt_tokens > len(smollm2.tokenizer.encode(CHAT[0]["content"]))  # template
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_joined_equals_the_answer(client):
    whole = greedy_chat(client)
    chunks = stream_chat(client, stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.choices[0].delta.role is None for ch in chunks[1:] if ch.choices)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(ch.usage is None for ch in chunks[:-1])


def test_raw_sse_ends_with_done_and_has_no_usage_unless_asked(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={
            "Authorization": f"Bearer {API_KEY}"}, json={
            "messages": CHAT, "max_tokens": 8, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    assert all("usage" not in e for e in events[:-1])
    assert events[0]["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("as_ids", [False, True])
def test_completion_of_a_string_or_its_token_ids(client, smollm2, as_ids):
    prompt = smollm2.tokenizer.encode(PROMPT) if as_ids else PROMPT
    r = client.completions.create(model=ALIAS, prompt=prompt, max_tokens=12, temperature=0)
    ref = client.completions.create(model=ALIAS, prompt=[PROMPT], max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.choices[0].text and r.choices[0].text
    assert r.usage.prompt_tokens == len(smollm2.tokenizer.encode(PROMPT))
    streamed = client.completions.create(model=ALIAS, prompt=prompt, max_tokens=12,
                                         temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text


def test_plain_greedy_text_is_the_host_samplers_text(client):
    """A plain greedy request takes the engine's argmax of each row with no sampler (no logits
    row copied to the host); asking for log-probs puts it back on the host sampler: the same
    text either way, and a repetition penalty (host sampler too) changes it."""
    kw = dict(model=ALIAS, prompt="One, two, three, one, two, three, one,", max_tokens=16,
              temperature=0)
    plain = client.completions.create(**kw).choices[0]
    r = client.completions.create(logprobs=2, **kw)
    hosted = r.choices[0]
    assert plain.text and plain.text == hosted.text
    assert len(hosted.logprobs.tokens) == r.usage.completion_tokens > 0
    penalized = client.completions.create(frequency_penalty=2.0, **kw).choices[0]
    assert penalized.text != plain.text


def test_plain_greedy_is_temperature_0_without_penalties_bias_or_logprobs():
    from numbaformer.sampling import SamplingParams
    from numbaformer.serve.bridge import Job, plain_greedy

    def job(**kw):
        return Job([1], 4, SamplingParams(temperature=kw.pop("temperature", 0.0),
                                          presence_penalty=kw.pop("presence", 0.0)), **kw)
    assert plain_greedy(job())
    assert not plain_greedy(job(temperature=0.7))
    assert not plain_greedy(job(presence=0.5))
    assert not plain_greedy(job(logit_bias={5: 1.0}))
    assert not plain_greedy(job(n_logprobs=0))


def test_length_and_stop_finish_reasons(client):
    r = client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    short = greedy_chat(client, messages=[{"role": "user", "content": "Say hello."}],
                        max_tokens=64)
    assert short.choices[0].finish_reason == "stop"        # the end-of-turn token
    assert "<|im_end|>" not in short.choices[0].message.content
    n = short.usage.completion_tokens
    past = greedy_chat(client, messages=[{"role": "user", "content": "Say hello."}],
                       max_tokens=n + 3, extra_body={"ignore_eos": True})
    assert past.choices[0].finish_reason == "length" and past.usage.completion_tokens == n + 3
    assert past.choices[0].message.content.startswith(short.choices[0].message.content)
    assert "<|im_end|>" not in past.choices[0].message.content


def test_max_completion_tokens_is_max_tokens(client):
    r = client.chat.completions.create(model=ALIAS, messages=CHAT, max_completion_tokens=2,
                                       temperature=0)
    assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"


# --- stop strings ------------------------------------------------------------------------------

def _stop_inside(text: str) -> str:
    """Five characters from a third into text (spanning tokens)."""
    assert len(text) > 15, text
    return text[len(text) // 3:len(text) // 3 + 5]


def test_stop_string_ends_the_text_before_it(client):
    full = client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=30,
                                     temperature=0).choices[0].text
    stop = _stop_inside(full)
    want = full[:full.index(stop)]
    r = client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=30, temperature=0,
                                  stop=["\u00a7never", stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 30
    chunks = list(client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=30,
                                            temperature=0, stop=stop, stream=True))
    deltas = [ch.choices[0].text for ch in chunks]
    assert "".join(deltas) == want                      # no prefix of the stop string leaked
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_stop_string_streamed(client):
    full = greedy_chat(client, max_tokens=40).choices[0].message.content
    stop = _stop_inside(full)
    chunks = stream_chat(client, max_tokens=40, stop=stop)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full[:full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


# --- sampling ----------------------------------------------------------------------------------

def test_seeded_sampling_repeats_and_parameters_matter(client):
    kw = dict(model=ALIAS, prompt=PROMPT, max_tokens=12, temperature=1.5, top_p=0.95,
              presence_penalty=0.5, frequency_penalty=0.5, seed=1234)
    extra = {"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1}     # beyond OpenAI's
    a = client.completions.create(**kw, extra_body=extra).choices[0].text
    b = client.completions.create(**kw, extra_body=extra).choices[0].text
    assert a == b
    others = {client.completions.create(**{**kw, "seed": s}, extra_body=extra).choices[0].text
              for s in range(4)}
    assert len(others | {a}) > 1                        # the seed is used


def test_logit_bias_changes_the_pick(client, smollm2):
    base = client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=1, temperature=0)
    tid = smollm2.tokenizer.encode(PROMPT + base.choices[0].text, add_special=False)[-1]
    assert smollm2.tokenizer.token_text(tid) == base.choices[0].text
    banned = client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=1, temperature=0,
                                       logit_bias={str(tid): -100})
    assert banned.choices[0].text != base.choices[0].text
    forced = client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=1, temperature=0,
                                       logit_bias={"1000": 100})
    assert forced.choices[0].text == smollm2.tokenizer.token_text(1000)


# --- logprobs ----------------------------------------------------------------------------------

def test_chat_logprobs_and_top_logprobs(client):
    r = greedy_chat(client, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert t.token == t.top_logprobs[0].token and t.logprob == lps[0]      # greedy
        assert bytes(t.bytes).decode() == t.token
    assert math.fsum(math.exp(a.logprob) for a in content[0].top_logprobs) <= 1 + 1e-9
    chunks = stream_chat(client, max_tokens=6, logprobs=True, top_logprobs=3)
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = greedy_chat(client, max_tokens=6)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_legacy_shape(client):
    r = client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=5, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(len(t) <= 2 for t in lp.top_logprobs)


# --- bad input: 4xx in the envelope, never a 5xx --------------------------------------------------

def _assert_error(r, status: int, param=None, code=None):
    assert r.status_code == status, (r.status_code, r.text)
    assert "Traceback" not in r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def chat_body(**kw):
    return {"messages": CHAT, "max_tokens": 4, **kw}


BAD_CHAT = [
    (chat_body(messages="hi"), "messages"),
    (chat_body(messages=[]), "messages"),
    (chat_body(messages=[{"content": "hi"}]), "messages[0].role"),
    (chat_body(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    (chat_body(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (chat_body(messages=[CHAT[0], "x"]), "messages[1]"),
    (chat_body(max_tokens=0), "max_tokens"),
    (chat_body(max_tokens=-1), "max_tokens"),
    (chat_body(max_tokens="4"), "max_tokens"),
    (chat_body(max_completion_tokens=0), "max_completion_tokens"),
    (chat_body(temperature=-0.5), "temperature"),
    (chat_body(temperature="hot"), "temperature"),
    (chat_body(temperature="0.5"), "temperature"),
    (chat_body(top_p=0), "top_p"),
    (chat_body(top_p=1.5), "top_p"),
    (chat_body(top_k=-1), "top_k"),
    (chat_body(min_p=2), "min_p"),
    (chat_body(presence_penalty=3), "presence_penalty"),
    (chat_body(frequency_penalty=-2.5), "frequency_penalty"),
    (chat_body(repetition_penalty=0), "repetition_penalty"),
    (chat_body(seed=2 ** 70), "seed"),
    (chat_body(seed=1.5), "seed"),
    (chat_body(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat_body(top_logprobs=2), "top_logprobs"),
    (chat_body(n=2), "n"),
    (chat_body(n=0), "n"),
    (chat_body(logit_bias={"99999999": 1}), "logit_bias"),
    (chat_body(logit_bias={"-1": 1}), "logit_bias"),
    (chat_body(logit_bias={"abc": 1}), "logit_bias"),
    (chat_body(logit_bias={"5": 101}), "logit_bias"),
    (chat_body(logit_bias=[1]), "logit_bias"),
    (chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
    (chat_body(stop=[""]), "stop"),
    (chat_body(stop="x" * 1001), "stop"),
    (chat_body(stop=5), "stop"),
    (chat_body(stream="yes"), "stream"),
    (chat_body(stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (chat_body(max_tokens=100000), "max_tokens"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_bad_chat_fields_are_400_naming_the_field(server, body, param):
    _assert_error(server.post("/v1/chat/completions", body), 400, param)


def comp_body(**kw):
    return {"prompt": PROMPT, "max_tokens": 4, **kw}


BAD_COMPLETION = [
    (comp_body(prompt=[1, 99999999]), "prompt"),
    (comp_body(prompt=[-1]), "prompt"),
    (comp_body(prompt=[2 ** 70]), "prompt"),
    (comp_body(prompt=[]), "prompt"),
    (comp_body(prompt=""), "prompt"),
    (comp_body(prompt=["a", "b"]), "prompt"),
    (comp_body(prompt=[[1], [2]]), "prompt"),
    (comp_body(prompt=5), "prompt"),
    (comp_body(prompt=None), "prompt"),
    (comp_body(logprobs=21), "logprobs"),
    (comp_body(logprobs=True), "logprobs"),
    (comp_body(echo=True), "echo"),
    (comp_body(suffix="x"), "suffix"),
    (comp_body(temperature=float("nan")), "temperature"),
    (comp_body(temperature=float("inf")), "temperature"),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETION, ids=[p for _, p in BAD_COMPLETION])
def test_bad_completion_fields_are_400_naming_the_field(server, body, param):
    content = json.dumps(body).encode()         # NaN and Infinity as Python's json writes them
    _assert_error(server.post("/v1/completions", content=content,
                              headers={"Content-Type": "application/json"}), 400, param)


@pytest.mark.parametrize("content", [b'{"messages": [', b"not json", b"", b"[]", b"null",
                                     b'{"messages": [{"role": "user", "content": "\xff"}]}',
                                     b"\x00\x01"])
def test_malformed_bodies_are_400(server, content):
    for path in ("/v1/chat/completions", "/v1/completions"):
        _assert_error(server.post(path, content=content,
                                  headers={"Content-Type": "application/json"}), 400)


def test_prompt_longer_than_the_context_is_context_length_exceeded(server, smollm2):
    ids = [1000] * CTX
    _assert_error(server.post("/v1/completions", {"prompt": ids, "max_tokens": 1}), 400,
                  "prompt", "context_length_exceeded")
    long = "word " * (CTX + 10)
    _assert_error(server.post("/v1/chat/completions", chat_body(
        messages=[{"role": "user", "content": long}])), 400, "messages", "context_length_exceeded")
    _assert_error(server.post("/v1/completions", {"prompt": [1000] * 500, "max_tokens": 20}),
                  400, "max_tokens", "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model=ALIAS, prompt=ids, max_tokens=1)
    assert e.value.code == "context_length_exceeded"


def test_body_over_the_cap_is_413(server):
    big = {"prompt": "x" * (MAX_BODY + 10), "max_tokens": 1}
    _assert_error(server.post("/v1/completions", big), 413)

    def chunks():                                   # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'
    _assert_error(server.post("/v1/completions", content=chunks()), 413)


def test_api_key_is_required_on_v1(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(server.url + "/v1/chat/completions", json=chat_body(), headers=headers)
        _assert_error(r, 401, code="invalid_api_key")
        _assert_error(httpx.get(server.url + "/v1/models", headers=headers), 401)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="nope").models.list()
    assert httpx.get(server.url + "/health").status_code == 200       # open paths
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_unknown_routes_and_methods_are_4xx(server):
    _assert_error(httpx.get(server.url + "/v1/nothing", headers={
        "Authorization": f"Bearer {API_KEY}"}), 404)
    _assert_error(httpx.get(server.url + "/v1/chat/completions", headers={
        "Authorization": f"Bearer {API_KEY}"}), 405)


def test_a_template_that_raises_is_400():
    from numbaformer.serve.app import _chat_ids
    from numbaformer.serve.protocol import APIError, ChatRequest

    class Tok:
        bos_id = eos_id = None

    meta = {"tokenizer.chat_template": "{{ raise_exception('no system messages') }}"}
    eng = SimpleNamespace(mf=SimpleNamespace(gguf=SimpleNamespace(metadata=meta)),
                          tokenizer=Tok())
    with pytest.raises(APIError) as e:
        _chat_ids(eng, ChatRequest(messages=CHAT))
    assert e.value.status == 400 and e.value.param == "messages"
    assert "no system messages" in e.value.message


def test_still_serving_after_the_bad_requests(client):
    assert greedy_chat(client, max_tokens=2).usage.completion_tokens == 2


# --- metrics -----------------------------------------------------------------------------------

def test_metrics_count_what_was_served(server, client):
    long = [1000 + i for i in range(150)]               # two full blocks: cached the second time
    for _ in range(2):
        client.completions.create(model=ALIAS, prompt=long, max_tokens=1)
    m = server.metrics()
    assert m["numbaformer_requests_running"] == 0 and m["numbaformer_requests_waiting"] == 0
    assert m["numbaformer_kv_blocks_used"] == 0 and m["numbaformer_kv_blocks_total"] > 0
    assert m["numbaformer_generation_tokens_total"] > 50
    assert m["numbaformer_prompt_tokens_total"] > 50
    assert m["numbaformer_time_to_first_token_seconds_count"] > 10
    assert m["numbaformer_time_per_output_token_seconds_count"] > 10
    assert m['numbaformer_requests_total{finish_reason="stop"}'] > 0
    assert m['numbaformer_requests_total{finish_reason="length"}'] > 0
    assert 0 < m["numbaformer_prefix_cache_hit_rate"] < 1           # the same prompts, again
    assert m['numbaformer_http_errors_total{status="400"}'] >= len(BAD_CHAT)


# --- text pieces -------------------------------------------------------------------------------

def test_deltas_are_whole_utf8_and_hold_back_a_stop_prefix(smollm2):
    from numbaformer.serve.openai import TextStream
    tok = smollm2.tokenizer
    text = "smile 🙂 and 猫 end"
    ids = tok.encode(text, add_special=False)
    assert any(not _whole(tok.token_bytes(i)) for i in ids)   # some token splits a character
    s = TextStream(tok, [tok.bos_id or 0], ["and 猫 e"], tok.eog_ids)
    deltas = [s.push(i) for i in ids]
    assert all(isinstance(d, str) and "\ufffd" not in d for d in deltas)
    assert "".join(deltas) + s.finish() == "smile 🙂 "
    assert s.stopped
    s = TextStream(tok, [tok.bos_id or 0], [], tok.eog_ids)
    assert "".join(s.push(i) for i in ids + sorted(tok.eog_ids)[:1]) + s.finish() == text


def _whole(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_a_model_that_fails_to_load_is_one_error_line_and_exit_2(tmp_path):
    from cli_helpers import assert_process_error, run_process
    from serve_helpers import free_port
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"garbage")
    p = run_process("serve", "-m", bad, "--port", free_port(), "--device", "cpu")
    assert_process_error(p, "not a GGUF file", lines_before=1)
    assert "listening" in p.stderr.splitlines()[0]


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_bench_serve_script_reports_the_serving_metrics(server, temperature):
    import subprocess
    import sys

    from vocab_files import REPO_ROOT
    p = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "bench_serve.py"), "--url",
                        server.url, "--api-key", API_KEY, "-c", "2", "-n", "3", "--input-len",
                        "16", "--output-len", "4", "--temperature", temperature, "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["requests"] == 3 and res["failed"] == 0
    assert res["output_tok_s"] > 0 and res["ttft_p50_ms"] > 0 and res["tpot_p99_ms"] > 0
    assert res["output_tok_s"] * res["duration_s"] == pytest.approx(12)   # ignore_eos: all 4


def test_serve_host_bench_runs_the_server_over_a_fake_engine(smollm2_path):
    """scripts/serve_host_bench.py: the server's app, bridge and engine thread over an engine
    whose step sleeps --step-ms; bench_serve's figures, every token delivered, the rate bounded
    by the steps (4 tokens a request, 10 ms a step: >= 40 ms a request)."""
    import subprocess
    import sys

    from serve_helpers import free_port
    from vocab_files import REPO_ROOT
    p = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "serve_host_bench.py"), "-m",
                        str(smollm2_path), "-np", "4", "-c", "4", "-n", "6", "--output-len", "4",
                        "--step-ms", "10", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["requests"] == 6 and res["failed"] == 0 and res["step_ms"] == 10
    assert res["output_tok_s"] * res["duration_s"] == pytest.approx(24)       # every token
    assert res["tpot_p50_ms"] >= 9


def test_a_port_in_use_is_one_error_line_before_loading(server):
    from cli_helpers import assert_process_error, run_process
    p = run_process("serve", "--port", server.port, "--device", "cpu", "-m", "/nonexistent")
    assert_process_error(p, f"cannot listen on 127.0.0.1:{server.port}")
    p = run_process("serve", "-n", "0", "--port", server.port)
    assert_process_error(p, "-n 0")
    p = run_process("serve", "--decode-steps", "17", "--port", server.port)
    assert_process_error(p, "--decode-steps must be 1..16")


def test_an_engine_step_that_raises_is_a_500_for_its_jobs_and_the_thread_goes_on(smollm2):
    """The bridge alone, over a fake engine whose step raises once: the job gets an error
    delta (a 500 in the envelope), the engine thread keeps serving the next job."""
    import asyncio

    from numbaformer.sampling import SamplingParams
    from numbaformer.scheduler import FINISHED, Sequence
    from numbaformer.serve.bridge import Bridge, Job

    class FakeEngine:
        tokenizer = smollm2.tokenizer
        backend, model = SimpleNamespace(name="fake"), SimpleNamespace(n_ctx=64)

        def __init__(self):
            self.batching = SimpleNamespace(seqs={})
            self.calls = 0

        def start_batching(self, *a):
            pass

        def warmup_batching(self):
            pass

        def add_request(self, ids, max_tokens, sampler=None, stop_ids=None):
            seq = Sequence(list(ids), max_tokens=max_tokens)
            self.batching.seqs[seq.seq_id] = seq
            return seq.seq_id

        def has_unfinished(self):
            return any(s.status != FINISHED for s in self.batching.seqs.values())

        def abort(self, sid):
            self.batching.seqs.pop(sid).status = FINISHED

        def step(self, max_steps=None):
            self.calls += 1
            if self.calls == 1:                         # the first job's
                raise RuntimeError("boom")
            for s in list(self.batching.seqs.values()):
                s.token_ids.append(smollm2.tokenizer.encode("hi", add_special=False)[0])
                s.status, s.finish_reason = FINISHED, "length"
                self.batching.seqs.pop(s.seq_id)

    async def main():
        bridge = Bridge(FakeEngine, 2, 16)
        bridge.start()
        await asyncio.get_running_loop().run_in_executor(None, bridge.ready.wait, 10)
        assert bridge.failure is None and bridge.ready.is_set()
        out = []
        for _ in range(2):
            job = Job([1, 2], 1, SamplingParams(temperature=0))
            job.loop, job.queue = asyncio.get_running_loop(), asyncio.Queue()
            bridge.submit(job)
            out.append(await asyncio.wait_for(job.queue.get(), 10))
        bridge.stop()
        return out

    first, second = asyncio.run(main())
    assert first.error is not None and first.error.status == 500
    assert second.error is None and second.finish_reason == "length" and second.text == "hi"
