"""The CPU's packed layout for the 8-bit-activation mat-vec, made once at load: row groups of 16.

GGUF keeps each row's blocks whole (scale, then quants). The decode mat-vec (simd.py) instead
takes 16 rows at a time, one per int32 lane of a 512-bit vector, and wants each load of 64 bytes
to hold 4 quant bytes of each of the 16 rows. So a matrix of `rows` rows becomes G = ceil(rows/16)
row groups, stored one after the other, each a run of its blocks (32 columns each), each block

    quants  64 * loads bytes     load k, row i, byte j: quant byte 4k+j of row 16g+i (Q4_0/Q4_1:
                                 the packed nibble bytes, loads = 4; Q8_0: the int8 quants + 128,
                                 loads = 8)
    d       16 f16 (32 bytes)    row i's scale
    m       16 f16 (32 bytes)    row i's min (Q4_1 only)

so that a group is one sequential stream (320 bytes a block for Q4_1, 288 for Q4_0, 544 for Q8_0).
Rows past the end of the matrix are zero (scale 0). The packing is a permutation of the bytes
(Q8_0's quants shifted by 128, which the kernel's integer sums undo exactly): lossless, the same
size but for that padding. The GGUF rows stay as they are for the prefill GEMM, the embedding and
the exact path. A backend packs all of a model's matrices into one arena, in the order a decode
step reads them (large enough for transparent huge pages).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from numba import prange

from ...quants import GGML_TYPES, Q4_0, Q4_1, Q8_0
from ._jit import cpu_jit
from .simd import KINDS, R, block_bytes

KIND = {Q4_0: "q4_0", Q4_1: "q4_1", Q8_0: "q8_0"}          # the types with a packed mat-vec
_QS = {Q4_0: (2, 18), Q4_1: (4, 20), Q8_0: (2, 34)}          # byte range of the quants in a block
_HALVES = {Q4_0: (0,), Q4_1: (0, 2), Q8_0: (0,)}             # byte offsets of d (and m)


@dataclass(frozen=True)
class Packed:
    """One weight matrix in row groups of 16 (module doc). rows: the matrix's, before padding."""

    kind: str
    rows: int
    cols: int
    w: np.ndarray             # (G, n_blocks * block_bytes(kind)) uint8

    @property
    def groups(self) -> int:
        return self.w.shape[0]


def packed_shape(qtype: int, rows: int, cols: int) -> tuple[int, int]:
    """(G, bytes per group) of a matrix's packed form."""
    return -(-rows // R), cols // 32 * block_bytes(KIND[qtype])


def pack(raw: np.ndarray, qtype: int, rows: int, cols: int, out: np.ndarray | None = None
         ) -> Packed:
    """GGUF rows (rows, row_bytes) uint8 of a type in KIND -> its Packed form, written into `out`
    ((G, bytes per group) uint8, e.g. a view of an arena) or a new array."""
    kind, (a, _) = KIND[qtype], _QS[qtype]
    w = np.empty(packed_shape(qtype, rows, cols), np.uint8) if out is None else out
    halves = _HALVES[qtype] + (-1,) * (2 - len(_HALVES[qtype]))
    _pack(np.asarray(raw), w, GGML_TYPES[qtype].type_size, a, KINDS[kind][0], halves[0],
          halves[1], 0x80 if qtype == Q8_0 else 0)
    return Packed(kind, rows, cols, w)


@cpu_jit(parallel=True)
def _pack(raw, w, bs, qs_at, loads, d_at, m_at, flip):
    # raw (rows, nb * bs) GGUF rows -> w (G, nb * block bytes); one row group per iteration
    rows = raw.shape[0]
    nb = raw.shape[1] // bs
    bb = w.shape[1] // nb
    for g in prange(w.shape[0]):
        for blk in range(nb):
            o = blk * bb
            for i in range(R):
                r = g * R + i
                for k in range(loads):
                    for j in range(4):
                        v = raw[r, blk * bs + qs_at + 4 * k + j] ^ flip if r < rows else 0
                        w[g, o + 64 * k + 4 * i + j] = v
                for h, at in enumerate((d_at, m_at)):
                    if at >= 0:
                        for j in range(2):
                            v = raw[r, blk * bs + at + j] if r < rows else 0
                            w[g, o + 64 * loads + 32 * h + 2 * i + j] = v


def unpack(p: Packed, qtype: int) -> np.ndarray:
    """The GGUF rows (rows, row_bytes) of a Packed matrix (tests: the packing is lossless)."""
    a, b = _QS[qtype]
    loads = KINDS[p.kind][0]
    nb, bs, groups = p.cols // 32, GGML_TYPES[qtype].type_size, p.groups
    src = p.w.reshape(groups, nb, -1)
    blocks = np.zeros((groups, R, nb, bs), np.uint8)
    qs = src[..., :64 * loads].reshape(groups, nb, loads, R, 4).transpose(0, 3, 1, 2, 4)
    blocks[..., a:b] = (qs ^ np.uint8(0x80) if qtype == Q8_0 else qs).reshape(groups, R, nb, -1)
    for h, off in enumerate(_HALVES[qtype]):
        at = 64 * loads + 32 * h
        blocks[..., off:off + 2] = src[..., at:at + 32].reshape(groups, nb, R, 2).transpose(
            0, 2, 1, 3)
    return blocks.reshape(groups * R, nb * bs)[:p.rows]
