"""What `numbaformer info` reports about a model file."""
from __future__ import annotations

from collections import Counter

from .generate import plural
from .loader import ModelFile

# llama.cpp's general.file_type values (LLAMA_FTYPE_*)
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
              10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
              16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


def model_info(mf: ModelFile, n_ctx: int | None = None) -> dict:
    """A JSON-ready description of the model and the memory it needs at context n_ctx."""
    cfg, gf = mf.config, mf.gguf
    n_ctx = n_ctx or cfg.n_ctx_train
    tok = mf.tokenizer
    weight_bytes = sum(t.n_bytes for t in gf.tensors.values())
    from .backends.cuda.layout import device_bytes           # numpy only: no numba.cuda import
    mats = mf.weights.matrices()
    gpu_bytes = weight_bytes - sum(t.nbytes for t in mats) + sum(device_bytes(t) for t in mats)
    return {
        "path": gf.path,
        "architecture": cfg.file_arch,
        "name": cfg.name,
        "parameters": sum(t.n_elements for t in gf.tensors.values()),
        "file_type": FILE_TYPES.get(cfg.file_type, "unknown" if cfg.file_type is None
                                    else f"#{cfg.file_type}"),
        "tensor_types": dict(sorted(Counter(t.type_name for t in gf.tensors.values()).items())),
        "layers": cfg.n_layer,
        "embedding_length": cfg.n_embd,
        "feed_forward_length": cfg.n_ff,
        "heads": cfg.n_head,
        "kv_heads": cfg.n_head_kv,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.n_vocab,
        "context_length": cfg.n_ctx_train,
        "rope": {"base": cfg.rope_base, "layout": "neox" if cfg.rope_neox else "normal",
                 "freq_scale": cfg.rope_freq_scale, "freq_factors": cfg.has_rope_freqs},
        "tied_embeddings": cfg.tied_embeddings,
        "qkv_bias": cfg.qkv_bias,
        "tokenizer": {"model": tok.kind, "pre": tok.pre, "bos_id": tok.bos_id,
                      "eos_id": tok.eos_id, "add_bos": tok.add_bos},
        "chat_template": "tokenizer.chat_template" in gf.metadata,
        "memory": {"weights_bytes": weight_bytes, "gpu_weights_bytes": gpu_bytes, "kv_ctx": n_ctx,
                   "kv_f16_bytes": cfg.kv_cache_bytes(n_ctx, 2)},
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_info(d: dict) -> str:
    types = ", ".join(f"{k}: {v}" for k, v in d["tensor_types"].items())
    m = d["memory"]
    lines = [
        ("file", d["path"]), ("architecture", d["architecture"]), ("name", d["name"]),
        ("parameters", f"{d['parameters']:,} ({d['parameters'] / 1e9:.3f} B)"),
        ("file type", d["file_type"]), ("tensor types", types), ("layers", d["layers"]),
        ("width", f"{d['embedding_length']} (ffn {d['feed_forward_length']}, head dim "
                  f"{d['head_dim']})"),
        ("heads", f"{d['heads']} / {d['kv_heads']} KV"), ("vocab", d["vocab_size"]),
        ("context", d["context_length"]),
        ("rope", f"{d['rope']['layout']}, base {d['rope']['base']:g}"),
        ("tokenizer", f"{d['tokenizer']['model']} ({d['tokenizer']['pre']})"),
        ("memory", f"weights {_gib(m['weights_bytes'])} ({_gib(m['gpu_weights_bytes'])} in the "
                   f"GPU layout), f16 KV cache at "
                   f"{plural(m['kv_ctx'])} {_gib(m['kv_f16_bytes'])}"),
    ]
    return "\n".join(f"{k:>13}: {v}" for k, v in lines)
