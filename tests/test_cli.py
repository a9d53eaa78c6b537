"""The `numbaformer` command, run in-process through numbaformer.cli.main (a few through a real
subprocess): what each subcommand prints, its JSON schemas, agreement with the library, and the
error contract: one line `error: ...` on stderr, exit code 2, no traceback.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from cli_helpers import (HAS_GPU_DRIVER, assert_one_line_error, assert_process_error, cli,
                         run_process)
from reference import log_softmax

from numbaformer.scoring import perplexity
from numbaformer.sampling import SamplingParams, make_sampler
from numbaformer.generate import stream_generate

TIMING_KEYS = {"load_s", "prompt_tokens", "prefill_tps", "generated_tokens", "decode_tps", "ttft_s"}
BENCH_KEYS = {"model", "size_bytes", "params", "type", "device", "test", "tokens_per_s", "stddev"}


@pytest.fixture(scope="module")
def model(engine, smollm2_path):
    """The SmolLM2 path, once the session engine has compiled (or loaded) the kernels, so that no
    command prints a compile notice."""
    return str(smollm2_path)


@pytest.fixture(scope="module")
def prompt0(llamacpp):
    return llamacpp[0]


@pytest.fixture(scope="module")
def greedy8(engine, prompt0):
    """The library's greedy continuation (8 tokens) of prompt 0, to hold the CLI to."""
    return stream_generate(engine.model, engine.tokenizer, prompt0["prompt_ids"],
                           make_sampler(SamplingParams(temperature=0)), max_tokens=8)


# --- info -----------------------------------------------------------------------------------------

def test_info_text(model):
    r = cli("info", model)
    assert r.code == 0, r.err
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in r.out.splitlines())}
    assert fields["architecture"] == "llama"
    assert fields["layers"] == "30"
    assert fields["width"].startswith("576 ")
    assert fields["heads"] == "9 / 3 KV"
    assert fields["vocab"] == "49152"
    assert fields["tensor types"] == "F32: 61, Q4_1: 210, Q8_0: 1"
    assert fields["file type"] == "Q4_1"


def test_info_says_one_token(model):
    r = cli("info", model, "-c", 1)
    assert r.code == 0, r.err
    assert "f16 KV cache at 1 token " in r.out


