"""ModelConfig.from_gguf on tiny model files written by tests/gguf_builder.py: the fields each
architecture and key implies, the defaults, and the model-level refusals (GGUFError naming the key
or tensor). The structural attacks on the file itself are in test_gguf_file.py."""
from __future__ import annotations

import dataclasses

import pytest
from gguf_builder import F32, STRING, T_F32, U32, tiny_llama

from numbaformer.config import ModelConfig
from numbaformer.gguf_file import GGUFError, open_gguf
from numbaformer.loader import load_model_file


def _load(b, tmp_path, name="model.gguf"):
    return load_model_file(b.write(tmp_path / name), tokenizer=False)


def _config(b, tmp_path) -> ModelConfig:
    """The config alone (no tensor checks), for metadata-only variations."""
    with open_gguf(b.write(tmp_path / "model.gguf")) as gf:
        return ModelConfig.from_gguf(gf)


def _refused(b, tmp_path) -> str:
    path = b.write(tmp_path / "bad.gguf")
    with pytest.raises(GGUFError) as info:
        load_model_file(path, tokenizer=False)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    return msg


def test_llama_gqa_and_tied_embeddings(tmp_path):
    mf = _load(tiny_llama(), tmp_path)
    c = mf.config
    assert (c.arch, c.file_arch, c.name) == ("llama", "llama", "tiny")
    assert (c.n_layer, c.n_embd, c.n_ff, c.n_vocab, c.n_ctx_train) == (2, 64, 256, 300, 256)
    assert (c.n_head, c.n_head_kv, c.gqa_group) == (4, 2, 2)
    assert (c.head_dim, c.q_dim, c.kv_dim, c.rope_dim) == (16, 64, 32, 16)
    assert c.norm_eps == pytest.approx(1e-5) and c.rope_base == 10000.0
    assert not c.rope_neox and not c.qkv_bias and not c.has_rope_freqs
    assert c.rope_freq_scale == 1.0 and c.file_type == 7
    assert c.tied_embeddings and mf.weights.output is mf.weights.token_embd
    assert mf.weights.layers[0].attn_q_bias is None and mf.weights.rope_freqs is None
    assert c.kv_cache_bytes(128) == 2 * 2 * 128 * 32 * 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.n_layer = 3
    mf.close()


def test_output_weight_unties(tmp_path):
    mf = _load(tiny_llama(output=True), tmp_path)
    assert not mf.config.tied_embeddings
    assert mf.weights.output.name == "output.weight" and mf.weights.output.rows == 300
    mf.close()


def test_qwen2_neox_rope_and_qkv_bias(tmp_path):
    mf = _load(tiny_llama("qwen2", qkv_bias=True), tmp_path)
    c = mf.config
    assert (c.arch, c.file_arch) == ("qwen2", "qwen2")
    assert c.rope_neox and c.qkv_bias
    layer = mf.weights.layers[1]
    assert layer.attn_q_bias.shape == (64,) and layer.attn_k_bias.shape == (32,)
    assert layer.attn_v_bias.shape == (32,)
    mf.close()


def test_qwen2_requires_its_bias_tensors(tmp_path):
    b = tiny_llama("qwen2", qkv_bias=True).remove_tensor("blk.1.attn_v.bias")
    assert "missing tensor 'blk.1.attn_v.bias'" in _refused(b, tmp_path)


def test_llama_with_bias_in_layer_0_needs_it_everywhere(tmp_path):
    b = tiny_llama(qkv_bias=True).remove_tensor("blk.1.attn_k.bias")
    assert "missing tensor 'blk.1.attn_k.bias'" in _refused(b, tmp_path)
    mf = _load(tiny_llama(qkv_bias=True), tmp_path, "ok.gguf")
    assert mf.config.qkv_bias and not mf.config.rope_neox
    mf.close()


def test_mistral_is_a_llama_alias(tmp_path):
    mf = _load(tiny_llama("mistral"), tmp_path)
    c = mf.config
    assert (c.arch, c.file_arch) == ("llama", "mistral")
    assert not c.rope_neox and not c.qkv_bias and c.n_head_kv == 2
    mf.close()


def test_keys_follow_the_file_architecture(tmp_path):
    b = tiny_llama()
    b.set("general.architecture", "mistral")        # the llama.* keys no longer apply
    assert "'mistral.embedding_length'" in _refused(b, tmp_path)


def test_rope_freqs_tensor(tmp_path):
    mf = _load(tiny_llama(rope_freqs=True), tmp_path)
    assert mf.config.has_rope_freqs and mf.weights.rope_freqs.shape == (8,)
    mf.close()


