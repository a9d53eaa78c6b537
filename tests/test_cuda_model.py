"""The whole graph on the CUDA backend: against the CPU backend and against llama.cpp.

Under the simulator (CI) one end-to-end generation on a tiny random-weight model (2 layers, width
64) must give the CPU backend's tokens. On the lent GPU (NUMBAFORMER_TEST_GPU=1, scripts/
gpu_check.sh), also: GPU vs CPU log-probs on random-weight models of every quant type; the 8-block
cut of SmolLM2 against llama.cpp's outputs for it, with the CPU engine's bounds; GPU log-probs
within 5e-3 of the CPU backend's on the same ids (each KV type against the same KV type).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from llamacpp_check import check_bounds, compare, required_greedy_prefix, summary, teacher_ids
from reference import log_softmax
from vocab_files import shared_dir

from numbaformer.generate import generate_step
from numbaformer.loader import load_model_file
from numbaformer.model import Model
from numbaformer.quants import DECODERS, GGML_TYPES
from numbaformer.sampling import SamplingParams, make_sampler

ON_GPU = os.environ.get("NUMBAFORMER_TEST_GPU") == "1"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs the GPU (NUMBAFORMER_TEST_GPU=1)")
CUT_MODEL = "smollm2-8l.gguf"
CUT_JSON = "smollm2-135m-q4_1-8l.llamacpp.json"
LOGPROB_TOL = 5e-3


def cuda_backend(exact: bool = False):
    from numbaformer.backends.cuda.backend import CUDABackend
    return CUDABackend(exact=exact)


def greedy_ids(model, prompt, n):
    sampler = make_sampler(SamplingParams(temperature=0))
    return [s.id for s in generate_step(model, prompt, sampler, max_tokens=n)]


def test_tiny_generation_equals_cpu(tmp_path, cuda_toy_shapes):
    """Greedy generation on a 2-layer width-64 model with a 300-token vocab (tests/gguf_builder.py):
    same tokens on CUDA as on the CPU (under the simulator on CI: toy launch shapes, so spans and
    tiles are crossed)."""
    from gguf_builder import tiny_llama
    from numbaformer.backends.cpu import CPUBackend
    path = tiny_llama().write(tmp_path / "tiny.gguf")
    mf = load_model_file(path, tokenizer=False)
    prompt = [5, 17, 33]
    n_gen = 2 if not ON_GPU else 24
    cpu = greedy_ids(Model(mf, CPUBackend(), n_ctx=32, n_batch=4), prompt, n_gen)
    gpu = greedy_ids(Model(mf, cuda_backend(), n_ctx=32, n_batch=4), prompt, n_gen)
    assert gpu == cpu


def test_multi_step_greedy_equals_single_steps(tmp_path, cuda_toy_shapes):
    """decode_greedy: n steps in one replay (one CUDA graph on the GPU), each pick fed to the next
    by the device, equals n host-fed single steps, and the CPU's picks."""
    from gguf_builder import tiny_llama
    from numbaformer.backends.cpu import CPUBackend
    mf = load_model_file(tiny_llama().write(tmp_path / "tiny.gguf"), tokenizer=False)
    n = 2 if not ON_GPU else 12
    picks = []
    for ops in (CPUBackend(), cuda_backend()):
        m = Model(mf, ops, n_ctx=32, n_batch=4)
        m.forward([5, 17, 33], 0, greedy=True)
        single = [m.greedy_token()]
        for j in range(n):
            m.forward([single[-1]], 3 + j, greedy=True)
            single.append(m.greedy_token())
        assert m.decode_greedy(single[0], 3, n) == single[1:]
        if ON_GPU:                                                      # a replay of the graph
            assert m.decode_greedy(single[0], 3, n) == single[1:]
        picks.append(single)
    assert picks[0] == picks[1]


