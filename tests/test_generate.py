"""generate.py (generate_step, stream_generate, StopMatcher, GenerationStats) and chat.py on the
real SmolLM2 engine: greedy continuations against llama.cpp's, finish reasons (eog "stop", the context
"context", max_tokens "length"; -1 no limit), stop strings held back while streaming, --ignore-eos, seeded
determinism, log-probs, and the chat loop's reuse of the KV cache.

The engine runs exact (f32 decode activations) in this module: several tests hold decode steps to
the prefill path's logits (argmax, log-probs, a cached prefix, chat turns), which only the exact
path matches to float rounding. The default 8-bit decode is held to the exact path and to
llama.cpp in test_model.py.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
from llamacpp_check import required_greedy_prefix
from reference import log_softmax

from numbaformer.chat import run_chat
from numbaformer.chat_template import render_model_chat
from numbaformer.generate import GenerationStats, StopMatcher, generate_step, stream_generate
from numbaformer.model import Model
from numbaformer.sampling import SamplingParams, make_sampler

GREEDY = SamplingParams(temperature=0.0)
CHAT_PROMPT = 1                    # index in prompts.json of the chat-formatted prompt


def greedy_sampler():
    return make_sampler(GREEDY)


def run(engine, ids, max_tokens, model=None, **kw):
    return stream_generate(model or engine.model, engine.tokenizer, ids, greedy_sampler(),
                           max_tokens=max_tokens, **kw)


@pytest.fixture(scope="module", autouse=True)
def exact_engine(engine):
    """The shared engine with every product exact for this module's tests."""
    engine.backend.exact = True
    yield engine
    engine.backend.exact = False


@pytest.fixture(scope="module")
def greedy_runs(engine, llamacpp):
    """The engine's greedy continuation (at most 32 tokens, eog ends it) of every prompt."""
    return [run(engine, r["prompt_ids"], 32) for r in llamacpp]


# --- greedy against llama.cpp --------------------------------------------------------------------

@pytest.mark.parametrize("k", range(3))
def test_greedy_matches_llamacpp_until_a_near_tie(engine, llamacpp, greedy_runs, k,
                                                  record_figure):
    """Equal to llama.cpp's greedy_ids up to the first position where llama.cpp's top-2 logit gap
    is below 1.0 (past it, float differences may legitimately pick the other token)."""
    r, ours = llamacpp[k], greedy_runs[k].ids
    must = required_greedy_prefix(r)
    same = next((j for j, (a, b) in enumerate(zip(ours, r["greedy_ids"])) if a != b),
                min(len(ours), len(r["greedy_ids"])))
    record_figure(f"greedy tokens equal to llama.cpp's, prompt {k}",
                  f"{same} of {len(r['greedy_ids'])} (required: {must})")
    assert ours[:must] == r["greedy_ids"][:must]


@pytest.mark.parametrize("k", range(3))
def test_greedy_is_argmax_of_teacher_forcing(engine, greedy_runs, llamacpp, k):
    """Each generated token is the argmax of forward_all over prompt + generated tokens (wherever
    that argmax is not a near-tie between the decode and prefill paths)."""
    prompt, ids = llamacpp[k]["prompt_ids"], greedy_runs[k].ids
    logits = engine.model.forward_all(prompt + ids[:-1])[len(prompt) - 1:]
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3
    assert np.array_equal(np.asarray(ids)[clear], logits.argmax(1)[clear])


# --- finish reasons -------------------------------------------------------------------------------

def test_eog_token_ends_with_stop(engine, llamacpp, greedy_runs):
    res = greedy_runs[CHAT_PROMPT]
    assert res.finish_reason == "stop"
    assert res.ids[-1] in engine.tokenizer.eog_ids
    assert not any(i in engine.tokenizer.eog_ids for i in res.ids[:-1])
    assert res.text == engine.tokenizer.decode(res.ids[:-1])     # the eog token is not text
    assert "<|im_end|>" not in res.text and res.text.strip()


