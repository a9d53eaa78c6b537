"""Random-weight GGUF models with real shapes and a real tokenizer, for speed work and for tests of
architectures we have no file for. Never for judging output quality.

A preset gives a model's shapes as its real GGUF has them; the tokenizer metadata (every
`tokenizer.*` key) is copied byte for byte from one of llama.cpp's vocab-only files in
tests/data/tokenizer-vectors/, and the model's vocab size is that file's token count (so a preset's
vocab follows its vocab file: smollm2-135m gets llama-bpe's 128256 tokens, not SmolLM2's 49152).

Weights: quantized blocks are random bytes with their fp16 scales (and K-quant sub-block scales)
set so that the dequantized values have mean ~0 and standard deviation 1/sqrt(fan_in), fan_in being
the row length: a unit-RMS input gives a unit-RMS output through every matrix, so activations
neither explode nor vanish over depth. Norm weights are near 1, biases small. A tensor whose rows
do not fit the type's block falls back as llama.cpp's quantizer does (Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0; Q2_K and Q3_K -> Q4_0, where llama.cpp takes IQ4_NL, which numbaformer does not read).

The file is streamed: header and tensor table first, then each tensor in chunks of rows as they are
generated, so memory stays bounded (tens of MB) at any model size. Every tensor draws from its own
generator seeded by (seed, tensor name): same seed, same numpy -> same bytes, and blk.0 is the same
whatever --layers says. Only numpy and gguf are needed (no numba), so the script runs anywhere.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT, LlamaFileType

from .refdata import find_data

ALIGNMENT = 32                    # GGUF default; general.alignment is not written
CHUNK_BYTES = 32 << 20            # tensor data generated and written this much at a time
NORM_SPREAD = 0.1                 # norm weights uniform in [1 - spread, 1 + spread]
BIAS_STD = 0.1

# the types numbaformer decodes (quants.DECODERS; not imported here, it needs numba)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# llama.cpp's fallback for rows that are not a whole number of 256-value blocks
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# main type -> general.file_type (the K-quants as llama.cpp's *_M mixes name them)
FILE_TYPES = {
    "F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16,
    "BF16": LlamaFileType.MOSTLY_BF16, "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": LlamaFileType.MOSTLY_Q4_1, "Q5_0": LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": LlamaFileType.MOSTLY_Q5_1, "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q2_K": LlamaFileType.MOSTLY_Q2_K, "Q3_K": LlamaFileType.MOSTLY_Q3_K_M,
    "Q4_K": LlamaFileType.MOSTLY_Q4_K_M, "Q5_K": LlamaFileType.MOSTLY_Q5_K_M,
    "Q6_K": LlamaFileType.MOSTLY_Q6_K,
}


@dataclass(frozen=True)
class Preset:
    """A model's shapes, as its real GGUF has them. The vocab size comes from the vocab file."""

    arch: str                     # general.architecture: "llama" or "qwen2" (QKV biases)
    vocab: str                    # tokenizer-vectors/ggml-vocab-{vocab}.gguf.gz
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int
    rope_base: float
    norm_eps: float
    tied: bool                    # no output.weight: logits use token_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def qkv_bias(self) -> bool:
        return self.arch == "qwen2"


