"""CUDABackend: the op table on one GPU, one stream, a buffer pool and CUDA-graph decode."""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
from numba import cuda
from ._sim import SIMULATOR

from ...progress import byte_bar
from ...quants import Q8_0
from ..base import Backend
from . import (attention, elementwise, embed, flash, gemv, matmul, matmul_mma, matmul_wide, norm,
               paged, rope, rows_mma, sample)
from .graph import CudaGraph, graphs_supported
from .launch import derived
from .layout import device_bytes, repack
from .pool import DevicePool

WORKSPACE_BYTES = 256 << 20          # kernels, scratch and fragmentation headroom in the estimate


def upload_matrix(host: np.ndarray, qtype: int, cols: int, stream=0):
    """GGUF rows (rows, row_bytes) uint8 -> the device, repacked into the GPU layout (layout.py):
    (rows, pitch) uint8, every row and plane 16-byte aligned for the kernels' vector loads."""
    return cuda.to_device(repack(host, qtype, cols), stream=stream)


def memory_needed(mf, n_ctx: int, n_batch: int) -> int:
    """Bytes the model needs on the GPU: weights, an f16 KV cache for n_ctx, activations for n_batch
    tokens (and their bf16 copy for the tensor-core GEMM), logits, and WORKSPACE_BYTES for
    kernels, scratch and fragmentation."""
    cfg = mf.config
    return (sum(device_bytes(t) for t in mf.weights.matrices()) + cfg.kv_cache_bytes(n_ctx, 2)
            + 4 * n_batch * (4 * cfg.n_embd + 2 * cfg.q_dim + 2 * cfg.kv_dim + 2 * cfg.n_ff)
            + 2 * n_batch * max(cfg.n_embd, cfg.q_dim, cfg.n_ff)
            + 4 * (n_batch + 1) * cfg.n_vocab + WORKSPACE_BYTES
            + (wide_scratch_bytes(cfg) if n_batch >= matmul_wide.WIDE_MIN_TOKENS else 0)
            + min(matmul_wide.RESIDENT_BYTES,
                  2 * sum(t.rows * t.cols for t in mf.weights.matrices())))


def wide_scratch_bytes(cfg) -> int:
    """The widened weights' scratch at its largest: the FFN's gate and up pair in bf16 (the
    output head, past matmul_wide.WIDE_MAX_BYTES for the vocabularies in use, stays in-kernel)."""
    return min(2 * 2 * cfg.n_ff * cfg.n_embd, matmul_wide.WIDE_MAX_BYTES)


