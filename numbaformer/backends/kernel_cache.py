"""Where compiled kernels are cached, keyed by the package's own source.

numba's `cache=True` invalidates a cached kernel only when the file that defines it changes, not when
a function it calls from another module does (a kernel in backends/cpu/matmul.py inlines the block
decoders of quants.py). So each backend's kernels are cached under a folder named by a hash of the
source files they are built from (quants.py, backends/*.py and backends/<name>/): a change there
starts a fresh cache; anything else reuses it.
Base folder: NUMBA_CACHE_DIR if set, else ~/.cache/numbaformer/numba.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def source_hash(backend: str) -> str:
    """Hash of the sources a backend's kernels are built from: quants.py, the backends package's
    own modules and the backend's folder (so a CUDA edit leaves the CPU cache valid)."""
    backends = PACKAGE_ROOT / "backends"
    files = [PACKAGE_ROOT / "quants.py", *backends.glob("*.py"), *(backends / backend).rglob("*.py")]
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(str(path.relative_to(PACKAGE_ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _folder(backend: str) -> Path:
    base = os.environ.get("NUMBA_CACHE_DIR") or str(Path.home() / ".cache" / "numbaformer" / "numba")
    return Path(base) / f"numbaformer-{backend}-{source_hash(backend)}"


def cached(backend: str, decorator):
    """decorator(fn), applied while numba's cache folder is this backend's: numba fixes a kernel's
    cache location when the kernel is decorated, and both backends may live in one process."""
    import numba

    def deco(fn):
        old = numba.config.CACHE_DIR
        numba.config.CACHE_DIR = str(_folder(backend))
        try:
            return decorator(fn)
        finally:
            numba.config.CACHE_DIR = old
    return deco


def is_warm(backend: str) -> bool:
    """True if kernels of this source were compiled and cached before (no compile pause ahead)."""
    folder = _folder(backend)
    return folder.is_dir() and any(folder.rglob("*.nbi"))