PRESETS = {
    "llama3-8b": Preset("llama", "llama-bpe", 32, 4096, 32, 8, 14336, 8192, 500000.0, 1e-5, False),
    "smollm2-135m": Preset("llama", "llama-bpe", 30, 576, 9, 3, 1536, 8192, 100000.0, 1e-5, True),
    "qwen2-0.5b": Preset("qwen2", "qwen2", 24, 896, 14, 2, 4864, 32768, 1000000.0, 1e-6, True),
    "tiny-llama": Preset("llama", "gpt-2", 2, 64, 4, 2, 128, 512, 10000.0, 1e-5, False),
    "tiny-qwen2": Preset("qwen2", "qwen2", 2, 64, 4, 2, 128, 512, 1000000.0, 1e-6, True),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    ne: tuple[int, ...]           # GGUF order: row length first
    ggml_type: int
    kind: str                     # "matrix", "norm" or "bias"

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[QT(self.ggml_type)]
        n = 1
        for d in self.ne:
            n *= d
        return n // block * size


# --- where the vocab files are, and their tokenizer metadata --------------------------------------

def default_vocab_dir() -> Path:
    """The folder of llama.cpp's ggml-vocab-*.gguf.gz files: tests/data/tokenizer-vectors of the
    checkout, else $NUMBAFORMER_SHARED (or ../shared)/tokenizer-vectors (numbaformer.refdata);
    FileNotFoundError naming the places tried."""
    return find_data("tokenizer-vectors")


_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
VT_U32, VT_F32, VT_STRING, VT_ARRAY = 4, 6, 8, 9


def _skip_value(buf: bytes, pos: int, vtype: int) -> int:
    """Offset just past the value of type vtype that starts at buf[pos]."""
    if vtype in _SCALAR_SIZE:
        return pos + _SCALAR_SIZE[vtype]
    if vtype == VT_STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    if vtype != VT_ARRAY:
        raise ValueError(f"unknown GGUF value type {vtype}")
    sub, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if sub in _SCALAR_SIZE:
        return pos + count * _SCALAR_SIZE[sub]
    for _ in range(count):
        pos = _skip_value(buf, pos, sub)
    return pos


def tokenizer_kvs(vocab: str, folder: str | os.PathLike | None = None
                  ) -> tuple[tuple[bytes, ...], int]:
    """The raw key/value records of every `tokenizer.*` key of ggml-vocab-{vocab}.gguf.gz, and its
    token count. The records are copied verbatim into the model file."""
    return tokenizer_kvs_from(Path(folder or default_vocab_dir()) / f"ggml-vocab-{vocab}.gguf.gz")


@lru_cache(maxsize=4)
def tokenizer_kvs_from(path: Path) -> tuple[tuple[bytes, ...], int]:
    """The `tokenizer.*` records and token count of any GGUF file (gzip-compressed or not): a real
    model's own vocabulary can be given to a random-weight model of its shape."""
    raw = Path(path).read_bytes() if not str(path).endswith(".gz") else None
    buf = raw[:raw_header_len(raw)] if raw is not None else gzip.decompress(Path(path).read_bytes())
    magic, version, _, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    if magic != b"GGUF" or version != 3:
        raise ValueError(f"{path}: not a GGUF v3 file")
    pos, records, n_vocab = 24, [], None
    for _ in range(n_kv):
        start = pos
        (klen,) = struct.unpack_from("<Q", buf, pos)
        key = buf[pos + 8:pos + 8 + klen].decode()
        (vtype,) = struct.unpack_from("<I", buf, pos + 8 + klen)
        pos = _skip_value(buf, pos + 12 + klen, vtype)
        if key.startswith("tokenizer."):
            records.append(buf[start:pos])
        if key == "tokenizer.ggml.tokens":
            n_vocab = struct.unpack_from("<Q", buf, start + 16 + klen)[0]
    if n_vocab is None:
        raise ValueError(f"{path}: no tokenizer.ggml.tokens")
    return tuple(records), n_vocab


def raw_header_len(buf: bytes) -> int:
    """Bytes of a GGUF up to the end of its key/value records (the tensor data is not needed)."""
    _, _, _, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    pos = 24
    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos + 8 + klen)
        pos = _skip_value(buf, pos + 12 + klen, vtype)
    return pos


# --- the tensor table -----------------------------------------------------------------------------

def fit_type(type_name: str, row_len: int) -> int:
    """The GGML type id a matrix with rows of row_len values gets when `type_name` is asked for."""
    name = type_name
    if row_len % GGML_QUANT_SIZES[QT[name]][0]:
        name = FALLBACK.get(name, name)
    if row_len % GGML_QUANT_SIZES[QT[name]][0]:
        raise ValueError(f"rows of {row_len} values fit neither {type_name} nor {name}")
    return int(QT[name])


