"""Load a model onto a backend: the one entry point the CLI commands share."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from .backends import select_backend
from .loader import ModelFile, load_model_file
from .model import Model

DEFAULT_CTX = 4096


@dataclass
class Engine:
    mf: ModelFile
    model: Model
    load_s: float

    @property
    def config(self):
        return self.mf.config

    @property
    def tokenizer(self):
        return self.mf.tokenizer

    @property
    def backend(self):
        return self.model.ops

    def close(self) -> None:
        self.mf.close()


def resolve_model_path(path: str | None, quiet: bool = False, offline: bool = False) -> str:
    """The local GGUF path that `path` names: a file as given; a hub model (ORG/REPO[:QUANT],
    hf://..., see hub.hub_ref) pulled into the hub's cache and verified; None: the default model
    (SmolLM2-135M-Instruct Q4_1), fetched on first use. offline: caches only (no network)."""
    if path:
        from .hub import resolve
        return str(resolve(path, offline=offline, quiet=quiet) or path)
    from .fetch import cached_path, fetch_model
    if not cached_path().is_file() and not quiet and not offline:
        print("no model given: using the default, SmolLM2-135M-Instruct Q4_1", file=sys.stderr)
    return str(fetch_model(quiet=quiet, offline=offline))


def load_engine(path: str | None = None, *, device: str = "auto", gpu: int = 0,
                threads: int | None = None, n_ctx: int | None = None, n_batch: int = 512,
                kv_type: str | None = None, quiet: bool = False, exact: bool = False,
                announce_compiles: bool | None = None) -> Engine:
    """Validate the file, pick the backend, upload, allocate, and warm up (compiling kernels once;
    cached afterwards). kv_type: "f16" | "f32" (default: the backend's, f16 on CUDA, f32 on the
    CPU). exact: decode mat-vecs with f32 activations (the backend's default otherwise: 8-bit
    activations on CUDA's fast path). quiet: no notes on stderr; announce_compiles (default: not quiet): a line on stderr
    before a kernel that is not cached compiles, now or later in the process. Raises GGUFError /
    BackendError / ValueError with one-line messages."""
    from .backends import kernel_cache

    path = resolve_model_path(path, quiet)
    t0 = time.perf_counter()
    mf = load_model_file(path)
    try:
        cfg = mf.config
        n_ctx = n_ctx or min(cfg.n_ctx_train, DEFAULT_CTX)
        if not 1 <= n_ctx <= cfg.n_ctx_train:
            raise ValueError(f"context {n_ctx} is outside 1..{cfg.n_ctx_train} (the model's "
                             f"training context)")
        ops = select_backend(device, gpu=gpu, threads=threads, quiet=quiet, exact=exact)
        ops.check_memory(mf, n_ctx, n_batch)
        if announce_compiles if announce_compiles is not None else not quiet:
            kernel_cache.announce_compiles(ops.name)   # a line before any kernel compiles
        model = Model(mf, ops, n_ctx, n_batch, kv_type=kv_type)
        model.warmup()
        return Engine(mf, model, time.perf_counter() - t0)
    except BaseException:
        mf.close()
        raise
