"""numbaformer.synthetic: random-weight models with real shapes load, carry the preset's config
and the vocab file's tokenizer, are deterministic, have weights of the intended scale (checked with
gguf's own dequantizer), and run through the engine as the float64 reference does."""
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType as QT
from gguf.quants import dequantize
from reference import ReferenceModel, log_softmax
from vocab_files import REPO_ROOT, read_metadata, unpack_vocab, vectors_dir

from numbaformer import quants, refdata, synthetic
from numbaformer.loader import load_model_file
from numbaformer.synthetic import PRESETS, random_blocks, write_synthetic
from numbaformer.weights import expected_shapes


VOCAB_DIR = vectors_dir()            # tests/data/tokenizer-vectors, whether or not installed editable
IDS = [1, 50, 300, 7, 1000, 42, 9, 12345, 3]
# tiny presets are 64 wide, so K-quants fall back there; these shapes take them for real
WIDE_LLAMA = replace(PRESETS["tiny-llama"], n_embd=256, n_ff=512)
WIDE_QWEN2 = replace(PRESETS["tiny-qwen2"], vocab="gpt-2", n_embd=256, n_ff=512)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """model_path(preset, type, output type, **kw) -> a file written once per module."""
    folder, cache = tmp_path_factory.mktemp("synthetic"), {}

    def make(preset, qtype, out_type, **kw):
        key = (preset, qtype, out_type, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = folder / f"m{len(cache)}.gguf"
            write_synthetic(cache[key], preset, qtype, out_type, vocab_dir=VOCAB_DIR, **kw)
        return cache[key]

    return make


def test_supported_types_are_the_decoders():
    assert set(synthetic.SUPPORTED_TYPES) == set(quants.SUPPORTED_TYPES)
    assert set(synthetic.FILE_TYPES) == set(synthetic.SUPPORTED_TYPES)


@pytest.mark.parametrize("name", synthetic.SUPPORTED_TYPES)
@pytest.mark.parametrize("fan_in", [64, 14336])
def test_dequantized_scale(name, fan_in):
    """Mean ~0 and RMS 1/sqrt(fan_in) by gguf's dequantizer (small fp16 scales are subnormal)."""
    sigma = 1 / np.sqrt(fan_in)
    q = QT[name]
    block = synthetic.GGML_QUANT_SIZES[q][0]
    y = dequantize(random_blocks(q, (1 << 16) // block, sigma, seed=5).reshape(-1), q)
    assert np.isfinite(y).all()
    assert abs(y.std() / sigma - 1) < 0.04
    assert abs(y.mean()) < 0.02 * sigma


def test_type_fallback_follows_llama_cpp():
    assert synthetic.fit_type("Q4_K", 576) == QT.Q5_0
    assert synthetic.fit_type("Q5_K", 64) == QT.Q5_1
    assert synthetic.fit_type("Q6_K", 896) == QT.Q8_0
    assert synthetic.fit_type("Q3_K", 64) == QT.Q4_0
    assert synthetic.fit_type("Q4_K", 4096) == QT.Q4_K
    assert synthetic.fit_type("Q4_0", 64) == QT.Q4_0


@pytest.mark.parametrize("preset,qtype,out_type", [
    ("tiny-llama", "Q4_0", "Q6_K"), ("tiny-llama", "F16", "F32"),
    ("tiny-qwen2", "Q5_1", "Q8_0"), ("tiny-qwen2", "Q4_K", "Q6_K"),
])
def test_tiny_file_loads_with_preset_config(model_path, preset, qtype, out_type):
    p = PRESETS[preset]
    mf = load_model_file(model_path(preset, qtype, out_type), tokenizer=False)
    c, meta = mf.config, mf.gguf.metadata
    n_vocab = {"gpt-2": 50257, "qwen2": 151936}[p.vocab]
    got = (c.arch, c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.n_ff, c.n_vocab, c.n_ctx_train)
    assert got == (p.arch, 2, 64, 4, 2, 128, n_vocab, 512)
    assert c.head_dim == c.rope_dim == 16
    assert (c.rope_base, c.norm_eps) == pytest.approx((p.rope_base, p.norm_eps))
    assert (c.rope_neox, c.qkv_bias, c.tied_embeddings) == ((True,) * 3 if p.arch == "qwen2"
                                                            else (False,) * 3)
    assert c.file_type == synthetic.FILE_TYPES[qtype]
    assert meta["general.name"] == f"synthetic {preset} {qtype}"
    assert meta[f"{p.arch}.vocab_size"] == n_vocab
    assert meta["general.quantization_version"] == 2
    types = {n: t.type_name for n, t in mf.gguf.tensors.items()}
    main = QT(synthetic.fit_type(qtype, 64)).name
    out = QT(synthetic.fit_type(out_type, 64)).name
    assert types["blk.1.attn_q.weight"] == types["blk.0.ffn_down.weight"] == main
    assert types["output.weight" if "output.weight" in types else "token_embd.weight"] == out
    assert {t for n, t in types.items() if n.endswith(("norm.weight", ".bias"))} == {"F32"}
    w = mf.weights
    assert 0.85 < w.layers[0].attn_norm.min() and w.layers[0].attn_norm.max() < 1.15
    if p.qkv_bias:
        assert 0.02 < np.abs(w.layers[1].attn_k_bias).mean() < 0.2
    mf.close()


@pytest.mark.parametrize("name", ["llama3-8b", "smollm2-135m", "qwen2-0.5b"])
def test_real_presets_have_the_shapes_the_engine_expects(model_path, name):
    """Each tensor table (not written: too big for a unit test) is what weights.expected_shapes
    asks of the config the file would carry; the 8B at Q4_K/Q6_K is about 4.3 GiB."""
    p = PRESETS[name]
    n_vocab = synthetic.tokenizer_kvs(p.vocab, VOCAB_DIR)[1]
    specs = synthetic.tensor_specs(p, n_vocab, "Q4_K", "Q6_K")
    mf = load_model_file(model_path("tiny-llama", "Q8_0", "Q8_0"), tokenizer=False)
    cfg = replace(mf.config, n_layer=p.n_layer, n_embd=p.n_embd, n_head=p.n_head,
                  n_head_kv=p.n_head_kv, head_dim=p.head_dim, n_ff=p.n_ff, n_vocab=n_vocab,
                  rope_dim=p.head_dim, qkv_bias=p.qkv_bias, tied_embeddings=p.tied)
    mf.close()
    assert {s.name: s.ne for s in specs} == expected_shapes(cfg)
    if name == "llama3-8b":
        assert n_vocab == 128256
        assert 4.3 < sum(s.nbytes for s in specs) / 2**30 < 4.9


def test_gguf_py_reads_the_file(model_path):
    """gguf-py's own reader agrees on the metadata and the tensor bytes."""
    path = model_path("tiny-llama", "Q4_0", "Q6_K")
    r = GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["llama.attention.head_count_kv"].contents() == 2
    mf = load_model_file(path, tokenizer=False)
    assert len(r.tensors) == len(mf.gguf.tensors) == 1 + 2 * 9 + 2
    for t in r.tensors:
        assert (np.asarray(t.data).reshape(-1).view(np.uint8)
                == mf.gguf.tensor_bytes(t.name)).all(), t.name
    mf.close()


def test_wide_file_has_k_quants(model_path):
    mf = load_model_file(model_path(WIDE_LLAMA, "Q4_K", "Q6_K"), tokenizer=False)
    types = {n: t.type_name for n, t in mf.gguf.tensors.items()}
    assert {t for n, t in types.items() if n.startswith("blk.") and n.endswith("weight")
            and "norm" not in n} == {"Q4_K"}
    assert (types["token_embd.weight"], types["output.weight"]) == ("Q4_K", "Q6_K")
    assert mf.config.name == "synthetic custom Q4_K"
    mf.close()


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_tokenizer_metadata_is_the_vocab_files(model_path, tmp_path, preset):
    vocab = read_metadata(unpack_vocab(PRESETS[preset].vocab, tmp_path))
    mf = load_model_file(model_path(preset, "Q8_0", "Q8_0"))
    meta = mf.gguf.metadata
    keys = {k for k in vocab if k.startswith("tokenizer.")}
    assert keys == {k for k in meta if k.startswith("tokenizer.")}
    for k in keys:
        a, b = vocab[k], meta[k]
        assert (a == b).all() if isinstance(a, np.ndarray) else a == b, k
    assert mf.tokenizer.encode("Hello world")
    mf.close()


def test_same_seed_same_bytes(tmp_path):
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    write_synthetic(a, "tiny-qwen2", "Q3_K", "Q6_K", seed=7, vocab_dir=VOCAB_DIR)
    write_synthetic(b, "tiny-qwen2", "Q3_K", "Q6_K", seed=7, vocab_dir=VOCAB_DIR)
    write_synthetic(c, "tiny-qwen2", "Q3_K", "Q6_K", seed=8, vocab_dir=VOCAB_DIR)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes() and a.stat().st_size == c.stat().st_size
    assert not list(tmp_path.glob("*.part"))


def test_layers_override_keeps_each_tensor(tmp_path):
    """A tensor's bytes depend only on (seed, its name): blk.0 is the same at 1 and 3 layers."""
    one, three = tmp_path / "1.gguf", tmp_path / "3.gguf"
    write_synthetic(one, "tiny-llama", "Q4_0", "Q8_0", n_layer=1, vocab_dir=VOCAB_DIR)
    write_synthetic(three, "tiny-llama", "Q4_0", "Q8_0", n_layer=3, vocab_dir=VOCAB_DIR)
    m1 = load_model_file(one, tokenizer=False)
    m3 = load_model_file(three, tokenizer=False)
    assert (m1.config.n_layer, m3.config.n_layer) == (1, 3)
    for name in ("blk.0.ffn_up.weight", "output.weight", "token_embd.weight"):
        assert (m1.gguf.tensor_bytes(name) == m3.gguf.tensor_bytes(name)).all()
    m1.close()
    m3.close()


@pytest.mark.parametrize("preset,qtype,out_type", [
    ("tiny-llama", "Q4_0", "Q6_K"), ("tiny-llama", "F16", "F32"),
    ("tiny-qwen2", "Q5_1", "Q8_0"), ("tiny-qwen2", "Q4_K", "Q6_K"),
    (WIDE_LLAMA, "Q4_K", "Q6_K"), (WIDE_QWEN2, "Q3_K", "Q5_K"),
], ids=["llama-q4_0", "llama-f16", "qwen2-q5_1", "qwen2-q4_k", "wide-llama-q4_k",
        "wide-qwen2-q3_k"])
def test_forward_matches_reference(model_path, preset, qtype, out_type):
    from numbaformer.backends.cpu import CPUBackend
    from numbaformer.model import Model
    mf = load_model_file(model_path(preset, qtype, out_type, seed=3), tokenizer=False)
    got = Model(mf, CPUBackend(), n_ctx=64).forward_all(IDS)
    ref = ReferenceModel(mf).forward(IDS)
    np.testing.assert_allclose(log_softmax(got), log_softmax(ref), atol=5e-3, rtol=0)
    assert 0.5 < ref.std() < 2            # weights of scale 1/sqrt(fan_in): logits ~ N(0, 1)
    mf.close()


def test_vocab_files_come_from_tests_data_first(tmp_path, monkeypatch):
    """refdata.find_data: the checkout's tests/data, else $NUMBAFORMER_SHARED, else ../shared."""
    checkout = tmp_path / "repo"
    env_dir, beside = tmp_path / "env", tmp_path / "shared"
    for folder in (checkout / "tests" / "data", env_dir, beside):
        (folder / "tokenizer-vectors").mkdir(parents=True)
    monkeypatch.setenv("NUMBAFORMER_SHARED", str(env_dir))
    assert refdata.find_data("tokenizer-vectors", checkout) == \
        checkout / "tests" / "data" / "tokenizer-vectors"
    (checkout / "tests" / "data" / "tokenizer-vectors").rmdir()
    assert refdata.find_data("tokenizer-vectors", checkout) == env_dir / "tokenizer-vectors"
    with pytest.raises(FileNotFoundError, match="tests/data/tokenizer-vectors"):
        refdata.find_data("tokenizer-vectors", checkout, shared=False)
    monkeypatch.delenv("NUMBAFORMER_SHARED")
    assert refdata.find_data("tokenizer-vectors", checkout) == beside / "tokenizer-vectors"


def test_missing_vocab_files_error_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBAFORMER_SHARED", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="NUMBAFORMER_SHARED") as e:
        refdata.find_data("tokenizer-vectors", tmp_path / "repo")
    assert str(tmp_path / "repo" / "tests" / "data" / "tokenizer-vectors") in str(e.value)


def test_script_runs_without_numba(tmp_path):
    """The CLI writes a file and prints its path and size, its vocab read from the checkout's
    tests/data (NUMBAFORMER_SHARED empty); the library does not import numba."""
    out, empty = tmp_path / "cli.gguf", tmp_path / "empty"
    empty.mkdir()
    script = REPO_ROOT / "scripts" / "make_synthetic_gguf.py"
    r = subprocess.run([sys.executable, str(script), "--preset", "tiny-llama", "--type", "Q8_0",
                        "--layers", "1", "-o", str(out)], capture_output=True, text=True,
                       cwd=tmp_path, check=True, env={**os.environ, "NUMBAFORMER_SHARED": str(empty)})
    assert str(out) in r.stdout and str(out.stat().st_size) in r.stdout
    code = "import sys, numbaformer.synthetic; print('numba' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
