"""Backend selection: --device auto|cpu|cuda, --gpu N, CUDA_FORCE_CPU, CUDA_VISIBLE_DEVICES.

CUDA is initialized lazily, only when it may be used: importing this module imports no numba.
"""
from __future__ import annotations

import ctypes.util
import os
import sys

DEVICES = ("auto", "cpu", "cuda")


class BackendError(RuntimeError):
    """The requested device cannot be used; the message is one line."""


def _cuda_unavailable_reason() -> str | None:
    """None if a CUDA GPU (or the simulator) looks usable, else why not. Initializes CUDA."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        if os.environ.get("NUMBAFORMER_ALLOW_CUDASIM") == "1":
            return None                  # tests drive the CUDA backend through the simulator
        return "NUMBA_ENABLE_CUDASIM=1 (the CUDA simulator is not a device)"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "CUDA_VISIBLE_DEVICES hides every GPU"
    if ctypes.util.find_library("cuda") is None and not os.path.exists("/usr/lib64/libcuda.so"):
        if not any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl")):
            return "no NVIDIA driver found"
    from . import cuda as _shim  # noqa: F401  (numpy shim before numba.cuda)
    from numba import cuda
    try:
        if not cuda.is_available() or len(cuda.gpus) == 0:
            return "no CUDA GPU available"
    except Exception as e:               # a broken driver must not become a traceback
        return f"CUDA failed to initialize: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def select_backend(device: str = "auto", *, gpu: int = 0, threads: int | None = None,
                   quiet: bool = False, exact: bool = False):
    """The backend for `device`. 'auto' falls back to the CPU with a one-line notice on stderr;
    'cuda' without a usable GPU raises BackendError. CUDA_FORCE_CPU=1 forces the CPU. exact:
    decode mat-vecs with f32 activations (else 8-bit activations where the weights' type has a
    fast mat-vec, on either device)."""
    if device not in DEVICES:
        raise BackendError(f"unknown device '{device}' (choose from {', '.join(DEVICES)})")
    if os.environ.get("CUDA_FORCE_CPU", "") not in ("", "0"):
        device = "cpu"
    if device in ("auto", "cuda"):
        reason = _cuda_unavailable_reason()
        if reason is None:
            from .cuda.backend import CUDABackend
            return CUDABackend(gpu, exact=exact)
        if device == "cuda":
            raise BackendError(f"--device cuda: {reason}")
        if not quiet:
            print(f"note: {reason}; running on the CPU", file=sys.stderr)
    from .cpu import CPUBackend
    return CPUBackend(threads, exact=exact)


def cuda_devices() -> tuple[list[dict], str | None]:
    """The CUDA devices numbaformer sees, each {index, name, compute_capability, memory_free,
    memory_total (bytes)}, and None; or ([], why there are none). Initializes CUDA; never
    raises for a missing or broken driver."""
    if os.environ.get("CUDA_FORCE_CPU", "") not in ("", "0"):
        return [], "CUDA_FORCE_CPU is set: numbaformer runs on the CPU"
    reason = _cuda_unavailable_reason()
    if reason is not None:
        return [], reason
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return [{"index": 0, "name": "CUDA simulator (NUMBA_ENABLE_CUDASIM=1)",
                 "compute_capability": None, "memory_free": None, "memory_total": None}], None
    from numba import cuda
    try:
        return gpu_rows(cuda), None
    except Exception as e:               # a driver failing midway: a reason, not a traceback
        return [], f"CUDA failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def gpu_rows(cuda) -> list[dict]:
    """One row per device of numba.cuda module `cuda` (a context is made on each to read its
    free memory)."""
    rows = []
    for i, gpu in enumerate(cuda.gpus):
        with gpu:
            dev = cuda.get_current_device()
            free, total = cuda.current_context().get_memory_info()
            name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
            rows.append({"index": i, "name": name,
                         "compute_capability": "%d.%d" % tuple(dev.compute_capability),
                         "memory_free": int(free), "memory_total": int(total)})
    return rows


def cpu_info() -> dict:
    """The CPU as the CPU backend uses it: name, logical cores (and those this process may run
    on), numba's thread count (the default of -t), and the decode mat-vec's instruction set."""
    import platform

    import numba

    from .cpu.simd import has_vnni
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), name)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"name": name, "cores": os.cpu_count(), "usable_cores": usable,
            "threads": numba.config.NUMBA_NUM_THREADS,
            "simd": "AVX-512 VNNI" if has_vnni() else "portable (no AVX-512 VNNI)"}