def tensor_specs(p: Preset, n_vocab: int, qtype: str, output_type: str) -> list[TensorSpec]:
    """Every tensor of the model, in file order."""
    e, q, kv, ff = p.n_embd, p.n_head * p.head_dim, p.n_head_kv * p.head_dim, p.n_ff

    def mat(name, ne, t=qtype):
        return TensorSpec(name, ne, fit_type(t, ne[0]), "matrix")

    def vec(name, n, kind="norm"):
        return TensorSpec(name, (n,), int(QT.F32), kind)

    specs = [mat("token_embd.weight", (e, n_vocab), output_type if p.tied else qtype)]
    for i in range(p.n_layer):
        b = f"blk.{i}."
        specs.append(vec(b + "attn_norm.weight", e))
        for name, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
            specs.append(mat(b + name + ".weight", (e, rows)))
            if p.qkv_bias:
                specs.append(vec(b + name + ".bias", rows, "bias"))
        specs += [mat(b + "attn_output.weight", (q, e)), vec(b + "ffn_norm.weight", e),
                  mat(b + "ffn_gate.weight", (e, ff)), mat(b + "ffn_up.weight", (e, ff)),
                  mat(b + "ffn_down.weight", (ff, e))]
    specs.append(vec("output_norm.weight", e))
    if not p.tied:
        specs.append(mat("output.weight", (e, n_vocab), output_type))
    return specs


# --- random blocks with sensible scales -----------------------------------------------------------
# Each filler takes (rng, n_blocks, sigma) and returns (n_blocks, type_size) uint8: random quant
# bits, scale fields set so that the dequantized values have mean ~0 and RMS sigma. `_ms` is the
# mean square of the values a uniformly random field takes.

