"""CPU backend: numba.njit(parallel=True, cache=True) ops over the model graph's op table."""
from __future__ import annotations

import dataclasses

import numpy as np

from ...progress import byte_bar
from ...weights import QTensor
from ..base import Backend
from . import attention, elementwise, embed, gemv_q8, matmul, norm, rope, sample
from .layout import KIND, Packed, pack, packed_shape

SERIAL_ROPE_ROWS = 64     # up to this many rows, rope and K/V store run serially (no launch)


@dataclasses.dataclass(frozen=True)
class CPUTensor(QTensor):
    """A weight matrix as the CPU uses it: the GGUF rows (the file's view) and, for the types with
    an 8-bit-activation mat-vec, the same weights packed in row groups (layout.py)."""

    packed: Packed | None = None


class CPUBackend(Backend):
    """Weights stay memory-mapped in their GGUF form (plus, unless exact, a packed copy of the
    Q4_0/Q4_1/Q8_0 matrices); activations are numpy arrays.
    `exact`: every product with f32 activations (else a single token's mat-vecs quantize the
    activations to 8 bits, as llama.cpp does; prefill's GEMM is f32 either way)."""

    name = "cpu"
    default_kv_type = "f32"
    paged_kv = True

    def kv_dtype(self, kv_type: str):
        """f32 storage either way: numba has no float16 on the CPU ("f16" rounds on store)."""
        return np.float32

    def __init__(self, n_threads: int | None = None, exact: bool = False):
        import numba
        if n_threads:
            numba.set_num_threads(max(1, min(n_threads, numba.config.NUMBA_NUM_THREADS)))
        self.n_threads = numba.get_num_threads()
        self.exact = exact
        self._packs: dict[int, tuple[QTensor, CPUTensor]] = {}     # id(GGUF tensor) -> packed
        self._plans: dict[tuple, tuple] = {}                       # ids of ws -> FastMatvec
        self._q8: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        # per prange chunk of the fast mat-vec (as many as numba may have threads): 2 x 16 results
        self._chunks = np.zeros((numba.config.NUMBA_NUM_THREADS, 4, 16), np.float32)

    def alloc(self, shape, dtype=np.float32):
        return np.zeros(shape, dtype=dtype)

    def to_device(self, host):
        return np.ascontiguousarray(host)

    def to_host(self, arr):
        return np.array(arr)

    def copy_in(self, dst, host):
        dst[:len(host)] = host

    # --- weights: the packed copy for the fast mat-vec, made once per matrix ----------------------
    def upload(self, weights):
        """The weights with each Q4_0/Q4_1/Q8_0 matrix the mat-vec reads also packed (not when
        exact), all in one arena in the order a decode step reads them."""
        if self.exact:
            return weights
        mats = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        order = [getattr(L, k) for L in weights.layers for k in mats] + [weights.output]
        todo = list({id(t): t for t in order if t.qtype in KIND and id(t) not in self._packs}
                    .values())
        shapes = [packed_shape(t.qtype, t.rows, t.cols) for t in todo]
        arena = np.empty(sum(g * n for g, n in shapes) + 64, np.uint8)  # huge pages when large
        at = -arena.ctypes.data % 64                                     # 64-byte aligned
        with byte_bar(sum(t.nbytes for t in todo), "repacking weights") as bar:
            for t, (g, n) in zip(todo, shapes):
                self.upload_matrix(t, arena[at:at + g * n].reshape(g, n))
                at += g * n
                bar.update(t.nbytes)
        up = self.upload_matrix
        layers = tuple(dataclasses.replace(L, **{k: up(getattr(L, k)) for k in mats})
                       for L in weights.layers)
        output = up(weights.output)                  # the embedding table only when tied to it
        embd = output if weights.token_embd is weights.output else weights.token_embd
        return dataclasses.replace(weights, token_embd=embd, output=output, layers=layers)

    def upload_matrix(self, t: QTensor, out: np.ndarray | None = None) -> QTensor:
        """t as a CPUTensor with its packed copy (into `out` if given) when its type has one;
        packed once per matrix."""
        if t.qtype not in KIND:
            return t
        if id(t) not in self._packs:
            p = CPUTensor(t.name, t.qtype, t.rows, t.cols, t.data,
                          pack(t.data, t.qtype, t.rows, t.cols, out))
            self._packs[id(t)] = (t, p)              # t kept alive: its id stays its own
        return self._packs[id(t)][1]

    def _q8_scratch(self, cols: int):
        """(xq (cols,) int8, xd (cols/32,) f32, xsq (cols/32,) int32): one set per width."""
        if cols not in self._q8:
            self._q8[cols] = (np.zeros(cols, np.int8), np.zeros(cols // 32, np.float32),
                              np.zeros(cols // 32, np.int32))
        return self._q8[cols]

    def _fast(self, x, *ws):
        """The FastMatvec of ws for one token's product (all packed, of one kind) unless exact;
        else None. Outside a batched step (split_rows) only."""
        if self.decode_rows is not None or x.shape[0] != 1:
            return None
        return self._plan(*ws)

    def _q8_rows(self, cols: int, n: int):
        """(xq (N, cols) int8, xd (N, cols/32) f32, xsq (N, cols/32) int32), N >= n rows."""
        key = ("rows", cols)
        if key not in self._q8 or self._q8[key][0].shape[0] < n:
            n = max(n, 16)
            self._q8[key] = (np.zeros((n, cols), np.int8), np.zeros((n, cols // 32), np.float32),
                             np.zeros((n, cols // 32), np.int32))
        return self._q8[key]

    def _split(self, x, *ws):
        """In a batched step: (the FastMatvec of ws or None, the number of decode rows that take
        it); the other rows take the GEMM, whatever their number (a lone row included), so that
        a row's products are the same bits in any batch."""
        if self.decode_rows is None:
            return None, 0
        plan = self._plan(*ws)
        return plan, (min(self.decode_rows, x.shape[0]) if plan else 0)

    def _plan(self, *ws):
        """The FastMatvec of ws (all packed, of one kind) unless exact; else None. Made once per
        ws."""
        if self.exact:
            return None
        key = tuple(map(id, ws))
        if key not in self._plans:
            ps = [getattr(w, "packed", None) for w in ws]
            ok = all(p is not None and p.kind == ps[0].kind for p in ps)
            q8 = self._q8_scratch(ws[0].cols)
            self._plans[key] = (gemv_q8.FastMatvec(ps, q8, self._chunks) if ok else None,
                                ws)                  # ws kept alive: their ids stay theirs
        return self._plans[key][0]

    # --- ops ------------------------------------------------------------------------------------
    embed = staticmethod(embed.embed)
    rmsnorm = staticmethod(norm.rmsnorm)
    rope = staticmethod(rope.rope)

    def matmul(self, out, x, w, bias=None):
        fast = self._fast(x, w)
        if fast:
            fast.matvec((out[0],), x[0])
        elif self.decode_rows is None:
            return matmul.matmul(out, x, w, bias)
        else:                                       # a batched step: decode rows, then the GEMM
            plan, nd = self._split(x, w)
            if nd:
                plan.matvec_rows((out[:nd],), x[:nd], self._q8_rows(x.shape[1], nd))
            matmul.gemm(out[nd:], x[nd:], w)
        if bias is not None:
            matmul._add_bias(out, bias)

    def matmul_add(self, x, a, w, scratch):
        fast = self._fast(a, w)
        if fast:
            return fast.matvec((x[0],), a[0], residual=True)
        if self.decode_rows is None:
            return super().matmul_add(x, a, w, scratch)
        plan, nd = self._split(a, w)
        if nd:
            plan.matvec_rows((x[:nd],), a[:nd], self._q8_rows(a.shape[1], nd), residual=True)
        if nd < a.shape[0]:
            matmul.gemm(scratch[nd:], a[nd:], w)
            self.add(x[nd:], x[nd:], scratch[nd:])

    def norm_matmul(self, outs, x, norm_w, eps, ws, biases, scratch):
        fast = self._fast(x, *ws)
        if fast:
            fast.matvec([o[0] for o in outs], x[0], norm=(norm_w, eps, scratch[0]))
        elif self.decode_rows is None:
            return super().norm_matmul(outs, x, norm_w, eps, ws, biases, scratch)
        else:
            plan, nd = self._split(x, *ws)
            if nd:
                plan.matvec_rows([o[:nd] for o in outs], x[:nd], self._q8_rows(x.shape[1], nd),
                                 norm=(norm_w, eps, scratch[:nd]))
            if nd < x.shape[0]:
                self.rmsnorm(scratch[nd:], x[nd:], norm_w, eps)
                for out, w in zip(outs, ws):
                    matmul.gemm(out[nd:], scratch[nd:], w)
        for out, b in zip(outs, biases):
            if b is not None:
                matmul._add_bias(out, b)

    def norm_swiglu(self, out, x, norm_w, eps, w_gate, w_up, scratch, up):
        fast = self._fast(x, w_gate, w_up)
        if fast:
            return fast.swiglu(out[0], x[0], (norm_w, eps, scratch[0]))
        if self.decode_rows is None:
            return super().norm_swiglu(out, x, norm_w, eps, w_gate, w_up, scratch, up)
        plan, nd = self._split(x, w_gate, w_up)
        if nd:
            plan.swiglu_rows(out[:nd], x[:nd], self._q8_rows(x.shape[1], nd),
                             (norm_w, eps, scratch[:nd]))
        if nd < x.shape[0]:
            self.rmsnorm(scratch[nd:], x[nd:], norm_w, eps)
            matmul.gemm(out[nd:], scratch[nd:], w_gate)
            matmul.gemm(up[nd:], scratch[nd:], w_up)
            self.silu_mul(out[nd:], out[nd:], up[nd:])

    def rope_store(self, q, k, v, pos, cache, layer, inv_freq, rope_params):
        if q.shape[0] == 1:
            rope.rope_store_one(q, k, v, pos, cache, layer, inv_freq, rope_params)
        elif q.shape[0] <= SERIAL_ROPE_ROWS:
            rope.rope_store_rows(q, k, v, pos, cache, layer, inv_freq, rope_params)
        else:
            super().rope_store(q, k, v, pos, cache, layer, inv_freq, rope_params)

    @staticmethod
    def kv_store(cache, layer, k, v, pos):
        slots = pos if cache.slots is None else cache.slots
        attention.kv_store(cache.k, cache.v, layer, k, v, slots, cache.kv_type == "f16")

    @staticmethod
    def attention(out, q, cache, layer, pos, scale):
        attention.attention(out, q, cache.k, cache.v, layer, pos, scale, cache.tables,
                            cache.row_seq, cache.block_size)
    silu_mul = staticmethod(elementwise.silu_mul)
    add = staticmethod(elementwise.add)

    @staticmethod
    def argmax(out, logits):
        out[0] = np.argmax(logits)

    sample = staticmethod(sample.sample)

    def stats(self) -> dict:
        return {"threads": self.n_threads}
