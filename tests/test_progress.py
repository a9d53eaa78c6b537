"""Progress bars (numbaformer/progress.py): on stderr only when it is a terminal and the work takes
over DELAY_S; used by the CPU backend's repacking, the CUDA backend's upload (under the simulator
here) and, through huggingface_hub, downloads (tests/test_hub.py)."""
from __future__ import annotations

import time

import pytest

from numbaformer import progress


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """The tiny llama of tests/gguf_builder (Q8_0 and Q4_0 matrices: both repacked on the CPU)."""
    from gguf_builder import tiny_llama

    from numbaformer.loader import load_model_file
    mf = load_model_file(tiny_llama().write(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))
    yield mf.weights
    mf.close()


@pytest.fixture
def terminal(monkeypatch):
    """stderr taken for a terminal, bars drawn at once."""
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    monkeypatch.setattr(progress, "DELAY_S", 0.0)


def test_no_bar_when_stderr_is_not_a_terminal(capsys):
    with progress.byte_bar(100, "work") as bar:
        bar.update(100)
    assert capsys.readouterr().err == ""


def test_no_bar_for_quick_work(capsys, monkeypatch):
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    with progress.byte_bar(100, "work") as bar:          # DELAY_S: 1 s
        bar.update(100)
    assert capsys.readouterr().err == ""


def test_bar_on_a_terminal_for_slow_work(capsys, monkeypatch):
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    monkeypatch.setattr(progress, "DELAY_S", 0.05)
    with progress.byte_bar(1 << 20, "work") as bar:
        time.sleep(0.1)
        bar.update(1 << 20)
    assert "work" in capsys.readouterr().err


def test_cpu_repacking_bar(tiny_weights, terminal, capsys):
    from numbaformer.backends.cpu import CPUBackend
    CPUBackend().upload(tiny_weights)
    assert "repacking weights" in capsys.readouterr().err


def test_cuda_upload_bar(tiny_weights, terminal, capsys):
    from numbaformer.backends.cuda.backend import CUDABackend
    CUDABackend().upload(tiny_weights)
    assert "uploading weights to the GPU" in capsys.readouterr().err
