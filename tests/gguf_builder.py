"""A tiny byte-level GGUF writer for tests, built on struct so that it can write *invalid* files.

gguf.GGUFWriter refuses to write most of what the parser must refuse to read (duplicate keys, lying
lengths, bad dims, misplaced data), so the tests write bytes themselves. Everything is plain and
mutable: build a valid model with `tiny_llama()`, break one field, call `to_bytes()`.

    b = tiny_llama()
    b.set("llama.block_count", 0)               # same value type as before
    b.tensor("blk.0.attn_q.weight").ne = (64, 32)
    data = b.to_bytes()                         # b.layout: where each part landed

Values: a KV holds (value type id, value). Scalars are Python numbers; strings are str or bytes;
arrays are `Arr(element type, items)` (items may be further `Arr`s); `Raw(payload)` writes the bytes
after the value type verbatim (a lying string length, an unknown type's payload).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize

# GGUF value type ids (gguf.GGUFValueType), spelled out so that tests read as the format does
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
               BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}

# GGML type ids used by the tests
T_F32, T_F16, T_Q4_0, T_Q8_0, T_IQ2_XXS = 0, 1, 2, 8, 16


@dataclass
class Arr:
    """An array value: element type and items. `count` overrides the written length (to lie)."""

    etype: int
    items: list
    count: int | None = None


@dataclass
class Raw:
    """Bytes written verbatim after a KV's value type."""

    payload: bytes


@dataclass
class KV:
    key: str | bytes
    vtype: int
    value: object


@dataclass
class Tensor:
    """One tensor. `ne` is GGUF order (row length first). `offset=None`: placed after the previous
    tensor at the alignment. `data=None`: zeros of the size the type implies. `write=False`: the
    info is written, the data is not. `n_dims` overrides the written dim count (to lie)."""

    name: str | bytes
    ne: tuple
    ggml_type: int
    data: bytes | None = None
    offset: int | None = None
    write: bool = True
    n_dims: int | None = None