def test_rope_freqs_wrong_length(tmp_path):
    b = tiny_llama(rope_freqs=True)
    t = b.tensor("rope_freqs.weight")
    t.ne, t.data = (16,), None
    assert "tensor 'rope_freqs.weight' has wrong shape; expected 8, got 16" in _refused(b, tmp_path)


# as llama.cpp reads them: the type defaults to linear, "none" never scales, factor 0 means none,
# and rope.scale_linear is the factor's old key
@pytest.mark.parametrize("kind,key,factor,scale", [
    ("linear", "rope.scaling.factor", 4.0, 0.25), ("linear", None, None, 1.0),
    (None, "rope.scaling.factor", 8.0, 0.125), ("none", "rope.scaling.factor", 4.0, 1.0),
    ("linear", "rope.scaling.factor", 0.0, 1.0), (None, "rope.scale_linear", 2.0, 0.5),
])
def test_rope_scaling(tmp_path, kind, key, factor, scale):
    b = tiny_llama()
    if kind is not None:
        b.add("llama.rope.scaling.type", STRING, kind)
    if key is not None:
        b.add("llama." + key, F32, factor)
    assert _config(b, tmp_path).rope_freq_scale == scale


@pytest.mark.parametrize("factor", [1e-4, -2.0, float("nan"), 1e7])
def test_rope_scaling_factor_bounds(tmp_path, factor):
    b = tiny_llama().add("llama.rope.scaling.type", STRING, "linear")
    b.add("llama.rope.scaling.factor", F32, factor)
    assert "'llama.rope.scaling.factor'" in _refused(b, tmp_path)


def test_defaults_of_optional_keys(tmp_path):
    b = tiny_llama()
    for key in ("llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.rope.dimension_count", "llama.vocab_size", "general.name",
                "general.file_type"):
        b.remove(key)
    c = _config(b, tmp_path)
    assert c.n_head_kv == c.n_head == 4 and c.gqa_group == 1
    assert (c.rope_base, c.rope_dim, c.n_vocab) == (10000.0, 16, 300)
    assert (c.name, c.file_type) == ("llama", None)


def test_explicit_head_dim(tmp_path):
    b = tiny_llama().add("llama.attention.key_length", U32, 32)
    b.set("llama.attention.head_count", 6)           # 64 % 6 != 0 is fine with an explicit head dim
    b.set("llama.attention.head_count_kv", 3)
    c = _config(b, tmp_path)
    assert (c.head_dim, c.q_dim, c.kv_dim, c.gqa_group) == (32, 192, 96, 2)


@pytest.mark.parametrize("mutate,expected", [
    (lambda b: b.add("llama.attention.key_length", U32, 16).add(
        "llama.attention.value_length", U32, 32), "'llama.attention.value_length'"),
    (lambda b: b.set("llama.attention.head_count", 64).set("llama.attention.head_count_kv", 64),
     "head dim 1 must be even"),
    (lambda b: b.set("llama.rope.dimension_count", 7), "'llama.rope.dimension_count'"),
    (lambda b: b.set("llama.rope.dimension_count", 32), "'llama.rope.dimension_count'"),
    (lambda b: b.set("llama.context_length", 0), "'llama.context_length'"),
    (lambda b: b.set("llama.feed_forward_length", 2.0, F32), "'llama.feed_forward_length'"),
    (lambda b: b.set("llama.embedding_length", 1 << 20), "'llama.embedding_length'"),
    (lambda b: b.remove("llama.attention.layer_norm_rms_epsilon"),
     "missing required key 'llama.attention.layer_norm_rms_epsilon'"),
    (lambda b: b.set("llama.attention.layer_norm_rms_epsilon", -1.0), "layer_norm_rms_epsilon"),
], ids=["value_length", "odd_head_dim", "odd_rope_dim", "rope_dim_above_head_dim", "context_0",
        "n_ff_float", "width_too_big", "eps_missing", "eps_negative"])
def test_config_refusals(tmp_path, mutate, expected):
    b = tiny_llama()
    mutate(b)
    assert expected in _refused(b, tmp_path)


def test_tensor_type_must_decode(tmp_path):
    b = tiny_llama()
    b.tensor("blk.1.attn_norm.weight").ggml_type = 24            # I8: sized, never decoded
    b.tensor("blk.1.attn_norm.weight").data = None
    msg = _refused(b, tmp_path)
    assert "tensor 'blk.1.attn_norm.weight' has type I8" in msg


def test_f32_norm_is_read_exactly(tmp_path):
    import numpy as np
    b = tiny_llama()
    want = np.linspace(-1, 1, 64, dtype=np.float32)
    b.tensor("output_norm.weight").data = want.tobytes()
    mf = _load(b, tmp_path)
    assert np.array_equal(mf.weights.output_norm, want)
    assert mf.weights.output_norm.dtype == np.float32 and T_F32 == 0
    mf.close()
