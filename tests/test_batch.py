"""Offline batch generation (batch.py, `generate --parallel`) and `bench --parallel` on the CPU
(SmolLM2): every line checked before any work (a bad one named by its line number), results in
input order, each one the text its request gives alone, seeded sampling the same alone or in a
batch, stop strings cut on the host; bench's table."""
from __future__ import annotations

import json

import pytest
from cli_helpers import assert_one_line_error, cli

from numbaformer.batch import (Request, in_order, parse_requests, pool_blocks, prepare,
                               run_batch)
from numbaformer.engine import Engine
from numbaformer.generate import stream_generate
from numbaformer.sampling import SamplingParams, make_sampler

GREEDY = SamplingParams(temperature=0)
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time",
           "def fibonacci(n):", "The color of the sky", "Water boils at"]


@pytest.fixture(scope="module")
def model(engine, smollm2_path):
    """The SmolLM2 path, once the session engine has compiled (or loaded) the kernels."""
    return str(smollm2_path)


def fresh(engine) -> Engine:
    """An Engine over the session's model and weights; run_batch builds its batched path."""
    return Engine(engine.mf, engine.model, 0.0)


def requests(engine, lines: list[dict], defaults: Request | None = None) -> list[Request]:
    reqs = parse_requests("\n".join(json.dumps(x) for x in lines), defaults)
    prepare(engine, reqs)
    return reqs


def run(engine, lines, parallel, **kw):
    return run_batch(fresh(engine), requests(engine, lines), parallel, **kw)


def solo(engine, line: dict):
    return run(engine, [line], 1)[0]


# --- reading the lines ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "a"', "not JSON"),
    ('["a"]', "expected a JSON object"),
    ('{"prompt": "a", "temp": 1}', "unknown field 'temp'"),
    ('{"prompt": "a", "messages": []}', "not both or none"),
    ('{"max_tokens": 3}', "not both or none"),
    ('{"prompt": 7}', "'prompt' must be a string"),
    ('{"messages": [{"role": "user"}]}', "'messages' must be"),
    ('{"prompt": "a", "temperature": -1}', "temperature must be"),
    ('{"prompt": "a", "top_p": 0}', "top-p must be"),
    ('{"prompt": "a", "max_tokens": true}', "'max_tokens' must be an integer"),
    ('{"prompt": "a", "seed": 1.5}', "'seed' must be an integer"),
    ('{"prompt": "a", "max_tokens": -2}', "'max_tokens' must be >= -1"),
    ('{"prompt": "a", "stop": [1]}', "'stop' must be a string or a list of strings"),
])
def test_a_bad_line_is_named_by_its_number(bad, message):
    text = '{"prompt": "fine"}\n\n' + bad + '\n{"prompt": "fine too"}\n'
    with pytest.raises(ValueError) as e:
        parse_requests(text)
    assert str(e.value).startswith("line 3: ") and message in str(e.value), str(e.value)


def test_lines_take_the_defaults_and_override_them():
    defaults = Request(0, params=SamplingParams(temperature=0.5, seed=3), max_tokens=9,
                       stop=("x",))
    a, b = parse_requests('{"prompt": "a"}\n\n{"prompt": "b", "temperature": 0, "max_tokens": 2,'
                          ' "stop": "y", "seed": 4, "id": [1]}', defaults)
    assert (a.line, a.prompt, a.params, a.max_tokens, a.stop) == (1, "a", defaults.params, 9,
                                                                  ("x",))
    assert (b.line, b.params.temperature, b.params.seed, b.max_tokens, b.stop, b.id) == \
        (3, 0, 4, 2, ("y",), [1])
    with pytest.raises(ValueError, match="no requests"):
        parse_requests("\n  \n")


def test_a_prompt_the_context_cannot_hold_is_named_before_any_work(engine):
    lines = [{"prompt": "hi"}, {"prompt": "word " * 600}]
    reqs = parse_requests("\n".join(json.dumps(x) for x in lines))
    with pytest.raises(ValueError, match=r"^line 2: the prompt has \d+ tokens; the context "
                                         r"holds 512"):
        prepare(engine, reqs)


