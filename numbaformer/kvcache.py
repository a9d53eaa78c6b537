"""Paged KV cache: per layer a pool of slots (n_layer, n_kv_head, n_slots, head_dim) for K and for
V, allocated once, cut into blocks of block_size slots (block b = slots b*B .. b*B + B - 1).

A sequence's block table maps its positions to slots: position p lives at slot
table[p // B] * B + p % B (blocks.py hands out the tables). A step writes each row's new K/V at its
slot (the slot mapping; a slot < 0 writes nowhere) and each row attends to positions 0..pos through
its sequence's table. The plain cache (`slots` None) is the identity table: one block spanning the
whole pool, slot == position, the single-sequence path of today (same kernels, same results).

kv_type "f16" halves the cache on the GPU (llama.cpp's default); "f32" keeps K and V exact. On the
CPU (numba has no float16 arithmetic) "f16" stores f32 values rounded to f16, for parity with the GPU.
Measured on SmolLM2 (8 blocks): f16 storage moves log-probs by up to ~2e-2 against f32.
"""
from __future__ import annotations

import numpy as np

from .blocks import BLOCK_SIZE
from .config import ModelConfig


KV_TYPES = ("f16", "f32")


class KVCache:
    """K/V for every layer, n_slots positions (n_ctx, or n_blocks * block_size when paged), on a
    backend. As built, the identity table (slot == position); `paged(...)` gives a view that
    reads and writes through block tables."""

    slots = None              # (n,) int32: each row's slot to write (None: its position)
    tables = None             # (n_seqs, max_blocks) int32: block tables (None: identity)
    row_seq = None            # (n,) int32: the row's sequence (its row of tables)

    def __init__(self, backend, cfg: ModelConfig, n_ctx: int, kv_type: str,
                 n_blocks: int | None = None, block_size: int = BLOCK_SIZE):
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        self.n_ctx, self.kv_type, self.block_size = n_ctx, kv_type, block_size
        self.n_blocks = n_blocks or 0
        # paged: whole blocks (a context that is not a multiple of the block size rounds up)
        n_slots = n_ctx if not self.n_blocks else \
            max(-(-n_ctx // block_size), self.n_blocks) * block_size
        dtype = backend.kv_dtype(kv_type)
        self.shape = (cfg.n_layer, cfg.n_head_kv, n_slots, cfg.head_dim)
        self.k = backend.alloc(self.shape, dtype)      # (n_layer, n_kv_head, n_slots, head_dim)
        self.v = backend.alloc(self.shape, dtype)

    @property
    def n_slots(self) -> int:
        return self.shape[2]

    @property
    def is_paged(self) -> bool:
        return self.slots is not None

    def paged(self, slots, tables, row_seq) -> KVCache:
        """A view of the same K/V that writes rows at slots (n,) and reads each row's keys
        through tables[row_seq[t]] (backend int32 arrays, fixed at load so a graph can replay)."""
        view = KVCache.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.slots, view.tables, view.row_seq = slots, tables, row_seq
        return view

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def check_batch(batch, n_vocab: int, n_ctx: int, n_blocks: int, block_size: int) -> None:
    """Raise ValueError (one line) unless scheduler.Batch `batch` is safe for the kernels, which
    check no bounds: n >= 1 rows of ids in the vocabulary, positions in the context, row_seq naming
    one of its m sequences, tables (m, w) of block ids < n_blocks (-1: none) with every block a row
    reads (0..pos // block_size of its sequence) present, each slot -1 (padding) or the one its
    position maps to, and last (m,) naming a row of each sequence."""
    ids, pos, slots, row_seq = (np.asarray(a) for a in (batch.ids, batch.pos, batch.slots,
                                                         batch.row_seq))
    tables, last = np.asarray(batch.tables), np.asarray(batch.last)
    n, m = len(ids), len(batch.seqs)
    if n < 1 or m < 1 or any(a.shape != (n,) for a in (pos, slots, row_seq)) or \
            tables.ndim != 2 or tables.shape[0] != m or last.shape != (m,):
        raise ValueError(f"batch shapes: ids {ids.shape}, pos {pos.shape}, slots {slots.shape}, "
                         f"row_seq {row_seq.shape}, tables {tables.shape}, last {last.shape} "
                         f"for {m} sequences")
    bad = [(what, a) for what, a, lo, hi in (("token id", ids, 0, n_vocab),
                                              ("position", pos, 0, n_ctx),
                                              ("row sequence", row_seq, 0, m),
                                              ("output row", last, 0, n),
                                              ("block id", tables, -1, n_blocks))
           if a.size and (a.min() < lo or a.max() >= hi)]
    if bad:
        what, a = bad[0]
        raise ValueError(f"batch: {what} out of range ({a.min()}..{a.max()})")
    top = np.full(m, -1, np.int64)                       # each sequence's last block read
    np.maximum.at(top, row_seq, pos // block_size)
    if top.max() >= tables.shape[1] or \
            (tables[np.arange(tables.shape[1])[None, :] <= top[:, None]] < 0).any():
        raise ValueError("batch: a row reads a position its sequence's block table lacks")
    want = tables[row_seq, pos // block_size].astype(np.int64) * block_size + pos % block_size
    if ((slots != want) & (slots != -1)).any():
        raise ValueError("batch: a slot is not its position's slot in its block table")
    if (row_seq[last] != np.arange(m)).any():
        raise ValueError("batch: an output row belongs to another sequence")
