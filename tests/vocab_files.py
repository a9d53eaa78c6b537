"""Test helper: the test data (tests/data: llama.cpp's tokenizer vectors and reference outputs), the
SmolLM2 model."""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest

from numbaformer.fetch import cached_path
from numbaformer.gguf_file import open_gguf
from numbaformer.refdata import find_data

REPO_ROOT = Path(__file__).resolve().parents[1]
VECTOR_SETS = ("llama-spm", "llama-bpe", "qwen2", "gpt-2")
VECTOR_SEPARATOR = "\n__ggml_vocab_test__\n"


def data_path(rel: str) -> Path:
    """tests/data/REL of this checkout: data the suite needs is carried by the checkout and never
    looked up elsewhere (numbaformer.refdata decides; FileNotFoundError when it is missing)."""
    return find_data(rel, REPO_ROOT, shared=False)


def data_dir() -> Path:
    """The folder holding reference/ and tokenizer-vectors/: tests/data of this checkout."""
    return data_path("reference").parent


shared_dir = data_dir               # the name tests/test_cuda_model.py imports


def vectors_dir() -> Path:
    """llama.cpp's tokenizer vectors (and vocab-only GGUFs, which numbaformer.synthetic reads)."""
    return data_path("tokenizer-vectors")


def unpack_vocab(name: str, folder: Path) -> Path:
    """Unpack ggml-vocab-NAME.gguf.gz into `folder`; returns the .gguf path."""
    out = folder / f"ggml-vocab-{name}.gguf"
    with gzip.open(vectors_dir() / f"ggml-vocab-{name}.gguf.gz", "rb") as src:
        with open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


def read_metadata(path: Path) -> dict:
    """The GGUF metadata dict of `path`, as the engine reads it."""
    with open_gguf(path) as f:
        return f.metadata


def read_vectors(name: str) -> list[tuple[str, list[int]]]:
    """(input text, llama.cpp's token ids) pairs of one vector set (no BOS, specials not parsed)."""
    base = vectors_dir() / f"ggml-vocab-{name}.gguf"
    texts = Path(f"{base}.inp").read_bytes().decode("utf-8").split(VECTOR_SEPARATOR)
    assert texts[-1] == "", "the .inp file ends with a separator line"
    lines = Path(f"{base}.out").read_bytes().decode("utf-8").split("\n")
    assert len(lines) >= len(texts) - 1, f"{name}: fewer .out lines than inputs"
    return [(text, [int(t) for t in line.split()]) for text, line in zip(texts[:-1], lines)]


def locate_test_model() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 file: $NUMBAFORMER_TEST_MODEL, else the model cache
    (~/.cache/numbaformer/models or $NUMBAFORMER_CACHE); skips the calling test when it is absent
    (tests take the `smollm2_path` fixture, which fetches it once instead)."""
    path = Path(os.environ.get("NUMBAFORMER_TEST_MODEL") or cached_path())
    if not path.is_file():
        pytest.skip(f"test model not found at {path} (set NUMBAFORMER_TEST_MODEL)")
    return path
