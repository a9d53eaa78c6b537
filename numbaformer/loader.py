"""Open a GGUF model and validate all of it: structure, config, tensors, tokenizer."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .config import ModelConfig
from .gguf_file import GGUFFile, open_gguf
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


def load_model_file(path: str | os.PathLike, *, tokenizer: bool = True) -> ModelFile:
    """Open `path` and check everything a run needs; raises GGUFError with a one-line message."""
    gf = open_gguf(path)
    try:
        cfg = ModelConfig.from_gguf(gf)
        mf = ModelFile(gf, cfg, load_weights(gf, cfg))
        if tokenizer:
            mf.tokenizer
        return mf
    except BaseException:
        gf.close()
        raise