def batch_memory_needed(cfg, kv_slots: int, n_batch: int, max_seqs: int,
                        kv_bytes: int = 2) -> int:
    """Bytes the batched path (Engine.start_batching) adds on the GPU beside the loaded model,
    whose weights it shares: its paged KV pool of kv_slots positions, activations for n_batch rows
    (and their bf16 copy), and each sequence's output row, logits and block table."""
    return (2 * cfg.n_layer * kv_slots * cfg.kv_dim * kv_bytes
            + 4 * n_batch * (4 * cfg.n_embd + 2 * cfg.q_dim + 2 * cfg.kv_dim + 2 * cfg.n_ff + 4)
            + 2 * n_batch * max(cfg.n_embd, cfg.q_dim, cfg.n_ff)
            + 4 * max_seqs * (2 * cfg.n_embd + cfg.n_vocab + 2 + kv_slots // 16))


def check_fits(need: int, free: int, total: int, n_ctx: int, what: str = "") -> None:
    """MemoryError with both numbers (one line) when need exceeds the free device memory; what:
    the need's parts (default: the loaded model's)."""
    if need > free:
        what = what or f"the model needs about {need / 2**30:.2f} GiB on the GPU (weights, KV " \
            f"cache at context {n_ctx}, workspace)"
        raise MemoryError(f"{what} but only {free / 2**30:.2f} GiB of {total / 2**30:.2f} GiB "
                          f"is free")


def _runs(ws, biases):
    """(i, j) of each run ws[i:j] of matrices of one type and width, with biases or without: what
    one fused mat-vec launch takes (Q, K, V)."""
    i = 0
    while i < len(ws):
        j = i + 1
        while j < len(ws) and (ws[j].qtype, ws[j].cols) == (ws[i].qtype, ws[i].cols) \
                and (biases[j] is None) == (biases[i] is None):
            j += 1
        yield i, j
        i = j


class CUDABackend(Backend):
    """Weights uploaded once in the GPU layout; activations and the f16 KV cache from the pool.
    `exact`: every matrix product with f32 activations and FP32 arithmetic (matmul.py); else
    decode mat-vecs take 8-bit activations where the type has a fast path (as llama.cpp's MMVQ),
    prefill products (n > 1 tokens) the bf16 tensor-core GEMM (matmul_mma.py) and prefill
    attention over an f16 cache the f16 tensor-core flash kernel (flash.py); each of the two is
    on by default on a GPU and behind its module's ENABLED flag (NUMBAFORMER_MMA, _FLASH)."""

    name = "cuda"
    default_kv_type = "f16"
    # a 2,000-token prompt in one chunk: H200, 8B Q4_K, time to first token 153 ms against 272 ms
    # in chunks of 512 (the tensor-core GEMM's larger tiles, one attention pass)
    default_n_batch = 2048

    def __init__(self, gpu: int = 0, exact: bool = False):
        self.exact = exact
        if not SIMULATOR:
            cuda.select_device(gpu)
        self.device_name = "simulator" if SIMULATOR else \
            cuda.get_current_device().name
        if isinstance(self.device_name, bytes):
            self.device_name = self.device_name.decode()
        self.stream = cuda.stream()
        self.pool = DevicePool(self.stream)
        self.graphs: dict = {}
        self.graph_launches = 0
        self.weight_bytes = 0
        self._decode_scratch = None
        self._sample_scratch = None
        self._rows_scratch = None
        self._adjust_buf = None
        self._paged_scratch = None                   # paged attention's (part_o, part_ml, count)
        self._uploads: dict = {}                     # id(ModelWeights) -> (it, its upload)
        self._xb = None                              # bf16 activations of the tensor-core GEMM
        self._part = None                            # the split decode product's partial sums
        self._xa = None                              # q8 activations of gemv_rows' decode rows
        self._wb = None                              # widened bf16 weights (matmul_wide)
        self._resident_bytes = 0                     # ... kept resident (matmul_wide.RESIDENT_BYTES)
        self._epoch = 0                              # bumped when a scratch above is reallocated

    # --- memory -----------------------------------------------------------------------------
    def alloc(self, shape, dtype=np.float32):
        return self.pool.alloc(shape, dtype)

    def to_device(self, host):
        arr = self.pool.alloc(np.shape(host), np.asarray(host).dtype, zero=False)
        arr.copy_to_device(np.ascontiguousarray(host), stream=self.stream)
        return arr

    def to_host(self, arr):
        out = arr.copy_to_host(stream=self.stream)
        self.stream.synchronize()
        return out

    def copy_in(self, dst, host):
        dst[:len(host)].copy_to_device(np.ascontiguousarray(host, dtype=dst.dtype),
                                       stream=self.stream)

    def upload(self, weights):
        """Every matrix on the device in the GPU layout (a tied output is uploaded once), with a
        progress bar on a terminal when it takes over a second. Once per ModelWeights: the batched
        model (Engine.start_batching) shares the single-sequence model's upload."""
        if id(weights) in self._uploads:
            return self._uploads[id(weights)][1]
        with byte_bar(sum(t.nbytes for t in weights.matrices()),
                      "uploading weights to the GPU") as bar:
            up = self._upload(weights, bar)
        self._uploads[id(weights)] = (weights, up)   # weights kept alive: its id stays its own
        return up

    def _upload(self, weights, bar):
        done = {}

        def up(t):
            if t.name not in done:
                done[t.name] = self.upload_matrix(t)
                bar.update(t.nbytes)
            return done[t.name]

        def vec(a):
            return None if a is None else self.to_device(a.astype(np.float32))

        layers = tuple(dataclasses.replace(
            L, attn_q=up(L.attn_q), attn_k=up(L.attn_k), attn_v=up(L.attn_v),
            attn_output=up(L.attn_output), ffn_gate=up(L.ffn_gate), ffn_up=up(L.ffn_up),
            ffn_down=up(L.ffn_down), attn_norm=vec(L.attn_norm), ffn_norm=vec(L.ffn_norm),
            attn_q_bias=vec(L.attn_q_bias), attn_k_bias=vec(L.attn_k_bias),
            attn_v_bias=vec(L.attn_v_bias)) for L in weights.layers)
        return dataclasses.replace(
            weights, token_embd=up(weights.token_embd), output=up(weights.output),
            output_norm=vec(weights.output_norm), rope_freqs=weights.rope_freqs, layers=layers)

    def upload_matrix(self, t):
        """A host QTensor -> the same QTensor with its data on the device, in the GPU layout."""
        arr = upload_matrix(t.data, t.qtype, t.cols, self.stream)
        self.weight_bytes += arr.nbytes
        return dataclasses.replace(t, data=arr)

    def check_memory(self, mf, n_ctx: int, n_batch: int) -> None:
        if SIMULATOR:
            return
        free, total = cuda.current_context().get_memory_info()
        check_fits(memory_needed(mf, n_ctx, n_batch), free, total, n_ctx)

    def check_batch_memory(self, cfg, kv_slots: int, n_batch: int, max_seqs: int,
                           kv_type: str) -> None:
        if SIMULATOR:
            return
        free, total = cuda.current_context().get_memory_info()
        need = batch_memory_needed(cfg, kv_slots, n_batch, max_seqs, 2 if kv_type == "f16" else 4)
        check_fits(need, free, total, kv_slots, f"{max_seqs} sequences at once need about "
                   f"{need / 2**30:.2f} GiB more on the GPU (a KV pool of {kv_slots} positions, "
                   f"{n_batch} tokens a step)")
    # --- ops --------------------------------------------------------------------------------
    def embed(self, out, table, ids):
        embed.embed(out, table, ids, self.stream)

    def rmsnorm(self, out, x, w, eps):
        norm.rmsnorm(out, x, w, eps, self.stream)

    def _batched(self, x) -> bool:
        """Whether x's rows take the batched products: several rows, or any number inside a
        batched step (split_rows), so that a row's result does not depend on how many rows share
        the step (a batch's lone decode row would otherwise take the single-sequence mat-vec;
        decode rows: _rows_first)."""
        return x.shape[0] > 1 or self.decode_rows is not None

    def _tensor_cores(self, x) -> bool:
        return self._batched(x) and not self.exact and matmul_mma.ENABLED

    def _bf16(self, x, norm_w=None, eps=0.0):
        """x (n, cols) f32 (or rmsnorm(x) * norm_w) in bf16, in the backend's scratch (n, cols)
        uint16, which grows to the largest GEMM input seen."""
        n, cols = x.shape
        xb = derived(self._grow("_xb", n * cols, np.uint16), (n, cols),
                     lambda a: a[:n * cols].reshape(n, cols))
        matmul_mma.to_bf16(xb, x, self.stream, norm_w, eps)
        return xb

    def _rows_first(self, x, ws) -> int:
        """How many leading rows of x (a batched step's decode rows) take gemv.gemv_rows, the
        mat-vec on 8-bit activations over many rows (gemv.ROWS): for the matrices rows_mma takes
        (Q4_K, Q6_K), gemv.ROWS_MMA_MIN to gemv.ROWS_MMA_MAX rows on the s8 tensor cores; for the
        others, up to gemv.ROWS_MAX rows on the dp4a rows kernel, whose rows have the bits of the
        single-sequence decode. Either way a row's bits do not depend on the other rows, as long
        as the step's decode rows stay within the kernel's range (past it, the tensor-core GEMM,
        the measured crossover). 0 outside batched steps, with `exact`, past those counts, or for
        matrices neither takes."""
        d = self.decode_rows
        if d is None or d <= 0 or not gemv.rows_supported(ws, self.exact) or \
                d > gemv.ROWS_MAX and not gemv.rows_on_tensor_cores(ws, d):
            return 0
        return min(d, x.shape[0])

    @contextlib.contextmanager
    def _prompt_rows(self):
        """After gemv_rows took the decode rows: the rest run with decode_rows 0, prompt rows to
        every product the method composes."""
        saved, self.decode_rows = self.decode_rows, 0
        try:
            yield
        finally:
            self.decode_rows = saved

    def _q8_rows(self, x, norm_w=None, eps=0.0):
        """x's rows as q8 activations (of rmsnorm(x) * norm_w with norm_w) in the backend's
        scratch, which grows to the most rows seen (gemv.quantize_rows)."""
        n, cols = x.shape
        width = gemv.rows_words(cols)
        xa = self._grow("_xa", n * width, np.float32)[:n * width].reshape(n, width)
        gemv.quantize_rows(xa, x, norm_w, eps, self.stream)
        return xa

    def _grow(self, name: str, size: int, dtype):
        """The backend's scratch array `name`, reallocated from the pool when smaller than size
        (which bumps _epoch: graphs captured with the old one are dropped by replay)."""
        a = getattr(self, name)
        if a is None or a.size < size:
            if a is not None:
                self.pool.release(a)
            a = self.pool.alloc(size, dtype, zero=False)
            setattr(self, name, a)
            self._epoch += 1
        return a

    def _mma(self, out, xb, w, residual=None, **kw):
        """The tensor-core product of xb's rows (matmul_mma.gemm's keywords). With
        matmul_mma.SPLIT_DECODE, inside a batched step the first decode_rows rows take the decode
        product (split-K, its slices fixed by W's shape) and the others the prefill GEMM, so that
        a row's bits depend on its kind only; else every row the prefill GEMM (whose rows' bits
        do not depend on the row count either)."""
        n = xb.shape[0]
        d = 0 if self.decode_rows is None or not matmul_mma.SPLIT_DECODE else \
            min(self.decode_rows, n)
        if d:
            swiglu = kw.get("up") is not None
            splits = matmul_mma.decode_splits(w, swiglu, gemv._n_sms())
            shape = matmul_mma.part_shape(d, w, swiglu, splits)
            size = int(np.prod(shape))
            part = self._grow("_part", size, np.float32)[:size].reshape(shape) \
                if splits > 1 else out
            matmul_mma.gemm(out[:d], xb[:d], w, self.stream, part=part,
                            residual=None if residual is None else residual[:d], **kw)
        if d == 0:                                      # (no views: numba's cost ~20-60 us each)
            self._gemm(out, xb, w, residual=residual, **kw)
        elif d < n:
            self._gemm(out[d:], xb[d:], w, residual=None if residual is None else residual[d:],
                       **kw)

    def _gemm(self, out, xb, w, residual=None, bias=None, up=None):
        """The prefill GEMM: on weights widened to bf16 in the backend's scratch for passes of
        matmul_wide.WIDE_MIN_TOKENS tokens or more (the same bits), else matmul_mma's."""
        if not matmul_wide.takes(xb.shape[0], w, up):
            return matmul_mma.gemm(out, xb, w, self.stream, residual=residual, bias=bias, up=up)
        rows = w.rows * (1 if up is None else 2)
        wb = self._resident_wide(w, up, rows)
        if wb is None:
            wb = derived(self._grow("_wb", rows * w.cols, np.uint16), (rows, w.cols),
                         lambda a: a[:rows * w.cols].reshape(rows, w.cols))
            matmul_wide.widen_pair(wb, w, self.stream, up)
        matmul_wide.gemm(out, xb, wb, w.rows, self.stream, bias=bias, residual=residual,
                         swiglu=up is not None)

    def _resident_wide(self, w, up, rows: int):
        """W's (and SwiGLU's up's) widened rows kept on the device, widened on first use while
        matmul_wide.RESIDENT_BYTES allows (kept on W's device array, freed with it); None past
        that budget."""
        key = ("wide", None if up is None else id(up.data))
        views = getattr(w.data, "_nf_views", None)
        if views is not None and key in views:
            return views[key]
        size = 2 * rows * w.cols
        if self._resident_bytes + size > matmul_wide.RESIDENT_BYTES:
            return None
        wb = cuda.device_array((rows, w.cols), np.uint16, stream=self.stream)
        matmul_wide.widen_pair(wb, w, self.stream, up)
        self._resident_bytes += size
        return derived(w.data, key, lambda a: wb)

    def matmul(self, out, x, w, bias=None):
        d = self._rows_first(x, [w])
        if d:
            gemv.gemv_rows([out], [w], self._q8_rows(x[:d]), d, self.stream,
                           mode="store" if bias is None else "bias",
                           extras=None if bias is None else [bias])
            if d < x.shape[0]:
                with self._prompt_rows():
                    self.matmul(out[d:], x[d:], w, bias)
            return
        if self._tensor_cores(x):
            return self._mma(out, self._bf16(x), w, bias=bias)
        matmul.matmul(out, x, w, self.stream, bias=bias, exact=self.exact,
                      batched=self._batched(x))

    def matmul_add(self, x, a, w, scratch):
        d = self._rows_first(a, [w])
        if d:
            gemv.gemv_rows([x], [w], self._q8_rows(a[:d]), d, self.stream, mode="residual",
                           extras=[x])
            if d < a.shape[0]:
                with self._prompt_rows():
                    self.matmul_add(x[d:], a[d:], w, scratch[d:])
            return
        if self._tensor_cores(a):
            return self._mma(x, self._bf16(a), w, residual=x)
        matmul.matmul(x, a, w, self.stream, residual=x, exact=self.exact,
                      batched=self._batched(a))

    def norm_matmul(self, outs, x, norm_w, eps, ws, biases, scratch):
        """Decode: one fused launch per run of matrices of one type and width (norm prologue,
        bias epilogue); prefill: the rmsnorm fused into the bf16 rounding, then one tensor-core
        GEMM per matrix (bias epilogue), or with `exact` the default composition."""
        if self._batched(x):
            d = self._rows_first(x, ws)
            if d:
                xa = self._q8_rows(x[:d], norm_w, eps)
                for i, j in _runs(ws, biases):
                    has_bias = biases[i] is not None
                    gemv.gemv_rows(outs[i:j], ws[i:j], xa, d, self.stream,
                                   mode="bias" if has_bias else "store",
                                   extras=biases[i:j] if has_bias else None)
                if d < x.shape[0]:
                    with self._prompt_rows():
                        self.norm_matmul([o[d:] for o in outs], x[d:], norm_w, eps, ws, biases,
                                         scratch[d:])
                return
            if self.exact or not matmul_mma.ENABLED:
                return super().norm_matmul(outs, x, norm_w, eps, ws, biases, scratch)
            xb = self._bf16(x, norm_w, eps)
            for out, w, b in zip(outs, ws, biases):
                self._mma(out, xb, w, bias=b)
            return
        for i, j in _runs(ws, biases):
            has_bias = biases[i] is not None
            gemv.gemv(outs[i:j], ws[i:j], x, self.stream, mode="bias" if has_bias else "store",
                      extras=biases[i:j] if has_bias else None, norm_w=norm_w, eps=eps,
                      opt_in=matmul._opt_in, exact=self.exact)

    def norm_swiglu(self, out, x, norm_w, eps, w_gate, w_up, scratch, up):
        same = (w_gate.qtype, w_gate.rows, w_gate.cols) == (w_up.qtype, w_up.rows, w_up.cols)
        d = self._rows_first(x, [w_gate, w_up]) if same else 0
        if d:                                         # SwiGLU in the mat-vec's epilogue
            xa = self._q8_rows(x[:d], norm_w, eps)
            if gemv.rows_on_tensor_cores([w_gate, w_up], d) and \
                    not rows_mma.mergeable([w_gate, w_up]):    # two products, then SwiGLU
                gemv.gemv_rows([out], [w_gate], xa, d, self.stream)
                gemv.gemv_rows([up], [w_up], xa, d, self.stream)
                self.silu_mul(out[:d], out[:d], up[:d])
            else:            # (gemv_rows: the merged tensor-core launch or the dp4a kernel's)
                gemv.gemv_rows([out], [w_gate, w_up], xa, d, self.stream, mode="swiglu")
            if d < x.shape[0]:
                with self._prompt_rows():
                    self.norm_swiglu(out[d:], x[d:], norm_w, eps, w_gate, w_up, scratch[d:],
                                     up[d:])
            return
        if self._tensor_cores(x):
            xb = self._bf16(x, norm_w, eps)
            if same:                                  # one GEMM, SwiGLU in its epilogue
                return self._mma(out, xb, w_gate, up=w_up)
            self._mma(out, xb, w_gate)
            self._mma(up, xb, w_up)
            return self.silu_mul(out, out, up)
        if self._batched(x) or not same:
            return super().norm_swiglu(out, x, norm_w, eps, w_gate, w_up, scratch, up)
        gemv.gemv([out], [w_gate, w_up], x, self.stream, mode="swiglu", norm_w=norm_w, eps=eps,
                  opt_in=matmul._opt_in, exact=self.exact)

    def qkv_rope(self, q, k, v, x, norm_w, eps, ws, biases, scratch, pos, cache, layer,
                 inv_freq, rp):
        """Decode: one launch (the fast mat-vec's rope epilogue) where gemv.rope_fusable; else the
        composition."""
        n_bias = sum(b is not None for b in biases)
        if cache.is_paged or x.shape[0] > 1 or n_bias not in (0, 3) or \
                not gemv.rope_fusable(ws, self.exact, rp.rope_dim, rp.head_dim):
            return super().qkv_rope(q, k, v, x, norm_w, eps, ws, biases, scratch, pos, cache,
                                    layer, inv_freq, rp)
        gemv.gemv([q, k, v], ws, x, self.stream, mode="rope",
                  extras=list(biases) if n_bias else None, norm_w=norm_w, eps=eps,
                  opt_in=matmul._opt_in, exact=self.exact,
                  rope=(pos, inv_freq, cache.k, cache.v, layer, rp.head_dim, rp.neox))

    def rope_store(self, q, k, v, pos, cache, layer, inv_freq, rp):
        if cache.is_paged:
            return self._paged_rope_store(q, k, v, pos, cache, layer, inv_freq, rp)
        rope.rope_store(q, k, v, pos, cache.k, cache.v, layer, inv_freq, rp, self.stream)

    def rope(self, x, pos, n_heads, inv_freq, rp):
        rope.rope(x, pos, n_heads, inv_freq, rp, self.stream)

    def kv_store(self, cache, layer, k, v, pos):
        if cache.is_paged:
            return self._paged_kv_store(cache, layer, k, v)
        attention.kv_store(cache.k, cache.v, layer, k, v, pos, self.stream)

    def attention(self, out, q, cache, layer, pos, scale):
        if cache.is_paged:
            return self._paged_attention(out, q, cache, layer, pos, scale)
        if q.shape[0] == 1:
            attention.decode_attention(out, q, cache.k, cache.v, layer, pos, scale,
                                       self._scratch(q.shape[1], cache.k), self.stream)
        elif flash.ENABLED and not self.exact and flash.supported(q, cache.k):
            flash.flash_attention(out, q, cache.k, cache.v, layer, pos, scale, self.stream)
        else:                                      # the FP32 kernel: exact, f32 caches
            attention.prefill_attention(out, q, cache.k, cache.v, layer, pos, scale, self.stream)

    def _scratch(self, q_dim: int, k_cache):
        head_dim, n_ctx = k_cache.shape[3], k_cache.shape[2]
        shapes = attention.decode_scratch_shape(q_dim // head_dim, k_cache.shape[1], head_dim,
                                                n_ctx)
        if self._decode_scratch is None or self._decode_scratch[0].shape != shapes[0][0] or \
                self._decode_scratch[2].shape != shapes[2][0]:
            self._decode_scratch = tuple(self.pool.alloc(s, d) for s, d in shapes)
            self._epoch += 1
        return self._decode_scratch

    # --- the paged cache (Model.forward_batch): slots, block tables; kernels in paged.py ----------
    paged_kv = True

    def _paged_rope_store(self, q, k, v, pos, cache, layer, inv_freq, rp):
        paged.rope_store(q, k, v, pos, cache.slots, cache.k, cache.v, layer, inv_freq, rp,
                         self.stream)

    def _paged_kv_store(self, cache, layer, k, v):
        paged.kv_store(cache.k, cache.v, layer, k, v, cache.slots, self.stream)

    def _paged_attention(self, out, q, cache, layer, pos, scale):
        """Every row through its sequence's block table (decode rows and prefill chunks alike)."""
        head_dim, max_blocks = cache.k.shape[3], cache.tables.shape[1]
        shapes = paged.scratch_shape(q.shape[1] // head_dim, cache.k.shape[1], head_dim,
                                     max_blocks)
        have = self._paged_scratch
        if have is None or tuple(a.shape for a in have) != tuple(s for s, _ in shapes):
            if have is not None:
                for a in have:
                    self.pool.release(a)
            self._paged_scratch = tuple(self.pool.alloc(s, d) for s, d in shapes)
            self._epoch += 1
        paged.attention(out, q, cache.k, cache.v, layer, pos, cache.tables, cache.row_seq,
                        cache.block_size, scale, self._paged_scratch, self.stream)

    def gather_rows(self, out, x, idx):
        paged.gather_rows(out, x, idx, self.stream)

    def silu_mul(self, out, gate, up):
        elementwise.silu_mul(out, gate, up, self.stream)

    def add(self, out, a, b):
        elementwise.add(out, a, b, self.stream)

    def argmax(self, out, logits):
        sample.argmax(out, logits, self.stream)

    def argmax_rows(self, out, logits):
        sample.argmax_rows(out, logits, self.stream)

    def advance(self, ids, pos, next_id, out, j):
        sample.advance(ids, pos, next_id, out, j, self.stream)

    def advance_rows(self, ids, pos, slots, tables, row_seq, picks, out, j, block_size):
        paged.advance_rows(ids, pos, slots, tables, row_seq, picks, out, j, block_size,
                           self.stream)

    multi_step = True

    samples_on_device = True

    def sample(self, logits, ids, pos, st, j):
        if self._sample_scratch is None:           # the first call runs outside any capture
            self._sample_scratch = (self.pool.alloc((sample.BINS,), np.int32),
                                    self.pool.alloc((sample.BINS,), np.uint64))
        sample.sample(logits, ids, pos, st, self._sample_scratch, j, self.stream)

    samples_rows_on_device = True

    def _rows_buffers(self, name: str, n: int, make):
        """The arrays self.<name> (make(rows) -> a tuple of them, the first's length the rows),
        grown to a power of two >= n rows when they are shorter (eager steps, never inside a
        capture: the batched sampling runs between graph replays)."""
        bufs = getattr(self, name)
        if bufs is None or bufs[0].shape[0] < n:
            bufs = make(1 << (n - 1).bit_length())
            setattr(self, name, bufs)
        return bufs

    def sample_rows(self, picks, logits, where, fp, ip, n):
        scratch = self._rows_buffers("_rows_scratch", n, lambda r: (
            self.pool.alloc((r, sample.BINS), np.int32),
            self.pool.alloc((r, sample.BINS), np.uint64), self.pool.alloc((1,), np.int32)))
        sample.sample_rows(picks, logits, where, fp, ip, scratch, n, self.stream)

    def adjust_rows(self, logits, where, fp, adj, bias):
        a, b = self._rows_buffers("_adjust_buf", len(adj), lambda r: (
            self.pool.alloc((r, 4), np.int64), self.pool.alloc((r,), np.float32)))
        self.copy_in(a, adj)
        self.copy_in(b, bias)
        sample.adjust_rows(logits, where, fp, a, b, len(adj), self.stream)

    # --- graphs -----------------------------------------------------------------------------
    def replay(self, key, fn) -> None:
        """Run fn() once per call. First call for `key`: run it directly (compiling/loading every
        kernel it launches, and doing this call's work), then capture it into a CUDA graph without
        running it again (fn may advance device state, as a multi-step decode does). Later calls
        replay the graph. A graph captured before one of the backend's scratch arrays was
        reallocated (a larger GEMM input, another model's shapes) is dropped and fn captured
        again: its frozen pointers are stale. Direct launches under the simulator."""
        if not graphs_supported():
            fn()
            return
        g, epoch = self.graphs.get(key, (None, None))
        if g is not None and epoch != self._epoch:
            g.close()
            del self.graphs[key]
            g = None
        if g is None:
            fn()                                   # this call's work; compiles + loads (+ grows)
            self.stream.synchronize()
            g = CudaGraph()
            g.capture(self.stream, fn)             # records only
            self.graphs[key] = (g, self._epoch)
            return
        g.launch(self.stream)
        self.graph_launches += 1

    def synchronize(self) -> None:
        self.stream.synchronize()

    def time_us(self, fn, reps: int = 20) -> float:
        """GPU time of one fn(): reps copies captured in a CUDA graph, timed by events around a
        replay (no host launch gaps); the host timer under the simulator."""
        if not graphs_supported():
            return super().time_us(fn, reps)
        fn()                                       # compile and load outside the capture
        self.stream.synchronize()
        g = CudaGraph()
        g.capture(self.stream, lambda: [fn() for _ in range(reps)])
        g.launch(self.stream)                      # warm
        e0, e1 = cuda.event(), cuda.event()
        e0.record(self.stream)
        g.launch(self.stream)
        e1.record(self.stream)
        e1.synchronize()
        g.close()
        return cuda.event_elapsed_time(e0, e1) * 1e3 / reps

    def count_launches(self, fn) -> int | None:
        """Nodes of a CUDA graph of one fn() (fn has run once: compiled)."""
        if not graphs_supported():
            return None
        g = CudaGraph()
        g.capture(self.stream, fn)
        n = g.node_count()
        g.close()
        return n

    def copy_bandwidth(self, nbytes: int = 1 << 31) -> float:
        """GB/s (read + written) of a device-to-device copy of nbytes with 16-byte accesses."""
        if not graphs_supported():
            return super().copy_bandwidth()
        n = nbytes // 16
        src = cuda.device_array(n, np.complex128, stream=self.stream)
        dst = cuda.device_array(n, np.complex128, stream=self.stream)
        us = self.time_us(lambda: elementwise.copy16(dst, src, self.stream), reps=4)
        return 2 * n * 16 / us / 1e3

    def stats(self) -> dict:
        return {"device": self.device_name, "exact": self.exact, "weights_bytes": self.weight_bytes,
                "graphs": len(self.graphs), "graph_launches": self.graph_launches,
                "pool": self.pool.stats()}
