"""backends/kernel_cache.py: a run says so before it compiles a kernel that is not in the cache (a
first run, a quant type not used before), and says nothing when every kernel comes from the
cache."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from numba.core import event

from numbaformer.backends.kernel_cache import compile_notice

NOTICE = "compiling cpu kernels that are not in the cache yet"


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notice_comes_once_before_a_compile_and_never_for_a_cache_load(tmp_path):
    src = tmp_path / "kernels_for_notice.py"
    src.write_text("from numba import njit\n\n@njit(cache=True)\ndef twice(x):\n    return 2 * x\n"
                   "\n@njit(cache=True)\ndef thrice(x):\n    return 3 * x\n")
    lines = []
    notice = compile_notice("cpu", write=lines.append)
    with event.install_listener("numba:run_pass", notice):
        m = _load(src, "kernels_for_notice_a")
        assert lines == []                           # decorating compiles nothing
        assert m.twice(2) == 4
        assert len(lines) == 1 and lines[0].startswith(NOTICE)
        assert m.thrice(2) == 6                      # a second compile: no second line
        assert len(lines) == 1
    lines.clear()
    notice = compile_notice("cpu", write=lines.append)
    with event.install_listener("numba:run_pass", notice):
        fresh = _load(src, "kernels_for_notice_b")   # new dispatchers: both come from the cache
        assert fresh.twice(3) == 6 and fresh.thrice(3) == 9
        assert fresh.twice.stats.cache_hits and fresh.thrice.stats.cache_hits
    assert lines == []


_CUDA_SCRIPT = """
import json
import numbaformer.backends.cuda
from numba import cuda, types
from numba.cuda.core import event
from numbaformer.backends.kernel_cache import announce_compiles, compile_notice, _PASS_EVENTS
lines = []
notice = compile_notice("cuda", write=lines.append)
assert _PASS_EVENTS["cuda"] == ("numba.cuda.core.event", "numba-cuda:run_pass")

def add_one(a):
    i = cuda.grid(1)
    if i < a.size:
        a[i] += 1

with event.install_listener("numba-cuda:run_pass", notice):
    before = list(lines)
    try:
        cuda.compile_ptx(add_one, (types.float32[::1],), cc=(9, 0))
    except Exception as e:  # only a missing toolchain (NVVM, libdevice) skips; bugs fail
        if type(e).__name__ not in ("DynamicLibNotFoundError", "FileNotFoundError",
                                    "NvvmSupportError", "CudaSupportError", "OSError"):
            raise
        lines = ["skip: " + type(e).__name__]
announce_compiles("cuda")                   # registers with numba-cuda's own event module
print(json.dumps({"before": before, "after": lines}))
"""


def test_cuda_compiles_are_announced_too():
    """The CUDA backend's kernels compile through numba-cuda's pipeline, whose passes are events
    of its own module: compiled offline (PTX, no GPU needed), with the simulator off."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    p = subprocess.run([sys.executable, "-c", _CUDA_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(p.stdout.splitlines()[-1])
    if d["after"] and d["after"][0].startswith("skip: "):
        pytest.skip(f"NVVM unavailable: {d['after'][0]}")
    assert d["before"] == [] and len(d["after"]) == 1
    assert d["after"][0].startswith("compiling cuda kernels that are not in the cache yet")


def _generate(model, cache_dir, *args) -> tuple[str, list[str]]:
    """stdout and stderr lines of a short CPU generation with kernels cached in cache_dir."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "NUMBA_ENABLE_CUDASIM": "0"}
    p = subprocess.run([sys.executable, "-m", "numbaformer.cli", "generate", "-m", str(model),
                        "-p", "Hello", "-n", "2", "--temp", "0", "--device", "cpu", "-c", "32",
                        *args], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    return p.stdout, p.stderr.splitlines()


def test_a_quant_type_not_cached_yet_is_announced(tiny_model, tmp_path):
    """An empty kernel cache: the first run announces; a model of another quant type, with every
    other kernel cached, announces again (the case that was silent), with --json too (on stderr;
    stdout stays one JSON object); its second run is silent."""
    q8, q4 = tiny_model("llama", "Q8_0"), tiny_model("llama", "Q4_0")
    _, first = _generate(q8, tmp_path)
    assert first[0].startswith(NOTICE) and first[-1].startswith("[length]")
    out, other_type = _generate(q4, tmp_path, "--json")
    assert len(other_type) == 1 and other_type[0].startswith(NOTICE)
    assert len(json.loads(out)["ids"]) == 2
    _, again = _generate(q4, tmp_path)
    assert not any("compiling" in line for line in again) and len(again) == 1
