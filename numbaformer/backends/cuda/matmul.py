"""Quantized matrix products on the GPU, weights in the GPU layout (layout.py).

GEMV (decode, one token): gemv.py's fused kernels (norm prologue, several matrices, epilogues).
GEMM (prefill; the exact path, FP32 FFMA on f32 activations: the default prefill product is the bf16
tensor-core GEMM of matmul_mma.py): a block computes a GEMM_BM-row x GEMM_BN-token tile of the
output, stepping through the shared dimension 32 values (one decode chunk) at a time: the X tile
is copied and the W tile
dequantized into shared memory (each weight block gathered into GGUF order once per token tile,
in a thread-local buffer, and decoded chunk by chunk), then every thread
accumulates a GEMM_TM x GEMM_TN register block from 16-byte shared loads.
"""
from __future__ import annotations

import functools

from numba import cuda, float32, uint8

from ...quants import GGML_TYPES, QK, U
from ._jit import cuda_kernel
from .decoders import DECODERS
from .gemv import _n_sms, gemv
from .layout import gather_block

SMEM_DEFAULT = 48 << 10  # dynamic shared memory a launch may use without opting in
GEMM_BM = 128            # weight rows per GEMM tile
GEMM_BN = 128            # tokens per GEMM tile
GEMM_TM = 8              # weight rows per thread (register block)
GEMM_TN = 8              # tokens per thread


@functools.lru_cache(maxsize=None)
def _gemm_kernel(qtype: int, bm: int, bn: int, tm: int, tn: int, epilogue: int):
    dq32 = DECODERS[qtype][0]
    cb = GGML_TYPES[qtype].chunk_bytes
    cpb = GGML_TYPES[qtype].chunks_per_block
    tx_n = bm // tm                              # threads along weight rows
    ty_n = bn // tn                              # threads along tokens
    threads = tx_n * ty_n
    pad_m, pad_n = bm + 4, bn + 4                # keep rows 16-byte aligned, spread the banks
    x_per_thread = bn * QK // threads            # x values each thread stages per step
    gather = gather_block(qtype)

    @cuda_kernel
    def _gemm(out, w, x, extra):
        """out[t, r] = sum_k x[t, k] W[r, k] (+ bias / residual) for a bm-row x bn-token tile.

        Per 32-value step c: threads copy x[tokens, 32c:32c+32] transposed into xs[k, token]
        (16-byte loads) and threads 0..bm-1 dequantize chunk c of one weight row each into
        ws[k, row] (barrier); then thread (tx, ty) multiplies rows tx*tm .. and tokens ty*tn ..
        into a tm x tn register block, reading both operands as 16-byte shared loads (barrier)."""
        xs = cuda.shared.array((QK, pad_n), float32)
        ws = cuda.shared.array((QK, pad_m), float32)
        acc = cuda.local.array((tn, tm), float32)
        blk = cuda.local.array(cb, uint8)                # this thread's weight block, GGUF order
        a = cuda.local.array(tn, float32)
        bv = cuda.local.array(tm, float32)
        tid = cuda.threadIdx.x
        tx = tid % tx_n
        ty = tid // tx_n
        r0 = cuda.blockIdx.x * bm
        t0 = cuda.blockIdx.y * bn
        n_tok = x.shape[0]
        rows = w.shape[0]
        nb = x.shape[1] // QK // cpb
        for j in range(tn):
            for i in range(tm):
                acc[j, i] = 0
        xt = tid // (QK // x_per_thread)                 # the token row this thread stages
        xk = (tid % (QK // x_per_thread)) * x_per_thread
        for c in range(x.shape[1] // QK):
            for e in range(x_per_thread):
                xs[U(xk + e), U(xt)] = x[t0 + xt, QK * c + xk + e] if t0 + xt < n_tok \
                    else float32(0)
            if tid < bm:
                if r0 + tid < rows:
                    if c % cpb == 0:
                        gather(w[r0 + tid], nb, c // cpb, blk)
                    dq32(blk, 0, c % cpb, ws[:, tid], 0, 16)
                else:
                    for k in range(QK):
                        ws[k, tid] = 0
            cuda.syncthreads()                           # xs, ws staged
            for k in range(QK):
                for j in range(tn):
                    a[j] = xs[U(k), U(ty * tn + j)]
                for i in range(tm):
                    bv[i] = ws[U(k), U(tx * tm + i)]
                for j in range(tn):
                    for i in range(tm):
                        acc[j, i] += a[j] * bv[i]
            cuda.syncthreads()                           # tiles consumed before the next step
        for j in range(tn):
            t = t0 + ty * tn + j
            if t < n_tok:
                for i in range(tm):
                    r = r0 + tx * tm + i
                    if r < rows:
                        v = acc[j, i]
                        if epilogue == 1:
                            v += extra[r]
                        elif epilogue == 2:
                            v += extra[t, r]
                        out[t, r] = v

    return _gemm


def matmul(out, x, w, stream, bias=None, residual=None, exact=False, batched=False) -> None:
    """out (n, rows) = x (n, cols) @ W.T (+ bias (rows,) | + residual (n, rows)); W a QTensor on
    the device. residual may be `out` itself (each element is read before it is written).
    A single token takes the mat-vec (gemv.py; exact: with f32 activations) unless `batched`
    (a row of a batched step: the GEMM, whatever the number of rows)."""
    n = x.shape[0]
    if n == 1 and not batched:
        mode, extras = ("bias", [bias]) if bias is not None else ("residual", [residual]) \
            if residual is not None else ("store", None)
        gemv([out], [w], x, stream, mode=mode, extras=extras, opt_in=_opt_in, exact=exact)
        return
    epilogue, extra = (1, bias) if bias is not None else (2, residual) if residual is not None \
        else (0, out)
    bm, bn, tm, tn = GEMM_BM, GEMM_BN, GEMM_TM, GEMM_TN
    if -(-w.rows // bm) * -(-n // bn) < 2 * _n_sms() and bm >= 128:
        bm, bn, tm, tn = bm // 2, bn // 2, tm // 2, tn // 2     # small problem: 4x the blocks
    k = _gemm_kernel(w.qtype, bm, bn, tm, tn, epilogue)
    grid = ((w.rows + bm - 1) // bm, (n + bn - 1) // bn)
    k[grid, (bm // tm) * (bn // tn), stream](out, w.data, x, extra)


_opted_in: dict = {}


def _opt_in(kernel, nbytes: int, *args) -> None:
    """Raise the kernel's dynamic shared memory limit past 48 KiB (once per kernel and size)."""
    if nbytes <= SMEM_DEFAULT:
        return
    from .launch import set_max_dynamic_shared_memory
    key = (id(kernel), tuple(getattr(a, "dtype", type(a)) for a in args))
    if _opted_in.get(key, 0) < nbytes:
        set_max_dynamic_shared_memory(kernel, nbytes, *args)
        _opted_in[key] = nbytes

