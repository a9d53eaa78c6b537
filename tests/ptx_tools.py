"""Offline PTX checks for CUDA kernels, no GPU needed: compile kernels to PTX with NVVM in a
subprocess (the test process runs under the simulator), and assemble the PTX with ptxas, when one
is installed, for its register and spill figures.

    ptx = offline_ptx('import test_cuda_mma as t; ptx["k"] = compile(t._kernel, (u32[::1],))')
    info = ptxas_info(ptx["k"])       # {"registers": 40, "spill_stores": 0, ...} or None

NVVM (numba-cuda's, from the `nvidia-cuda-nvcc` / `nvidia-cuda-nvrtc` wheels) may emit a newer
`.version` than the ptxas found here accepts; only the header is lowered before assembling (the
kernels use no instruction newer than the ptxas).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_PREAMBLE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import numbaformer.backends.cuda
from numba import cuda, types
import numba.cuda.dispatcher as d
d.get_current_device = lambda: type("F", (), {"compute_capability": (9, 0)})()  # offline only
u32, i32, f32, u16, u8 = types.uint32, types.int32, types.float32, types.uint16, types.uint8

def compile(kernel, sig):
    '''PTX of a cuda.jit dispatcher (with its launch bounds) or a plain function, for sm_90.'''
    fn = getattr(kernel, "py_func", kernel)
    bounds = getattr(kernel, "targetoptions", {}).get("launch_bounds")
    return cuda.compile_ptx(fn, sig, cc=(9, 0), launch_bounds=bounds)[0]

ptx = {}
try:
"""

_EPILOGUE = """
except Exception as e:  # only a missing toolchain (NVRTC, NVVM, libdevice) skips; bugs fail
    if type(e).__name__ not in ("DynamicLibNotFoundError", "FileNotFoundError", "NvvmSupportError",
                                "CudaSupportError", "ImportError", "OSError"):
        raise
    ptx = {"skip": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
print(json.dumps(ptx))
"""


def offline_ptx(body: str, timeout: int = 1800) -> dict[str, str]:
    """Run `body` (statements filling the dict `ptx`, name -> PTX; `compile(kernel, sig)` and the
    numba types u32, i32, f32, u16, u8 are defined) in a subprocess with the simulator off and the
    tests folder on sys.path. Skips the test when NVVM is not available."""
    script = _PREAMBLE + "".join(f"    {line}\n" for line in body.strip().splitlines()) + _EPILOGUE
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    done = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    ptx = json.loads(done.stdout.splitlines()[-1])
    if "skip" in ptx:
        pytest.skip(f"NVVM unavailable: {ptx['skip']}")
    return ptx


def find_ptxas() -> str | None:
    """$PTXAS, else ptxas on PATH, else the one of the nvidia-cuda-nvcc wheel."""
    if os.environ.get("PTXAS"):
        return os.environ["PTXAS"]
    found = shutil.which("ptxas")
    if found:
        return found
    try:
        import nvidia.cuda_nvcc as nvcc
        for root in nvcc.__path__:
            cand = Path(root) / "bin" / "ptxas"
            if cand.is_file():
                return str(cand)
    except ImportError:
        pass
    return None


_PTX_ISA = {(12, 0): "8.0", (12, 1): "8.1", (12, 2): "8.2", (12, 3): "8.3", (12, 4): "8.4",
            (12, 5): "8.5", (12, 6): "8.5", (12, 8): "8.7", (12, 9): "8.8"}


def ptxas_info(ptx: str, arch: str = "sm_90") -> dict | None:
    """Assemble with `ptxas -arch=sm_90 -v`: {"registers", "spill_stores", "spill_loads",
    "stack", "smem"} of the (last) kernel in the PTX, or None when there is no ptxas."""
    exe = find_ptxas()
    if exe is None:
        return None
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", version)
    release = (int(m.group(1)), int(m.group(2))) if m else (12, 0)
    if release < (13, 0):              # the newest PTX ISA each CUDA 12 ptxas accepts
        top = _PTX_ISA.get(release, "8.0")
        ptx = re.sub(r"^\.version \d+\.\d+", f".version {top}", ptx, count=1, flags=re.M)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([exe, f"-arch={arch}", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                              capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stderr + done.stdout

    def last(pattern):
        found = re.findall(pattern, log)
        return int(found[-1]) if found else 0

    return {"registers": last(r"Used (\d+) registers"),
            "spill_stores": last(r"(\d+) bytes spill stores"),
            "spill_loads": last(r"(\d+) bytes spill loads"),
            "stack": last(r"(\d+) bytes stack frame"), "smem": last(r"(\d+) bytes smem")}