def test_info_json(model):
    r = cli("info", model, "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert d["architecture"] == "llama"
    assert (d["layers"], d["embedding_length"], d["heads"], d["kv_heads"], d["head_dim"]) == \
        (30, 576, 9, 3, 64)
    assert d["vocab_size"] == 49152 and d["feed_forward_length"] == 1536
    assert d["tensor_types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert d["parameters"] == 134_515_008
    assert d["tied_embeddings"] is True and d["rope"]["layout"] == "normal"
    assert d["memory"]["kv_f16_bytes"] == 2 * 30 * 3 * 64 * 8192 * 2
    # the GPU layout pads each plane of a row to 16 bytes: SmolLM2's Q4_1 rows (576 or 1536 values,
    # 2 planes) and its Q8_0 embedding (576 values, 2 planes) grow by less than 32 bytes a row
    grow = d["memory"]["gpu_weights_bytes"] - d["memory"]["weights_bytes"]
    rows = 30 * (576 + 2 * 192 + 576 + 2 * 1536 + 576) + 49152
    assert 0 < grow < 32 * rows


# --- tokenize -------------------------------------------------------------------------------------

def test_tokenize_text_and_json(model, prompt0, engine):
    r = cli("tokenize", "-m", model, prompt0["prompt"])
    assert r.code == 0, r.err
    assert [int(t) for t in r.out.split()] == prompt0["prompt_ids"]
    r = cli("tokenize", "-m", model, "--json", "Hello world")
    d = json.loads(r.out)
    assert d["ids"] == engine.tokenizer.encode("Hello world")
    assert d["pieces"] == ["Hello", " world"]                            # readable text
    assert d["vocab_pieces"] == [engine.tokenizer.piece(i) for i in d["ids"]] == ["Hello", "Ġworld"]
    r = cli("tokenize", "-m", model, "--json", "é🦙")
    d = json.loads(r.out)
    assert "".join(d["pieces"]).startswith("é") and "\\x" in "".join(d["pieces"])  # part bytes
    assert b"".join(engine.tokenizer.token_bytes(i) for i in d["ids"]) == "é🦙".encode()


def test_tokenize_stdin_and_no_special(model, engine):
    text = "<|im_start|>user\nhi"
    r = cli("tokenize", "-m", model, "--json", "-f", "-", input=text)
    assert r.code == 0, r.err
    ids = json.loads(r.out)["ids"]
    assert ids[0] == 1 and ids == engine.tokenizer.encode(text)         # one special token
    r = cli("tokenize", "-m", model, "--json", "--no-special", "-f", "-", input=text)
    plain = json.loads(r.out)["ids"]
    assert 1 not in plain and plain == engine.tokenizer.encode(text, parse_special=False)


def test_tokenize_file(model, tmp_path, prompt0):
    f = tmp_path / "p.txt"
    f.write_text(prompt0["prompt"], encoding="utf-8")
    r = cli("tokenize", "-m", model, "-f", f)
    assert [int(t) for t in r.out.split()] == prompt0["prompt_ids"]


@pytest.mark.parametrize("name", ["llama-spm", "gpt-2"])
def test_tokenize_vocab_only_gguf(name, tmp_path):
    """A vocab-only GGUF (llama.cpp's models/ggml-vocab-*.gguf: a tokenizer, no tensors; gpt-2's
    architecture is not one numbaformer runs) tokenizes as llama.cpp does (its test vectors),
    with BOS where the vocab adds it."""
    from vocab_files import read_vectors, unpack_vocab
    path = unpack_vocab(name, tmp_path)
    for text, want in read_vectors(name)[10:15]:
        f = tmp_path / "text.txt"
        f.write_bytes(text.encode())
        r = cli("tokenize", "-m", path, "-f", f, "--no-special", "--json")
        assert r.code == 0, r.err
        ids = json.loads(r.out)["ids"]
        assert ids == ([1] if name == "llama-spm" else []) + want, text


@pytest.mark.parametrize("args", [("generate", "-p", "hi"), ("score", "hi"), ("bench",),
                                  ("perplexity", "-f", "{text}")])
def test_other_commands_refuse_a_vocab_only_gguf(args, tmp_path):
    from vocab_files import unpack_vocab
    path = unpack_vocab("llama-spm", tmp_path)
    (tmp_path / "t.txt").write_text("hello " * 50)
    args = [a.format(text=tmp_path / "t.txt") for a in args]
    assert_one_line_error(cli(*args[:1], "-m", path, *args[1:], "--device", "cpu"),
                          "vocab-only GGUF", "only `tokenize` can use it")
    assert_one_line_error(cli("info", path), "vocab-only GGUF")


# --- generate -------------------------------------------------------------------------------------

def test_generate_json_schema(model, prompt0, greedy8):
    r = cli("generate", "-m", model, "-p", prompt0["prompt"], "--temp", 0, "-n", 8, "--json",
            "--device", "cpu", "-c", 256)
    assert r.code == 0, r.err
    assert r.err == ""
    d = json.loads(r.out)
    assert set(d) == {"model", "device", "prompt_ids", "ids", "text", "finish_reason", "timings"}
    assert d["model"] == model and d["device"] == "cpu"
    assert d["prompt_ids"] == prompt0["prompt_ids"]
    assert d["ids"] == greedy8.ids and d["text"] == greedy8.text
    assert d["finish_reason"] == "length"
    t = d["timings"]
    assert set(t) == TIMING_KEYS
    assert t["prompt_tokens"] == len(prompt0["prompt_ids"]) and t["generated_tokens"] == 8
    assert t["load_s"] > 0 and t["ttft_s"] > 0 and t["prefill_tps"] > 0 and t["decode_tps"] > 0


def test_generate_logprobs(model, prompt0, greedy8):
    r = cli("generate", "-m", model, "-p", prompt0["prompt"], "--temp", 0, "-n", 4, "--json",
            "--logprobs", 3, "--device", "cpu", "-c", 256)
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert d["ids"] == greedy8.ids[:4]
    assert len(d["logprobs"]) == 4
    for i, e in zip(d["ids"], d["logprobs"]):
        assert e["id"] == i and len(e["top"]) == 3
        assert e["top"][0] == [i, e["logprob"]] and e["logprob"] <= 0
        assert e["top"][0][1] >= e["top"][1][1] >= e["top"][2][1]


def test_generate_streams_text(model, prompt0, greedy8):
    r = cli("generate", "-m", model, "-p", prompt0["prompt"], "--temp", 0, "-n", 8,
            "--device", "cpu", "-c", 256)
    assert r.code == 0, r.err
    assert r.out == greedy8.text + "\n"
    assert r.err.splitlines()[-1].startswith("[length] prompt: 15 tokens")


def test_generate_says_when_the_context_is_full(model, prompt0, engine):
    """-c 20 holds the 15-token prompt and 5 more positions: 6 tokens (the last needs no slot),
    then a one-line note on stderr; --json tells it from the -n limit by finish_reason."""
    base = ("generate", "-m", model, "-p", prompt0["prompt"], "--temp", 0, "--device", "cpu",
            "-c", 20)
    r = cli(*base, "-n", 50)
    assert r.code == 0, r.err
    note, last = r.err.splitlines()[-2:]
    assert note.startswith("note: generation stopped: the context is full (20 tokens)")
    assert "-c" in note and "8192" in note
    assert last.startswith("[context] prompt: 15 tokens") and "generated: 6 tokens" in last
    full = json.loads(cli(*base, "-n", 50, "--json").out)
    assert full["finish_reason"] == "context" and len(full["ids"]) == 6
    limited = json.loads(cli(*base, "-n", 6, "--json").out)
    assert limited["finish_reason"] == "length" and limited["ids"] == full["ids"]
    unlimited = json.loads(cli(*base, "-n", -1, "--json").out)
    assert unlimited["finish_reason"] == "context" and unlimited["ids"] == full["ids"]
    assert "note:" not in cli(*base, "-n", 6).err


def test_generate_stop_and_ignore_eos(model, llamacpp, engine):
    chat = llamacpp[1]["prompt"]
    base = ("generate", "-m", model, "-p", chat, "--temp", 0, "--json", "--device", "cpu",
            "-c", 256)
    stopped = json.loads(cli(*base, "-n", 32).out)
    assert stopped["finish_reason"] == "stop" and stopped["ids"][-1] in engine.tokenizer.eog_ids
    n = len(stopped["ids"])
    more = json.loads(cli(*base, "-n", n + 2, "--ignore-eos").out)
    assert more["finish_reason"] == "length" and more["ids"][:n] == stopped["ids"]
    assert len(more["ids"]) == n + 2
    words = stopped["text"].split()
    cut = json.loads(cli(*base, "-n", 32, "--stop", " ".join(words[1:3])).out)
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == stopped["text"][:stopped["text"].index(" ".join(words[1:3]))]


def test_generate_no_limit_stops_at_end_of_generation(model, llamacpp, engine):
    chat = llamacpp[1]["prompt"]
    base = ("generate", "-m", model, "-p", chat, "--temp", 0, "--json", "--device", "cpu")
    d = json.loads(cli(*base, "-n", -1).out)
    assert d["finish_reason"] == "stop" and d["ids"][-1] in engine.tokenizer.eog_ids
    assert d["ids"] == json.loads(cli(*base, "-n", len(d["ids"]) + 5).out)["ids"]


def test_generate_counts_one_token_as_one_token(model, engine):
    assert engine.tokenizer.encode("hi") == [6004]                     # a one-token prompt
    r = cli("generate", "-m", model, "-p", "hi", "-n", 1, "--temp", 0, "--device", "cpu",
            "-c", 32)
    assert r.code == 0, r.err
    assert "prompt: 1 token, " in r.err and "generated: 1 token, " in r.err


def test_interrupted_generate_prints_what_it_has_and_exits_130(model, prompt0, greedy8,
                                                                monkeypatch):
    """Ctrl-C after 3 tokens: their text is on stdout, the [interrupted] line on stderr, exit
    130 (as bench, and as llama.cpp); --json still prints the object."""
    import numbaformer.generate as gen
    real = gen.generate_step

    def interrupted_after_3(*args, **kw):
        for i, step in enumerate(real(*args, **kw)):
            if i == 3:
                raise KeyboardInterrupt
            yield step

    monkeypatch.setattr(gen, "generate_step", interrupted_after_3)
    base = ("generate", "-m", model, "-p", prompt0["prompt"], "--temp", 0, "-n", 8,
            "--device", "cpu", "-c", 64)
    r = cli(*base)
    assert r.code == 130, (r.code, r.err)
    text = r.out.removesuffix("\n")
    assert text and greedy8.text.startswith(text) and text != greedy8.text
    assert r.err.splitlines()[-1].startswith("[interrupted] prompt: 15 tokens")
    r = cli(*base, "--json")
    assert r.code == 130
    d = json.loads(r.out)
    assert d["finish_reason"] == "interrupted" and d["ids"] == greedy8.ids[:3]


def test_generate_same_seed_same_text(model, prompt0):
    args = ("generate", "-m", model, "-p", prompt0["prompt"], "--temp", 1.0, "-n", 6, "--json",
            "--device", "cpu", "-c", 64, "--seed")
    a, b = (json.loads(cli(*args, 42).out)["ids"] for _ in range(2))
    assert a == b


# --- score, perplexity, bench ---------------------------------------------------------------------

def test_score_agrees_with_forward_all(model, prompt0, engine, tmp_path):
    """Every position: the actual next token and its log-prob, the top-k beside it; the total and
    the perplexity over the scored tokens."""
    ids = prompt0["prompt_ids"] + prompt0["greedy_ids"][:5]
    f = tmp_path / "ids.json"
    f.write_text(json.dumps(ids))
    r = cli("score", "-m", model, "--ids-file", f, "--top-k", 3, "--device", "cpu", "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert set(d) == {"model", "ids", "positions", "logprob", "n_scored", "perplexity"}
    assert d["ids"] == ids and len(d["positions"]) == len(ids) and d["n_scored"] == len(ids) - 1
    lp = log_softmax(engine.model.forward_all(ids))
    for i, p in enumerate(d["positions"]):
        top = np.argsort(-lp[i], kind="stable")[:3]
        assert [t for t, _ in p["top"]] == top.tolist()
        assert np.allclose([v for _, v in p["top"]], lp[i, top], rtol=0, atol=1e-6)
        if i + 1 < len(ids):
            assert set(p) == {"id", "logprob", "top"} and p["id"] == ids[i + 1]
            assert p["logprob"] == pytest.approx(lp[i, ids[i + 1]], abs=1e-6)
        else:
            assert set(p) == {"top"}                   # nothing follows the last token
    want = sum(lp[i, ids[i + 1]] for i in range(len(ids) - 1))
    assert d["logprob"] == pytest.approx(want, abs=1e-5)
    assert d["perplexity"] == pytest.approx(math.exp(-want / (len(ids) - 1)), rel=1e-6)


def test_score_text_as_table_and_json(model, engine):
    """A text is tokenized as generate does; the table has one row per scored token and the same
    total as the JSON."""
    text = "The capital of France is Paris."
    ids = engine.tokenizer.encode(text)
    r = cli("score", "-m", model, text, "--device", "cpu", "--top-k", 2)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split()[:3] == ["pos", "logprob", "token"] and len(lines) == len(ids) + 1
    rows = [line.split() for line in lines[1:-1]]
    assert [int(row[0]) for row in rows] == list(range(1, len(ids)))
    assert lines[2].split(maxsplit=2)[2].startswith(repr(engine.tokenizer.token_text(ids[2])))
    d = json.loads(cli("score", "-m", model, text, "--device", "cpu", "--json").out)
    assert d["ids"] == ids
    assert [round(p["logprob"], 4) for p in d["positions"][:-1]] == [float(r[1]) for r in rows]
    assert lines[-1] == (f"log-prob {d['logprob']:.4f} over {len(ids) - 1} tokens, "
                         f"perplexity {d['perplexity']:.4f}")


def test_score_of_one_token_scores_nothing(model):
    d = json.loads(cli("score", "-m", model, "hi", "--device", "cpu", "--json").out)
    assert len(d["ids"]) == 1 and set(d["positions"][0]) == {"top"}
    assert (d["logprob"], d["n_scored"], d["perplexity"]) == (0.0, 0, None)
    r = cli("score", "-m", model, "hi", "--device", "cpu")
    assert r.code == 0 and r.out.splitlines()[-1] == "log-prob 0.0000 over 0 tokens"


def test_score_and_perplexity_take_kv_type(model, tmp_path):
    """--kv-type f16 rounds the CPU's KV cache as stored: near the f32 numbers, not equal."""
    text = "The capital of France is Paris. It is known for the Eiffel tower."
    f32, f16 = (json.loads(cli("score", "-m", model, text, "--device", "cpu", "--json",
                               "--kv-type", kv).out) for kv in ("f32", "f16"))
    assert f32["ids"] == f16["ids"] and f32["logprob"] != f16["logprob"]
    assert f16["logprob"] == pytest.approx(f32["logprob"], abs=0.05)
    f = tmp_path / "text.txt"
    f.write_text(PPL_TEXT)
    ppl = [float(cli("perplexity", "-m", model, "-f", f, "-c", 16, "--device", "cpu",
                     "--kv-type", kv).out.split()[1]) for kv in ("f32", "f16")]
    assert ppl[0] != ppl[1] and ppl[1] == pytest.approx(ppl[0], rel=1e-2)


@pytest.mark.parametrize("content,what", [("[1, 2", "not JSON"), ("[]", "non-empty"),
                                          ('[1, "2"]', "integer"), ("[1, true]", "integer"),
                                          ("[1, 49152]", "outside the vocabulary"),
                                          ("[-1]", "outside the vocabulary"),
                                          ("[1, 99999999999999999999]", "outside the vocabulary")])
def test_score_bad_ids(model, tmp_path, content, what):
    f = tmp_path / "ids.json"
    f.write_text(content)
    assert_one_line_error(cli("score", "-m", model, "--ids-file", f, "--device", "cpu", "--json"),
                          what)


PPL_TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins "
            "with a single step. All that glitters is not gold. Actions speak louder than words. "
            "Where there is a will, there is a way.")


def test_perplexity(model, engine, tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(PPL_TEXT)
    r = cli("perplexity", "-m", model, "-f", f, "-c", 16, "--device", "cpu")
    assert r.code == 0, r.err
    ids = engine.tokenizer.encode(PPL_TEXT, add_special=False, parse_special=False)
    n_chunks = len(ids) // 16
    progress = [line for line in r.err.splitlines() if line.startswith("chunk ")]
    assert [line.split(":")[0] for line in progress] == [
        f"chunk {i}/{n_chunks}" for i in range(1, n_chunks + 1)]
    assert float(progress[-1].split()[3]) == float(r.out.split()[1])   # the last is the result
    words = r.out.split()
    assert words[0] == "perplexity:" and words[2:4] == ["over", words[3]]
    value, n = float(words[1]), int(words[3])
    assert math.isfinite(value) and value > 1
    assert n == len(ids) // 16 * 7                 # positions 8..14 of every 16-token chunk
    want, _ = perplexity(engine.model, ids, 16)
    assert value == pytest.approx(want, rel=1e-4)


def test_perplexity_text_too_short(model, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("Too short.")
    assert_one_line_error(cli("perplexity", "-m", model, "-f", f, "-c", 16, "--device", "cpu"),
                          "needs at least 32")


def test_bench_table_on_stdout_backend_stats_on_stderr(model):
    r = cli("bench", "-m", model, "-p", 8, "-n", 2, "-r", 1, "--device", "cpu", "-t", 1)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].startswith("| model |") and len(lines) == 4       # head, rule, pp8, tg2
    assert [line.split("|")[6].strip() for line in lines[2:]] == ["pp8", "tg2"]
    stats = [line for line in r.err.splitlines() if line.startswith("backend: ")]
    assert len(stats) == 1 and json.loads(stats[0][len("backend: "):]) == {"threads": 1}


def test_bench_kernels_profiles_every_op_of_a_decode_step(model):
    r = cli("bench", "-m", model, "-p", 0, "-n", 4, "-r", 1, "--kernels", "--device", "cpu",
            "-t", 1)
    assert r.code == 0, r.err
    # the embedding row, per layer five fused ops (qkv_rope, attention, two matmul_add,
    # norm_swiglu), the head and the argmax: 1 + 5 * 30 + 2
    assert "decode step at position 2 (cpu): 153 op calls" in r.out
    assert "| norm_swiglu:ffn_gate:Q4_1 | 30 |" in r.out and "| total | 153 |" in r.out
    r = cli("bench", "-m", model, "-p", 0, "-n", 4, "-r", 1, "--kernels", "--json", "--device",
            "cpu", "-t", 1)
    d = json.loads(r.out)
    assert d["rows"][0]["test"] == "tg4" and d["kernels"]["position"] == 2
    assert sum(o["calls"] for o in d["kernels"]["ops"]) == 153 and d["kernels"]["copy_GBps"] > 0


def test_bench_json(model):
    r = cli("bench", "-m", model, "-p", 16, "-n", 4, "-r", 2, "--json", "--device", "cpu")
    assert r.code == 0, r.err
    rows = json.loads(r.out)
    assert [row["test"] for row in rows] == ["pp16", "tg4"]
    for row in rows:
        assert set(row) == BENCH_KEYS
        assert row["device"] == "cpu" and row["type"] == "Q4_1"
        assert row["params"] == 134_515_008 and row["size_bytes"] > 90e6
        assert row["tokens_per_s"] > 0 and row["stddev"] >= 0


# --- errors: one line, exit 2, no traceback -------------------------------------------------------

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """A garbage file, and a GGUF cut off inside its tensor data (a tiny model's first half)."""
    from gguf_builder import tiny_llama
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
    whole = tiny_llama().to_bytes()
    (d / "truncated.gguf").write_bytes(whole[:len(whole) // 2])
    return d


LONG_PROMPT = "word " * 40


@pytest.mark.parametrize("args,fragment", [
    (("info", "{missing}"), "cannot read"),
    (("generate", "-m", "{missing}", "-p", "hi"), "cannot read"),
    (("info", "{garbage}"), "magic"),
    (("generate", "-m", "{garbage}", "-p", "hi"), "magic"),
    (("generate", "-m", "{truncated}", "-p", "hi"), "past the end of the file"),
    (("generate", "-m", "{model}", "-p", "hi", "--temp", "-1"), "temperature"),
    (("generate", "-m", "{model}", "-p", "hi", "--top-p", "0"), "top-p"),
    (("generate", "-m", "{model}", "-p", "hi", "--top-p", "1.5"), "top-p"),
    (("generate", "-m", "{model}", "-p", "hi", "--top-p", "nan"), "top-p must be in (0, 1]"),
    (("generate", "-m", "{model}", "-p", "hi", "--temp", "-inf"), "finite number >= 0"),
    (("generate", "-m", "{model}", "-p", "hi", "--repeat-penalty", "inf"), "finite number > 0"),
    (("generate", "-m", "{model}", "-p", "hi", "--presence-penalty", "nan"), "finite"),
    (("chat", "-m", "{model}", "--frequency-penalty", "-inf"), "frequency-penalty"),
    (("generate", "-m", "{model}", "-p", "caf\udce9"), "not valid UTF-8 (byte 0xe9 at offset 3)"),
    (("generate", "-m", "{model}", "-p", LONG_PROMPT, "-c", "16", "--device", "cpu"), "context"),
    (("generate", "-m", "{model}", "-p", "hi", "--bogus"), "--bogus"),
    (("generate", "-m", "{model}", "--device", "cpu"), "prompt"),
    (("generate", "-m", "{model}", "-p", "", "--device", "cpu", "-c", "16"), "prompt is empty"),
    (("generate", "-m", "{model}", "-p", "hi", "-f", "{missing}"), "prompt"),
    (("generate", "-m", "{model}", "-f", "{missing}"), "cannot read"),
    (("generate", "-m", "{model}", "-p", "hi", "-n", "-2"), "-n"),
    (("generate", "-m", "{model}", "-p", "hi", "--logprobs", "3"), "--logprobs needs --json"),
    (("bench", "-m", "{model}", "-p", "0", "-n", "0"), "nothing to measure"),
    (("score", "-m", "{model}", "hi", "--ids-file", "{missing}"), "not both"),
    (("score", "-m", "{model}", "--device", "cpu"), "text"),
    (("score", "-m", "{model}", "", "--device", "cpu", "--json"), "the text is empty"),
    (("tokenize", "-m", "{model}"), "text"),
    (("bogus-command",), "bogus-command"),
])
def test_errors(args, fragment, bad_files, request):
    paths = {"missing": bad_files / "does-not-exist.gguf", "garbage": bad_files / "garbage.gguf",
             "truncated": bad_files / "truncated.gguf"}
    if "{model}" in args:                     # only these need the real model (and warm kernels)
        paths["model"] = request.getfixturevalue("model")
    assert_one_line_error(cli(*(a.format(**paths) for a in args)), fragment)


@pytest.mark.skipif(HAS_GPU_DRIVER, reason="this machine has an NVIDIA driver")
def test_device_cuda_without_gpu(model):
    assert_one_line_error(cli("generate", "-m", model, "-p", "hi", "--device", "cuda"),
                          "--device cuda")


@pytest.mark.skipif(HAS_GPU_DRIVER, reason="this machine has an NVIDIA driver")
def test_device_auto_falls_back_with_a_note(model):
    r = cli("generate", "-m", model, "-p", "hi", "-n", 2, "--temp", 0, "--device", "auto",
            "-c", 64)
    assert r.code == 0, r.err
    notes = [line for line in r.err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "CPU" in notes[0]
    assert r.err.splitlines()[-1].startswith("[length]")


def test_cuda_force_cpu(model):
    r = cli("generate", "-m", model, "-p", "hi", "-n", 2, "--temp", 0, "--device", "cuda",
            "--json", "-c", 64, env={"CUDA_FORCE_CPU": "1"})
    assert r.code == 0, r.err
    assert json.loads(r.out)["device"] == "cpu"


def test_generate_cuda_samples_on_device(tmp_path, cuda_toy_shapes, monkeypatch):
    """`generate --device cuda` with sampling options (the CUDA backend under the simulator, a
    2-layer toy model): streams the text of the ids the CPU backend's sampling op picks, the
    decode steps in multi-step replays (decode_chunk; 2 steps here, DECODE_CHUNK on a GPU)."""
    import numbaformer.generate as gen
    from gguf_builder import tiny_llama
    from numbaformer.backends.cpu import CPUBackend
    from numbaformer.loader import load_model_file
    from numbaformer.model import Model
    monkeypatch.setattr(gen, "DECODE_CHUNK", 2)
    path = tiny_llama().write(tmp_path / "tiny.gguf")
    chunks, real = [], Model.decode_chunk
    monkeypatch.setattr(Model, "decode_chunk", lambda self, tok, pos, n: chunks.append(
        (self.ops.name, n)) or real(self, tok, pos, n))
    r = cli("generate", "-m", path, "-p", "the cat", "-n", 3, "-c", 32, "--device", "cuda",
            "--exact", "--temp", 0.7, "--top-k", 20, "--top-p", 0.9, "--min-p", 0.05,
            "--repeat-penalty", 1.1, "--seed", 3,
            env={"NUMBA_ENABLE_CUDASIM": "1", "NUMBAFORMER_ALLOW_CUDASIM": "1"})
    assert r.code == 0, r.err
    assert chunks == [("cuda", 2)]
    mf = load_model_file(path)
    ops = CPUBackend(exact=True)
    ops.samples_on_device = True
    ids = mf.tokenizer.encode("the cat", add_special=True, parse_special=True)
    p = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repeat_penalty=1.1,
                       seed=3)
    want = stream_generate(Model(mf, ops, n_ctx=32), mf.tokenizer, ids, make_sampler(p),
                           max_tokens=3)
    assert len(want.ids) == 3 and chunks == [("cuda", 2), ("cpu", 2)]
    assert r.out == want.text + "\n" and r.err.splitlines()[-1].startswith("[length]")


def test_help_and_version():
    r = cli("--help")
    assert r.code == 0 and "generate" in r.out and "bench" in r.out
    bare = cli()                           # no command: the same help, not an "error: Usage:..."
    assert bare.code == 0 and bare.out == r.out and bare.err == ""
    r = cli("--version")
    assert r.code == 0 and "0.1.0" in r.out


def _commands(group, path=()):
    import click
    for name, cmd in group.commands.items():
        yield (*path, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))


def test_every_option_has_an_environment_variable_shown_in_help():
    """NUMBAFORMER_<OPTION>: the long option's name, upper case, - as _ (--json: NUMBAFORMER_JSON,
    -hf/--hf-repo: NUMBAFORMER_HF_REPO), the same for every command."""
    import click

    from numbaformer.cli import cli as group
    seen = set()
    for path, cmd in _commands(group):
        r = cli(*path, "--help")
        assert r.code == 0, r.err
        text = " ".join(r.out.split())
        for p in cmd.params:
            if isinstance(p, click.Option):
                var = "NUMBAFORMER_" + max(p.opts, key=len).lstrip("-").replace("-", "_").upper()
                assert f"env var: {var}" in text, (path, var)
                seen.add(var)
    assert {"NUMBAFORMER_MODEL", "NUMBAFORMER_HF_REPO", "NUMBAFORMER_OFFLINE", "NUMBAFORMER_JSON",
            "NUMBAFORMER_TEMP", "NUMBAFORMER_N_PREDICT", "NUMBAFORMER_DEVICE"} <= seen
    assert "NUMBAFORMER_CACHE" not in seen           # the model cache's folder: not an option


def test_options_from_the_environment(tmp_path):
    from vocab_files import unpack_vocab
    path = unpack_vocab("llama-spm", tmp_path)
    r = cli("tokenize", "Hello world", env={"NUMBAFORMER_MODEL": path, "NUMBAFORMER_JSON": "1"})
    assert r.code == 0, r.err
    assert json.loads(r.out)["ids"] == [1, 15043, 3186]
    r = cli("tokenize", "-m", path, "Hello world",          # the command line wins
            env={"NUMBAFORMER_MODEL": tmp_path / "missing.gguf", "NUMBAFORMER_JSON": "0"})
    assert r.code == 0 and r.out.split() == ["1", "15043", "3186"], r.err
    r = cli("generate", "-m", path, "-p", "hi", env={"NUMBAFORMER_N_PREDICT": "abc"})
    assert_one_line_error(r, "--n-predict", "(from NUMBAFORMER_N_PREDICT)")


# --- devices --------------------------------------------------------------------------------------

@pytest.mark.skipif(HAS_GPU_DRIVER, reason="this machine has an NVIDIA driver")
def test_devices_without_a_gpu():
    import numba
    r = cli("devices")
    assert r.code == 0 and r.err == "", r.err
    lines = r.out.splitlines()
    assert lines[0] == "CUDA: none (no NVIDIA driver found)"
    assert lines[1].startswith("CPU: ") and f"{numba.config.NUMBA_NUM_THREADS} threads" in lines[1]
    d = json.loads(cli("devices", "--json").out)
    assert d["cuda"] == [] and d["cuda_unavailable"] == "no NVIDIA driver found"
    assert d["cpu"]["threads"] == numba.config.NUMBA_NUM_THREADS and d["cpu"]["cores"] >= 1


@pytest.mark.parametrize("env,reason", [
    ({"CUDA_FORCE_CPU": "1"}, "CUDA_FORCE_CPU is set: numbaformer runs on the CPU"),
    ({"NUMBA_ENABLE_CUDASIM": "1"}, "NUMBA_ENABLE_CUDASIM=1 (the CUDA simulator is not a device)"),
    ({"CUDA_VISIBLE_DEVICES": ""}, "CUDA_VISIBLE_DEVICES hides every GPU")])
def test_devices_says_why_there_is_no_gpu(env, reason):
    r = cli("devices", env=env)
    assert r.code == 0 and r.out.splitlines()[0] == f"CUDA: none ({reason})", r.out


def test_devices_lists_each_gpu(monkeypatch):
    """gpu_rows over a stand-in for numba.cuda (two devices), and their lines."""
    from types import SimpleNamespace

    import numbaformer.backends as backends
    current = {}

    class Gpu:
        def __init__(self, i):
            self.i = i

        def __enter__(self):
            current["i"] = self.i

        def __exit__(self, *exc):
            current.pop("i")

    fake = SimpleNamespace(
        gpus=[Gpu(0), Gpu(1)],
        get_current_device=lambda: SimpleNamespace(name=[b"NVIDIA H200", "NVIDIA L4"][current["i"]],
                                                   compute_capability=[(9, 0), (8, 9)][current["i"]]),
        current_context=lambda: SimpleNamespace(
            get_memory_info=lambda: [(130 << 30, 140 << 30), (20 << 30, 24 << 30)][current["i"]]))
    rows = backends.gpu_rows(fake)
    assert rows[1] == {"index": 1, "name": "NVIDIA L4", "compute_capability": "8.9",
                       "memory_free": 20 << 30, "memory_total": 24 << 30}
    monkeypatch.setattr(backends, "cuda_devices", lambda: (rows, None))
    lines = cli("devices").out.splitlines()
    assert lines[:3] == ["CUDA: 2 devices",
                         "  0: NVIDIA H200, compute capability 9.0, 130.0 GiB free of 140.0 GiB",
                         "  1: NVIDIA L4, compute capability 8.9, 20.0 GiB free of 24.0 GiB"]


def test_process_devices():
    p = run_process("devices")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert p.stdout.startswith("CUDA: ") and "\nCPU: " in p.stdout


# --- through a real process -----------------------------------------------------------------------

def test_process_info_json(model):
    p = run_process("info", "--json", model)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["tensor_types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}


@pytest.mark.parametrize("args", [("info", "/nonexistent/model.gguf"),
                                  ("generate", "-m", "{model}", "-p", "hi", "--top-p", "1.5"),
                                  ("generate", "--no-such-option")])
def test_process_errors(args, model):
    p = run_process(*(a.format(model=model) for a in args))
    assert p.returncode == 2
    assert "Traceback" not in p.stdout + p.stderr and p.stdout == ""
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("error: ")


def test_process_generate(model, greedy8, prompt0):
    p = run_process("generate", "-m", model, "-p", prompt0["prompt"], "--temp", 0, "-n", 8,
                    "--json", "--device", "cpu", "-c", 64)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ids"] == greedy8.ids


# --- bad input through a real process: one error line and exit 2, or (chat, stdin closed) exit 0 -

GEN = ("generate", "-m", "{model}", "--device", "cpu")


@pytest.mark.parametrize("args,input,stdin,fragments", [
    ((*GEN, "-f", "-"), b"caf\xe9", None, ("prompt on stdin", "UTF-8", "0xe9 at offset 3")),
    ((*GEN, "-p", b"caf\xe9"), None, None, ("the prompt is not valid UTF-8", "0xe9")),
    ((*GEN, "--chat", "-sys", b"caf\xe9", "-p", "hi"), None, None, ("system message", "UTF-8")),
    (("tokenize", "-m", "{model}", b"\xff"), None, None,
     ("the text is not valid UTF-8", "0xff at offset 0")),
    ((*GEN, "-f", "-"), None, "closed", ("stdin", "closed")),
    ((*GEN, "-f", "-"), None, "write-only", ("cannot read the prompt from stdin",)),
    ((*GEN, "-p", "hi", "--temp", "inf"), None, None, ("temperature", "finite", ">= 0")),
    ((*GEN, "-p", "hi", "--temp", "nan"), None, None, ("temperature", "finite", "not nan")),
], ids=["stdin-not-utf8", "p-not-utf8", "sys-not-utf8", "tokenize-not-utf8", "stdin-closed",
        "stdin-write-only", "temp-inf", "temp-nan"])
def test_process_bad_input(model, args, input, stdin, fragments):
    p = run_process(*(a.format(model=model) if isinstance(a, str) else a for a in args),
                    input=input, stdin=stdin)
    assert_process_error(p, *fragments)
    assert p.stdout == ""


CHAT_BANNER = 1                      # chat's one line on stderr before it reads


@pytest.mark.parametrize("input,stdin,fragments", [
    (b"caf\xe9\n", None, ("the chat input is not valid UTF-8", "0xe9")),
    (None, "write-only", ("cannot read the chat input from stdin",)),
], ids=["not-utf8", "write-only"])
def test_process_chat_bad_input(model, input, stdin, fragments):
    p = run_process("chat", "-m", model, "--device", "cpu", "-c", 64, "-n", 2, input=input,
                    stdin=stdin)
    assert_process_error(p, *fragments, lines_before=CHAT_BANNER)


def test_process_chat_with_stdin_closed_ends_like_ctrl_d(model):
    p = run_process("chat", "-m", model, "--device", "cpu", "-c", 64, "-n", 2, stdin="closed")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "error" not in p.stderr
    assert p.stdout == "\n" and p.stderr.startswith("chat: Ctrl-D quits")


def test_chat_command(model, engine):
    """Two turns from stdin (with /help and /clear between), then end of input: the replies are
    the library's greedy replies; /help and /clear answer on stderr, --stats gives each reply's
    speed."""
    from numbaformer.chat_template import render_model_chat
    r = cli("chat", "-m", model, "--temp", 0, "-n", 8, "--device", "cpu", "-c", 256, "--stats",
            input="What is 2+2?\n/help\n/clear\nWhat is 2+2?\n")
    assert r.code == 0, r.err
    ids = engine.tokenizer.encode(render_model_chat(
        engine.mf.gguf.metadata, engine.tokenizer, [{"role": "user", "content": "What is 2+2?"}]))
    reply = stream_generate(engine.model, engine.tokenizer, ids,
                            make_sampler(SamplingParams(temperature=0)), max_tokens=8).text
    assert r.out.count(reply + "\n") == 2, r.out
    err = [line for line in r.err.splitlines() if not line.startswith("compiling")]
    assert err[0].startswith("chat: Ctrl-D quits") and "/help" in err[0]
    assert err[1].startswith(f"[length] prompt: {len(ids)} tokens") and "tok/s" in err[1]
    assert err[2].startswith("commands: /help") and "/clear" in err[2]
    assert err[3] == "(conversation cleared)"
    assert err[4].startswith(f"[length] prompt: {len(ids)} tokens")      # cleared: all new
    assert len(err) == 5 and "load" not in err[1]


def test_chat_without_stats_says_only_the_banner(model):
    r = cli("chat", "-m", model, "--temp", 0, "-n", 2, "--device", "cpu", "-c", 64,
            input="Hi\n")
    assert r.code == 0, r.err
    assert [line for line in r.err.splitlines() if not line.startswith("compiling")] == [
        "chat: Ctrl-D quits, Ctrl-C stops a reply, /help lists the commands"]


def test_chat_no_limit_replies_to_the_end(model, engine):
    """-n -1: the reply runs to its end-of-generation token, as the library's with no limit."""
    from numbaformer.chat_template import render_model_chat
    r = cli("chat", "-m", model, "--temp", 0, "-n", -1, "--device", "cpu", "-c", 256, "--stats",
            input="What is 2+2?\n")
    assert r.code == 0, r.err
    ids = engine.tokenizer.encode(render_model_chat(
        engine.mf.gguf.metadata, engine.tokenizer, [{"role": "user", "content": "What is 2+2?"}]))
    want = stream_generate(engine.model, engine.tokenizer, ids,
                           make_sampler(SamplingParams(temperature=0)), max_tokens=-1)
    assert want.finish_reason == "stop" and len(want.ids) > 8           # past chat's old -n
    assert r.out == f"> {want.text}\n> \n"
    assert any(line.startswith("[stop] ") for line in r.err.splitlines())