def test_eog_ids_of_generate_step(engine, llamacpp, greedy_runs):
    """Any id in eog_ids ends generation: it is yielded, then the generator stops with "stop"."""
    prompt, ids = llamacpp[0]["prompt_ids"], greedy_runs[0].ids
    stats = GenerationStats()
    steps = list(generate_step(engine.model, prompt, greedy_sampler(), max_tokens=32,
                               eog_ids={ids[3]}, stats=stats))
    assert [s.id for s in steps] == ids[:ids.index(ids[3]) + 1]
    assert stats.finish_reason == "stop" and stats.generated_tokens == len(steps)


def test_empty_prompt_is_refused(engine):
    with pytest.raises(ValueError, match="prompt is empty"):
        run(engine, [], 4)


def test_max_tokens_ends_with_length(engine, llamacpp, greedy_runs):
    prompt = llamacpp[0]["prompt_ids"]
    res = run(engine, prompt, 5)
    assert res.ids == greedy_runs[0].ids[:5] and res.finish_reason == "length"
    res = run(engine, prompt, 0)
    assert res.ids == [] and res.text == "" and res.finish_reason == "length"


def test_context_end_ends_with_context(engine, llamacpp, greedy_runs):
    """With n_ctx = prompt + 3, positions run out after 4 tokens (the last sampled token needs no
    cache slot): 'context' when max_tokens (or -1, no limit) asks for more, 'length' when it asks
    for exactly 4; the tokens are those of a large context."""
    prompt = llamacpp[0]["prompt_ids"]
    small = Model(engine.mf, engine.backend, n_ctx=len(prompt) + 3)
    for max_tokens, reason in ((100, "context"), (-1, "context"), (5, "context"), (4, "length")):
        res = run(engine, prompt, max_tokens, model=small)
        assert (res.finish_reason, res.stats.finish_reason) == (reason, reason), max_tokens
        assert res.ids == greedy_runs[0].ids[:4] and res.stats.generated_tokens == 4
    # a prompt that fills the context exactly still yields its one token; one more yields none
    full = Model(engine.mf, engine.backend, n_ctx=len(prompt))
    res = run(engine, prompt, 10, model=full)
    assert res.ids == greedy_runs[0].ids[:1] and res.finish_reason == "context"
    tiny = Model(engine.mf, engine.backend, n_ctx=len(prompt) - 1)
    res = run(engine, prompt, 10, model=tiny)
    assert res.ids == [] and res.finish_reason == "context"


def test_greedy_chunks_equal_single_steps(engine, llamacpp):
    """decode_greedy(tok, pos, n) (n steps per replay, each pick fed to the next on the device)
    picks what n single greedy steps pick; a chunk that ends early (the caller keeps fewer picks)
    leaves the cache good for the next one; generate_step's chunks cross max_tokens limits."""
    from numbaformer.model import DECODE_CHUNK, MAX_CHUNK
    prompt = llamacpp[0]["prompt_ids"]
    m = engine.model
    m.forward(prompt, 0, greedy=True)
    ref = [m.greedy_token()]
    for j in range(2 * DECODE_CHUNK - 1):                  # single steps, the host feeding each
        m.forward([ref[-1]], len(prompt) + j, greedy=True)
        ref.append(m.greedy_token())
    first = ref[0]
    got = m.decode_greedy(first, len(prompt), 5)
    assert got == ref[1:6]
    # keep 2 of them, then continue from there: the 3 extra steps' cache slots are overwritten
    got = m.decode_greedy(ref[2], len(prompt) + 2, 7)
    assert got == ref[3:10]
    for n in (DECODE_CHUNK + 3, 2 * DECODE_CHUNK):
        res = run(engine, prompt, n, ignore_eos=True)
        assert res.ids == ref[:n] and res.stats.generated_tokens == n
    with pytest.raises(ValueError, match="chunk"):
        m.decode_greedy(first, len(prompt), MAX_CHUNK + 1)
    with pytest.raises(ValueError, match="exceed the context"):
        m.decode_greedy(first, m.n_ctx - 2, 3)


def test_no_limit_runs_to_the_end_of_generation(engine, llamacpp, greedy_runs):
    """max_tokens -1 (llama.cpp's -n -1) stops at the end-of-generation token."""
    prompt = llamacpp[CHAT_PROMPT]["prompt_ids"]
    res = run(engine, prompt, -1)
    assert res.finish_reason == "stop" and res.ids == greedy_runs[CHAT_PROMPT].ids


