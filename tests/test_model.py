"""The whole forward (model.py over the CPU backend) on the real SmolLM2-135M Q4_1 file, held
against the float64 reference (tests/reference.py) and against llama.cpp's outputs, teacher-forced
on prompt_ids + greedy_ids of tests/data/reference/prompts.json; and the invariants of the graph:
prefill equals decode, chunking and the thread count change nothing beyond rounding.

Prefill (the GEMM) is exact f32 on either path; decode's mat-vecs quantize activations to 8 bits
unless the backend is exact. The invariants that compare decode with prefill run exact; the fast
decode is held against the exact path (KL divergence, top-1) and against llama.cpp's bounds.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest
from llamacpp_check import (check_bounds, compare, required_greedy_prefix, summary, teacher_ids,
                            top2_gap)
from reference import ReferenceModel, log_softmax

from numbaformer.generate import stream_generate
from numbaformer.loader import load_model_file
from numbaformer.model import Model
from numbaformer.sampling import SamplingParams, make_sampler

# Decode (mat-vec) and prefill (GEMM) sum each dot product in another order, and the difference
# travels through 30 layers: measured 2e-6 * max|logit| on SmolLM2. Allowed: 2e-5 * max|logit| of
# the row (~170 float32 ulps of the largest logit), so any real divergence (a wrong position, a
# stale cache row) still fails by orders of magnitude.
PATH_RTOL = 2e-5


def close_rows(a: np.ndarray, b: np.ndarray, rtol: float = PATH_RTOL) -> bool:
    """Every row of a within rtol * max|row of b| of b."""
    return bool((np.abs(a - b) <= rtol * np.abs(b).max(axis=1, keepdims=True)).all())


# --- against the float64 reference ---------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_model(engine):
    """SmolLM2 dequantized by gguf-py, in float64 (about 1 GB, freed after this module)."""
    return ReferenceModel(engine.mf)


@pytest.mark.parametrize("k", range(3))
def test_logprobs_match_float64_reference(exact, reference_model, llamacpp, k, record_figure):
    """Within 5e-3 of the float64 reference's log-prob of every token at every position; the
    same top-1 wherever the reference's top-2 gap exceeds 1e-2."""
    ids = teacher_ids(llamacpp[k])
    got = log_softmax(exact.model.forward_all(ids))
    want_logits = reference_model.forward(ids)
    want = log_softmax(want_logits)
    delta = np.abs(got - want).max()
    record_figure(f"max |logprob - float64 reference|, prompt {k}", f"{delta:.2e}")
    assert delta <= 5e-3
    clear = top2_gap(want_logits) > 1e-2
    assert np.array_equal(got.argmax(1)[clear], want.argmax(1)[clear])


# --- against llama.cpp ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vs_llamacpp(engine, llamacpp):
    return compare(engine.model.forward_all, llamacpp)


def test_prompt_ids_are_llamacpps(engine, llamacpp):
    for r in llamacpp:
        assert engine.tokenizer.encode(r["prompt"], add_special=True, parse_special=True) == \
            r["prompt_ids"]


def test_llamacpp_bounds(vs_llamacpp, record_figure):
    """Top-1 agreement >= 92%; disagreements only at llama.cpp top-2 gaps < 1.0; |dlogprob| of
    llama.cpp's top token: median <= 0.05, p95 <= 0.25, max <= 0.6."""
    record_figure("vs llama.cpp (CPU, SmolLM2)", summary(vs_llamacpp))
    check_bounds(vs_llamacpp)


# --- the fast decode path (8-bit activations) -----------------------------------------------------

def test_fast_decode_fidelity(engine, llamacpp, record_figure):
    """Decode with 8-bit activations (the default) on every prompt, teacher-forced: within
    llama.cpp's bounds, and against the exact path on the same ids (f32 activations): mean KL
    divergence <= 0.005 nats and top-1 agreement >= 98 %."""
    m = engine.model
    assert not engine.backend.exact and getattr(m.w.layers[0].attn_q, "packed", None) is not None
    v = compare(lambda ids: decode_steps(m, ids), llamacpp)
    record_figure("vs llama.cpp (CPU decode, q8 activations, SmolLM2)", summary(v))
    check_bounds(v)
    kl, agree = [], []
    for r in llamacpp:
        ids = teacher_ids(r)
        lq = log_softmax(decode_steps(m, ids))
        le = log_softmax(m.forward_all(ids))                  # the GEMM: f32 activations
        kl.extend(np.sum(np.exp(le) * (le - lq), axis=1))
        agree.extend(lq.argmax(1) == le.argmax(1))
    record_figure("CPU q8 decode vs exact", f"mean KL {np.mean(kl):.2e} nats, max "
                  f"{np.max(kl):.2e}; top-1 agreement {np.mean(agree):.1%} of {len(kl)} positions")
    assert np.mean(kl) <= 0.005 and np.mean(agree) >= 0.98


def test_fast_greedy_matches_llamacpp_until_a_near_tie(engine, llamacpp):
    """Greedy generation with the 8-bit decode equals llama.cpp's greedy_ids up to the first
    position where llama.cpp's top-2 logit gap is below 1.0 (as the exact path must)."""
    sampler = make_sampler(SamplingParams(temperature=0.0))
    for r in llamacpp:
        must = required_greedy_prefix(r)
        res = stream_generate(engine.model, engine.tokenizer, r["prompt_ids"], sampler,
                              max_tokens=max(must, 1))
        assert res.ids[:must] == r["greedy_ids"][:must]


