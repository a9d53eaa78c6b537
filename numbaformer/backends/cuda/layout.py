"""The GPU layout of quantized weights, made once at upload: every GGUF block split into planes.

A GGUF row is a run of blocks of 18, 20, 22, 24, 34, 84, 110, 144, 176 or 210 bytes, so a 16-byte
load of the quants is aligned for Q4_K alone. On the device each row is instead a run of *planes*,
each plane the same byte range of every block of the row, one after the other, each plane padded
to 16 bytes:

    row r:  [ q plane: quants of block 0, 1, .. | pad ][ plane 2 .. | pad ] ...

The q plane (nibbles, bytes or 2-bit fields) comes first and holds 16 bytes per 32 values for the
4-bit types: a kernel reads one 16-byte *unit* of it per lane with an aligned LDG.128, coalesced
across the warp. The other planes (5th/high bits, scales, d and min as f16) are small and read
beside it. The repacking is a permutation of bytes: lossless, the same size but for the padding,
and still quantized. Float types (F32, F16, BF16) keep their rows as they are.

PLANES[t] lists the planes of type t as (start, end) byte ranges of the GGUF block.
`plane_offsets(t, n_blocks)` gives each plane's byte offset in a row; the kernels compute the same
offsets from the row's block count.
"""
from __future__ import annotations

import functools

import numpy as np

from ...quants import (BF16, F16, F32, GGML_TYPES, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1,
                       Q5_K, Q6_K, Q8_0)

ALIGN = 16

PLANES: dict[int, tuple[tuple[int, int], ...]] = {
    F32: ((0, 128),), F16: ((0, 64),), BF16: ((0, 64),),     # 32 values: identity
    Q4_0: ((2, 18), (0, 2)),                                 # qs | d
    Q4_1: ((4, 20), (0, 4)),                                 # qs | d m
    Q5_0: ((6, 22), (2, 6), (0, 2)),                         # qs | qh | d
    Q5_1: ((8, 24), (4, 8), (0, 4)),                         # qs | qh | d m
    Q8_0: ((2, 34), (0, 2)),                                 # qs | d
    Q2_K: ((16, 80), (0, 16), (80, 84)),                     # qs | scales | d dmin
    Q3_K: ((32, 96), (0, 32), (96, 108), (108, 110)),        # qs | hmask | scales | d
    Q4_K: ((16, 144), (0, 16)),                              # qs | d dmin scales
    Q5_K: ((48, 176), (16, 48), (0, 16)),                    # qs | qh | d dmin scales
    Q6_K: ((0, 128), (128, 192), (192, 208), (208, 210)),    # ql | qh | scales | d
}


def _pad(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def block_bytes(qtype: int) -> int:
    """Bytes of one GGUF block (for float types: of 32 values)."""
    return GGML_TYPES[qtype].chunk_bytes


def n_blocks(qtype: int, cols: int) -> int:
    """Blocks per row (32-value chunks for the float types)."""
    t = GGML_TYPES[qtype]
    return cols // (t.block_size if t.block_size > 1 else 32)


def plane_offsets(qtype: int, nb: int) -> tuple[int, ...]:
    """Byte offset of each plane in a row of nb blocks, then the row's pitch (16-byte multiple)."""
    offs = [0]
    for a, b in PLANES[qtype]:
        offs.append(offs[-1] + _pad(nb * (b - a)))
    return tuple(offs)


def row_pitch(qtype: int, cols: int) -> int:
    return plane_offsets(qtype, n_blocks(qtype, cols))[-1]


def device_bytes(t) -> int:
    """Bytes a weight matrix (QTensor) takes on the device in this layout."""
    return t.rows * row_pitch(t.qtype, t.cols)


def repack(raw: np.ndarray, qtype: int, cols: int) -> np.ndarray:
    """GGUF rows (rows, row_bytes) uint8 -> the GPU layout (rows, pitch) uint8."""
    rows, nb = raw.shape[0], n_blocks(qtype, cols)
    blocks = np.ascontiguousarray(raw).reshape(rows, nb, block_bytes(qtype))
    offs = plane_offsets(qtype, nb)
    out = np.zeros((rows, offs[-1]), dtype=np.uint8)
    for (a, b), o in zip(PLANES[qtype], offs):
        out[:, o:o + nb * (b - a)].reshape(rows, nb, b - a)[...] = blocks[:, :, a:b]
    return out


def unpack(packed: np.ndarray, qtype: int, cols: int) -> np.ndarray:
    """The inverse of repack: (rows, pitch) -> GGUF rows (rows, row_bytes)."""
    rows, nb = packed.shape[0], n_blocks(qtype, cols)
    blocks = np.zeros((rows, nb, block_bytes(qtype)), dtype=np.uint8)
    for (a, b), o in zip(PLANES[qtype], plane_offsets(qtype, nb)):
        blocks[:, :, a:b] = packed[:, o:o + nb * (b - a)].reshape(rows, nb, b - a)
    return blocks.reshape(rows, -1)


@functools.lru_cache(maxsize=None)
def gather_block(qtype: int):
    """A device function gather(row, nb, b, dst) copying block b of a GPU-layout row (uint8, nb
    blocks) into dst[0 : block_bytes] in GGUF order, for the GGUF-order decoders of quants.py (the
    exact paths: embedding, GEMM staging, the f32 mat-vec)."""
    from numba import cuda

    starts = tuple(a for a, _ in PLANES[qtype])
    lens = tuple(b - a for a, b in PLANES[qtype])
    n_planes = len(lens)

    @cuda.jit(device=True, inline=True)
    def gather(row, nb, b, dst):
        base = 0
        for p in range(n_planes):
            n = lens[p]
            src = base + b * n
            for k in range(n):
                dst[starts[p] + k] = row[src + k]
            base += (nb * n + ALIGN - 1) // ALIGN * ALIGN
    return gather
