"""The scheduler: which sequences run in a step, and what their rows are. It never touches a device.

`Scheduler.schedule()` returns the Batch of one step: first one decode row for every running
sequence whose prompt is done (each at its own position), then prefill chunks of sequences still
in their prompt, then new sequences admitted while the block manager can reserve their blocks,
all within max_batched_tokens rows and max_seqs sequences (a long prompt is split across steps,
so it never stalls decoding). `postprocess(batch, tokens)` advances each sequence by its rows,
registers its computed full blocks in the prefix cache, appends its token, and finishes it (its
blocks freed) at an end-of-generation id, max_tokens or the context. (nano-vllm's shape.)
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .blocks import BlockManager

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
_ids = itertools.count()


@dataclass
class Sequence:
    """One request: its tokens (prompt, then each pick), its blocks and how far it has run."""

    token_ids: list[int]
    max_tokens: int = 64
    stop_ids: frozenset = frozenset()
    sampler: object = None                  # callable(logits (n_vocab,) f32) -> id; None: greedy
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_prompt: int = 0
    status: str = WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0              # prompt positions found in the prefix cache
    num_computed: int = 0                   # positions whose K/V is in the cache
    finish_reason: str = ""

    def __post_init__(self):
        self.token_ids = [int(t) for t in self.token_ids]
        self.num_prompt = self.num_prompt or len(self.token_ids)
        if not self.token_ids:
            raise ValueError("a sequence needs at least one prompt token")

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def in_prompt(self) -> bool:
        """Whether its next rows are prefill (more than the last token still to compute)."""
        return self.num_computed < len(self.token_ids) - 1


@dataclass
class Batch:
    """The rows of one step, token-major, and the sequences they belong to.

    seqs: the step's sequences; rows[i] of them are seqs[i]'s (contiguous, in order)
    ids, pos, slots (n,) int32: each row's token, position, and cache slot to write its K/V
    tables (n_seqs, max_blocks) int32: each sequence's block table (-1 padded)
    row_seq (n,) int32: the index in seqs of each row's sequence
    last (n_seqs,) int32: the row whose logits are the sequence's output
    emits: per sequence, whether this step ends its prompt (its last row gives a token)
    decode (n,) bool: whether a row feeds a generated token (not one of its prompt's)
    """

    seqs: list[Sequence]
    rows: list[int]
    ids: np.ndarray
    pos: np.ndarray
    slots: np.ndarray
    tables: np.ndarray
    row_seq: np.ndarray
    last: np.ndarray
    emits: list[bool]
    decode: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        return len(self.ids)

    @property
    def n_decode(self) -> int:
        return sum(1 for r, e in zip(self.rows, self.emits) if r == 1 and e)


class Scheduler:
    """Decides each step's batch over a BlockManager; n_ctx bounds every sequence."""

    def __init__(self, blocks: BlockManager, n_ctx: int, max_seqs: int = 16,
                 max_batched_tokens: int = 512):
        if max_batched_tokens < max_seqs:
            raise ValueError(f"max batched tokens ({max_batched_tokens}) must cover one decode "
                             f"row per sequence ({max_seqs})")
        self.blocks, self.n_ctx = blocks, n_ctx
        self.max_seqs, self.max_batched_tokens = max_seqs, max_batched_tokens
        self.max_blocks = blocks.blocks_for(n_ctx)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if len(seq.token_ids) >= self.n_ctx:
            raise ValueError(f"prompt of {len(seq.token_ids)} tokens leaves no room in the "
                             f"context of {self.n_ctx}")
        if self.blocks.blocks_for(len(seq.token_ids) + 1) > len(self.blocks.blocks):
            raise ValueError("prompt needs more KV blocks than the pool has")
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> bool:
        """Drop a sequence wherever it is (its blocks freed); whether it was found."""
        for q in (self.waiting, self.running):
            for s in list(q):
                if s.seq_id == seq_id:
                    q.remove(s)
                    self._finish(s, "abort")
                    return True
        return False

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> Batch | None:
        """The next step's rows: decodes, then prefill chunks, within the budgets (None: idle)."""
        chosen: list[tuple[Sequence, int]] = []
        budget = self.max_batched_tokens
        for s in [s for s in self.running if not s.in_prompt]:
            if s not in self.running:                 # preempted by an earlier one's growth
                continue
            while not self.blocks.can_append(s, len(s.token_ids)):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is s:
                    break
            if s in self.running:
                self.blocks.append(s, len(s.token_ids))
                chosen.append((s, 1))
                budget -= 1
        for s in self.running:                        # prompts under way (chunked prefill)
            if s.in_prompt and budget > 0:
                n = min(len(s.token_ids) - s.num_computed, budget)
                chosen.append((s, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            s = self.waiting[0]
            if not self.blocks.can_allocate(s):
                break
            self.waiting.popleft()
            self.blocks.allocate(s)
            s.num_computed, s.status = s.num_cached_tokens, RUNNING
            self.running.append(s)
            n = min(len(s.token_ids) - s.num_computed, budget)
            chosen.append((s, n))
            budget -= n
        return self._batch(chosen) if chosen else None

    def schedule_steps(self, k: int) -> tuple[Batch, int] | None:
        """A batch for several decode steps in one go (Model.run_batch_steps) and their count,
        k or the power of two that covers the most tokens any running sequence may still take;
        None when the next step needs the host (a sequence waiting or in its prompt, fewer than 2
        steps, a context or the pool too short for that many more positions of every running
        sequence). One decode row a running sequence, its table grown to cover the positions of
        the steps (up to len(tokens) + k - 2)."""
        if self.waiting or not self.running or any(s.in_prompt for s in self.running):
            return None
        left = max(min(s.max_tokens - len(s.output_ids), self.n_ctx - len(s.token_ids))
                   for s in self.running)
        k = min(k, 1 << max(0, left - 1).bit_length())
        if k < 2 or any(len(s.token_ids) + k - 1 > self.n_ctx for s in self.running):
            return None
        need = sum(max(0, self.blocks.blocks_for(len(s.token_ids) + k - 1) - len(s.block_table))
                   for s in self.running)
        if need > self.blocks.n_free:
            return None
        for s in self.running:
            self.blocks.append(s, len(s.token_ids) + k - 1)
        return self._batch([(s, 1) for s in self.running]), k

    def postprocess_steps(self, batch: Batch, picks) -> list[Sequence]:
        """postprocess for the k steps of a schedule_steps batch, picks (k, n_seqs): each
        sequence takes its picks in order until it finishes (the rest dropped)."""
        done = []
        for j, row in enumerate(picks):
            step = Batch(batch.seqs, batch.rows, batch.ids, batch.pos + j, batch.slots,
                         batch.tables, batch.row_seq, batch.last, batch.emits, batch.decode)
            done += self.postprocess(step, row)
        return done

    def _batch(self, chosen) -> Batch:
        B = self.blocks.block_size
        seqs = [s for s, _ in chosen]
        rows = [n for _, n in chosen]
        pos = np.concatenate([np.arange(s.num_computed, s.num_computed + n, dtype=np.int32)
                              for s, n in chosen])
        ids = np.concatenate([np.asarray(s.token_ids[s.num_computed:s.num_computed + n], np.int32)
                              for s, n in chosen])
        row_seq = np.repeat(np.arange(len(seqs), dtype=np.int32), rows)
        tables = np.full((len(seqs), self.max_blocks), -1, np.int32)
        for i, s in enumerate(seqs):
            tables[i, :len(s.block_table)] = s.block_table
        slots = (tables[row_seq, pos // B] * B + pos % B).astype(np.int32)
        last = (np.cumsum(rows) - 1).astype(np.int32)
        emits = [s.num_computed + n == len(s.token_ids) for s, n in chosen]
        decode = pos >= np.repeat([s.num_prompt for s in seqs], rows)
        return Batch(seqs, rows, ids, pos, slots, tables, row_seq, last, emits, decode)

    def postprocess(self, batch: Batch, tokens) -> list[Sequence]:
        """Advance the batch's sequences by their rows; append tokens[i] to each that emits;
        return the sequences that finished this step (their blocks freed)."""
        done = []
        for s, n, emit, tok in zip(batch.seqs, batch.rows, batch.emits, tokens):
            if s.status != RUNNING:
                continue
            s.num_computed += n
            self.blocks.commit(s, s.num_computed)
            if not emit:
                continue
            s.token_ids.append(int(tok))
            reason = ("stop" if int(tok) in s.stop_ids else
                      "length" if len(s.output_ids) >= s.max_tokens or
                      len(s.token_ids) >= self.n_ctx else "")
            if reason:
                self.running.remove(s)
                self._finish(s, reason)
                done.append(s)
        return done

    def _finish(self, s: Sequence, reason: str) -> None:
        self.blocks.free(s)
        s.status, s.finish_reason = FINISHED, reason

    def _preempt(self, s: Sequence) -> None:
        """Give s's blocks back and queue it first again (its cached prefix may survive)."""
        self.running.remove(s)
        self.blocks.free(s)
        s.status, s.num_computed, s.num_cached_tokens = WAITING, 0, 0
        self.waiting.appendleft(s)
