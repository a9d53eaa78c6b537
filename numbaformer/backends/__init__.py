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