@pytest.mark.cuda
def test_sampled_chunk_ends_at_eog_as_cpu(tmp_path, cuda_toy_shapes, monkeypatch):
    """Generation with the sampling chain on the device (temperature, top-k, top-p, min-p, a
    repeat penalty, a seed): a chunk of 3 steps (8 on the GPU) in one replay picks the ids the CPU
    backend's op picks one step per replay, and an eog id picked mid-chunk ends it there: the
    ids past it are not yielded and the later steps write no cache position past the last fed
    token. On the GPU, the chunk's captured graph then serves other settings (greedy with
    penalties): replayed, not captured again."""
    import numbaformer.generate as gen
    from gguf_builder import tiny_llama
    from numbaformer.backends.cpu import CPUBackend
    mf = load_model_file(tiny_llama().write(tmp_path / "tiny.gguf"), tokenizer=False)
    p = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1,
                       seed=7)
    prompt, n = [5, 17, 33], 8 if ON_GPU else 3
    cpu_ops = CPUBackend(exact=True)
    cpu_ops.samples_on_device = True
    cpu = Model(mf, cpu_ops, n_ctx=32, n_batch=4, kv_type="f32")
    monkeypatch.setattr(gen, "DECODE_CHUNK", 1)
    ref = [s.id for s in generate_step(cpu, prompt, make_sampler(p), max_tokens=12)]
    k = next(i for i in range(2, n) if ref[i] not in ref[:i])         # mid-chunk: step i - 1
    monkeypatch.setattr(gen, "DECODE_CHUNK", n)
    from numbaformer.backends.cuda.backend import CUDABackend
    gpu = Model(mf, CUDABackend(exact=True), n_ctx=32, n_batch=4, kv_type="f32")
    got = [s.id for s in generate_step(gpu, prompt, make_sampler(p), max_tokens=12,
                                       eog_ids={ref[k]})]
    assert got == ref[:k + 1]
    written = len(prompt) + k
    keys = gpu.ops.to_host(gpu.kv.k)
    assert not keys[:, :, written:].any()
    np.testing.assert_allclose(keys[:, :, :written], cpu.kv.k[:, :, :written], atol=1e-5)
    if ON_GPU:
        p2 = SamplingParams(temperature=0.0, repeat_penalty=1.3, repeat_last_n=-1)
        monkeypatch.setattr(gen, "DECODE_CHUNK", 1)
        want = [s.id for s in generate_step(cpu, prompt, make_sampler(p2), max_tokens=1 + n)]
        monkeypatch.setattr(gen, "DECODE_CHUNK", n)
        graphs, launches = len(gpu.ops.graphs), gpu.ops.graph_launches
        assert [s.id for s in generate_step(gpu, prompt, make_sampler(p2),
                                            max_tokens=1 + n)] == want
        assert len(gpu.ops.graphs) == graphs and gpu.ops.graph_launches == launches + 1


@gpu_only
@pytest.mark.cuda
@pytest.mark.parametrize("name", [GGML_TYPES[t].name for t in DECODERS])
def test_gpu_matches_cpu_every_type(tmp_path, name):
    """Random weights of each type (a 256-wide 2-layer model, so K-quants are really K-quants):
    GPU log-probs within 5e-3 of the CPU backend's, f32 KV on both, the GPU's exact path (FP32
    prefill GEMM: the bf16 tensor-core one is held to llama.cpp's bounds instead)."""
    from numbaformer import synthetic
    from numbaformer.backends.cpu import CPUBackend
    preset = dataclasses.replace(synthetic.PRESETS["tiny-llama"], n_embd=256, n_ff=512)
    path = tmp_path / f"{name}.gguf"
    synthetic.write_synthetic(path, preset, name, name, seed=3)
    mf = load_model_file(path, tokenizer=False)
    ids = list(np.random.default_rng(0).integers(0, mf.config.n_vocab, 40))
    lc = Model(mf, CPUBackend(), n_ctx=64, n_batch=16, kv_type="f32").forward_all(ids)
    lg = Model(mf, cuda_backend(exact=True), n_ctx=64, n_batch=16, kv_type="f32").forward_all(ids)
    assert np.abs(log_softmax(lg) - log_softmax(lc)).max() <= LOGPROB_TOL


