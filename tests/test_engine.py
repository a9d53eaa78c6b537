"""The batched engine on the CPU (SmolLM2): a batch's rows give the bits each sequence gives alone
and the single-sequence prefill's bits; 16 sequences of different lengths together give each one's
solo greedy text; a prefix-cache hit gives the cold prefill's logits; after warmup_batching, a
server's mix of steps loads no kernel."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from numbaformer.engine import Engine
from numbaformer.model import Model
from numbaformer.sampling import SamplingParams, make_sampler


def fresh(engine, max_seqs=4, max_batched_tokens=128, kv_blocks=24) -> Engine:
    """An Engine over the session's model and weights with a batched path of its own."""
    e = Engine(engine.mf, engine.model, 0.0)
    e.start_batching(max_seqs, max_batched_tokens, kv_blocks)
    return e


def prompts(engine, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(100, engine.config.n_vocab - 100, n)) for n in lengths]


def first_logits(e, prompt_list):
    """Each prompt's last-token logits from one step that prefills them all."""
    for p in prompt_list:
        e.add_request(p, max_tokens=1)
    b = e.batching
    batch = b.scheduler.schedule()
    assert batch.rows == [len(p) for p in prompt_list]
    out = b.model.forward_batch(batch)
    b.scheduler.postprocess(batch, [0] * len(prompt_list))
    return out


def test_batched_prefill_equals_separate_and_the_plain_path(engine):
    ps = prompts(engine, [1, 7, 70])
    together = first_logits(fresh(engine), ps)
    for i, p in enumerate(ps):
        alone = first_logits(fresh(engine), [p])
        assert np.array_equal(together[i], alone[0])
    plain = Model(engine.mf, engine.backend, n_ctx=128)
    assert np.array_equal(together[2], engine.backend.to_host(plain.forward(ps[2], 0))[0])


def test_batched_decode_rows_equal_the_plain_decode_steps(engine):
    """Decode rows (the decode product) beside a prompt chunk (the prefill product) give the
    single-sequence path's decode-step logits bit for bit."""
    ps = prompts(engine, [5, 12, 40], seed=4)
    e = fresh(engine, max_batched_tokens=64)
    sched = e.batching.scheduler
    for p in ps[:2]:
        e.add_request(p, max_tokens=2)
    first = sched.schedule()                                # both prompts, then token 1000
    e.batching.model.forward_batch(first)
    sched.postprocess(first, [1000, 1000])
    e.add_request(ps[2], max_tokens=1)
    batch = sched.schedule()
    assert batch.rows == [1, 1, 40] and list(batch.decode) == [True] * 2 + [False] * 40
    out = e.batching.model.forward_batch(batch)
    plain = Model(engine.mf, engine.backend, n_ctx=128)
    for i, p in enumerate(ps[:2]):
        plain.forward(p, 0)
        step = engine.backend.to_host(plain.forward([1000], len(p)))[0]
        assert np.array_equal(out[i], step)
    assert np.array_equal(out[2], engine.backend.to_host(plain.forward(ps[2], 0))[0])


def test_sixteen_sequences_give_their_solo_greedy_text(engine):
    lengths = [1, 3, 5, 8, 13, 17, 21, 30, 34, 40, 47, 55, 63, 64, 65, 71]
    ps = prompts(engine, lengths, seed=1)
    e = fresh(engine, max_seqs=16, max_batched_tokens=96, kv_blocks=40)
    together = e.generate_batch(ps, max_tokens=5)
    for p, s in zip(ps, together):
        solo = fresh(engine, max_seqs=1, max_batched_tokens=96).generate_batch([p], max_tokens=5)
        assert s.output_ids == solo[0].output_ids, (len(p), s.output_ids, solo[0].output_ids)
        assert s.finish_reason in ("length", "stop")
    assert e.batching.blocks.n_free == 40
    e.batching.blocks.check()


def test_prefix_cache_hit_gives_the_cold_prefill_logits(engine):
    system = prompts(engine, [130], seed=2)[0]          # two full blocks of 64, and more
    a, b = system + [1000, 1001], system + [2000]
    e = fresh(engine, max_batched_tokens=256)
    first_logits(e, [a])
    while e.has_unfinished():
        e.step()
    assert e.batching.blocks.n_free == 24
    e.add_request(b, max_tokens=1)
    batch = e.batching.scheduler.schedule()
    assert batch.seqs[0].num_cached_tokens == 128 and batch.rows == [len(b) - 128]
    hit = e.batching.model.forward_batch(batch)
    cold = first_logits(fresh(engine, max_batched_tokens=256), [b])
    assert np.array_equal(hit[0], cold[0])


def test_seeded_sampling_is_the_same_alone_or_in_a_batch(engine):
    ps = prompts(engine, [4, 9, 20], seed=3)
    params = SamplingParams(temperature=0.8, top_k=40, seed=7)
    samplers = [make_sampler(params) for _ in ps]
    together = fresh(engine).generate_batch(ps, max_tokens=4, samplers=samplers)
    for p, s in zip(ps, together):
        solo = fresh(engine).generate_batch([p], max_tokens=4, samplers=[make_sampler(params)])
        assert s.output_ids == solo[0].output_ids


def test_abort_frees_the_blocks(engine):
    e = fresh(engine)
    i = e.add_request(prompts(engine, [10])[0], max_tokens=50)
    e.step()
    assert e.abort(i) and not e.has_unfinished()
    assert e.batching.blocks.n_free == 24


_WARMUP_SCRIPT = """
import json, sys
from numba.core import dispatcher
from numbaformer.engine import load_engine

loaded = []                                  # every kernel compiled or loaded from the cache
add = dispatcher.Dispatcher.add_overload
dispatcher.Dispatcher.add_overload = lambda self, cres: (
    loaded.append(self.py_func.__qualname__), add(self, cres))[1]
e = load_engine(sys.argv[1], device="cpu", threads=1, n_ctx=512, quiet=True)
e.start_batching(2, 512)
e.warmup_batching()
n = len(loaded)
e.add_request(list(range(100, 130)), 6)      # a prompt, then its decodes alone
e.step(); e.step()
e.add_request(list(range(200, 211)), 4)      # a prompt beside a decode row
e.add_request(list(range(300, 311)), 4)      # waits for a free sequence
while e.has_unfinished():
    e.step()
e.add_request(list(range(100, 150)), 2)      # 2 x 50 prompt rows in one step
e.add_request(list(range(400, 450)), 2)
while e.has_unfinished():
    e.step()
print(json.dumps(loaded[n:]))
"""


def test_after_the_batched_warmup_a_servers_steps_load_no_kernel(smollm2_path):
    """In a fresh process (no kernel in memory yet): once warmup_batching ran, prefill, decode
    and mixed steps of 1 to 100 rows compile or load no kernel (a first request would wait for
    it: seconds with a fresh kernel cache)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    p = subprocess.run([sys.executable, "-c", _WARMUP_SCRIPT, str(smollm2_path)], cwd=root,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1]) == []