def test_pool_fits_the_largest_requests_running_together():
    assert pool_blocks(512, [10, 300, 64, 65], 2, 64) == 5 + 2       # 300 -> 5 blocks, 65 -> 2
    assert pool_blocks(512, [5000], 4, 64) == 8                       # one full context at most
    assert pool_blocks(4096, [4000] * 64, 64, 64) == 64 * 16          # the engine's default cap


def test_results_come_in_input_order_as_soon_as_they_can():
    reqs = parse_requests("\n".join(json.dumps({"prompt": p}) for p in "abcd"))
    written = []
    on_result = in_order(reqs, lambda r: written.append(r.request.prompt))
    from numbaformer.batch import BatchResult
    for i in (2, 0, 3, 1):
        on_result(BatchResult(reqs[i]))
        if i == 0:
            assert written == ["a"]
    assert written == ["a", "b", "c", "d"]


# --- running them ---------------------------------------------------------------------------------

def test_a_batch_gives_each_prompt_its_solo_greedy_text(engine):
    """Alone through the engine, and through the single-sequence path (generate): the batched
    decode rows are that path's decode steps, bit for bit."""
    lines = [{"prompt": p, "temperature": 0, "max_tokens": 4 + 3 * i}
             for i, p in enumerate(PROMPTS)]
    together = run(engine, lines, 4)
    assert [r.request.prompt for r in together] == PROMPTS            # input order
    for line, res in zip(lines, together):
        alone = solo(engine, line)
        assert (res.ids, res.text) == (alone.ids, alone.text), line
        plain = stream_generate(engine.model, engine.tokenizer, res.request.prompt_ids,
                                make_sampler(GREEDY), max_tokens=line["max_tokens"])
        assert (res.ids, res.text) == (plain.ids, plain.text), line
        assert res.finish_reason in ("stop", "length") and res.ids
        assert res.text == engine.tokenizer.decode(
            [t for t in res.ids if t not in engine.tokenizer.eog_ids])
    assert {r.finish_reason for r in together} >= {"length"}


def test_seeded_sampling_is_the_same_alone_or_in_a_batch(engine):
    line = {"prompt": "Once upon a time", "temperature": 1.0, "top_k": 0, "top_p": 1.0,
            "min_p": 0, "seed": 1234, "max_tokens": 12}
    others = [{"prompt": p, "temperature": 0.9, "max_tokens": 5} for p in PROMPTS[:3]]
    alone = solo(engine, line)
    batch = run(engine, others[:2] + [line] + others[2:] + [line], 5)
    assert batch[2].ids == alone.ids and batch[4].ids == alone.ids
    other_seed = solo(engine, {**line, "seed": 4321})
    assert other_seed.ids != alone.ids                     # the seed does choose the draws


def test_a_stop_string_cuts_the_text_before_it(engine):
    line = {"prompt": "1, 2, 3, 4,", "temperature": 0, "max_tokens": 16}
    full = solo(engine, line)
    assert " 7" in full.text, full.text
    cut = run(engine, [{**line, "stop": [" 7", "never"]}, {**line, "stop": "never"}], 2)
    assert cut[0].text == full.text[:full.text.index(" 7")]
    assert cut[0].finish_reason == "stop" and len(cut[0].ids) < len(full.ids)
    assert cut[1].text == full.text and cut[1].finish_reason == full.finish_reason


def test_a_backend_without_a_paged_cache_is_refused_in_one_line(engine):
    class NoPaging:
        name, paged_kv = "cuda", False

    e = fresh(engine)
    e.model = type("M", (), {"ops": NoPaging(), "n_ctx": 512})()
    with pytest.raises(ValueError, match="needs a paged KV cache, which the cuda backend"):
        run_batch(e, requests(engine, [{"prompt": "hi"}]), 2)


# --- the commands ---------------------------------------------------------------------------------