@pytest.fixture(scope="module")
def cut_model():
    path = Path(os.environ.get("NUMBAFORMER_TEST_MODEL_8L", Path(__file__).parents[1] / ".models"
                               / CUT_MODEL))
    if not ON_GPU or not path.is_file():
        pytest.skip(f"needs the GPU and the 8-block SmolLM2 cut at {path} "
                    "(shared/scripts/truncate_gguf.py)")
    mf = load_model_file(path)
    yield mf
    mf.close()


@pytest.fixture(scope="module")
def cut_reference():
    return json.loads((shared_dir() / "reference" / CUT_JSON).read_text())["results"]


@pytest.mark.cuda
@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_cut_model_vs_llamacpp(cut_model, cut_reference, kv_type):
    m = Model(cut_model, cuda_backend(), n_ctx=256, n_batch=64, kv_type=kv_type)
    v = compare(m.forward_all, cut_reference)
    print(f"\nGPU ({kv_type} KV) vs llama.cpp, SmolLM2 8-block cut: {summary(v)}")
    check_bounds(v)
    for r in cut_reference:
        ours = greedy_ids(m, r["prompt_ids"], len(r["greedy_ids"]))
        must = required_greedy_prefix(r)
        assert ours[:must] == r["greedy_ids"][:must]


@pytest.mark.cuda
def test_cut_model_gpu_vs_cpu(cut_model, cut_reference):
    """Same ids: with f32 K/V on both, GPU log-probs within 5e-3 of the CPU's. With f16 K/V (the
    GPU default, llama.cpp's) the CPU rounds K and V to f16 exactly as the GPU cache stores them,
    but a 1e-7 difference in a K value can round to the neighbouring half: storing K/V in f16 is
    itself a log-prob perturbation, measured here on the CPU as f16 vs f32 on the same ids, and
    the GPU's f16 result must stay within that perturbation of the CPU's. The GPU's exact path
    (FP32 prefill GEMM; test_cut_model_vs_llamacpp holds the default bf16 one)."""
    from numbaformer.backends.cpu import CPUBackend
    worst = {}
    for kv in ("f32", "f16"):
        gpu = Model(cut_model, cuda_backend(exact=True), n_ctx=256, n_batch=64, kv_type=kv)
        cpu = Model(cut_model, CPUBackend(), n_ctx=256, n_batch=64, kv_type=kv)
        cpu32 = Model(cut_model, CPUBackend(), n_ctx=256, n_batch=64, kv_type="f32")
        w = [0.0, 0.0]
        for r in cut_reference:
            ids = teacher_ids(r)
            lc = log_softmax(cpu.forward_all(ids))
            w[0] = max(w[0], np.abs(log_softmax(gpu.forward_all(ids)) - lc).max())
            w[1] = max(w[1], np.abs(lc - log_softmax(cpu32.forward_all(ids))).max())
        worst[kv] = w
        print(f"\nGPU vs CPU ({kv} KV), SmolLM2 8-block cut: max |dlogprob| {w[0]:.2e} "
              f"(f16 storage itself moves the CPU's by {w[1]:.2e})")
    assert worst["f32"][0] <= LOGPROB_TOL
    assert worst["f16"][0] <= max(LOGPROB_TOL, worst["f16"][1])


def decode_all(m):
    """forward_all through the decode path: the tokens one at a time (the mat-vec kernels and the
    decode graph), the logits of every position."""
    def run(ids):
        out = np.empty((len(ids), m.cfg.n_vocab), dtype=np.float32)
        for p, t in enumerate(ids):
            out[p] = m.ops.to_host(m.forward([t], p))[0]
        return out
    return run


def kl_and_agreement(fast_all, exact_all, results, what: str):
    """Per position of every result's teacher ids: KL(exact || fast) of the two forwards'
    distributions and whether their argmax agree; printed with `what`, returned (mean KL, top-1
    agreement)."""
    kl, agree = [], []
    for r in results:
        ids = teacher_ids(r)
        lq = log_softmax(fast_all(ids))
        le = log_softmax(exact_all(ids))
        kl.extend(np.sum(np.exp(le) * (le - lq), axis=1))
        agree.extend(lq.argmax(1) == le.argmax(1))
    print(f"\n{what}: mean KL {np.mean(kl):.2e} nats, max {np.max(kl):.2e}; top-1 agreement "
          f"{np.mean(agree):.1%} of {len(kl)} positions")
    return float(np.mean(kl)), float(np.mean(agree))


