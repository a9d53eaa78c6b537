"""The op table every backend implements: what model.py may call, with shapes and dtypes.

Arrays are backend arrays (numpy on the CPU, numba device arrays on CUDA). Every op writes into an
`out` argument allocated once by the caller; none allocates in the decode loop. Activations are
float32, row-major, token-major: x (n_tokens, width). Per-step values that change between decode
steps (token ids, positions) live in backend arrays too, so a captured CUDA graph can replay.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig


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

    kv_dtype = np.float32

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

    @abstractmethod
    def rope(self, x, pos, n_heads: int, inv_freq, rope: RopeParams) -> None:
        """Rotate x (n, n_heads * head_dim) in place by positions pos (n,) int32."""

    @abstractmethod
    def kv_store(self, k_cache, v_cache, layer: int, k, v, pos) -> None:
        """Write k, v (n, kv_dim) into the caches (n_layer, n_kv_head, n_ctx, head_dim) at pos (n,)."""

    @abstractmethod
    def attention(self, out, q, k_cache, v_cache, layer: int, pos, scale: float) -> None:
        """Causal GQA attention: out[t] (q_dim) attends to cache positions 0..pos[t] of its
        KV head; q, out (n, n_head * head_dim) f32."""

    @abstractmethod
    def silu_mul(self, out, gate, up) -> None:
        """out = silu(gate) * up; (n, n_ff) f32."""

    @abstractmethod
    def add(self, out, a, b) -> None:
        """out = a + b (the residual); (n, d) f32."""

    @abstractmethod
    def argmax(self, out, logits) -> None:
        """out[0] (int32) = index of the largest of logits (n_vocab,) (greedy decoding)."""

    def replay(self, key, fn) -> None:
        """Run fn(), which only launches ops on buffers fixed at load. A backend that can record
        (CUDA graphs) records it on the first call for `key` and replays the record afterwards."""
        fn()

    def check_memory(self, mf, n_ctx: int, n_batch: int) -> None:
        """Raise MemoryError (one line, both numbers) if the model cannot fit on the device."""

    def synchronize(self) -> None:
        """Wait for queued work (no-op on the CPU)."""

    def stats(self) -> dict:
        """Memory statistics for --verbose and bench."""
        return {}
