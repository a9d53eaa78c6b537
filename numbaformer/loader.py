"""Open a GGUF model and validate all of it: structure, config, tensors, tokenizer."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .config import ModelConfig
from .gguf_file import GGUFError, GGUFFile, open_gguf
from .weights import ModelWeights, load_weights


@dataclass
class ModelFile:
    """A validated model file. `tokenizer` is built on first use (a 128k vocab takes ~1 s)."""

    gguf: GGUFFile
    config: ModelConfig
    weights: ModelWeights
    _tokenizer: object = field(default=None, repr=False)

    @property
    def path(self) -> str:
        return self.gguf.path

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer
            self._tokenizer = Tokenizer.from_metadata(self.gguf.metadata, source=self.gguf.path)
        return self._tokenizer

    def close(self) -> None:
        self.gguf.close()


def is_vocab_only(gf: GGUFFile) -> bool:
    """A GGUF with a tokenizer and no tensors, as llama.cpp's models/ggml-vocab-*.gguf (one with
    neither is just broken, and refused as such)."""
    return not gf.tensors and "tokenizer.ggml.model" in gf.metadata


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a model file or of a vocab-only GGUF (a model file is validated whole, as
    load_model_file does); GGUFError with a one-line message."""
    gf = open_gguf(path)
    if not is_vocab_only(gf):
        gf.close()
        return load_model_file(path).tokenizer
    try:
        from .tokenizer import Tokenizer
        return Tokenizer.from_metadata(gf.metadata, source=gf.path)
    finally:
        gf.close()


def load_model_file(path: str | os.PathLike, *, tokenizer: bool = True) -> ModelFile:
    """Open `path` and check everything a run needs; raises GGUFError with a one-line message
    (also for a vocab-only GGUF, which has no weights to run)."""
    gf = open_gguf(path)
    if is_vocab_only(gf):
        gf.close()
        raise GGUFError(f"{gf.path}: a vocab-only GGUF (a tokenizer without weights): only "
                        f"`tokenize` can use it")
    try:
        cfg = ModelConfig.from_gguf(gf)
        mf = ModelFile(gf, cfg, load_weights(gf, cfg))
        if tokenizer:
            mf.tokenizer
        return mf
    except BaseException:
        gf.close()
        raise
