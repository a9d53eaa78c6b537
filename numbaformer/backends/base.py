"""The op table every backend implements: what model.py may call, with shapes and dtypes.

Arrays are backend arrays (numpy on the CPU, numba device arrays on CUDA). Every op writes into an
`out` argument allocated once by the caller; none allocates in the decode loop. Activations are
float32, row-major, token-major: x (n_tokens, width). Per-step values that change between decode
steps (token ids, positions) live in backend arrays too, so a captured CUDA graph can replay.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig

# The sampling chain's parameters on the device, written once per generation (so one captured graph
# serves every setting). fparams (8,) float64 and iparams (8,) int64, by these indices:
F_TEMP, F_TOP_P, F_MIN_P_D, F_REPEAT, F_PRESENCE, F_FREQUENCY = range(6)
I_TOP_K, I_LAST_N, I_SEED, I_STOP_POS = range(4)
ID_BITS = 18                  # a vocabulary id fits in 18 bits on the device (ids < 262144)


@dataclass(frozen=True)
class RopeParams:
    """Everything rope needs besides the positions."""

    head_dim: int
    rope_dim: int             # leading dims of each head that rotate
    base: float
    freq_scale: float         # linear scaling: theta = pos * freq_scale * base^(-2i/rope_dim)
    neox: bool                # pair (i, i + rope_dim/2) instead of (2i, 2i+1)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> RopeParams:
        return cls(cfg.head_dim, cfg.rope_dim, cfg.rope_base, cfg.rope_freq_scale, cfg.rope_neox)

    def inv_freq(self, freq_factors: np.ndarray | None = None) -> np.ndarray:
        """(rope_dim // 2,) float64: freq_scale * base^(-2i/rope_dim) / factor_i (llama.cpp's theta
        per position)."""
        i = np.arange(self.rope_dim // 2, dtype=np.float64)
        f = self.freq_scale * self.base ** (-2.0 * i / self.rope_dim)
        if freq_factors is not None:
            f = f / freq_factors.astype(np.float64)
        return f


@dataclass(frozen=True)
class SamplerState:
    """The sampling chain's backend arrays, allocated once by the model; `sample` reads and
    updates them.

    fparams (8,) f64: temperature (0 = greedy), top_p (1 = off), min_p as the distance
                      -log(min_p) below the top logit (inf = off), repeat, presence and frequency
                      penalties, at F_TEMP, F_TOP_P, F_MIN_P_D, F_REPEAT, F_PRESENCE, F_FREQUENCY
    iparams (8,) i64: top_k (0 = off), repeat_last_n (0 = no penalties, -1 = all), the 64-bit seed
                      (its bit pattern), stop_pos (the last position a sampled token may take), at
                      I_TOP_K, I_LAST_N, I_SEED, I_STOP_POS
    hist    (n_ctx,) i32: the token at each position (the prompt, then each pick)
    counts  (n_vocab,) i32: occurrences of each id among the last repeat_last_n tokens
    eog     (n_vocab,) u8: 1 for the ids that end generation
    out     (2 + max steps,) i32: [0] picks that count, [1] 1 once generation ended (an eog id or
                      stop_pos), [2 + j] the pick of step j
    """

    fparams: object
    iparams: object
    hist: object
    counts: object
    eog: object
    out: object


def sampler_params(params, seed: int, stop_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """(fparams (8,) f64, iparams (8,) i64) host arrays of SamplingParams `params` for SamplerState:
    penalties off (repeat_last_n 0) unless one is set; seed as its 64-bit pattern."""
    fp = np.zeros(8, np.float64)
    ip = np.zeros(8, np.int64)
    fp[F_TEMP], fp[F_TOP_P] = params.temperature, params.top_p
    fp[F_MIN_P_D] = -np.log(params.min_p) if params.min_p > 0 else np.inf
    fp[F_REPEAT], fp[F_PRESENCE] = params.repeat_penalty, params.presence_penalty
    fp[F_FREQUENCY] = params.frequency_penalty
    ip[I_TOP_K] = params.top_k
    ip[I_LAST_N] = params.repeat_last_n if params.has_penalties else 0
    ip[I_SEED] = np.uint64(seed & 0xFFFFFFFFFFFFFFFF).view(np.int64)
    ip[I_STOP_POS] = stop_pos
    return fp, ip


class Backend(ABC):
    """A device and its ops. Weights are uploaded once by `upload`; `alloc` gives zeroed arrays."""

    name: str = "?"

    # --- memory -----------------------------------------------------------------------------
    @abstractmethod
    def alloc(self, shape: tuple[int, ...], dtype=np.float32):
        """A zero-filled backend array, allocated once (at load)."""

    @abstractmethod
    def to_device(self, host: np.ndarray):
        """A backend copy of a host array (weights, tables)."""

    @abstractmethod
    def to_host(self, arr) -> np.ndarray:
        """Copy a backend array to the host (synchronizes)."""

    @abstractmethod
    def copy_in(self, dst, host: np.ndarray) -> None:
        """Fill the leading elements of backend array `dst` from a host array."""

    default_kv_type = "f32"
    default_n_batch = 512         # prompt tokens a forward pass takes at once (load_engine's default)

    def kv_dtype(self, kv_type: str):
        """The numpy dtype that stores a KV cache of kv_type ("f16" | "f32") here."""
        return np.float16 if kv_type == "f16" else np.float32

    def upload(self, weights):
        """The ModelWeights with every array on this backend (CPU: the file views themselves)."""
        return weights

    # --- ops: n (the token count) is out.shape[0]; the model passes row views of its buffers ---
    @abstractmethod
    def embed(self, out, table, ids) -> None:
        """out (n, width) f32 = dequantized rows ids (n,) int32 of QTensor `table` (n_vocab, width)."""

    @abstractmethod
    def rmsnorm(self, out, x, w, eps: float) -> None:
        """out = x / sqrt(mean(x^2) + eps) * w;  x, out (n, d) f32, w (d,) f32."""

    @abstractmethod
    def matmul(self, out, x, w, bias=None) -> None:
        """out (n, rows) = x (n, cols) @ W.T (+ bias (rows,)); W a QTensor (rows, cols)."""

    # --- fused ops: backends may override; these defaults compose the ops above -------------
    def norm_matmul(self, outs, x, norm_w, eps: float, ws, biases, scratch) -> None:
        """outs[m] (n, rows_m) = rmsnorm(x) * norm_w @ ws[m].T (+ biases[m] where not None);
        scratch (n, d) may receive the normed x."""
        self.rmsnorm(scratch, x, norm_w, eps)
        for out, w, b in zip(outs, ws, biases):
            self.matmul(out, scratch, w, b)

    def norm_swiglu(self, out, x, norm_w, eps: float, w_gate, w_up, scratch, up) -> None:
        """out (n, n_ff) = silu(xn @ Wg.T) * (xn @ Wu.T), xn = rmsnorm(x) * norm_w; scratch (n, d)
        and up (n, n_ff) may be used."""
        self.rmsnorm(scratch, x, norm_w, eps)
        self.matmul(out, scratch, w_gate)
        self.matmul(up, scratch, w_up)
        self.silu_mul(out, out, up)

    def rope_store(self, q, k, v, pos, cache, layer: int, inv_freq, rope: RopeParams) -> None:
        """Rotate q (n, n_head * hd) and k (n, n_kv * hd) in place at positions pos, then write
        k and v into the cache."""
        self.rope(q, pos, q.shape[1] // rope.head_dim, inv_freq, rope)
        self.rope(k, pos, k.shape[1] // rope.head_dim, inv_freq, rope)
        self.kv_store(cache, layer, k, v, pos)

    def qkv_rope(self, q, k, v, x, norm_w, eps: float, ws, biases, scratch, pos, cache,
                 layer: int, inv_freq, rope: RopeParams) -> None:
        """The attention block's input side: (q, k, v) = rmsnorm(x) * norm_w @ (Wq, Wk, Wv).T
        (+ biases), then rope_store (q and k rotated, k and v into the cache at pos)."""
        self.norm_matmul((q, k, v), x, norm_w, eps, ws, biases, scratch)
        self.rope_store(q, k, v, pos, cache, layer, inv_freq, rope)

    def matmul_add(self, x, a, w, scratch) -> None:
        """x += a @ W.T (the residual update); scratch (n, rows) may be used for the product."""
        self.matmul(scratch, a, w)
        self.add(x, x, scratch)

    @abstractmethod
    def rope(self, x, pos, n_heads: int, inv_freq, rope: RopeParams) -> None:
        """Rotate x (n, n_heads * head_dim) in place by positions pos (n,) int32."""

    paged_kv = False              # kv_store/attention follow a paged cache's tables (kvcache.py)

    @abstractmethod
    def kv_store(self, cache, layer: int, k, v, pos) -> None:
        """Write k, v (n, kv_dim) into KVCache `cache` (.k, .v: (n_layer, n_kv_head, n_slots,
        head_dim), .kv_type) of `layer` at positions pos (n,), or, when the cache is paged, at
        slots cache.slots (n,) int32 (a slot < 0 writes nothing)."""

    @abstractmethod
    def attention(self, out, q, cache, layer: int, pos, scale: float) -> None:
        """Causal GQA attention: out[t] (q_dim) attends to positions 0..pos[t] of its KV head in
        `cache`; q, out (n, n_head * head_dim) f32. When the cache is paged, position j of row t
        is at slot tables[row_seq[t], j // B] * B + j % B (cache.tables (n_seqs, max_blocks),
        cache.row_seq (n,) int32, B = cache.block_size)."""

    @abstractmethod
    def silu_mul(self, out, gate, up) -> None:
        """out = silu(gate) * up; (n, n_ff) f32."""

    @abstractmethod
    def add(self, out, a, b) -> None:
        """out = a + b (the residual); (n, d) f32."""

    @abstractmethod
    def argmax(self, out, logits) -> None:
        """out[0] (int32) = index of the largest of logits (n_vocab,) (greedy decoding)."""

    def argmax_rows(self, out, logits) -> None:
        """out[r] (int32) = index of the first largest of logits[r], logits (m, n_vocab): the
        greedy picks of a batched step. Host arrays here; a device backend overrides it."""
        out[:logits.shape[0]] = np.argmax(logits, axis=1)

    samples_on_device = False     # generation samples with the `sample` op (else on the host)
    samples_rows_on_device = False    # a batched step's sampled rows with `sample_rows`

    def sample_rows(self, picks, logits, where, fp, ip, n: int) -> None:
        """The sampling chain (`sample`'s, without penalties or bookkeeping) on n rows of a
        batched step at once: picks[b] (int32) from logits[where[b, 0]] with the parameters
        fp[b], ip[b] (sampler_params rows, repeat_last_n 0), the draw keyed by where[b, 1] (the
        position of the token being sampled), so that each pick is the host sampler's
        (make_sampler) for that row. Only where samples_rows_on_device: the others sample a
        batch's rows on the host."""
        raise NotImplementedError("this backend samples a batch's rows on the host")

    def adjust_rows(self, logits, where, fp, adj, bias) -> None:
        """Before sample_rows, in place: for each entry i of adj (host int64 (n, 4): b, id,
        count, has_bias; bias host float32 (n,)), logits[where[b, 0], id] plus bias[i] when
        has_bias, then the penalties of fp[b] (`sample`'s, as sampling.apply_penalties) when
        count > 0. Each (b, id) at most once. Only where samples_rows_on_device."""
        raise NotImplementedError("this backend samples a batch's rows on the host")

    @abstractmethod
    def sample(self, logits, ids, pos, st: SamplerState, j: int) -> None:
        """Step j of a decode chain: pick the next token from logits (n_vocab,) f32 of the token at
        position pos[0] with SamplingParams' chain (sampling.py): penalties (applied to logits in
        place), then top-k, top-p, min-p on the untempered probabilities, then a Gumbel-max draw
        at the temperature from rng.py's Philox keyed by (seed, pos[0] + 1, id); temperature 0 is
        the argmax. Then record it: st.hist, st.counts (the penalty window), st.out[2 + j] and
        st.out[0] = j + 1; st.out[1] = 1 when it is an eog id or pos[0] + 1 >= stop_pos, else feed
        it on: ids[0] = pick, pos[0] += 1 (int32 (1,) views). With st.out[1] set and j > 0 the
        step does nothing (step 0 clears it), so the steps of a chunk after the end of generation
        repeat the last step's inputs and leave the cache and the state as they were."""

    def advance(self, ids, pos, next_id, out, j: int) -> None:
        """Feed the greedy pick to the next decode step without the host: ids[0] = next_id[0],
        pos[0] += 1, and out[j] = next_id[0] (int32 arrays; out collects a chunk's picks). Host
        arrays here; a device backend overrides it with a kernel."""
        ids[0] = next_id[0]
        pos[0] += 1
        out[j] = next_id[0]

    def advance_rows(self, ids, pos, slots, tables, row_seq, picks, out, j: int,
                     block_size: int) -> None:
        """advance() for the rows of a decode-only batch (Model.run_batch_steps): each row r
        with slots[r] >= 0 takes picks[r] as its next token (out[j, r] too), one position on, and
        that position's slot through tables[row_seq[r]] (-1 if the table has no block there);
        padding rows (slot -1) stay as they are. Host arrays here; a device backend overrides it
        with a kernel."""
        for r in range(ids.shape[0]):
            if slots[r] < 0:
                continue
            out[j, r] = ids[r] = picks[r]
            pos[r] += 1
            b = pos[r] // block_size
            blk = tables[row_seq[r], b] if b < tables.shape[1] else -1
            slots[r] = blk * block_size + pos[r] % block_size if blk >= 0 else -1

    # whether the batched engine runs several greedy decode steps a replay (Engine.step): a
    # backend with graphs, where it saves the host's turn between steps
    multi_step = False

    decode_rows = None            # set by split_rows for a batched step's products

    def split_rows(self, n: int | None) -> None:
        """For the products that follow (a batched step): their first n rows are decode rows (a
        generated token of a sequence each), the rest prompt rows; the backend may give each
        kind its own product, as long as a row's result never depends on the other rows. None:
        back to the single-sequence choice (by row count)."""
        self.decode_rows = n

    def gather_rows(self, out, x, idx) -> None:
        """out (m, d) = x[idx] (idx (m,) int32): the rows whose logits a batched step wants.
        Host arrays here; a device backend overrides it with a kernel."""
        out[:] = x[idx]

    def replay(self, key, fn) -> None:
        """Run fn(), which only launches ops on buffers fixed at load. A backend that can record
        (CUDA graphs) records it on the first call for `key` and replays the record afterwards."""
        fn()

    def check_memory(self, mf, n_ctx: int, n_batch: int) -> None:
        """Raise MemoryError (one line, both numbers) if the model cannot fit on the device."""

    def check_batch_memory(self, cfg, kv_slots: int, n_batch: int, max_seqs: int,
                           kv_type: str) -> None:
        """Raise MemoryError (one line) if the batched path's KV pool of kv_slots positions and
        its buffers for n_batch rows and max_seqs sequences cannot fit beside the model."""

    def synchronize(self) -> None:
        """Wait for queued work (no-op on the CPU)."""

    def stats(self) -> dict:
        """Memory statistics for --verbose and bench."""
        return {}

    # --- measuring (bench --kernels) ---------------------------------------------------------
    def time_us(self, fn, reps: int = 20) -> float:
        """Microseconds one fn() (which only launches ops, and has run once: compiled) takes, over
        reps runs, synchronized."""
        self.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        self.synchronize()
        return (time.perf_counter() - t0) / reps * 1e6

    def count_launches(self, fn) -> int | None:
        """Kernel launches one fn() makes, where the backend can count them (CUDA graphs)."""
        return None

    def copy_bandwidth(self, nbytes: int = 1 << 28) -> float:
        """GB/s (bytes read + written) of copying nbytes between two arrays, the best of 3 (on the
        host: numpy's single-threaded copy)."""
        src = np.ones(nbytes // 4, np.float32)
        dst = np.empty_like(src)
        best = min(_seconds(lambda: np.copyto(dst, src)) for _ in range(3))
        return 2 * nbytes / best / 1e9


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
