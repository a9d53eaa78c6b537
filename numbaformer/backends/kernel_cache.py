"""Where compiled kernels are cached, keyed by the package's own source.

numba's `cache=True` invalidates a cached kernel only when the file that defines it changes, not when
a function it calls from another module does (a kernel in backends/cpu/matmul.py inlines the block
decoders of quants.py). So kernels are cached under a folder named by a hash of every source file
kernels are built from (quants.py and backends/): a change there starts a fresh cache; anything
else reuses it.
Base folder: NUMBA_CACHE_DIR if set, else ~/.cache/numbaformer/numba.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    h = hashlib.sha256()
    files = [PACKAGE_ROOT / "quants.py", *(PACKAGE_ROOT / "backends").rglob("*.py")]
    for path in sorted(files):
        h.update(str(path.relative_to(PACKAGE_ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def configure() -> Path:
    """Point numba's cache at the folder for this source; returns it. Call before defining kernels."""
    import numba

    base = os.environ.get("NUMBA_CACHE_DIR") or str(Path.home() / ".cache" / "numbaformer" / "numba")
    folder = Path(base) / f"numbaformer-{source_hash()}"
    numba.config.CACHE_DIR = str(folder)
    return folder


def is_warm() -> bool:
    """True if kernels of this source were compiled and cached before (no compile pause ahead)."""
    folder = configure()
    return folder.is_dir() and any(folder.rglob("*.nbi"))