def _bytes(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode("utf-8")


def _string(s: str | bytes) -> bytes:
    b = _bytes(s)
    return struct.pack("<Q", len(b)) + b


def encode_value(vtype: int, value) -> bytes:
    """The bytes of one value (without its type id)."""
    if isinstance(value, Raw):
        return value.payload
    if vtype == STRING:
        return _string(value)
    if vtype == ARRAY:
        n = len(value.items) if value.count is None else value.count
        body = b"".join(encode_value(value.etype, v) for v in value.items)
        return struct.pack("<IQ", value.etype, n) + body
    return struct.pack(_SCALAR_FMT[vtype], value)


def tensor_nbytes(ne, ggml_type: int) -> int:
    """Bytes of a tensor per gguf-py's type table (0 for a type gguf-py does not know)."""
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except ValueError:
        return 0
    n = 1
    for d in ne:
        n *= d
    return n // block * size


@dataclass
class GGUFBuilder:
    magic: bytes = b"GGUF"
    version: int = 3
    kvs: list = field(default_factory=list)
    tensors: list = field(default_factory=list)
    n_kv: int | None = None              # override the header's counts
    n_tensors: int | None = None
    alignment: int | None = None         # padding used when writing; None: general.alignment or 32
    layout: dict = field(default_factory=dict)

    # --- metadata ---------------------------------------------------------------------------
    def add(self, key, vtype: int, value) -> GGUFBuilder:
        self.kvs.append(KV(key, vtype, value))
        return self

    def kv(self, key: str) -> KV:
        return next(kv for kv in self.kvs if kv.key == key)

    def set(self, key: str, value, vtype: int | None = None) -> GGUFBuilder:
        """Replace a key's value (keeping its type unless vtype is given), or append it."""
        for kv in self.kvs:
            if kv.key == key:
                kv.value = value
                kv.vtype = kv.vtype if vtype is None else vtype
                return self
        if vtype is None:
            raise KeyError(f"new key {key!r} needs a vtype")
        return self.add(key, vtype, value)

    def remove(self, key: str) -> GGUFBuilder:
        self.kvs = [kv for kv in self.kvs if kv.key != key]
        return self

    def move_to_end(self, key: str) -> GGUFBuilder:
        kv = self.kv(key)
        self.kvs.remove(kv)
        self.kvs.append(kv)
        return self

    # --- tensors ----------------------------------------------------------------------------
    def add_tensor(self, name, ne, ggml_type: int, data: bytes | None = None, **kw) -> GGUFBuilder:
        self.tensors.append(Tensor(name, tuple(ne), ggml_type, data, **kw))
        return self

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)

    def remove_tensor(self, name: str) -> GGUFBuilder:
        self.tensors = [t for t in self.tensors if t.name != name]
        return self

    # --- writing ----------------------------------------------------------------------------
    def _alignment(self) -> int:
        if self.alignment is not None:
            return self.alignment
        for kv in self.kvs:
            if kv.key == "general.alignment" and kv.vtype in _SCALAR_FMT and kv.vtype != BOOL:
                v = kv.value
                if isinstance(v, int) and v > 0 and not v & (v - 1):
                    return v
        return 32

    def to_bytes(self) -> bytes:
        """Serialize; records in self.layout the offsets of each part (for truncation tests):
        kv: [(key_start, value_type_start, value_start, end)], tensor_info: [(start, end)],
        data_start, and tensor_data: {name: absolute offset}."""
        align = self._alignment()
        out = bytearray(self.magic)
        out += struct.pack("<I", self.version)
        out += struct.pack("<QQ", len(self.tensors) if self.n_tensors is None else self.n_tensors,
                           len(self.kvs) if self.n_kv is None else self.n_kv)
        lay = {"kv": [], "tensor_info": [], "tensor_data": {}}
        for kv in self.kvs:
            k0 = len(out)
            out += _string(kv.key)
            t0 = len(out)
            out += struct.pack("<I", kv.vtype)
            v0 = len(out)
            out += encode_value(kv.vtype, kv.value)
            lay["kv"].append((k0, t0, v0, len(out)))
        placed, cursor = [], 0
        for t in self.tensors:
            n = len(t.data) if t.data is not None else tensor_nbytes(t.ne, t.ggml_type)
            off = t.offset if t.offset is not None else -(-cursor // align) * align
            if t.offset is None:
                cursor = off + n
            placed.append((t, off, n))
            i0 = len(out)
            out += _string(t.name)
            out += struct.pack("<I", len(t.ne) if t.n_dims is None else t.n_dims)
            out += b"".join(struct.pack("<Q", d) for d in t.ne)
            out += struct.pack("<IQ", t.ggml_type, off)
            lay["tensor_info"].append((i0, len(out)))
        out += bytes(-len(out) % align)
        data_start = lay["data_start"] = len(out)
        blob = bytearray()
        for t, off, n in placed:
            lay["tensor_data"][t.name] = data_start + off
            if not t.write:
                continue
            data = t.data if t.data is not None else bytes(n)
            if len(blob) < off + len(data):
                blob += bytes(off + len(data) - len(blob))
            blob[off:off + len(data)] = data
        out += blob
        self.layout = lay
        return bytes(out)

    def write(self, path) -> str:
        with open(path, "wb") as f:
            f.write(self.to_bytes())
        return str(path)


# --- a valid tiny model ---------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# each merge joins two tokens already in the vocab; 43 of them + 256 bytes + 1 special = 300
_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "e r", "a n", "o n", "r e", "Ġ a", "Ġ s", "e n", "a t",
           "o r", "Ġ w", "e s", "Ġ o", "i s", "i t", "a l", "a r", "Ġ c", "Ġ f", "Ġ p", "Ġ b",
           "e d", "Ġ m", "o u", "l e", "Ġ i", "in g", "Ġ d", "i c", "Ġ h", "Ġa n", "Ġan d",
           "Ġ l", "Ġo f", "Ġt o", "Ġ n", "Ġ e", "Ġ re", "o w", "Ġs t"]