@pytest.mark.cuda
def test_cut_model_decode_fidelity(cut_model, cut_reference):
    """The fast decode path (8-bit activations) on the 8-block cut: within llama.cpp's calibrated
    bounds, and against the exact path (the CPU backend, f32 activations, same ids, f32 K/V): mean
    KL divergence <= 0.005 nats and top-1 agreement >= 98 %."""
    from numbaformer.backends.cpu import CPUBackend
    from numbaformer.backends.cuda.backend import CUDABackend
    fast = Model(cut_model, CUDABackend(), n_ctx=256, n_batch=64, kv_type="f32")
    exact = Model(cut_model, CPUBackend(), n_ctx=256, n_batch=64, kv_type="f32")
    v = compare(decode_all(fast), cut_reference)
    print(f"\nGPU decode (q8 activations) vs llama.cpp, SmolLM2 8-block cut: {summary(v)}")
    check_bounds(v)
    kl, agree = kl_and_agreement(decode_all(fast), exact.forward_all, cut_reference,
                                 "q8 decode vs exact (CPU)")
    assert kl <= 0.005 and agree >= 0.98


@pytest.mark.cuda
def test_cut_model_prefill_fidelity(cut_model, cut_reference):
    """The tensor-core prefill (bf16 GEMM, flash attention) against the exact path (FP32 GEMM and
    attention) on the same ids, both with f16 K/V so that only the prefill arithmetic differs: mean
    KL divergence <= 0.005 nats and top-1 agreement >= 98 %. Then the prompt prefilled and decoded
    gives the greedy text of the prompt fed one token at a time (n_batch 1: the decode path only),
    up to the first near-tie of the decode-only run (top-2 logit gap < NEAR_TIE)."""
    from llamacpp_check import NEAR_TIE, top2_gap

    from numbaformer.backends.cuda.backend import CUDABackend
    fast = Model(cut_model, CUDABackend(), n_ctx=256, n_batch=64, kv_type="f16")
    exact = Model(cut_model, CUDABackend(exact=True), n_ctx=256, n_batch=64, kv_type="f16")
    kl, agree = kl_and_agreement(fast.forward_all, exact.forward_all, cut_reference,
                                 "tensor-core prefill vs exact (GPU, f16 KV)")
    assert kl <= 0.005 and agree >= 0.98
    one = Model(cut_model, CUDABackend(), n_ctx=256, n_batch=1, kv_type="f16")
    compared = 0
    for r in cut_reference:
        n_gen = len(r["greedy_ids"])
        want = greedy_ids(one, r["prompt_ids"], n_gen)
        gaps = top2_gap(decode_all(one)(r["prompt_ids"] + want[:-1]))[len(r["prompt_ids"]) - 1:]
        must = next((j for j, g in enumerate(gaps) if g < NEAR_TIE), n_gen)
        assert greedy_ids(fast, r["prompt_ids"], n_gen)[:must] == want[:must]
        compared += must
    print(f"prefill + decode = decode alone on {compared} greedy tokens before the near-ties")
    assert compared > 0


@pytest.mark.skipif(ON_GPU, reason="the simulator's backend selection")
@pytest.mark.parametrize("exact", [False, True])
def test_exact_reaches_the_cuda_backend(monkeypatch, exact):
    """--exact (load_engine(exact=...)) selects the f32 mat-vec path of the CUDA backend."""
    from numbaformer.backends import select_backend
    from numbaformer.backends.cuda.backend import CUDABackend
    monkeypatch.setenv("NUMBAFORMER_ALLOW_CUDASIM", "1")
    monkeypatch.delenv("CUDA_FORCE_CPU", raising=False)
    be = select_backend("cuda", exact=exact, quiet=True)
    assert isinstance(be, CUDABackend) and be.exact is exact and be.stats()["exact"] is exact
