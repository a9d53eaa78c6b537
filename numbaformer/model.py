"""The one forward graph: embedding -> L x (attention block, feed-forward block) -> norm -> logits.

Reads like llama2.c's forward(): a loop over layers calling ops from a backend's op table. No numba
here; llama and qwen2 differ only in config flags (rope layout, QKV bias, tied embeddings).
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np

from .backends.base import ID_BITS, Backend, RopeParams, SamplerState, sampler_params
from .blocks import BLOCK_SIZE
from .kvcache import KVCache, check_batch
from .loader import ModelFile


MAX_CHUNK = 16                 # decode steps one graph replay may run
DECODE_CHUNK = 8               # the steps generation and bench run per replay
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)   # decode-only batches replay a graph of the next size up


class Buffers:
    """Activations for up to n_batch tokens, allocated once; `rows(n)` gives views of n rows.
    With max_seqs, also a batched step's tables for that many sequences of max_blocks blocks."""

    def __init__(self, ops: Backend, cfg, n_batch: int, n_ctx: int, max_seqs: int = 0,
                 max_blocks: int = 0):
        a = ops.alloc
        if max_seqs:          # a batched step's inputs, one host copy a step (run_batch):
            # ids | pos | slots | row_seq (n_batch each) | last (max_seqs) | tables
            self.step_sizes = (n_batch,) * 4 + (max_seqs, max_seqs * max_blocks)
            self.step_in = a((sum(self.step_sizes),), np.int32)
            self.step_host = np.zeros(sum(self.step_sizes), np.int32)
            o = np.cumsum((0,) + self.step_sizes)
            self.ids, self.pos, self.slots, self.row_seq, self.last = (
                self.step_in[o[i]:o[i + 1]] for i in range(5))
            self.tables = self.step_in[o[5]:].reshape(max_seqs, max_blocks)
        else:
            self.ids = a((n_batch,), np.int32)           # token ids of this step
            self.pos = a((n_batch,), np.int32)           # their positions
        self.x = a((n_batch, cfg.n_embd))                # residual stream
        self.xn = a((n_batch, cfg.n_embd))               # normed input of a block
        self.proj = a((n_batch, cfg.n_embd))             # block output before the residual add
        self.q = a((n_batch, cfg.q_dim))
        self.attn = a((n_batch, cfg.q_dim))              # attention output, heads concatenated
        self.k = a((n_batch, cfg.kv_dim))
        self.v = a((n_batch, cfg.kv_dim))
        self.gate = a((n_batch, cfg.n_ff))
        self.up = a((n_batch, cfg.n_ff))
        self.logits = a((1, cfg.n_vocab))                # last token's logits
        self.next_id = a((1,), np.int32)                 # greedy pick, on the device
        self.chunk_ids = a((MAX_CHUNK,), np.int32)       # the picks of a multi-step decode
        self.sampler = SamplerState(                     # the sampling chain (base.py)
            fparams=a((8,), np.float64), iparams=a((8,), np.int64),
            hist=a((n_ctx,), np.int32), counts=a((cfg.n_vocab,), np.int32),
            eog=a((cfg.n_vocab,), np.uint8), out=a((2 + MAX_CHUNK,), np.int32))
        if max_seqs:          # slots: each row's cache slot (-1: padding); row_seq: its sequence;
            # last: the row of each sequence's output; tables: the sequences' block tables
            self.x_sel = a((max_seqs, cfg.n_embd))       # those rows of x
            self.xn_sel = a((max_seqs, cfg.n_embd))
            self.batch_logits = a((max_seqs, cfg.n_vocab))
            self.batch_ids = a((max_seqs,), np.int32)    # each output row's greedy pick
            self.step_picks = a((MAX_CHUNK, max_seqs), np.int32)   # run_batch_steps' picks
            # batch_sample_ids: each sampled row's (output row, draw index), parameters, pick
            self.rows_where = a((max_seqs, 2), np.int32)
            self.rows_fp = a((max_seqs, 8), np.float64)
            self.rows_ip = a((max_seqs, 8), np.int64)
            self.rows_picks = a((max_seqs,), np.int32)
        self._all_logits = None
        self._ops, self._cfg, self.n_batch = ops, cfg, n_batch

    def all_logits(self):
        """(n_batch, n_vocab) logits of every token (scoring only; allocated on first use)."""
        if self._all_logits is None:
            self._all_logits = self._ops.alloc((self.n_batch, self._cfg.n_vocab))
        return self._all_logits

    @functools.lru_cache(maxsize=8)
    def rows(self, n: int) -> SimpleNamespace:
        names = ("ids", "pos", "x", "xn", "proj", "q", "attn", "k", "v", "gate", "up")
        v = SimpleNamespace(**{k: getattr(self, k)[:n] for k in names})
        v.x_last = self.x[n - 1:n]
        v.xn_last = self.xn[n - 1:n]
        v.ids_last = self.ids[n - 1:n]
        v.pos_last = self.pos[n - 1:n]
        return v