def gpt2_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): 256 byte tokens, 43 merged tokens, <|endoftext|> last."""
    tokens = list(_bytes_to_unicode().values())
    known = set(tokens)
    for m in _MERGES:
        a, b = m.split(" ")
        assert a in known and b in known and a + b not in known, m
        tokens.append(a + b)
        known.add(a + b)
    tokens.append("<|endoftext|>")
    types = [1] * (len(tokens) - 1) + [3]
    return tokens, types, list(_MERGES)


def _weights(ne, ggml_type: int, rng: np.random.Generator) -> bytes:
    x = (rng.standard_normal(tuple(reversed(ne))) * 0.05).astype(np.float32)
    if ggml_type == T_F32:
        return x.tobytes()
    return quantize(x, GGMLQuantizationType(ggml_type)).tobytes()


N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_CTX = 2, 64, 4, 2, 256, 256


def tiny_llama(arch: str = "llama", *, output: bool = False, qkv_bias: bool = False,
               rope_freqs: bool = False, seed: int = 0) -> GGUFBuilder:
    """A valid 2-layer llama-family model: width 64, 4 heads / 2 KV heads (head dim 16), n_ff 256,
    300-token gpt2 vocab; token_embd and FFN Q8_0, attention Q4_0, norms F32; output.weight (Q8_0)
    only if `output` (else tied), attn_{q,k,v}.bias (F32) if `qkv_bias`, rope_freqs.weight (F32)
    if `rope_freqs`."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = gpt2_vocab()
    n_vocab, p = len(tokens), arch + "."
    b = GGUFBuilder()
    b.add("general.architecture", STRING, arch)
    b.add("general.name", STRING, "tiny")
    b.add("general.file_type", U32, 7)
    b.add(p + "block_count", U32, N_LAYER)
    b.add(p + "context_length", U32, N_CTX)
    b.add(p + "embedding_length", U32, N_EMBD)
    b.add(p + "feed_forward_length", U32, N_FF)
    b.add(p + "attention.head_count", U32, N_HEAD)
    b.add(p + "attention.head_count_kv", U32, N_HEAD_KV)
    b.add(p + "attention.layer_norm_rms_epsilon", F32, 1e-5)
    b.add(p + "rope.freq_base", F32, 10000.0)
    b.add(p + "rope.dimension_count", U32, N_EMBD // N_HEAD)
    b.add(p + "vocab_size", U32, n_vocab)
    b.add("tokenizer.ggml.model", STRING, "gpt2")
    b.add("tokenizer.ggml.pre", STRING, "gpt-2")
    b.add("tokenizer.ggml.tokens", ARRAY, Arr(STRING, tokens))
    b.add("tokenizer.ggml.token_type", ARRAY, Arr(I32, types))
    b.add("tokenizer.ggml.merges", ARRAY, Arr(STRING, merges))
    b.add("tokenizer.ggml.bos_token_id", U32, n_vocab - 1)
    b.add("tokenizer.ggml.eos_token_id", U32, n_vocab - 1)

    hd = N_EMBD // N_HEAD
    q, kv, e, ff = N_HEAD * hd, N_HEAD_KV * hd, N_EMBD, N_FF

    def t(name, ne, ty):
        b.add_tensor(name, ne, ty, _weights(ne, ty, rng))

    t("token_embd.weight", (e, n_vocab), T_Q8_0)
    if rope_freqs:
        t("rope_freqs.weight", (hd // 2,), T_F32)
    for i in range(N_LAYER):
        k = f"blk.{i}."
        t(k + "attn_norm.weight", (e,), T_F32)
        t(k + "attn_q.weight", (e, q), T_Q4_0)
        t(k + "attn_k.weight", (e, kv), T_Q4_0)
        t(k + "attn_v.weight", (e, kv), T_Q4_0)
        if qkv_bias:
            t(k + "attn_q.bias", (q,), T_F32)
            t(k + "attn_k.bias", (kv,), T_F32)
            t(k + "attn_v.bias", (kv,), T_F32)
        t(k + "attn_output.weight", (q, e), T_Q4_0)
        t(k + "ffn_norm.weight", (e,), T_F32)
        t(k + "ffn_gate.weight", (e, ff), T_Q8_0)
        t(k + "ffn_up.weight", (e, ff), T_Q8_0)
        t(k + "ffn_down.weight", (ff, e), T_Q8_0)
    t("output_norm.weight", (e,), T_F32)
    if output:
        t("output.weight", (e, n_vocab), T_Q8_0)
    return b