# --- invariants of the graph ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample_ids(llamacpp):
    return teacher_ids(llamacpp[0])[:20]


def decode_steps(model: Model, ids) -> np.ndarray:
    """Logits after each of len(ids) single-token steps from position 0 (the decode path)."""
    return np.stack([model.ops.to_host(model.forward([t], i))[0] for i, t in enumerate(ids)])


@pytest.fixture
def exact(engine):
    """The shared engine with every product exact (f32 activations) for the test's duration."""
    engine.backend.exact = True
    yield engine
    engine.backend.exact = False


def test_prefill_equals_decode_steps(exact, sample_ids):
    m = exact.model
    prefill = m.forward_all(sample_ids)
    steps = decode_steps(m, sample_ids)
    assert close_rows(steps, prefill)
    gap = top2_gap(prefill)
    assert np.array_equal(steps.argmax(1)[gap > 1e-3], prefill.argmax(1)[gap > 1e-3])
    last = m.ops.to_host(m.forward(sample_ids, 0))
    assert close_rows(last, prefill[-1:])


def test_greedy_on_device_is_argmax(engine, sample_ids):
    m = engine.model
    logits = m.ops.to_host(m.forward(sample_ids, 0, greedy=True))[0]
    assert m.greedy_token() == int(np.argmax(logits))
    logits = m.ops.to_host(m.forward([sample_ids[0]], len(sample_ids), greedy=True))[0]
    assert m.greedy_token() == int(np.argmax(logits))


def test_chunked_prefill_over_filled_cache(engine, sample_ids):
    """n_batch 7: chunks of 7, 7, 6 tokens, each at start_pos > 0 over the cache the previous
    chunks filled, give the logits of one 20-token prefill."""
    whole = engine.model.forward_all(sample_ids)
    small = Model(engine.mf, engine.backend, n_ctx=64, n_batch=7)
    assert close_rows(small.forward_all(sample_ids), whole)
    last = small.ops.to_host(small.forward(sample_ids, 0))
    assert close_rows(last, engine.model.ops.to_host(engine.model.forward(sample_ids, 0)))


def test_continuing_a_cached_prefix(engine, sample_ids):
    """Prefill the first 12 tokens, then the other 8 at start_pos 12: the logits of the whole."""
    m = engine.model
    whole = m.forward_all(sample_ids)
    m.forward(sample_ids[:12], 0)
    rest = m.forward_all(sample_ids[12:], 12)
    assert close_rows(rest, whole[12:])


def test_thread_count_changes_nothing(engine, sample_ids, record_figure):
    m = engine.model
    n0 = numba.get_num_threads()
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread")
    results = {}
    try:
        for n in (1, 2):
            numba.set_num_threads(n)
            prefill = m.forward_all(sample_ids)
            steps = decode_steps(m, sample_ids[:8])
            greedy = [int(np.argmax(m.ops.to_host(m.forward(sample_ids, 0))))]
            for i in range(5):
                m.forward([greedy[-1]], len(sample_ids) + i, greedy=True)
                greedy.append(m.greedy_token())
            results[n] = prefill, steps, greedy
    finally:
        numba.set_num_threads(n0)
    (p1, s1, g1), (p2, s2, g2) = results[1], results[2]
    record_figure("max |logit(1 thread) - logit(2 threads)|",
                  f"prefill {np.abs(p1 - p2).max():.1e}, decode {np.abs(s1 - s2).max():.1e}")
    assert close_rows(p1, p2) and close_rows(s1, s2)
    assert g1 == g2


def test_forward_rejects_bad_input(engine):
    m = engine.model
    with pytest.raises(ValueError, match="no tokens"):
        m.forward([], 0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m.forward([1, engine.config.n_vocab], 0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m.forward_all([-1])
    with pytest.raises(ValueError, match="exceed the context"):
        m.forward([1, 2], m.n_ctx - 1)
    with pytest.raises(ValueError, match="exceed the context"):
        m.forward([1], -1)
    m.forward([1], m.n_ctx - 1)                 # the last slot itself is fine


def test_forward_rejects_huge_ids(engine):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.model.forward([1, 2 ** 64], 0)


# --- tiny random-weight models: the other architecture (qwen2: NeoX rope, QKV bias) ---------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_paths_agree_with_reference(tiny_model, arch):
    mf = load_model_file(tiny_model(arch, "Q8_0"))
    try:
        from numbaformer.backends.cpu import CPUBackend
        assert mf.config.rope_neox == (arch == "qwen2") and mf.config.qkv_bias == (arch == "qwen2")
        ids = list(np.random.default_rng(0).integers(0, mf.config.n_vocab, 13))
        want = ReferenceModel(mf).forward(ids)
        model = Model(mf, CPUBackend(exact=True), n_ctx=32, n_batch=5)   # chunks of 5, 5, 3
        prefill = model.forward_all(ids)
        assert np.abs(log_softmax(prefill) - log_softmax(want)).max() <= 5e-3
        assert close_rows(decode_steps(model, ids), prefill)
    finally:
        mf.close()