def test_ignore_eos_generates_past_eog(engine, llamacpp, greedy_runs):
    prompt, stopped = llamacpp[CHAT_PROMPT]["prompt_ids"], greedy_runs[CHAT_PROMPT].ids
    res = run(engine, prompt, len(stopped) + 3, ignore_eos=True)
    assert res.finish_reason == "length"
    assert len(res.ids) == len(stopped) + 3
    assert res.ids[:len(stopped)] == stopped              # the eog token is kept in the stream


# --- stop strings ---------------------------------------------------------------------------------

def feed(matcher: StopMatcher, pieces) -> list[str]:
    out = [matcher.push(p) for p in pieces]
    return out + [matcher.flush()]


def test_stop_matcher_across_pieces():
    m = StopMatcher(["o wor"])
    out = feed(m, ["Hell", "o", " w", "orld"])
    assert out == ["Hell", "", "", "", ""] and m.stopped


def test_stop_matcher_partial_match_released():
    m = StopMatcher(["STOP"])
    assert m.push("go ST") == "go "            # "ST" could grow into STOP: held back
    assert m.push("O") == ""
    assert m.push("X!") == "STOX!"             # it did not: released
    assert m.flush() == "" and not m.stopped


def test_stop_matcher_holds_tail_until_flush():
    m = StopMatcher(["</s>"])
    assert m.push("a</") == "a"
    assert m.flush() == "</"


def test_stop_matcher_earliest_of_several():
    m = StopMatcher(["world", "lo w", ""])     # empty stop strings are ignored
    assert m.push("hello world") == "hel" and m.stopped
    assert m.push("more") == "" and m.flush() == ""


def test_stop_matcher_overlapping_prefix():
    m = StopMatcher(["aab"])
    assert m.push("aaa") == "a"
    assert m.push("b") == "" and m.stopped


def first_stop_cut(text: str, pieces: list[str], stops: list[str]) -> int | None:
    """Where generation must cut: after the first piece with which some stop string is complete,
    before the earliest-starting complete one (llama.cpp's server checks the same way per token)."""
    end = 0
    for p in pieces:
        end += len(p)
        hits = [text[:end].find(s) for s in stops if s in text[:end]]
        if hits:
            return min(hits)
    return None


def test_stop_matcher_random_splits():
    """Whatever the split into pieces, the output is the text before the stop string the first
    piece to complete one completes (all of it without one): holding back never loses a match."""
    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(1, 2))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 16)))
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        cut = first_stop_cut(text, pieces, stops)
        m = StopMatcher(stops)
        assert "".join(feed(m, pieces)) == text[:cut], (stops, pieces)
        assert m.stopped == (cut is not None)


def test_stop_matcher_commits_to_first_completed_match():
    """'a' completes before the earlier-starting 'baa' could: the cut is before that 'a'."""
    m = StopMatcher(["baa", "a"])
    assert feed(m, ["b", "b", "a", "a"]) == ["", "b", "b", "", ""]
    m = StopMatcher(["baa", "a"])
    assert m.push("bbaa") == "b"              # both complete in one piece: the earliest start


def test_stop_string_spanning_tokens_streams_and_cuts(engine, llamacpp, greedy_runs):
    """A stop string that starts inside one generated token and ends two tokens later: the text
    ends right before it, nothing of it was streamed, and the rest streamed piece by piece."""
    prompt, ids = llamacpp[0]["prompt_ids"], greedy_runs[0].ids
    tok = engine.tokenizer
    before = tok.decode(prompt[-1:] + ids[:4])[len(tok.decode(prompt[-1:])):]
    piece4, piece6 = tok.decode(ids[4:5]), tok.decode(ids[4:7])
    assert len(piece4) >= 2 and len(tok.decode(ids[6:7])) >= 2
    start = len(before) + len(piece4) // 2                 # inside token 4
    stop = (before + piece6)[start:len(before) + len(piece6) - 1]   # ... to inside token 6
    streamed = []
    res = run(engine, prompt, 32, stop=[stop], on_text=streamed.append)
    assert res.finish_reason == "stop"
    assert res.text == greedy_runs[0].text[:start]
    assert "".join(streamed) == res.text and len(streamed) >= 3
    assert res.ids == ids[:7]                               # stopped at the completing token


