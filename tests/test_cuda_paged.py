"""The paged KV cache on the CUDA backend (backends/cuda/paged.py): K/V stores through a slot mapping,
attention through block tables against tests/reference.py (float64), Model.forward_batch against
separate single-sequence forwards and the CPU backend, and the engine loop.

Under the simulator (CI) at toy sizes, with the block size, threads, spans and rows per launch made
small so that toy contexts cross paged blocks, spans, key chunks and launches. With
NUMBAFORMER_TEST_GPU=1 on the lent GPU (`pytest -m cuda`), the op checks run at real sizes (the 8B
shape: 32 heads, 8 KV heads, head dim 128, blocks of 64, contexts to 4096).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import reference as R
from ptx_tools import offline_ptx, ptxas_info

from numbaformer.backends.base import RopeParams
from numbaformer.blocks import BlockManager
from numbaformer.kvcache import KVCache
from numbaformer.loader import load_model_file
from numbaformer.model import Model
from numbaformer.scheduler import Scheduler, Sequence

ON_GPU = os.environ.get("NUMBAFORMER_TEST_GPU") == "1"
pytestmark = pytest.mark.cuda if ON_GPU else []
# model-level cases that CI's simulator leaves to the GPU run (minutes each there, on 2 cores;
# the f16 forward_batch case and the same-bits case stand for them under the simulator)
GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="minutes under the simulator: the GPU run's")


@pytest.fixture
def cu(cuda_toy_shapes):
    """A CUDA backend; under the simulator its kernels' threads one warp (conftest.py)."""
    from numbaformer.backends.cuda.backend import CUDABackend
    return CUDABackend()


def dev(be, a):
    return be.to_device(np.ascontiguousarray(a))


class Cfg:
    def __init__(self, n_kv, head_dim, n_layer=2):
        self.n_layer, self.n_head_kv, self.head_dim = n_layer, n_kv, head_dim


def paged_cache(be, n_kv, hd, kv_type, n_blocks, block_size, n_ctx):
    """A 2-layer KVCache of n_blocks blocks of block_size (zeros)."""
    return KVCache(be, Cfg(n_kv, hd), n_ctx, kv_type, n_blocks, block_size)


