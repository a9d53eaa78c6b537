"""ModelConfig: a frozen dataclass built only from a GGUF file's metadata and tensor table."""
from __future__ import annotations

from dataclasses import dataclass

from .gguf_file import (FLOAT_VALUE_TYPES, INT_VALUE_TYPES, VT_ARRAY, VT_STRING, GGUFError,
                        GGUFFile, shown)

# the architecture names a file may carry -> the graph that runs it, with its rope layout
ARCH_ALIASES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
NEOX_ROPE_ARCHS = frozenset({"qwen2"})          # rotate the two halves of each head (GPT-NeoX)
QKV_BIAS_ARCHS = frozenset({"qwen2"})           # attn_q/k/v carry a bias that the file must hold
ROPE_SCALING_TYPES = ("none", "linear")


@dataclass(frozen=True)
class ModelConfig:
    """Everything the graph needs to know about a model, in llama.cpp's terms."""

    arch: str                 # graph family: "llama" or "qwen2"
    file_arch: str            # as written in general.architecture (mistral -> llama)
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    norm_eps: float
    rope_base: float
    rope_dim: int             # leading dims of each head that rotate (rope.dimension_count)
    rope_neox: bool           # False: rotate adjacent pairs (llama); True: the two halves (qwen2)
    rope_freq_scale: float    # 1 / linear scaling factor
    has_rope_freqs: bool      # rope_freqs.weight: per-frequency divisors (Llama 3.1+)
    qkv_bias: bool
    tied_embeddings: bool     # no output.weight: logits use token_embd
    file_type: int | None

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def gqa_group(self) -> int:
        return self.n_head // self.n_head_kv

    def kv_cache_bytes(self, n_ctx: int, bytes_per_value: int = 2) -> int:
        """K and V for every layer at context n_ctx (f16 by default)."""
        return 2 * self.n_layer * n_ctx * self.kv_dim * bytes_per_value

    @classmethod
    def from_gguf(cls, gf: GGUFFile) -> ModelConfig:
        """Read and sanity-check the model's hyper-parameters; GGUFError names the bad key."""
        m = _Meta(gf)
        file_arch = m.string("general.architecture")
        if file_arch not in ARCH_ALIASES:
            raise m.fail(f"key 'general.architecture': unsupported architecture "
                         f"'{shown(file_arch)}' (supported: {', '.join(ARCH_ALIASES)})")
        arch = ARCH_ALIASES[file_arch]
        p = file_arch + "."
        if m.has(p + "expert_count") and m.int(p + "expert_count", 0, 1 << 16) > 0:
            raise m.fail(f"key '{p}expert_count': mixture-of-experts models are not supported")
        n_embd = m.int(p + "embedding_length", 1, 1 << 17)
        n_head = m.int(p + "attention.head_count", 1, 1 << 12)
        n_head_kv = m.int(p + "attention.head_count_kv", 1, n_head, default=n_head)
        if n_head % n_head_kv:
            raise m.fail(f"key '{p}attention.head_count_kv': {n_head_kv} does not divide "
                         f"head_count {n_head}")
        if not m.has(p + "attention.key_length") and n_embd % n_head:
            raise m.fail(f"key '{p}attention.head_count': {n_head} does not divide "
                         f"embedding_length {n_embd}")
        head_dim = m.int(p + "attention.key_length", 2, 1 << 12, default=n_embd // n_head)
        if m.int(p + "attention.value_length", 2, 1 << 12, default=head_dim) != head_dim:
            raise m.fail(f"key '{p}attention.value_length': must equal key_length {head_dim}")
        if head_dim % 2:
            raise m.fail(f"head dim {head_dim} must be even for rope")
        rope_dim = m.int(p + "rope.dimension_count", 2, head_dim, default=head_dim)
        if rope_dim % 2:
            raise m.fail(f"key '{p}rope.dimension_count': must be even, got {rope_dim}")
        n_vocab = _vocab_size(m, p)
        return cls(
            arch=arch, file_arch=file_arch,
            name=m.string("general.name", default="") or file_arch,
            n_layer=m.int(p + "block_count", 1, 512),
            n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
            n_ff=m.int(p + "feed_forward_length", 1, 1 << 20),
            n_vocab=n_vocab,
            n_ctx_train=m.int(p + "context_length", 1, 1 << 24),
            norm_eps=m.float(p + "attention.layer_norm_rms_epsilon", 0.0, 1.0),
            rope_base=m.float(p + "rope.freq_base", 1.0, 1e12, default=10000.0),
            rope_dim=rope_dim,
            rope_neox=arch in NEOX_ROPE_ARCHS,
            rope_freq_scale=_rope_freq_scale(m, p),
            has_rope_freqs="rope_freqs.weight" in gf.tensors,
            qkv_bias=arch in QKV_BIAS_ARCHS or "blk.0.attn_q.bias" in gf.tensors,
            tied_embeddings="output.weight" not in gf.tensors,
            file_type=m.int("general.file_type", 0, 1 << 16, default=None),
        )


def _vocab_size(m: _Meta, p: str) -> int:
    if m.type_of("tokenizer.ggml.tokens") != (VT_ARRAY, VT_STRING):
        raise m.fail("key 'tokenizer.ggml.tokens': expected an array of strings"
                     + ("" if m.has("tokenizer.ggml.tokens") else ", missing"))
    n_vocab = len(m.gf.metadata["tokenizer.ggml.tokens"])
    if not 1 <= n_vocab <= 1 << 24:
        raise m.fail(f"key 'tokenizer.ggml.tokens': vocab size {n_vocab} outside 1..2^24")
    declared = m.int(p + "vocab_size", 1, 1 << 24, default=n_vocab)
    if declared != n_vocab:
        raise m.fail(f"key '{p}vocab_size': {declared} disagrees with the {n_vocab} tokens in "
                     f"tokenizer.ggml.tokens")
    return n_vocab


def _rope_freq_scale(m: _Meta, p: str) -> float:
    """1 / the linear factor, read as llama.cpp reads it: the type defaults to linear, "none" never
    scales, rope.scale_linear is the factor's old key, and a factor of 0 means none."""
    kind = m.string(p + "rope.scaling.type", default="linear")
    if kind not in ROPE_SCALING_TYPES:
        raise m.fail(f"key '{p}rope.scaling.type': '{shown(kind)}' is not supported "
                     f"(supported: {', '.join(ROPE_SCALING_TYPES)})")
    key = p + ("rope.scaling.factor" if m.has(p + "rope.scaling.factor") else "rope.scale_linear")
    factor = m.float(key, -1.0, 1e6, default=0.0)
    if kind == "none" or factor == 0.0:
        return 1.0
    if factor < 1e-3:
        raise m.fail(f"key '{key}': expected 0 or a factor in [0.001, 1e6], got {factor}")
    return 1.0 / factor


class _Meta:
    """Typed, bounded access to metadata keys; every failure names the file and the key."""

    def __init__(self, gf: GGUFFile):
        self.gf = gf

    def fail(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.gf.path}: {msg}")

    def has(self, key: str) -> bool:
        return key in self.gf.metadata

    def type_of(self, key: str):
        return self.gf.value_types.get(key)

    _MISSING = object()

    def _get(self, key: str, default, ok_types, kind: str):
        if key not in self.gf.metadata:
            if default is self._MISSING:
                raise self.fail(f"missing required key '{key}' ({kind})")
            return default
        if self.gf.value_types[key][0] not in ok_types:
            raise self.fail(f"key '{key}': expected {kind}, found "
                            f"{type(self.gf.metadata[key]).__name__}")
        return self.gf.metadata[key]

    def int(self, key: str, lo: int, hi: int, default=_MISSING) -> int:
        v = self._get(key, default, INT_VALUE_TYPES, "an integer")
        if v is not default and not lo <= v <= hi:
            raise self.fail(f"key '{key}': expected {lo}..{hi}, got {v}")
        return v

    def float(self, key: str, lo: float, hi: float, default=_MISSING) -> float:
        v = self._get(key, default, FLOAT_VALUE_TYPES, "a float")
        if v is not default and not lo < v <= hi:      # also refuses NaN
            raise self.fail(f"key '{key}': expected a value in ({lo}, {hi}], got {v}")
        return float(v)

    def string(self, key: str, default=_MISSING) -> str:
        return self._get(key, default, (VT_STRING,), "a string")