# --- sampling through the engine ------------------------------------------------------------------

def test_same_seed_same_text(engine, llamacpp):
    prompt = llamacpp[0]["prompt_ids"]

    def sample(seed):
        p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        return stream_generate(engine.model, engine.tokenizer, prompt, make_sampler(p),
                               max_tokens=8).text

    first = sample(1234)
    assert sample(1234) == first
    assert len({first, sample(1), sample(2)}) > 1         # other seeds, other draws


def test_logprobs_of_generated_tokens(engine, llamacpp, greedy_runs):
    """Greedy with log-probs (the host path) picks what the on-device greedy picks, and reports the
    log-softmax of the logits: top-3 sorted, the chosen token first."""
    prompt = llamacpp[0]["prompt_ids"]
    res = run(engine, prompt, 6, logprobs=3)
    assert res.ids == greedy_runs[0].ids[:6]
    assert [e["id"] for e in res.logprobs] == res.ids
    want = log_softmax(engine.model.forward_all(prompt + res.ids[:-1])[len(prompt) - 1:])
    for i, e in enumerate(res.logprobs):
        top = e["top"]
        assert len(top) == 3 and top[0][0] == e["id"] and top[0][1] == e["logprob"]
        assert [t[1] for t in top] == sorted((t[1] for t in top), reverse=True)
        for t, lp in top:
            assert abs(lp - want[i, t]) < 1e-3


def test_generation_stats(engine, llamacpp):
    prompt = llamacpp[0]["prompt_ids"]
    res = run(engine, prompt, 4)
    s = res.stats
    assert s.prompt_tokens == len(prompt) and s.generated_tokens == 4
    assert s.ttft_s > 0 and s.prefill_s == s.ttft_s and s.decode_s > 0
    assert s.prefill_tps == pytest.approx(len(prompt) / s.prefill_s)
    assert s.decode_tps == pytest.approx(3 / s.decode_s)
    assert set(s.as_dict()) == {"load_s", "prompt_tokens", "prefill_tps", "generated_tokens",
                                "decode_tps", "ttft_s"}


def test_cached_prefix_gives_the_same_continuation(engine, llamacpp, greedy_runs):
    """n_cached: the prompt's first tokens are already in the KV cache (chat turns)."""
    prompt = llamacpp[0]["prompt_ids"]
    engine.model.forward(prompt, 0)
    for n_cached in (len(prompt) - 5, len(prompt), len(prompt) + 10):   # capped at len - 1
        res = run(engine, prompt, 6, n_cached=n_cached)
        assert res.ids == greedy_runs[0].ids[:6]
        assert res.stats.prompt_tokens == len(prompt) - min(n_cached, len(prompt) - 1)


# --- chat -----------------------------------------------------------------------------------------

def chat_session(engine, lines, model, max_tokens=12):
    """Run run_chat over `lines` (then Ctrl-D); returns what it wrote."""
    feed_lines, written = iter(lines), []

    def read(_prompt):
        try:
            return next(feed_lines)
        except StopIteration:
            raise EOFError from None

    eng = SimpleNamespace(tokenizer=engine.tokenizer, model=model, mf=engine.mf)
    run_chat(eng, GREEDY, max_tokens=max_tokens, read=read, write=written.append)
    return "".join(written)


def expected_reply(engine, messages, max_tokens=12):
    ids = engine.tokenizer.encode(render_model_chat(engine.mf.gguf.metadata, engine.tokenizer,
                                                    messages), add_special=True, parse_special=True)
    fresh = Model(engine.mf, engine.backend, n_ctx=256)
    return run(engine, ids, max_tokens, model=fresh).text


def test_chat_second_turn_reuses_cache(engine, monkeypatch):
    """Turn 2 runs only what turn 1 did not leave in the cache, and answers as a fresh model given
    the whole history would; after /clear the first answer comes back."""
    model = Model(engine.mf, engine.backend, n_ctx=256)
    real_forward, starts = model.forward, []

    def forward(ids, start_pos, **kw):
        if len(ids) > 1:
            starts.append(start_pos)
        return real_forward(ids, start_pos, **kw)

    monkeypatch.setattr(model, "forward", forward)
    q1, q2 = "What is 2+2?", "And 3+3?"
    out = chat_session(engine, [q1, q2, "/clear", "", q1], model)
    first = expected_reply(engine, [{"role": "user", "content": q1}])
    second = expected_reply(engine, [{"role": "user", "content": q1},
                                     {"role": "assistant", "content": first},
                                     {"role": "user", "content": q2}])
    assert out == first + "\n" + second + "\n" + first + "\n" + "\n"
    assert starts[0] == 0 and starts[1] > 20 and starts[2] == 0     # prefills: turn 2 reused