def layout(lengths, block_size, n_blocks, max_blocks, seed):
    """Block tables (n_seqs, max_blocks) int32 (-1 padded) for sequences of these lengths, their
    blocks drawn in random order from the pool."""
    free = list(np.random.default_rng(seed).permutation(n_blocks))
    tables = np.full((len(lengths), max_blocks), -1, np.int32)
    for i, n in enumerate(lengths):
        for b in range(-(-n // block_size)):
            tables[i, b] = free.pop()
    return tables


def slots_of(tables, row_seq, pos, B):
    return (tables[row_seq, pos // B] * B + pos % B).astype(np.int32)


# --- K/V stores through the slot mapping -----------------------------------------------------------

@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_kv_store_writes_at_slots_and_padding_nowhere(cu, kv_type):
    n_kv, hd, B, n_blocks = (2, 16, 4, 6) if not ON_GPU else (8, 128, 64, 64)
    cache = paged_cache(cu, n_kv, hd, kv_type, n_blocks, B, n_blocks * B)
    rng = np.random.default_rng(0)
    n = 7 if not ON_GPU else 300
    slots = rng.permutation(n_blocks * B)[:n].astype(np.int32)
    slots[[1, n - 2]] = -1                                   # padding rows
    k = rng.standard_normal((n, n_kv * hd)).astype(np.float32)
    v = rng.standard_normal((n, n_kv * hd)).astype(np.float32)
    view = cache.paged(dev(cu, slots), None, None)
    cu.kv_store(view, 1, dev(cu, k), dev(cu, v), dev(cu, np.zeros(n, np.int32)))
    dt = np.float16 if kv_type == "f16" else np.float32
    for got, x in ((cu.to_host(cache.k), k), (cu.to_host(cache.v), v)):
        want = np.zeros(cache.shape, dt)
        keep = slots >= 0
        want[1][:, slots[keep]] = x[keep].reshape(-1, n_kv, hd).transpose(1, 0, 2)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("neox", [False, True])
def test_rope_store_through_slots(cu, neox):
    """Rope at each row's position (not its slot), K/V at its slot, padding rows stored nowhere."""
    n_q, n_kv, hd, B, n_blocks = (4, 2, 16, 4, 6) if not ON_GPU else (32, 8, 128, 64, 64)
    rp = RopeParams(hd, hd, 10000.0, 1.0, neox)
    cache = paged_cache(cu, n_kv, hd, "f32", n_blocks, B, n_blocks * B)
    rng = np.random.default_rng(1)
    n = 5 if not ON_GPU else 200
    pos = rng.integers(0, 4 * B, n).astype(np.int32)
    slots = rng.permutation(n_blocks * B)[:n].astype(np.int32)
    slots[2] = -1
    q = rng.standard_normal((n, n_q * hd)).astype(np.float32)
    k = rng.standard_normal((n, n_kv * hd)).astype(np.float32)
    v = rng.standard_normal((n, n_kv * hd)).astype(np.float32)
    dq, dk = dev(cu, q), dev(cu, k)
    inv = rp.inv_freq()
    cu.rope_store(dq, dk, dev(cu, v), dev(cu, pos), cache.paged(dev(cu, slots), None, None), 0,
                  dev(cu, inv), rp)
    qr = R.rope(q, pos, n_q, hd, hd, inv, neox)
    kr = R.rope(k, pos, n_kv, hd, hd, inv, neox)
    np.testing.assert_allclose(cu.to_host(dq), qr, rtol=0, atol=1e-5)
    got_k, got_v = cu.to_host(cache.k)[0], cu.to_host(cache.v)[0]
    for t in range(n):
        if slots[t] < 0:
            continue
        np.testing.assert_allclose(got_k[:, slots[t]].reshape(-1), kr[t], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got_v[:, slots[t]].reshape(-1), v[t])
    written = np.zeros(n_blocks * B, bool)
    written[slots[slots >= 0]] = True
    assert not got_k[:, ~written].any() and not got_v[:, ~written].any()


# --- attention through block tables ------------------------------------------------------------------

# (cached prefix, rows this step) per sequence: decode rows (1) and prefill chunks, contexts that
# end inside a block, on a block's last slot, and a lone first token
TOY_SEQS = [(9, 1), (2, 3), (0, 1), (7, 1), (3, 5), (33, 2)]
REAL_SEQS = [(700, 1), (1000, 77), (0, 1), (4095, 1), (63, 1), (64, 1), (0, 130), (2000, 1)]


def attention_case(cu, kv_type, seqs, B, n_blocks, n_ctx, seed=0):
    """A paged cache holding every position of the sequences (stored through the slot mapping,
    prefix and step in two stores, with a padding row), the step's rows (q, pos, row_seq), and
    the float64 reference output of each row."""
    n_q, n_kv, hd = (4, 2, 16) if not ON_GPU else (32, 8, 128)
    cache = paged_cache(cu, n_kv, hd, kv_type, n_blocks, B, n_ctx)
    max_blocks = n_ctx // B
    lengths = [c + r for c, r in seqs]
    tables = layout(lengths, B, n_blocks, max_blocks, seed)
    rng = np.random.default_rng(seed)
    ramp = 1 + 2 * np.arange(max(lengths))[:, None] / max(lengths)   # later keys score higher:
    ks = [(rng.standard_normal((n, n_kv * hd)) * ramp[:n]).astype(np.float32)  # new maxima in
          for n in lengths]                                           # later key chunks
    vs = [rng.standard_normal((n, n_kv * hd)).astype(np.float32) for n in lengths]
    if kv_type == "f16":                      # the reference sees what the cache holds
        ks = [k.astype(np.float16).astype(np.float32) for k in ks]
        vs = [v.astype(np.float16).astype(np.float32) for v in vs]
    for part in (0, 1):                       # the cached prefixes, then the step's rows
        sel = [np.arange(c) if part == 0 else np.arange(c, c + r) for c, r in seqs]
        row_seq = np.concatenate([np.full(len(s), i, np.int32) for i, s in enumerate(sel)])
        pos = np.concatenate(sel).astype(np.int32)
        k = np.concatenate([ks[i][s] for i, s in enumerate(sel)] + [np.ones((1, n_kv * hd))])
        v = np.concatenate([vs[i][s] for i, s in enumerate(sel)] + [np.ones((1, n_kv * hd))])
        slots = np.concatenate([slots_of(tables, row_seq, pos, B), [-1]]).astype(np.int32)
        view = cache.paged(dev(cu, slots), None, None)
        cu.kv_store(view, 1, dev(cu, k.astype(np.float32)), dev(cu, v.astype(np.float32)),
                    dev(cu, np.zeros(len(slots), np.int32)))
    q = rng.standard_normal((len(pos), n_q * hd)).astype(np.float32)
    ref = np.stack([R.attention(q[t:t + 1], ks[row_seq[t]][:pos[t] + 1],
                                vs[row_seq[t]][:pos[t] + 1], pos[t:t + 1],
                                np.arange(pos[t] + 1), n_q, n_kv, hd)[0]
                    for t in range(len(pos))])
    return cache, tables, q, pos, row_seq, ref


def run_attention(cu, cache, tables, q, pos, row_seq):
    out = cu.alloc(q.shape)
    view = cache.paged(cu.alloc(1, np.int32), dev(cu, tables), dev(cu, row_seq))
    cu.attention(out, dev(cu, q), view, 1, dev(cu, pos), 1 / np.sqrt(cache.shape[3]))
    return cu.to_host(out)


# (block size, MAX_SPANS, ROWS_PER_LAUNCH) under the simulator: a span per paged block (merges
# of up to 9 spans); 3 blocks per span, 2 rows per launch; one span of 6 blocks read in key chunks
# of 32 lanes (the running max and sum across chunks), 3 rows per launch
TOY_SPLITS = [(4, 32, 64), (8, 2, 2), (8, 1, 3)]


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
@pytest.mark.parametrize("split", TOY_SPLITS if not ON_GPU else [(64, 32, 64), (64, 8, 3)])
def test_paged_attention_against_float64(cu, monkeypatch, kv_type, split):
    from numbaformer.backends.cuda import paged
    B, spans, rows = split
    monkeypatch.setattr(paged, "MAX_SPANS", spans)
    monkeypatch.setattr(paged, "ROWS_PER_LAUNCH", rows)
    seqs = TOY_SEQS if not ON_GPU else REAL_SEQS
    n_ctx = 48 if not ON_GPU else 4096
    n_blocks = sum(-(-(c + r) // B) for c, r in seqs) + 2
    cache, tables, q, pos, row_seq, ref = attention_case(cu, kv_type, seqs, B, n_blocks, n_ctx)
    got = run_attention(cu, cache, tables, q, pos, row_seq)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)


def test_paged_attention_same_bits_alone_or_batched(cu):
    """Each sequence's rows alone (its own one-row table) give the bits they give in the batch."""
    seqs = TOY_SEQS[:3] if not ON_GPU else REAL_SEQS
    B, n_ctx = (4, 48) if not ON_GPU else (64, 4096)
    n_blocks = sum(-(-(c + r) // B) for c, r in seqs)
    cache, tables, q, pos, row_seq, _ = attention_case(cu, "f16", seqs, B, n_blocks, n_ctx, 3)
    together = run_attention(cu, cache, tables, q, pos, row_seq)
    for i in range(len(seqs)):
        mine = row_seq == i
        alone = run_attention(cu, cache, tables[i:i + 1], q[mine], pos[mine],
                              np.zeros(mine.sum(), np.int32))
        np.testing.assert_array_equal(alone, together[mine])


def test_gather_rows(cu):
    x = np.random.default_rng(2).standard_normal((7, 40)).astype(np.float32)
    idx = np.array([6, 0, 3, 3], np.int32)
    out = cu.alloc((4, 40))
    cu.gather_rows(out, dev(cu, x), dev(cu, idx))
    np.testing.assert_array_equal(cu.to_host(out), x[idx])


# --- the model: forward_batch against separate forwards, the CPU, and the engine ---------------------

def tiny_mf(tmp_path):
    from gguf_builder import tiny_llama
    return load_model_file(tiny_llama().write(tmp_path / "tiny.gguf"), tokenizer=False)


@pytest.fixture
def toy_model_shapes(cuda_toy_shapes, monkeypatch):
    """Under the simulator, spans of 2 blocks of 4 in the model tests (contexts of 32: 4 spans, not
    8, so fewer simulated blocks that only exit; sequences still cross blocks and spans)."""
    if not ON_GPU:
        from numbaformer.backends.cuda import paged
        monkeypatch.setattr(paged, "MAX_SPANS", 4)


def run_steps(model, prompts, max_tokens, B, n_blocks, budget):
    """Greedy generation of prompts together through forward_batch (scheduler, block manager of
    n_blocks blocks of B): {seq index: [(token ids run so far, the logits of the last)]}."""
    sched = Scheduler(BlockManager(n_blocks, B), model.n_ctx, model.max_seqs, budget)
    seqs = [Sequence(p, max_tokens=max_tokens) for p in prompts]
    for s in seqs:
        sched.add(s)
    index = {s.seq_id: i for i, s in enumerate(seqs)}
    got = {i: [] for i in range(len(prompts))}
    while not sched.is_finished():
        batch = sched.schedule()
        logits = model.forward_batch(batch)
        toks = []
        for i, (s, e) in enumerate(zip(batch.seqs, batch.emits)):
            if e:
                got[index[s.seq_id]].append((list(s.token_ids), logits[i]))
            toks.append(int(np.argmax(logits[i])) if e else -1)
        sched.postprocess(batch, toks)
    return got


PROMPTS = [[5, 17, 33, 40, 41, 90, 7], [250, 3], [11], [60, 61, 62, 63, 64]]


@pytest.mark.parametrize("kv_type", [pytest.param("f32", marks=GPU_ONLY), "f16"])
def test_forward_batch_equals_separate_forwards(tmp_path, toy_model_shapes, kv_type):
    """Exact path (FP32 GEMM): each sequence's logits at each step of a batched greedy generation
    (blocks of 4: prompts and decodes cross blocks; a budget of 6 rows: prompts chunked, the 4th
    sequence admitted when one finishes) equal a single-sequence forward over the same ids (its
    prefill: the plain cache and its kernels; within float32 rounding with an f32 cache, within
    the f16 rounding of K/V computed in another order with an f16 cache) and the CPU backend's
    forward_batch."""
    from numbaformer.backends.cpu import CPUBackend
    from numbaformer.backends.cuda.backend import CUDABackend
    mf = tiny_mf(tmp_path)
    n_gen = 2 if not ON_GPU else 12
    gpu = Model(mf, CUDABackend(exact=True), n_ctx=32, n_batch=6, kv_type=kv_type, max_seqs=3,
                kv_blocks=16, block_size=4)
    got = run_steps(gpu, PROMPTS, n_gen, 4, 16, 6)
    cpu = Model(mf, CPUBackend(exact=True), n_ctx=32, n_batch=6, kv_type=kv_type, max_seqs=3,
                kv_blocks=16, block_size=4)
    want = run_steps(cpu, PROMPTS, n_gen, 4, 16, 6)
    single = Model(mf, CUDABackend(exact=True), n_ctx=32, n_batch=32, kv_type=kv_type)
    tol = 1e-4 if kv_type == "f32" else 2e-2
    for i in range(len(PROMPTS)):
        assert [ids for ids, _ in got[i]] == [ids for ids, _ in want[i]]
        every = single.forward_all(got[i][-1][0])               # each position's logits
        for (ids, lg), (_, lc) in zip(got[i], want[i]):
            assert np.abs(R.log_softmax(lg) - R.log_softmax(every[len(ids) - 1])).max() <= tol
            assert np.abs(R.log_softmax(lg) - R.log_softmax(lc)).max() <= tol


def test_forward_batch_same_bits_alone_or_batched(tmp_path, toy_model_shapes, record_figure):
    """The default path (f16 cache; on the GPU the bf16 tensor-core GEMM): a sequence's logits are
    the same bits alone or in a batch (a batch's lone decode row included: every row of a batched
    step takes the batched products; three sequences' decode-only steps padded to the graph
    bucket of 4, alone to that of 1); on the GPU within the bf16 GEMM's rounding of the exact
    path's."""
    from numbaformer.backends.cuda.backend import CUDABackend
    mf = tiny_mf(tmp_path)
    ops = CUDABackend()
    model = Model(mf, ops, n_ctx=32, n_batch=6, max_seqs=4, kv_blocks=16, block_size=4)
    n_gen = 2 if not ON_GPU else 8
    together = run_steps(model, PROMPTS[:3], n_gen, 4, 16, 6)
    worst = 0.0
    for i, p in enumerate(PROMPTS[:3]):
        alone = run_steps(model, [p], n_gen, 4, 16, 6)[0]
        assert [ids for ids, _ in alone] == [ids for ids, _ in together[i]]
        for (_, a), (_, b) in zip(alone, together[i]):
            np.testing.assert_array_equal(a, b)
    if not ON_GPU:        # the simulator's default path is the FP32 GEMM (no tensor cores)
        return
    exact = Model(mf, CUDABackend(exact=True), n_ctx=32, n_batch=6, max_seqs=3, kv_blocks=16,
                  block_size=4)
    exact_run = run_steps(exact, PROMPTS[:3], n_gen, 4, 16, 6)
    for i in range(3):
        for (_, a), (_, b) in zip(together[i], exact_run[i]):
            worst = max(worst, np.abs(R.log_softmax(a) - R.log_softmax(b)).max())
    record_figure("CUDA forward_batch, bf16 GEMM vs exact, tiny model", f"{worst:.1e}")
    assert worst <= 5e-2


@pytest.mark.parametrize("max_seqs", [4, 3])
def test_batch_steps_give_the_single_steps_picks(tmp_path, toy_model_shapes, max_seqs):
    """Model.run_batch_steps (the engine's several greedy decode steps a replay, each step's
    picks fed to the next on the device by advance_rows, the slot through the block table) gives
    the picks of as many single run_batch steps: three sequences in the graph bucket of 4 (a
    padding row), the first one's positions crossing a block of 4 inside the chunk; with
    max_seqs 3 the 3 rows have no bucket and the steps are launched directly (the H200 run found
    them refused: the engine's batches of max_seqs 3 failed). Under the simulator on the exact
    path (the FP32 GEMM's products: the steps' scheduling, feeding and slots are the same code;
    the fast decode rows, ~4 minutes a case there in their warp reductions, have their own bit
    tests in test_cuda_ops.py); on the GPU the default path."""
    from numbaformer.backends.cuda.backend import CUDABackend
    mf = tiny_mf(tmp_path)
    ops = CUDABackend(exact=not ON_GPU)
    outs = []
    for several in (True, False):
        model = Model(mf, ops, n_ctx=32, n_batch=6, max_seqs=max_seqs, kv_blocks=16,
                      block_size=4)
        bm = BlockManager(16, 4)
        sched = Scheduler(bm, model.n_ctx, model.max_seqs, 6)
        seqs = [Sequence(p, max_tokens=3, stop_ids=frozenset()) for p in PROMPTS[:3]]
        for q in seqs:
            sched.add(q)
        while sched.waiting or any(q.in_prompt for q in sched.running):
            batch = sched.schedule()
            model.run_batch(batch)
            toks = model.batch_greedy_ids(len(batch.seqs))
            sched.postprocess(batch, [int(t) if e else -1 for t, e in zip(toks, batch.emits)])
        if several:
            batch, k = sched.schedule_steps(4)
            assert k == 2 and batch.n_rows == 3 and batch.pos[0] == 7
            sched.postprocess_steps(batch, model.run_batch_steps(batch, k))
        else:
            for _ in range(2):
                batch = sched.schedule()
                model.run_batch(batch)
                sched.postprocess(batch, [int(t) for t in model.batch_greedy_ids(3)])
        assert [len(q.output_ids) for q in seqs] == [3, 3, 3]
        outs.append([q.output_ids for q in seqs])
        bm.check()
    assert outs[0] == outs[1]


def test_advance_rows_kernel_against_the_host_rule(cu):
    """paged.advance_rows (the device's step-to-step feed of a batch) against the base backend's
    host rule: real rows take their pick, one position on, the slot through their table (-1 past
    the table's width or at a missing block); padding rows (slot -1) untouched."""
    from numbaformer.backends.base import Backend
    from numbaformer.backends.cuda import paged as P
    rng = np.random.default_rng(9)
    n, B = 7, 4
    tables = np.array([[3, 0, 5, -1], [1, 2, -1, -1], [4, 6, 7, 8]], np.int32)
    row_seq = np.array([0, 1, 2, 0, 2, 1, 0], np.int32)
    pos = np.array([2, 3, 6, 7, 15, 7, 0], np.int32)
    slots = (tables[row_seq, pos // B] * B + pos % B).astype(np.int32)
    slots[6] = -1                                            # a padding row
    ids = rng.integers(0, 100, n).astype(np.int32)
    picks = rng.integers(0, 100, n).astype(np.int32)
    want = [a.copy() for a in (ids, pos, slots)] + [np.full((2, n), -7, np.int32)]
    Backend.advance_rows(None, *want[:3], tables, row_seq, picks, want[3], 1, B)
    got = [dev(cu, a) for a in (ids, pos, slots, np.full((2, n), -7, np.int32))]
    P.advance_rows(*got[:3], dev(cu, tables), dev(cu, row_seq), dev(cu, picks), got[3], 1, B,
                   cu.stream)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(cu.to_host(g), w)
    assert want[2][4] == -1 and want[2][5] == -1 and want[2][0] == 3 * B + 3   # past, missing
    assert want[1][6] == 0 and want[3][1, 6] == -7                              # padding


@GPU_ONLY
def test_engine_on_cuda_gives_each_solo_greedy_text(tmp_path, toy_model_shapes):
    """Engine.add_request/step on the CUDA backend (its default f16 cache, blocks of 64): three
    sequences together give the greedy text each gives alone, and every block comes back."""
    from numbaformer.backends.cuda.backend import CUDABackend
    from numbaformer.engine import Engine
    mf = tiny_mf(tmp_path)
    ops = CUDABackend()
    base = Model(mf, ops, n_ctx=32, n_batch=4)
    n_gen = 2 if not ON_GPU else 10

    def run(prompts):
        e = Engine(mf, base, 0.0)
        e.start_batching(max_seqs=3, max_batched_tokens=8, kv_blocks=4)
        ids = [e.add_request(p, max_tokens=n_gen, stop_ids=()) for p in prompts]
        seqs = [e.batching.seqs[i] for i in ids]
        while e.has_unfinished():
            e.step()
        assert e.batching.blocks.n_free == 4
        e.batching.blocks.check()
        assert e.batching.model.kv.kv_type == "f16" and e.batching.model.w is base.w
        return [s.output_ids for s in seqs]

    together = run(PROMPTS[:3])
    assert together == [run([p])[0] for p in PROMPTS[:3]]
    assert all(len(t) == n_gen for t in together)


def test_engine_on_cuda_samples_a_batchs_rows_as_the_host(tmp_path, toy_model_shapes,
                                                           monkeypatch):
    """Engine.step on the CUDA backend with three sampled sequences (one with a frequency
    penalty) beside a greedy one: the sampled rows are picked on the device, all in one launch a
    step (Model.batch_sample_ids), each pick the host sampler's on the same logits row and
    history (checked at every call); every block back. (Under the simulator on the exact path:
    the sampling is what is tested, the products have their own tests.)"""
    from numbaformer import engine as E
    from numbaformer.backends.cuda.backend import CUDABackend
    from numbaformer.sampling import SamplingParams, make_sampler
    mf = tiny_mf(tmp_path)
    base = Model(mf, CUDABackend(exact=not ON_GPU), n_ctx=32, n_batch=8)
    n_gen = 2 if not ON_GPU else 12
    params = [None, SamplingParams(seed=1), SamplingParams(temperature=1.5, top_k=0, top_p=0.9,
                                                           min_p=0.0, seed=2),
              SamplingParams(temperature=0.9, frequency_penalty=1.5, repeat_penalty=1.3,
                             seed=3)]
    calls = []
    real = Model.batch_sample_ids

    def spy(model, rows, samplers, index, histories):
        logits = model.ops.to_host(model.buf.batch_logits)
        got = real(model, rows, samplers, index, histories)
        calls.append(sorted(s.params.seed for s in samplers))
        assert [s(logits[r].copy(), list(h), i)
                for r, s, i, h in zip(rows, samplers, index, histories)] == got.tolist()
        return got
    monkeypatch.setattr(Model, "batch_sample_ids", spy)
    monkeypatch.setattr(E, "DEVICE_ROWS_SAMPLING", True)
    e = E.Engine(mf, base, 0.0)
    e.start_batching(max_seqs=4, max_batched_tokens=8, kv_blocks=8)
    ids = [e.add_request(p, max_tokens=n_gen, stop_ids=(), sampler=make_sampler(sp) if sp else None)
           for p, sp in zip(PROMPTS, params)]
    seqs = [e.batching.seqs[i] for i in ids]
    while e.has_unfinished():
        e.step()
    assert e.batching.blocks.n_free == 8
    assert all(len(s.output_ids) == n_gen for s in seqs)
    assert calls and all(set(c) <= {1, 2, 3} for c in calls)       # never the greedy one
    assert [1, 2, 3] in calls                                       # all three in one launch


# --- offline compile ------------------------------------------------------------------------------

@pytest.mark.skipif(ON_GPU, reason="an offline check (CI); the GPU run compiles them for real")
@pytest.mark.parametrize("hd,group", [(64, 3), (128, 4)])
def test_ptx_paged_kernels(hd, group, record_figure):
    """The paged kernels at their real launch shapes (blocks of 64, f16 and f32 caches) compile to
    PTX for sm_90, and where ptxas is installed assemble without spilling."""
    ptx = offline_ptx(f"""
from numbaformer.backends.cuda import paged as P
A = types.Array
f16 = types.float16
i64 = types.int64
for name, ct in (("f16", f16), ("f32", f32)):
    sig = (A(f32, 2, "C"), A(f32, 4, "C"), A(f32, 4, "C"), A(i32, 2, "C"), A(f32, 2, "C"),
           A(ct, 4, "C"), A(ct, 4, "C"), i64, A(i32, 1, "C"), A(i32, 2, "C"), A(i32, 1, "C"),
           i64, f32)
    k = P._attention_kernel(P.PAGED_THREADS // 32, {hd}, {group}, name == "f16", 64, 64)
    ptx["attn_" + name] = compile(k, sig)
    ptx["store_" + name] = compile(P._kv_store_kernel, (A(ct, 4, "C"), A(ct, 4, "C"), i64,
                                   A(f32, 2, "C"), A(f32, 2, "C"), A(i32, 1, "C")))
    ptx["rope_" + name] = compile(P._rope_store_kernel(P.STORE_THREADS, {hd // 2}), (
        A(f32, 2, "C"), A(f32, 2, "C"), A(f32, 2, "C"), A(ct, 4, "C"), A(ct, 4, "C"), i64,
        A(i32, 1, "C"), A(i32, 1, "C"), i64, A(types.float64, 1, "C"), types.boolean))
ptx["gather"] = compile(P._gather_rows_kernel, (A(f32, 2, "C"), A(f32, 2, "C"), A(i32, 1, "C")))
""")
    assert "shfl.sync.bfly" in ptx["attn_f16"] and "atom.global.add" in ptx["attn_f16"]
    for name, text in ptx.items():
        info = ptxas_info(text)
        if info is None:
            pytest.skip("no ptxas: PTX checked, registers and spills not")
        if name.startswith("attn"):
            record_figure(f"paged attention hd {hd} group {group} {name} (sm_90, ptxas)",
                          f"{info['registers']} regs, stack {info['stack']} B")
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (name, info)


def test_forward_batch_refuses_a_bad_table_before_any_kernel(tmp_path, cuda_toy_shapes):
    """A block id past the pool (which a kernel would read out of bounds) is a ValueError from
    forward_batch, with nothing launched."""
    import dataclasses

    from numbaformer.backends.cuda.backend import CUDABackend
    model = Model(tiny_mf(tmp_path), CUDABackend(), n_ctx=32, n_batch=6, max_seqs=3, kv_blocks=16,
                  block_size=4)
    sched = Scheduler(BlockManager(16, 4), 32, 3, 6)
    sched.add(Sequence([5, 17, 33]))
    batch = sched.schedule()
    tables = batch.tables.copy()
    tables[0, 0] = 16
    with pytest.raises(ValueError, match="block id"):
        model.forward_batch(dataclasses.replace(batch, tables=tables))


@pytest.mark.skipif(not ON_GPU, reason="times the kernel on the GPU")
def test_paged_decode_attention_time(cu, record_figure):
    """Microseconds of one layer's batched decode attention (8B shape: 32 heads, 8 KV heads, head
    dim 128, f16 cache, blocks of 64) at 1 / 4 / 16 / 64 rows of 1024-position contexts, with the
    K/V bytes read per second; the single-sequence decode kernel at one row beside it."""
    n_q, n_kv, hd, B, ctx = 32, 8, 128, 64, 1024
    cache = KVCache(cu, Cfg(n_kv, hd, n_layer=1), 4096, "f16", 64 * ctx // B, B)
    scale = 1 / np.sqrt(hd)
    for rows in (1, 4, 16, 64):
        tables = layout([ctx] * rows, B, 64 * ctx // B, 4096 // B, seed=rows)
        q = cu.to_device(np.random.default_rng(0).standard_normal((rows, n_q * hd), np.float32))
        pos = cu.to_device(np.full(rows, ctx - 1, np.int32))
        view = cache.paged(cu.alloc(rows, np.int32), dev(cu, tables),
                           dev(cu, np.arange(rows, dtype=np.int32)))
        out = cu.alloc((rows, n_q * hd))
        cu.attention(out, q, view, 0, pos, scale)
        us = cu.time_us(lambda: cu.attention(out, q, view, 0, pos, scale), reps=50)
        gbs = rows * ctx * n_kv * hd * 2 * 2 / us / 1e3
        record_figure(f"paged decode attention, {rows} rows x {ctx} positions",
                      f"{us:.1f} us ({gbs:.0f} GB/s of K/V)")
        assert us < 5000
    plain = KVCache(cu, Cfg(n_kv, hd, n_layer=1), 4096, "f16")
    q = cu.to_device(np.random.default_rng(0).standard_normal((1, n_q * hd), np.float32))
    pos = cu.to_device(np.array([ctx - 1], np.int32))
    out = cu.alloc((1, n_q * hd))
    cu.attention(out, q, plain, 0, pos, scale)
    us = cu.time_us(lambda: cu.attention(out, q, plain, 0, pos, scale), reps=50)
    record_figure(f"single-sequence decode attention, 1 row x {ctx} positions", f"{us:.1f} us")