class Model:
    """A loaded model on a backend, with its KV cache for n_ctx positions. With max_seqs (> 0),
    the cache is a pool of kv_blocks blocks of block_size, and `forward_batch` runs the rows of up
    to max_seqs sequences (n_batch rows) a step through their block tables (scheduler.Batch)."""

    def __init__(self, mf: ModelFile, ops: Backend, n_ctx: int, n_batch: int = 512,
                 kv_type: str | None = None, max_seqs: int = 0, kv_blocks: int = 0,
                 block_size: int = BLOCK_SIZE):
        cfg = mf.config
        self.cfg, self.ops, self.n_ctx = cfg, ops, n_ctx
        self.n_batch = max(1, min(n_batch, n_ctx)) if not max_seqs else max(2, n_batch)
        self.max_seqs = max_seqs
        self.max_blocks = -(-n_ctx // block_size)
        if max_seqs and not ops.paged_kv:
            raise NotImplementedError(f"batched sequences (a paged KV cache) are not on the "
                                      f"{ops.name} backend yet")
        self.w = ops.upload(mf.weights)
        self.kv = KVCache(ops, cfg, n_ctx, kv_type or ops.default_kv_type, kv_blocks or None,
                          block_size)
        self.buf = Buffers(ops, cfg, self.n_batch, n_ctx, max_seqs + (max_seqs == 1),
                           self.max_blocks)
        self.rope = RopeParams.from_config(cfg)
        self.inv_freq = ops.to_device(self.rope.inv_freq(mf.weights.rope_freqs))
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, ids, start_pos: int, *, greedy: bool = False, sample: bool = False):
        """Run tokens `ids` at positions start_pos.. (in chunks of n_batch); return the last
        token's logits (1, n_vocab) as a backend array. With greedy, also leave its argmax in
        buf.next_id (read it with `greedy_token()`); with sample, pick the next token with the
        sampling chain set by `start_sampling` (read it with `sampled()`; the logits are then
        penalized)."""
        ids = self._check(ids, start_pos)
        pick = "sample" if sample else "greedy" if greedy else None
        for c in range(0, len(ids), self.n_batch):
            chunk = ids[c:c + self.n_batch]
            self._load_step(chunk, start_pos + c)
            v = self.buf.rows(len(chunk))
            last = c + self.n_batch >= len(ids)
            if len(chunk) == 1:
                self.ops.replay(("decode", pick), lambda: self._run(v, pick))
            else:
                self._layers(v)
                if last:
                    self._head(v, self.buf.logits, pick)
        return self.buf.logits

    def forward_batch(self, batch) -> np.ndarray:
        """run_batch, then each sequence's output row's logits (n_seqs, n_vocab) as a host
        float32 array."""
        self.run_batch(batch)
        return self.ops.to_host(self.buf.batch_logits[:len(batch.seqs)])

    def batch_greedy_ids(self, m: int) -> np.ndarray:
        """The greedy picks (argmax) of the last run_batch's m output rows, on the host."""
        return self.ops.to_host(self.buf.batch_ids[:m])

    @property
    def samples_rows_on_device(self) -> bool:
        """Whether batch_sample_ids can pick a batched step's sampled rows (the backend's
        sample_rows; vocabularies up to ID_BITS ids)."""
        return self.ops.samples_rows_on_device and self.cfg.n_vocab <= 1 << ID_BITS

    def batch_sample_ids(self, rows, samplers, index, histories=None) -> np.ndarray:
        """The picks of the last run_batch's output rows `rows`, row rows[i] by samplers[i]'s
        chain (make_sampler's .params and .seed, with the .bias (ids, values) a server's
        request adds first, if any) with the draw keyed by index[i] (the position of the token
        being sampled, the length of its sequence's ids) and the penalty window taken from
        histories[i] (its token ids), in two launches (ops.adjust_rows: bias and penalties on
        the ids they touch; ops.sample_rows: the chain, a row a block): the picks the host
        sampler would make from the same logits, and only the ids cross to the host. The rows'
        logits are left biased and penalized. int32 (len(rows),)."""
        k = len(rows)
        m, n_vocab = self.buf.batch_logits.shape
        if not self.samples_rows_on_device:
            raise ValueError("this backend samples a batch's rows on the host")
        histories = histories if histories is not None else [()] * k
        if not 1 <= k <= m or len(samplers) != k or len(index) != k or len(histories) != k or \
                not all(0 <= r < m for r in rows) or not all(0 <= i < 1 << 31 for i in index):
            raise ValueError(f"batch_sample_ids: {k} rows {list(rows)[:8]} of {m}, draw indices "
                             f"{list(index)[:8]} (int32)")
        fp = np.empty((k, 8), np.float64)
        ip = np.empty((k, 8), np.int64)
        adj, bias = [], []
        for b, s in enumerate(samplers):
            fp[b], ip[b] = sampler_params(s.params, s.seed, self.n_ctx)
            entries = _row_adjustments(s, histories[b], n_vocab)
            if entries is not None:
                a, v = entries
                a[:, 0] = b
                adj.append(a)
                bias.append(v)
        b_, ops = self.buf, self.ops
        ops.copy_in(b_.rows_where, np.stack([np.asarray(rows), np.asarray(index)], axis=1))
        ops.copy_in(b_.rows_fp, fp)
        ops.copy_in(b_.rows_ip, ip)
        if adj:
            ops.adjust_rows(b_.batch_logits, b_.rows_where, b_.rows_fp, np.concatenate(adj),
                            np.concatenate(bias))
        ops.sample_rows(b_.rows_picks, b_.batch_logits, b_.rows_where, b_.rows_fp, b_.rows_ip, k)
        return ops.to_host(b_.rows_picks)[:k]

    def run_batch(self, batch) -> None:
        """Run a scheduler.Batch: its rows (each at its own position, K/V written at its slot,
        attending through its sequence's block table) in one pass over the weights; leave each
        sequence's output row's logits in buf.batch_logits[:n_seqs] and their argmax in
        buf.batch_ids (read them with forward_batch / batch_greedy_ids).
        The rows run reordered, decode rows (batch.decode) first: the backend gives those its
        decode product and the prompt rows its prefill product (ops.split_rows), each row's
        result independent of the others, as are the output rows' (decode product): a
        sequence's logits are the same bits alone or in any batch. A batch of decode rows only
        (one a sequence) is padded to the next GRAPH_BUCKETS size (padding rows write nowhere
        and read position 0 of the first sequence) and replays that size's CUDA graph."""
        size, n_decode = self._stage_batch(batch)
        if size:
            self.ops.replay(("batch_decode", id(self), size), lambda: self._batch_step(size, size))
        else:
            self._batch_step(batch.n_rows, len(batch.seqs), n_decode)

    def run_batch_steps(self, batch, k: int) -> np.ndarray:
        """k greedy decode steps of a decode-only batch (one row a sequence, each sequence's
        table covering its positions pos .. pos + k - 1) in one replay (launched directly when
        the batch has no graph bucket, e.g. 3 rows with max_seqs 3): each step's picks feed
        the next on the device (ops.advance_rows: the next position and its slot through the
        table), so the host reads the picks once; returns them, (k, n_seqs) int32. A sequence
        that the caller ends inside the chunk (a stop id, its token budget) has had its K/V
        written past its end, into its own blocks. Each step is run_batch's, the same bits."""
        n, m = batch.n_rows, len(batch.seqs)
        if not 1 <= k <= MAX_CHUNK:
            raise ValueError(f"a batch's greedy chunk is 1..{MAX_CHUNK} steps, not {k}")
        if batch.decode is None or not np.asarray(batch.decode).all() or n != m:
            raise ValueError("several steps a replay take a batch of decode rows only, one a "
                             "sequence")
        size, _ = self._stage_batch(batch)                  # (checks the batch first)
        tables, B = np.asarray(batch.tables), self.kv.block_size
        end = np.asarray(batch.pos, np.int64) + k - 1          # each row's last position
        reach = end // B
        if end.max() >= self.n_ctx or reach.max() >= tables.shape[1] or any(
                (tables[s, :b + 1] < 0).any() for s, b in zip(batch.row_seq, reach)):
            raise ValueError(f"batch: {k} steps reach positions its block tables (or the "
                             f"context of {self.n_ctx}) lack")
        ops, b = self.ops, self.buf
        rows = size or n          # no graph bucket (more rows than max_seqs allows): launched

        def steps():
            for j in range(k):
                self._batch_step(rows, rows)
                ops.advance_rows(b.ids[:rows], b.pos[:rows], b.slots[:rows], b.tables,
                                 b.row_seq[:rows], b.batch_ids, b.step_picks, j, B)
        if size:
            ops.replay(("batch_steps", id(self), size, k), steps)
        else:
            steps()
        return ops.to_host(b.step_picks)[:k, :m]

    def _stage_batch(self, batch) -> tuple[int, int]:
        """Check a batch and copy its rows (reordered, decode rows first; a decode-only batch
        padded to its graph bucket) to the step's device buffers in one host->device copy;
        returns (the bucket size, 0 if the batch runs eagerly; its decode rows)."""
        n, m = batch.n_rows, len(batch.seqs)
        if not self.max_seqs:
            raise ValueError("this model was built for one sequence (max_seqs 0)")
        if n > self.n_batch or m > self.max_seqs or batch.tables.shape[1] > self.max_blocks:
            raise ValueError(f"batch of {n} rows / {m} sequences exceeds the model's "
                             f"{self.n_batch} / {self.max_seqs}")
        check_batch(batch, self.cfg.n_vocab, self.n_ctx, self.kv.n_slots // self.kv.block_size,
                    self.kv.block_size)
        ops, b = self.ops, self.buf
        decode = np.zeros(n, bool) if batch.decode is None else batch.decode
        order = np.argsort(~decode, kind="stable")        # decode rows first
        where = np.empty(n, np.int32)
        where[order] = np.arange(n, dtype=np.int32)       # a row's place in the run
        rows = dict(ids=batch.ids[order], pos=batch.pos[order], slots=batch.slots[order],
                    row_seq=batch.row_seq[order])
        last = where[batch.last]
        size = next((g for g in GRAPH_BUCKETS if g >= n), 0)
        graphed = decode.all() and n == m and size and size <= min(self.n_batch, self.max_seqs)
        if graphed and size > n:                          # padding rows: write nowhere
            pad = size - n
            for k, fill in (("ids", 0), ("pos", 0), ("slots", -1), ("row_seq", 0)):
                rows[k] = np.concatenate([rows[k], np.full(pad, fill, np.int32)])
            last = np.concatenate([last, np.arange(n, size, dtype=np.int32)])
        host, o = b.step_host, np.cumsum((0,) + b.step_sizes)
        for i, src in enumerate((rows["ids"], rows["pos"], rows["slots"], rows["row_seq"], last)):
            host[o[i]:o[i] + len(src)] = src
        tables = host[o[5]:].reshape(b.tables.shape)
        tables[...] = -1
        tables[:m, :batch.tables.shape[1]] = batch.tables
        ops.copy_in(b.step_in, host)                      # the step's one host->device copy
        return (size if graphed else 0), int(decode.sum())

    def _batch_step(self, n: int, m: int, n_decode: int | None = None) -> None:
        ops, b = self.ops, self.buf
        v = self.buf.rows(n)
        try:
            ops.split_rows(n if n_decode is None else n_decode)
            self._layers(v, self._paged(n))
            ops.gather_rows(b.x_sel[:m], v.x, b.last[:m])
            ops.split_rows(m)
            self._logits(b.x_sel[:m], b.xn_sel[:m], b.batch_logits[:m])
            ops.argmax_rows(b.batch_ids, b.batch_logits[:m])
        finally:
            ops.split_rows(None)

    @functools.lru_cache(maxsize=16)
    def _paged(self, n: int) -> KVCache:
        b = self.buf
        return self.kv.paged(b.slots[:n], b.tables, b.row_seq[:n])

    def decode_greedy(self, tok: int, pos: int, n: int) -> list[int]:
        """n greedy decode steps in one replay: token `tok` at position pos, then each step's
        pick fed to the next on the device; returns the n picks (read once). Every step writes its
        K/V, so the caller that keeps fewer picks simply decodes from its own position again (the
        positions past it are overwritten before they are read)."""
        if not 1 <= n <= MAX_CHUNK:
            raise ValueError(f"a greedy chunk is 1..{MAX_CHUNK} steps, not {n}")
        self._check([tok], pos)
        if pos + n > self.n_ctx:
            raise ValueError(f"positions {pos}..{pos + n - 1} exceed the context of {self.n_ctx} "
                             f"tokens")
        self._load_step(np.array([tok], np.int32), pos)
        v, b = self.buf.rows(1), self.buf

        def steps():
            for j in range(n):
                self._run(v, "greedy")
                self.ops.advance(b.ids, b.pos, b.next_id, b.chunk_ids, j)
        self.ops.replay(("decode_greedy", n), steps)
        return [int(t) for t in self.ops.to_host(b.chunk_ids)[:n]]

    @property
    def samples_on_device(self) -> bool:
        """Whether generation picks with the `sample` op (the backend's choice; device ids are
        ID_BITS wide, so larger vocabularies sample on the host)."""
        return self.ops.samples_on_device and self.cfg.n_vocab <= 1 << ID_BITS

    def start_sampling(self, sampler, history, eog_ids=(), max_tokens: int = -1) -> None:
        """Set the sampling chain for one generation: sampler's params and seed (make_sampler),
        the penalty window over `history` (the prompt; the chain appends each pick), the ids
        that end generation, and the limit: the token of position len(history) + max_tokens - 1
        (or n_ctx, whichever is first) is the last (-1: only n_ctx)."""
        p, st, ops = sampler.params, self.buf.sampler, self.ops
        hist = np.asarray(history, np.int32)[:self.n_ctx]
        stop = self.n_ctx if max_tokens < 0 else min(self.n_ctx, len(hist) + max_tokens - 1)
        fp, ip = sampler_params(p, sampler.seed, stop)
        ops.copy_in(st.fparams, fp)
        ops.copy_in(st.iparams, ip)
        ops.copy_in(st.hist, hist)
        if p.has_penalties:
            window = hist if p.repeat_last_n == -1 else hist[max(0, len(hist) - p.repeat_last_n):]
            ops.copy_in(st.counts, np.bincount(window, minlength=self.cfg.n_vocab).astype(np.int32))
        eog = np.zeros(self.cfg.n_vocab, np.uint8)
        eog[[t for t in eog_ids if 0 <= t < self.cfg.n_vocab]] = 1
        ops.copy_in(st.eog, eog)

    def decode_chunk(self, tok: int, pos: int, n: int) -> list[int]:
        """n decode steps in one replay, each picking with the sampling chain (start_sampling)
        and feeding its pick to the next on the device: token `tok` at position pos first.
        Returns the picks that count (read once): all n, or up to and including an id that ends
        generation or the one at the limit; the steps after those repeat the last step and leave
        no trace. A caller that keeps fewer picks decodes from its own position again (the
        positions past it are overwritten before they are read)."""
        if not 1 <= n <= MAX_CHUNK:
            raise ValueError(f"a decode chunk is 1..{MAX_CHUNK} steps, not {n}")
        self._check([tok], pos)
        if pos + n > self.n_ctx:
            raise ValueError(f"positions {pos}..{pos + n - 1} exceed the context of {self.n_ctx} "
                             f"tokens")
        self._load_step(np.array([tok], np.int32), pos)
        v = self.buf.rows(1)

        def steps():
            for j in range(n):
                self._run(v, "sample", j)
        self.ops.replay(("decode_chunk", n), steps)
        return self.sampled()

    def sampled(self) -> list[int]:
        """The picks of the last sampling forward or decode_chunk that count."""
        out = self.ops.to_host(self.buf.sampler.out)
        return [int(t) for t in out[2:2 + out[0]]]

    def forward_all(self, ids, start_pos: int = 0) -> np.ndarray:
        """Logits of every position (n, n_vocab) as a host float32 array (teacher forcing)."""
        ids = self._check(ids, start_pos)
        out = np.empty((len(ids), self.cfg.n_vocab), dtype=np.float32)
        for c in range(0, len(ids), self.n_batch):
            chunk = ids[c:c + self.n_batch]
            n = len(chunk)
            self._load_step(chunk, start_pos + c)
            v = self.buf.rows(n)
            self._layers(v)
            logits = self.buf.all_logits()[:n]
            self._logits(v.x, v.xn, logits)
            out[c:c + n] = self.ops.to_host(logits)
        return out

    def warmup(self) -> None:
        """Compile (or load from the cache) what the first tokens need: a 2-token prefill, a
        decode step and the sampling kernel, at the start of the cache (overwritten by the first
        real step)."""
        self.forward([0, 0], 0)
        self.forward([0], 2, greedy=True)
        self.greedy_token()
        if self.samples_on_device:                 # the sampling chain's kernel
            v = self.buf.rows(1)
            self.ops.sample(self.buf.logits[0], v.ids_last, v.pos_last, self.buf.sampler, 0)
            self.sampled()

    def greedy_token(self) -> int:
        return int(self.ops.to_host(self.buf.next_id)[0])

    def _check(self, ids, start_pos: int) -> np.ndarray:
        ids = [int(i) for i in np.asarray(ids, dtype=object).reshape(-1)]
        if not ids:
            raise ValueError("no tokens to run")
        if start_pos < 0 or start_pos + len(ids) > self.n_ctx:
            raise ValueError(f"positions {start_pos}..{start_pos + len(ids) - 1} exceed the "
                             f"context of {self.n_ctx} tokens")
        bad = [i for i in ids if not 0 <= i < self.cfg.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary "
                             f"(0..{self.cfg.n_vocab - 1})")
        return np.asarray(ids, dtype=np.int32)

    def _load_step(self, chunk: np.ndarray, pos0: int) -> None:
        self.ops.copy_in(self.buf.ids, chunk)
        self.ops.copy_in(self.buf.pos, np.arange(pos0, pos0 + len(chunk), dtype=np.int32))

    def _run(self, v, pick, j: int = 0) -> None:
        self._layers(v)
        self._head(v, self.buf.logits, pick, j)

    def _layers(self, v, kv: KVCache | None = None) -> None:
        ops, cfg, kv = self.ops, self.cfg, kv or self.kv
        ops.embed(v.x, self.w.token_embd, v.ids)
        for i, L in enumerate(self.w.layers):
            # attention block: x += Wo attn(rope(Wq xn), rope(Wk xn), Wv xn), xn = rmsnorm(x)
            ops.qkv_rope(v.q, v.k, v.v, v.x, L.attn_norm, cfg.norm_eps,
                         (L.attn_q, L.attn_k, L.attn_v),
                         (L.attn_q_bias, L.attn_k_bias, L.attn_v_bias), v.xn, v.pos, kv, i,
                         self.inv_freq, self.rope)
            ops.attention(v.attn, v.q, kv, i, v.pos, self.scale)
            ops.matmul_add(v.x, v.attn, L.attn_output, v.proj)
            # feed-forward block: x += Wd (silu(Wg xn) * Wu xn), xn = rmsnorm(x)
            ops.norm_swiglu(v.gate, v.x, L.ffn_norm, cfg.norm_eps, L.ffn_gate, L.ffn_up, v.xn,
                            v.up)
            ops.matmul_add(v.x, v.gate, L.ffn_down, v.proj)

    def _head(self, v, logits, pick=None, j: int = 0) -> None:
        """The last token's logits; pick: None, "greedy" (argmax into buf.next_id) or "sample"
        (step j of the sampling chain)."""
        self._logits(v.x_last, v.xn_last, logits)
        if pick == "greedy":
            self.ops.argmax(self.buf.next_id, logits[0])
        elif pick == "sample":
            self.ops.sample(logits[0], v.ids_last, v.pos_last, self.buf.sampler, j)

    def _logits(self, x, xn, logits) -> None:
        self.ops.norm_matmul((logits,), x, self.w.output_norm, self.cfg.norm_eps,
                             (self.w.output,), (None,), xn)