def test_chat_interrupted_prefill_does_not_poison_the_cache(engine, monkeypatch):
    """Ctrl-C during a reply's prefill leaves the cache rows of that prompt half written: the next
    turn must recompute them, not trust them."""
    model = Model(engine.mf, engine.backend, n_ctx=256)
    real_forward, calls = model.forward, []

    def forward(ids, start_pos, **kw):
        calls.append(start_pos)
        if len(calls) == 1:                    # the first prefill: garbage in the cache, then ^C
            model.kv.k[...] = np.nan
            raise KeyboardInterrupt
        return real_forward(ids, start_pos, **kw)

    monkeypatch.setattr(model, "forward", forward)
    out = chat_session(engine, ["What is 2+2?", "What is 2+2?"], model)
    history = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": ""},
               {"role": "user", "content": "What is 2+2?"}]
    assert out == "\n" + expected_reply(engine, history) + "\n" + "\n"


# --- the sampling chain on the device (decode_chunk), on the CPU backend's `sample` op -------------

CHAIN_SETTINGS = {
    "sampled": SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02,
                              repeat_penalty=1.2, frequency_penalty=0.1, repeat_last_n=16, seed=5),
    "greedy+penalties": SamplingParams(temperature=0.0, repeat_penalty=1.5, presence_penalty=0.3,
                                       repeat_last_n=-1),
    "no truncation": SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=9),
}
TINY_PROMPT = [5, 17, 33, 101]


@pytest.fixture(scope="module")
def tiny_mf(tmp_path_factory):
    """gguf_builder's 2-layer model with its 300-token gpt2 vocabulary (a tokenizer for text)."""
    from gguf_builder import tiny_llama
    from numbaformer.loader import load_model_file
    mf = load_model_file(tiny_llama().write(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))
    yield mf
    mf.close()


def chain_model(mf, n_ctx: int = 64, chain: bool = True) -> Model:
    """A model on a CPU backend that samples with its `sample` op (decode_chunk), as CUDA does;
    chain=False: the host sampler."""
    from numbaformer.backends.cpu import CPUBackend
    ops = CPUBackend(exact=True)
    ops.samples_on_device = chain
    return Model(mf, ops, n_ctx=n_ctx, n_batch=8)


def chain_ids(model, p, max_tokens=20, prompt=TINY_PROMPT, **kw) -> list[int]:
    return [s.id for s in generate_step(model, prompt, make_sampler(p), max_tokens=max_tokens,
                                        **kw)]


@pytest.mark.parametrize("name", CHAIN_SETTINGS)
def test_chain_same_seed_any_chunk_size(tiny_mf, monkeypatch, name):
    """Same seed, same ids: one step per replay, 3 or 8, and the host sampler (the draw is keyed
    by the position, not by when it is made); greedy with penalties is the penalized argmax."""
    import numbaformer.generate as gen
    p = CHAIN_SETTINGS[name]
    host = chain_ids(chain_model(tiny_mf, chain=False), p)
    for chunk, sizes in ((1, [1] * 19), (3, [3] * 6 + [1]), (8, [8, 8, 3])):
        monkeypatch.setattr(gen, "DECODE_CHUNK", chunk)
        m = chain_model(tiny_mf)
        real, asked = m.decode_chunk, []
        monkeypatch.setattr(m, "decode_chunk", lambda t, pos, n: asked.append(n) or real(t, pos, n))
        assert chain_ids(m, p) == host, chunk
        assert asked == sizes
    assert len(set(host)) > 3


