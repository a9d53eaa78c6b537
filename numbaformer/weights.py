"""Per-layer weight sets, checked against the config, as views of the memory-mapped file.

Matrices stay in their GGUF quantized form (`QTensor`: raw bytes shaped (rows, row_bytes)); only the
small 1-D tensors (norm weights, biases, rope frequency factors) are decoded to float32 here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .gguf_file import GGUFError, GGUFFile
from .quants import BF16, DECODERS, F16, F32, GGML_TYPES, QK, SUPPORTED_TYPES


@dataclass(frozen=True)
class QTensor:
    """A weight matrix in its GGML type: y = W @ x with W of shape (rows, cols), model order."""

    name: str
    qtype: int
    rows: int
    cols: int
    data: np.ndarray          # (rows, row_bytes) uint8, a view of the file (or a device copy)

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.qtype].name

    @property
    def nbytes(self) -> int:
        return self.data.size


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: np.ndarray                 # (n_embd,) f32
    attn_q: QTensor                       # (q_dim, n_embd)
    attn_k: QTensor                       # (kv_dim, n_embd)
    attn_v: QTensor                       # (kv_dim, n_embd)
    attn_output: QTensor                  # (n_embd, q_dim)
    attn_q_bias: np.ndarray | None        # (q_dim,) f32, qwen2
    attn_k_bias: np.ndarray | None        # (kv_dim,)
    attn_v_bias: np.ndarray | None        # (kv_dim,)
    ffn_norm: np.ndarray                  # (n_embd,)
    ffn_gate: QTensor                     # (n_ff, n_embd)
    ffn_up: QTensor                       # (n_ff, n_embd)
    ffn_down: QTensor                     # (n_embd, n_ff)


@dataclass(frozen=True)
class ModelWeights:
    token_embd: QTensor                   # (n_vocab, n_embd)
    output_norm: np.ndarray               # (n_embd,)
    output: QTensor                       # (n_vocab, n_embd); token_embd when tied
    rope_freqs: np.ndarray | None         # (rope_dim // 2,) f32 divisors of each frequency
    layers: tuple[LayerWeights, ...]

    def matrices(self):
        """Every distinct QTensor, once (a tied output is token_embd)."""
        seen = {}
        for t in (self.token_embd, self.output):
            seen.setdefault(t.name, t)
        for layer in self.layers:
            for t in (layer.attn_q, layer.attn_k, layer.attn_v, layer.attn_output,
                      layer.ffn_gate, layer.ffn_up, layer.ffn_down):
                seen.setdefault(t.name, t)
        return list(seen.values())


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF name -> expected ne (GGUF order: row length first) of every tensor the graph reads."""
    e, q, kv, ff = cfg.n_embd, cfg.q_dim, cfg.kv_dim, cfg.n_ff
    shapes = {"token_embd.weight": (e, cfg.n_vocab), "output_norm.weight": (e,)}
    if not cfg.tied_embeddings:
        shapes["output.weight"] = (e, cfg.n_vocab)
    if cfg.has_rope_freqs:
        shapes["rope_freqs.weight"] = (cfg.rope_dim // 2,)
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm.weight": (e,), b + "attn_q.weight": (e, q), b + "attn_k.weight": (e, kv),
            b + "attn_v.weight": (e, kv), b + "attn_output.weight": (q, e),
            b + "ffn_norm.weight": (e,), b + "ffn_gate.weight": (e, ff),
            b + "ffn_up.weight": (e, ff), b + "ffn_down.weight": (ff, e),
        })
        if cfg.qkv_bias:
            shapes.update({b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,),
                           b + "attn_v.bias": (kv,)})
    return shapes


def check_tensors(gf: GGUFFile, cfg: ModelConfig) -> None:
    """Every tensor the graph needs exists, has the shape the config implies and a known type."""
    for name, ne in expected_shapes(cfg).items():
        t = gf.tensors.get(name)
        if t is None:
            raise GGUFError(f"{gf.path}: missing tensor '{name}'")
        got = tuple(d for d in t.ne)
        if got != ne:
            raise GGUFError(f"{gf.path}: tensor '{name}' has wrong shape; expected "
                            f"{', '.join(map(str, ne))}, got {', '.join(map(str, got))}")
        if t.ggml_type not in DECODERS:
            raise GGUFError(f"{gf.path}: tensor '{name}' has type {t.type_name}, which numbaformer "
                            f"does not support (supported: {', '.join(SUPPORTED_TYPES)})")
        if len(ne) == 2 and ne[0] % QK:
            raise GGUFError(f"{gf.path}: tensor '{name}' rows of {ne[0]} values are not a multiple "
                            f"of {QK}")


def _matrix(gf: GGUFFile, name: str) -> QTensor:
    t = gf.tensors[name]
    return QTensor(name, t.ggml_type, t.ne[1], t.ne[0], gf.tensor_rows(name))


def _vector(gf: GGUFFile, name: str) -> np.ndarray:
    """A small 1-D tensor (norm weight, bias, rope factors) decoded to float32."""
    t = gf.tensors[name]
    raw = gf.tensor_bytes(name)
    if t.ggml_type == F32:
        return raw.view(np.float32).copy()
    if t.ggml_type == F16:
        return raw.view(np.float16).astype(np.float32)
    if t.ggml_type == BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    from .backends.cpu.dequant import dequantize
    return dequantize(gf.tensor_rows(name), t.ggml_type, t.ne[0])[0]


def load_weights(gf: GGUFFile, cfg: ModelConfig) -> ModelWeights:
    """Check the tensor table against the config and return the weights as file views."""
    check_tensors(gf, cfg)
    layers = []
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        bias = (lambda n: _vector(gf, b + n)) if cfg.qkv_bias else (lambda n: None)
        layers.append(LayerWeights(
            attn_norm=_vector(gf, b + "attn_norm.weight"),
            attn_q=_matrix(gf, b + "attn_q.weight"), attn_k=_matrix(gf, b + "attn_k.weight"),
            attn_v=_matrix(gf, b + "attn_v.weight"),
            attn_output=_matrix(gf, b + "attn_output.weight"),
            attn_q_bias=bias("attn_q.bias"), attn_k_bias=bias("attn_k.bias"),
            attn_v_bias=bias("attn_v.bias"),
            ffn_norm=_vector(gf, b + "ffn_norm.weight"),
            ffn_gate=_matrix(gf, b + "ffn_gate.weight"), ffn_up=_matrix(gf, b + "ffn_up.weight"),
            ffn_down=_matrix(gf, b + "ffn_down.weight"),
        ))
    token_embd = _matrix(gf, "token_embd.weight")
    return ModelWeights(
        token_embd=token_embd,
        output_norm=_vector(gf, "output_norm.weight"),
        output=token_embd if cfg.tied_embeddings else _matrix(gf, "output.weight"),
        rope_freqs=_vector(gf, "rope_freqs.weight") if cfg.has_rope_freqs else None,
        layers=tuple(layers),
    )