def test_generate_parallel_json_in_input_order_equals_solo_text(engine, model, tmp_path):
    lines = [{"prompt": p, "max_tokens": 3 + 2 * i, "id": f"r{i}"}
             for i, p in enumerate(PROMPTS[:4])]
    lines[1] = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6, "id": "r1"}
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    r = cli("generate", "-m", model, "-f", f, "--parallel", 3, "--json", "--temp", 0, "-c", 512,
            "--device", "cpu")
    assert r.code == 0, r.err
    out = [json.loads(s) for s in r.out.splitlines()]
    assert [o["id"] for o in out] == ["r0", "r1", "r2", "r3"]
    assert [o["line"] for o in out] == [1, 2, 3, 4]
    for line, o in zip(lines, out):
        alone = solo(engine, {**line, "temperature": 0})
        assert (o["text"], o["ids"]) == (alone.text, alone.ids)
        assert o["finish_reason"] in ("stop", "length")
        assert o["timings"]["generated_tokens"] == len(o["ids"])
        assert o["timings"]["prompt_tokens"] == len(alone.request.prompt_ids)
    r = cli("generate", "-m", model, "-f", "-", "--parallel", 2, "--temp", 0, "-c", 512,
            "--device", "cpu", input=f.read_text())
    assert r.code == 0, r.err
    assert r.out.startswith("--- line 1 [") and "--- line 4 [" in r.out
    assert out[0]["text"] in r.out and "4 requests:" in r.err


def test_generate_parallel_names_a_bad_line_before_loading_the_model(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b", "top_k": "many"}\n')
    r = cli("generate", "-m", tmp_path / "missing.gguf", "-f", f, "--parallel", 2, "--json")
    assert_one_line_error(r, "line 2: 'top_k' must be an integer")
    r = cli("generate", "-m", tmp_path / "missing.gguf", "-p", "hi", "--parallel", 2)
    assert_one_line_error(r, "--parallel takes its requests from -f FILE")


def test_bench_parallel_prints_llama_batched_bench_table(model):
    r = cli("bench", "-m", model, "--parallel", "1,3", "-p", 8, "-n", 3, "--device", "cpu")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["PP", "TG", "B", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s", "T s",
                    "S t/s"]
    rows = [[c.strip() for c in s.strip("|").split("|")] for s in lines[2:]]
    assert [row[:4] for row in rows] == [["8", "3", "1", "11"], ["8", "3", "3", "33"]]
    assert all(float(c) > 0 for row in rows for c in row[4:])
    r = cli("bench", "-m", model, "--parallel", "2", "-p", 4, "-n", 2, "--json", "--device",
            "cpu")
    row, = json.loads(r.out)
    assert row["parallel"] == 2 and row["n_kv"] == 12 and row["decode_tps"] > 0
    assert row["prefill_tps"] == pytest.approx(8 / row["prefill_s"], rel=0.01)
    assert_one_line_error(cli("bench", "-m", model, "--parallel", "1,x"), "--parallel takes")


def test_bench_parallel_times_the_warmed_up_engine(engine, monkeypatch):
    """Each count's timed run steps the engine (and so the batched model, whose CUDA graphs are
    keyed by it) that its warm-up stepped through the same run: nothing is captured or compiled
    on the clock. Both runs leave the KV pool as they found it."""
    from numbaformer import bench
    stepped = []
    real_step = Engine.step
    monkeypatch.setattr(Engine, "step", lambda self: stepped.append(id(self)) or real_step(self))
    made = []
    real_make = bench._batched_engine
    monkeypatch.setattr(bench, "_batched_engine",
                        lambda *a: made.append(real_make(*a)) or made[-1])
    rows = bench.run_parallel_bench(engine, [1, 2], n_prompt=4, n_gen=3)
    assert [r["parallel"] for r in rows] == [1, 2] and len(made) == 2
    assert set(stepped) == {id(e) for e in made}
    for e in made:
        bm = e.batching.blocks
        assert not e.has_unfinished() and bm.n_free == len(bm.blocks)
        bm.check()