def test_chain_ends_inside_a_chunk(tiny_mf, monkeypatch):
    """An eog id picked mid-chunk ends generation there ("stop"), the later steps of the chunk
    leave the cache as it was (no position past the last fed token is written); so does the
    length limit set by start_sampling."""
    import numbaformer.generate as gen
    monkeypatch.setattr(gen, "DECODE_CHUNK", 8)
    p, L = CHAIN_SETTINGS["sampled"], len(TINY_PROMPT)
    full = chain_model(tiny_mf)
    ref = chain_ids(full, p)
    k = next(i for i in range(3, 20) if ref[i] not in ref[:i] and (i - 1) % 8 not in (0, 7))
    m, stats = chain_model(tiny_mf), GenerationStats()
    assert chain_ids(m, p, eog_ids={ref[k]}, stats=stats) == ref[:k + 1]
    assert stats.finish_reason == "stop"
    written = L + k                          # positions 0 .. L + k - 1: prompt, then ref[:k]
    assert not m.kv.k[:, :, written:].any() and not m.kv.v[:, :, written:].any()
    assert np.array_equal(m.kv.k[:, :, :written], full.kv.k[:, :, :written])
    m = chain_model(tiny_mf)                 # the limit: 3 tokens, the chunk asked for 8 steps
    m.start_sampling(make_sampler(p), TINY_PROMPT, max_tokens=3)
    m.forward(TINY_PROMPT, 0, sample=True)
    first = m.sampled()
    assert first == ref[:1] and m.decode_chunk(first[0], L, 8) == ref[1:3]
    assert not m.kv.k[:, :, L + 2:].any()


def test_chain_limits(tiny_mf, monkeypatch):
    """max_tokens inside a chunk ("length") and the end of the context ("context"): the host
    path's ids and finish reasons."""
    import numbaformer.generate as gen
    monkeypatch.setattr(gen, "DECODE_CHUNK", 4)
    p, L = CHAIN_SETTINGS["sampled"], len(TINY_PROMPT)
    for n_ctx, max_tokens, reason, n in ((64, 11, "length", 11), (L + 6, 20, "context", 7),
                                         (L + 6, 7, "length", 7), (L + 6, -1, "context", 7)):
        got, want = GenerationStats(), GenerationStats()
        ids = chain_ids(chain_model(tiny_mf, n_ctx), p, max_tokens, stats=got)
        assert ids == chain_ids(chain_model(tiny_mf, n_ctx, chain=False), p, max_tokens,
                                stats=want)
        assert len(ids) == n and got.finish_reason == want.finish_reason == reason


def test_chain_stop_string_mid_chunk(tiny_mf, monkeypatch):
    """A stop string completed by a token in the middle of a chunk: the text ends before it, the
    ids at the completing token; the positions the chunk decoded past it are reused: the next
    generation from the cached prefix picks what a fresh model picks."""
    import numbaformer.generate as gen
    monkeypatch.setattr(gen, "DECODE_CHUNK", 8)
    tok, p = tiny_mf.tokenizer, CHAIN_SETTINGS["sampled"]
    ref = stream_generate(chain_model(tiny_mf), tok, TINY_PROMPT, make_sampler(p), max_tokens=20,
                          ignore_eos=True)
    text0 = tok.decode(TINY_PROMPT[-1:] + ref.ids)[len(tok.decode(TINY_PROMPT[-1:])):]
    assert text0 == ref.text
    k = next(i for i in range(4, 16) if (i - 1) % 8 not in (0, 7)
             and tok.decode(ref.ids[i - 1:i + 1]) not in tok.decode(ref.ids[:i]))
    stop = tok.decode(ref.ids[k - 1:k + 1])
    m = chain_model(tiny_mf)
    res = stream_generate(m, tok, TINY_PROMPT, make_sampler(p), max_tokens=20, stop=[stop],
                          ignore_eos=True)
    assert res.finish_reason == "stop" and res.ids == ref.ids[:k + 1]
    assert res.text == ref.text[:ref.text.index(stop)]
    follow = TINY_PROMPT + res.ids[:-1] + [42, 43]
    cached = len(TINY_PROMPT) + len(res.ids) - 1
    p2 = CHAIN_SETTINGS["no truncation"]
    assert chain_ids(m, p2, 10, prompt=follow, n_cached=cached) == \
        chain_ids(chain_model(tiny_mf), p2, 10, prompt=follow)
