"""The one forward graph: embedding -> L x (attention block, feed-forward block) -> norm -> logits.

Reads like llama2.c's forward(): a loop over layers calling ops from a backend's op table. No numba
here; llama and qwen2 differ only in config flags (rope layout, QKV bias, tied embeddings).
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np

from .backends.base import Backend, RopeParams
from .kvcache import KVCache
from .loader import ModelFile


MAX_CHUNK = 16                 # decode steps one greedy graph replay may run
DECODE_CHUNK = 8               # the steps generation and bench run per replay (greedy on device)


class Buffers:
    """Activations for up to n_batch tokens, allocated once; `rows(n)` gives views of n rows."""

    def __init__(self, ops: Backend, cfg, n_batch: int):
        a = ops.alloc
        self.ids = a((n_batch,), np.int32)               # token ids of this step
        self.pos = a((n_batch,), np.int32)               # their positions
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
        return v


class Model:
    """A loaded model on a backend, with its KV cache for n_ctx positions."""

    def __init__(self, mf: ModelFile, ops: Backend, n_ctx: int, n_batch: int = 512,
                 kv_type: str | None = None):
        cfg = mf.config
        self.cfg, self.ops, self.n_ctx = cfg, ops, n_ctx
        self.n_batch = max(1, min(n_batch, n_ctx))
        self.w = ops.upload(mf.weights)
        self.kv = KVCache(ops, cfg, n_ctx, kv_type or ops.default_kv_type)
        self.buf = Buffers(ops, cfg, self.n_batch)
        self.rope = RopeParams.from_config(cfg)
        self.inv_freq = ops.to_device(self.rope.inv_freq(mf.weights.rope_freqs))
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, ids, start_pos: int, *, greedy: bool = False):
        """Run tokens `ids` at positions start_pos.. (in chunks of n_batch); return the last
        token's logits (1, n_vocab) as a backend array. With greedy, also leave its argmax in
        buf.next_id (read it with `greedy_token()`)."""
        ids = self._check(ids, start_pos)
        for c in range(0, len(ids), self.n_batch):
            chunk = ids[c:c + self.n_batch]
            self._load_step(chunk, start_pos + c)
            v = self.buf.rows(len(chunk))
            last = c + self.n_batch >= len(ids)
            if len(chunk) == 1:
                self.ops.replay(("decode", greedy), lambda: self._run(v, greedy))
            else:
                self._layers(v)
                if last:
                    self._head(v.x_last, v.xn_last, self.buf.logits, greedy)
        return self.buf.logits

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
                self._run(v, True)
                self.ops.advance(b.ids, b.pos, b.next_id, b.chunk_ids, j)
        self.ops.replay(("decode_greedy", n), steps)
        return [int(t) for t in self.ops.to_host(b.chunk_ids)[:n]]

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
            self._head(v.x, v.xn, logits, False)
            out[c:c + n] = self.ops.to_host(logits)
        return out

    def warmup(self) -> None:
        """Compile (or load from the cache) what the first tokens need: a 2-token prefill and a
        decode step, at the start of the cache (overwritten by the first real step)."""
        self.forward([0, 0], 0)
        self.forward([0], 2, greedy=True)
        self.greedy_token()

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

    def _run(self, v, greedy: bool) -> None:
        self._layers(v)
        self._head(v.x_last, v.xn_last, self.buf.logits, greedy)

    def _layers(self, v) -> None:
        ops, cfg, kv = self.ops, self.cfg, self.kv
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

    def _head(self, x, xn, logits, greedy: bool) -> None:
        self.ops.norm_matmul((logits,), x, self.w.output_norm, self.cfg.norm_eps,
                             (self.w.output,), (None,), xn)
        if greedy:
            self.ops.argmax(self.buf.next_id, logits[0])
