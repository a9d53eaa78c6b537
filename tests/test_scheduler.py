"""The scheduler with a fake forward (no model): its cache holds each position's token id at the
slot the batch names, and its "next token" is a hash of what the sequence's block table reads back,
so a wrong slot, table or position changes the text. Decodes come first, prompts are chunked within
the token budget, prefix hits skip prefill, preemption and abort give every block back."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from numbaformer.backends.base import Backend
from numbaformer.blocks import BlockManager
from numbaformer.kvcache import check_batch
from numbaformer.scheduler import FINISHED, Scheduler, Sequence

B = 4
VOCAB = 97


class FakeModel:
    def __init__(self, n_blocks):
        self.cache = np.full(n_blocks * B, -1, np.int64)
        self.rows_run = []

    def step(self, batch):
        self.cache[batch.slots] = batch.ids                   # the K/V writes
        self.rows_run.append(batch.n_rows)
        out = []
        for i, r in enumerate(batch.last):
            p = batch.pos[r]
            table = batch.tables[i]
            ctx = [self.cache[table[j // B] * B + j % B] for j in range(p + 1)]
            assert min(ctx) >= 0
            out.append(next_token(ctx))
        return out


    def steps(self, batch, k):
        """k decode steps of a decode-only batch, each step's picks fed to the next as
        Model.run_batch_steps does on a device (the base backend's advance_rows, host arrays)."""
        ids, pos, slots = batch.ids.copy(), batch.pos.copy(), batch.slots.copy()
        picks = np.full((k, len(ids)), -1, np.int32)
        for j in range(k):
            self.cache[slots[slots >= 0]] = ids[slots >= 0]
            out = []
            for r in range(len(ids)):
                table = batch.tables[batch.row_seq[r]]
                ctx = [self.cache[table[i // B] * B + i % B] for i in range(pos[r] + 1)]
                assert min(ctx) >= 0
                out.append(next_token(ctx))
            Backend.advance_rows(None, ids, pos, slots, batch.tables, batch.row_seq,
                                 np.array(out, np.int32), picks, j, B)
        self.rows_run.append(len(ids))
        return picks


def next_token(ctx):
    return int(sum((i + 1) * t for i, t in enumerate(ctx)) % VOCAB)


def solo_text(prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(next_token(ids))
    return ids[len(prompt):]


def run(sched, model, max_steps=1000):
    for _ in range(max_steps):
        batch = sched.schedule()
        if batch is None:
            return
        sched.postprocess(batch, model.step(batch))
    raise AssertionError("did not finish")


def make(n_blocks=32, **kw):
    bm = BlockManager(n_blocks, B)
    return bm, Scheduler(bm, n_ctx=64, **kw), FakeModel(n_blocks)


def test_many_sequences_give_their_solo_text():
    bm, sched, model = make(max_seqs=4, max_batched_tokens=8)
    rng = np.random.default_rng(1)
    seqs = [Sequence(list(rng.integers(0, VOCAB, rng.integers(1, 20))), max_tokens=int(m))
            for m in rng.integers(1, 12, 10)]
    for s in seqs:
        sched.add(s)
    run(sched, model)
    for s in seqs:
        assert s.status == FINISHED and s.finish_reason == "length"
        assert s.output_ids == solo_text(s.token_ids[:s.num_prompt], s.max_tokens)
    assert max(model.rows_run) <= 8
    assert bm.n_free == 32
    bm.check()


def test_several_steps_a_go_give_the_solo_text():
    """schedule_steps / postprocess_steps (the engine's several greedy steps a replay): only
    when nothing waits and no prompt is under way; k steps, or the power of two covering the
    most tokens a sequence may still take; every sequence takes its picks until its length or a
    stop id (inside a chunk too), and gives the text it gives alone; the pool comes back whole."""
    bm, sched, model = make(n_blocks=48, max_seqs=4, max_batched_tokens=12)
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, VOCAB, int(n))) for n in rng.integers(1, 14, 9)]
    lengths = [int(m) for m in rng.integers(2, 14, 9)]
    texts = [solo_text(p, m) for p, m in zip(prompts, lengths)]
    stops = [frozenset({texts[i][len(texts[i]) // 2]}) if i % 3 == 0 else frozenset()
             for i in range(9)]
    seqs = [Sequence(p, max_tokens=m, stop_ids=st) for p, m, st in zip(prompts, lengths, stops)]
    for s in seqs:
        sched.add(s)
    ks = []
    for _ in range(200):
        plan = sched.schedule_steps(4)
        if plan is not None:
            assert not sched.waiting and not any(s.in_prompt for s in sched.running)
            batch, k = plan
            ks.append(k)
            check_batch(batch, VOCAB, 64, 48, B)
            sched.postprocess_steps(batch, model.steps(batch, k))
            continue
        batch = sched.schedule()
        if batch is None:
            break
        sched.postprocess(batch, model.step(batch))
    assert sched.is_finished() and ks and set(ks) <= {2, 4}
    for s, text, st in zip(seqs, texts, stops):
        want = text[:text.index(next(iter(st))) + 1] if st else text
        assert s.output_ids == want, (s.output_ids, want)
        assert s.finish_reason == ("stop" if st else "length")
    assert bm.n_free == 48
    bm.check()
    one = Sequence([1, 2, 3], max_tokens=1)
    sched.add(one)
    assert sched.schedule_steps(4) is None                  # waiting
    sched.postprocess(b := sched.schedule(), model.step(b))
    assert one.status == FINISHED and sched.schedule_steps(4) is None


def test_decodes_first_then_prompt_chunks_within_budget():
    bm, sched, model = make(max_seqs=4, max_batched_tokens=6)
    a = Sequence([1, 2, 3], max_tokens=5)
    sched.add(a)
    sched.postprocess(b := sched.schedule(), model.step(b))    # a's prompt, its first token
    long = Sequence(list(range(20)), max_tokens=2)
    sched.add(long)
    b = sched.schedule()
    assert b.seqs == [a, long] and b.rows == [1, 5] and b.emits == [True, False]
    sched.postprocess(b, model.step(b))
    b = sched.schedule()
    assert b.rows == [1, 5]
    run(sched, model)
    assert a.output_ids == solo_text([1, 2, 3], 5)
    assert long.output_ids == solo_text(list(range(20)), 2)
    bm.check()


def test_prefix_hit_skips_prefill_and_gives_the_same_text():
    bm, sched, model = make(max_seqs=4, max_batched_tokens=64)
    system = list(range(10, 22))                        # 3 full blocks
    a = Sequence(system + [5, 6], max_tokens=3)
    sched.add(a)
    run(sched, model)
    b = Sequence(system + [7], max_tokens=3)
    sched.add(b)
    batch = sched.schedule()
    assert b.num_cached_tokens == 12 and batch.rows == [1]
    sched.postprocess(batch, model.step(batch))
    run(sched, model)
    assert b.output_ids == solo_text(system + [7], 3)
    bm.check()
    assert bm.n_free == 32


def test_stop_ids_and_abort():
    bm, sched, model = make()
    prompt = [3, 1, 4]
    first = solo_text(prompt, 1)[0]
    a = Sequence(prompt, max_tokens=10, stop_ids=frozenset({first}))
    c = Sequence([9, 9], max_tokens=10)
    sched.add(a)
    sched.add(c)
    b = sched.schedule()
    done = sched.postprocess(b, model.step(b))
    assert done == [a] and a.finish_reason == "stop" and a.output_ids == [first]
    assert sched.abort(c.seq_id) and c.finish_reason == "abort"
    assert sched.is_finished() and bm.n_free == 32
    bm.check()


def test_preemption_when_blocks_run_out_still_gives_solo_text():
    bm, sched, model = make(n_blocks=6, max_seqs=4, max_batched_tokens=16)
    seqs = [Sequence([i + 1] * 6, max_tokens=8) for i in range(3)]   # 14 positions: 4 blocks each
    for s in seqs:
        sched.add(s)
    run(sched, model)
    for s in seqs:
        assert s.output_ids == solo_text(s.token_ids[:6], 8)
    assert bm.n_free == 6
    bm.check()


def test_prompt_that_cannot_fit_is_refused():
    bm, sched, _ = make(n_blocks=2)
    with pytest.raises(ValueError):
        sched.add(Sequence(list(range(9))))
    with pytest.raises(ValueError):
        sched.add(Sequence(list(range(64))))


def test_check_batch_refuses_what_kernels_would_read_out_of_bounds():
    """kvcache.check_batch (Model.forward_batch's first step) passes a scheduled batch and refuses
    each spoiled field with a line naming it."""
    sched = Scheduler(BlockManager(6, 4), 24, max_seqs=2, max_batched_tokens=8)
    for p in ([1, 2, 3, 4, 5], [6, 7]):
        sched.add(Sequence(p))
    batch = sched.schedule()
    check_batch(batch, 100, 24, 6, 4)                          # as scheduled: fine
    bad = {"ids": ("token id", lambda b: b.ids.__setitem__(0, 100)),
           "pos": ("position", lambda b: b.pos.__setitem__(1, 24)),
           "row_seq": ("row sequence", lambda b: b.row_seq.__setitem__(0, 2)),
           "block": ("block id", lambda b: b.tables.__setitem__((0, 0), 6)),
           "hole": ("lacks", lambda b: b.tables.__setitem__((0, 1), -1)),     # pos 4 reads it
           "slot": ("slot", lambda b: b.slots.__setitem__(0, b.slots[0] + 1)),
           "last": ("another sequence", lambda b: b.last.__setitem__(0, 6))}
    for name, (msg, spoil) in bad.items():
        b = dataclasses.replace(batch, ids=batch.ids.copy(), pos=batch.pos.copy(),
                                row_seq=batch.row_seq.copy(), tables=batch.tables.copy(),
                                slots=batch.slots.copy(), last=batch.last.copy())
        spoil(b)
        with pytest.raises(ValueError, match=msg):
            check_batch(b, 100, 24, 6, 4)
    with pytest.raises(ValueError, match="shapes"):
        check_batch(dataclasses.replace(batch, pos=batch.pos[:-1]), 100, 24, 6, 4)