def _ms(values) -> float:
    return float(np.mean(np.square(np.asarray(values, np.float64))))


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniformly random bytes (the raw 64-bit stream: ~14x faster than Generator.bytes)."""
    return rng.bit_generator.random_raw(-(-n // 8)).view(np.uint8)[:n]


def _put_f16(raw: np.ndarray, col: int, values) -> None:
    raw[:, col:col + 2] = np.asarray(values, "<f2").view(np.uint8).reshape(-1, 2)


def _signs(rng, n: int) -> np.ndarray:
    return rng.integers(0, 2, n).astype(np.float64) * 2 - 1


def _blocks(rng, n: int, qtype: int) -> np.ndarray:
    return _random_bytes(rng, n * GGML_QUANT_SIZES[QT(qtype)][1]).reshape(n, -1)


def _d_only(mid: float, ms: float, qtype: int, has_min: bool):
    """Q4_0 / Q5_0 / Q8_0: y = d*v with v = q - offset; a random sign of d makes the mean 0.
    Q4_1 / Q5_1: y = d*q + m with m = -mid*d, so y = d*(q - mid). ms = mean square of v."""
    def fill(rng, n, sigma):
        raw = _blocks(rng, n, qtype)
        d = sigma / np.sqrt(ms) * _signs(rng, n)
        _put_f16(raw, 0, d)
        if has_min:
            _put_f16(raw, 2, -mid * d)
        return raw
    return fill


def _fill_q2_k(rng, n, sigma):
    """y = d*sc*q - dmin*mn, q in 0..3: sc = mn in 8..15, dmin = 1.5 d."""
    raw = _blocks(rng, n, QT.Q2_K)
    sc = rng.integers(8, 16, (n, 16), dtype=np.uint8)
    raw[:, 0:16] = sc | (sc << 4)
    d = sigma / np.sqrt(_ms(range(8, 16)) * _ms(np.arange(4) - 1.5))
    _put_f16(raw, 80, np.full(n, d))
    _put_f16(raw, 82, np.full(n, 1.5 * d))
    return raw


def _fill_q3_k(rng, n, sigma):
    """y = d*sc*v: random signed 6-bit scales sc in -32..31 and values v in -4..3 (mean 0.25 d
    against an RMS of 43 d: negligible)."""
    raw = _blocks(rng, n, QT.Q3_K)
    _put_f16(raw, 108, np.full(n, sigma / np.sqrt(_ms(np.arange(64) - 32) * _ms(np.arange(8) - 4))))
    return raw


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Pack 8 (6-bit scale, 6-bit min) pairs per block, (n, 8) each, into Q4_K/Q5_K's 12 bytes."""
    out = np.empty((len(sc), 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _k_min(bits: int, qtype: int):
    """Q4_K / Q5_K: y = d*sc*q - dmin*mn with sc = mn in 32..63 and dmin = mid*d."""
    mid = ((1 << bits) - 1) / 2

    def fill(rng, n, sigma):
        raw = _blocks(rng, n, qtype)
        sc = rng.integers(32, 64, (n, 8), dtype=np.uint8)
        raw[:, 4:16] = _k_scales(sc, sc)
        d = sigma / np.sqrt(_ms(range(32, 64)) * _ms(np.arange(1 << bits) - mid))
        _put_f16(raw, 0, np.full(n, d))
        _put_f16(raw, 2, np.full(n, mid * d))
        return raw
    return fill


def _fill_q6_k(rng, n, sigma):
    """y = d*sc*(q - 32), q in 0..63: int8 scales of random sign, magnitude 64..127."""
    raw = _blocks(rng, n, QT.Q6_K)
    mag = rng.integers(64, 128, (n, 16))
    raw[:, 192:208] = (mag * (rng.integers(0, 2, (n, 16)) * 2 - 1)).astype(np.int8).view(np.uint8)
    _put_f16(raw, 208, np.full(n, sigma / np.sqrt(_ms(range(64, 128)) * _ms(np.arange(64) - 32))))
    return raw


def _float(dtype: str):
    """F32 / F16 / BF16: N(0, sigma^2) values ("blocks" are single values)."""
    def fill(rng, n, sigma):
        x = rng.standard_normal(n, np.float32) * np.float32(sigma)
        if dtype == "bf16":                       # round to nearest even, keep the upper half
            bits = x.view(np.uint32)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        else:
            x = x.astype(dtype)
        return x.view(np.uint8).reshape(n, -1)
    return fill


FILLERS = {
    QT.F32: _float("<f4"), QT.F16: _float("<f2"), QT.BF16: _float("bf16"),
    QT.Q4_0: _d_only(8, _ms(np.arange(16) - 8), QT.Q4_0, False),
    QT.Q4_1: _d_only(7.5, _ms(np.arange(16) - 7.5), QT.Q4_1, True),
    QT.Q5_0: _d_only(16, _ms(np.arange(32) - 16), QT.Q5_0, False),
    QT.Q5_1: _d_only(15.5, _ms(np.arange(32) - 15.5), QT.Q5_1, True),
    QT.Q8_0: _d_only(0, _ms(np.arange(-128, 128)), QT.Q8_0, False),
    QT.Q2_K: _fill_q2_k, QT.Q3_K: _fill_q3_k,
    QT.Q4_K: _k_min(4, QT.Q4_K), QT.Q5_K: _k_min(5, QT.Q5_K), QT.Q6_K: _fill_q6_k,
}


def random_blocks(qtype: int, n_blocks: int, sigma: float, seed: int = 0) -> np.ndarray:
    """(n_blocks, type_size) uint8 of GGML type qtype whose values have mean ~0 and RMS sigma."""
    return FILLERS[QT(qtype)](np.random.default_rng(seed), n_blocks, sigma)


def tensor_chunks(spec: TensorSpec, seed: int):
    """The bytes of one tensor, in chunks of whole rows (each at most ~CHUNK_BYTES)."""
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    if spec.kind == "norm":
        yield rng.uniform(1 - NORM_SPREAD, 1 + NORM_SPREAD, spec.ne[0]).astype("<f4")
        return
    if spec.kind == "bias":
        yield (rng.standard_normal(spec.ne[0]) * BIAS_STD).astype("<f4")
        return
    cols, rows = spec.ne
    block, size = GGML_QUANT_SIZES[QT(spec.ggml_type)]
    per_row = cols // block
    step = max(1, CHUNK_BYTES // (per_row * size))
    fill, sigma = FILLERS[QT(spec.ggml_type)], 1.0 / np.sqrt(cols)
    for r in range(0, rows, step):
        yield fill(rng, min(step, rows - r) * per_row, sigma)


# --- the file -------------------------------------------------------------------------------------

def _kv(key: str, vtype: int, value) -> bytes:
    k = key.encode()
    head = struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype)
    if vtype == VT_STRING:
        v = value.encode()
        return head + struct.pack("<Q", len(v)) + v
    return head + struct.pack("<f" if vtype == VT_F32 else "<I", value)


def metadata(p: Preset, n_vocab: int, name: str, file_type: int) -> list[bytes]:
    """general.* and {arch}.* records, as llama.cpp writes them for a model file."""
    a = p.arch + "."
    return [
        _kv("general.architecture", VT_STRING, p.arch), _kv("general.type", VT_STRING, "model"),
        _kv("general.name", VT_STRING, name), _kv("general.file_type", VT_U32, file_type),
        _kv("general.quantization_version", VT_U32, 2),
        _kv(a + "context_length", VT_U32, p.n_ctx), _kv(a + "embedding_length", VT_U32, p.n_embd),
        _kv(a + "block_count", VT_U32, p.n_layer), _kv(a + "feed_forward_length", VT_U32, p.n_ff),
        _kv(a + "attention.head_count", VT_U32, p.n_head),
        _kv(a + "attention.head_count_kv", VT_U32, p.n_head_kv),
        _kv(a + "attention.layer_norm_rms_epsilon", VT_F32, p.norm_eps),
        _kv(a + "rope.freq_base", VT_F32, p.rope_base),
        _kv(a + "rope.dimension_count", VT_U32, p.head_dim),
        _kv(a + "vocab_size", VT_U32, n_vocab),
    ]


def _tensor_info(spec: TensorSpec, offset: int) -> bytes:
    n = spec.name.encode()
    return (struct.pack("<Q", len(n)) + n + struct.pack("<I", len(spec.ne))
            + struct.pack(f"<{len(spec.ne)}Q", *spec.ne)
            + struct.pack("<IQ", spec.ggml_type, offset))


def _pad(n: int) -> int:
    return -n % ALIGNMENT


def write_synthetic(path: str | os.PathLike, preset: str | Preset, qtype: str = "Q4_K",
                    output_type: str = "Q6_K", *, n_layer: int | None = None, seed: int = 0,
                    vocab_dir: str | os.PathLike | None = None,
                    vocab_file: str | None = None) -> int:
    """Write a random-weight model to `path` (through `path`.part, renamed when complete); returns
    its size in bytes. `preset` is a PRESETS name or a Preset; `qtype` is the type of every matrix,
    `output_type` that of output.weight (token_embd when tied); norms and biases are F32.
    `vocab_dir` overrides where the ggml-vocab-*.gguf.gz files are read from; `vocab_file` takes the
    tokenizer of another GGUF instead (e.g. a real model of the same shape)."""
    for t in (qtype, output_type):
        if t not in SUPPORTED_TYPES:
            raise ValueError(f"type {t!r} is not one of {', '.join(SUPPORTED_TYPES)}")
    label = preset if isinstance(preset, str) else "custom"
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if n_layer is not None:
        if n_layer < 1:
            raise ValueError(f"n_layer must be at least 1, got {n_layer}")
        p = replace(p, n_layer=n_layer)
    tok_records, n_vocab = (tokenizer_kvs_from(Path(vocab_file)) if vocab_file
                            else tokenizer_kvs(p.vocab, vocab_dir))
    specs = tensor_specs(p, n_vocab, qtype, output_type)
    kvs = [*metadata(p, n_vocab, f"synthetic {label} {qtype}", int(FILE_TYPES[qtype])),
           *tok_records]
    infos, offset = [], 0
    for s in specs:
        infos.append(_tensor_info(s, offset))
        offset += s.nbytes + _pad(s.nbytes)
    header = b"".join([struct.pack("<4sIQQ", b"GGUF", 3, len(specs), len(kvs)), *kvs, *infos])
    part = Path(f"{os.fspath(path)}.part")
    try:
        with open(part, "wb") as f:
            f.write(header + bytes(_pad(len(header))))
            for s in specs:
                for chunk in tensor_chunks(s, seed):
                    f.write(chunk)
                f.write(bytes(_pad(s.nbytes)))
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return os.path.getsize(path)