def _row_adjustments(sampler, history, n_vocab: int):
    """The logit adjustments of one sampled row, as the host sampler makes them: None, or
    (int64 (n, 4) [row (set by the caller), id, count in the penalty window, has a bias],
    float32 (n,) biases) over the ids its logit_bias (sampler.bias: ids, values) and its penalty
    window (the last repeat_last_n of history, all for -1) touch, each id once."""
    p = sampler.params
    bias = getattr(sampler, "bias", None)
    bi = np.asarray(bias[0] if bias is not None else (), np.int64)
    bv = np.asarray(bias[1] if bias is not None else (), np.float32)
    if p.has_penalties and len(history):
        recent = history if p.repeat_last_n == -1 else history[-p.repeat_last_n:]
        pi, pc = np.unique(np.asarray(recent, np.int64), return_counts=True)
    else:
        pi, pc = np.zeros(0, np.int64), np.zeros(0, np.int64)
    if not len(bi) and not len(pi):
        return None
    ids = np.union1d(bi, pi)
    if ids[0] < 0 or ids[-1] >= n_vocab:
        raise ValueError(f"a logit_bias or history id outside the vocabulary of {n_vocab}")
    a = np.zeros((len(ids), 4), np.int64)
    a[:, 1] = ids
    a[np.searchsorted(ids, pi), 2] = pc
    v = np.zeros(len(ids), np.float32)
    if len(bi):
        at = np.searchsorted(ids, bi)
        a[at, 3] = 1
        v[at] = bv
    return a, v
