"""KV cache layout: one K and one V array (n_layer, n_kv_head, n_ctx, head_dim), allocated once."""
from __future__ import annotations

from .config import ModelConfig


class KVCache:
    """K/V for every layer at context n_ctx, on a backend. Positions are the cache rows."""

    def __init__(self, backend, cfg: ModelConfig, n_ctx: int, dtype):
        self.n_ctx = n_ctx
        self.shape = (cfg.n_layer, cfg.n_head_kv, n_ctx, cfg.head_dim)
        self.k = backend.alloc(self.shape, dtype)      # (n_layer, n_kv_head, n_ctx, head_dim)
        self.v = backend.alloc(self.shape, dtype)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
