"""Where compiled kernels are cached, keyed by the package's own source.

numba's `cache=True` invalidates a cached kernel only when the file that defines it changes, not when
a function it calls from another module does (a kernel in backends/cpu/matmul.py inlines the block
decoders of quants.py). So each backend's kernels are cached under a folder named by a hash of the
source files they are built from (quants.py, backends/*.py and backends/<name>/): a change there
starts a fresh cache; anything else reuses it. rng.py (the sampler's Philox, inlined into both
backends' sampling kernels) counts as one of those sources.
Base folder: NUMBA_CACHE_DIR if set, else ~/.cache/numbaformer/numba.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def source_hash(backend: str) -> str:
    """Hash of the sources a backend's kernels are built from: quants.py, rng.py, the backends
    package's own modules and the backend's folder (so a CUDA edit leaves the CPU cache valid)."""
    backends = PACKAGE_ROOT / "backends"
    files = [PACKAGE_ROOT / "quants.py", PACKAGE_ROOT / "rng.py", *backends.glob("*.py"),
             *(backends / backend).rglob("*.py")]
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


# numba announces each compiler pass it is about to run; a kernel loaded from the cache runs none
_PASS_EVENTS = {"cpu": ("numba.core.event", "numba:run_pass"),
                "cuda": ("numba.cuda.core.event", "numba-cuda:run_pass")}
_notices: dict[str, object] = {}


def compile_notice(backend: str, write=None):
    """A numba event listener that prints one line (to stderr, or through `write`) when the first
    compiler pass starts, i.e. before a kernel that is not in the cache (a first run, a quant type
    or shape not used before, an edited source) is compiled; then it stays silent. Cache loads
    run no pass, so a warm run prints nothing."""
    import importlib

    event = importlib.import_module(_PASS_EVENTS[backend][0])

    class CompileNotice(event.Listener):
        said = False

        def on_start(self, ev):
            if not self.said:
                self.said = True
                line = (f"compiling {backend} kernels that are not in the cache yet (several "
                        f"seconds; cached for the next runs)...")
                if write is not None:
                    write(line)
                else:
                    print(line, file=sys.stderr, flush=True)

        def on_end(self, ev):
            pass

    return CompileNotice()


def announce_compiles(backend: str) -> None:
    """From now on in this process, say so on stderr before the first kernel compile of
    `backend` (see compile_notice). Registered once per backend; one attribute test per compiler
    pass afterwards, nothing per kernel launch."""
    if backend in _notices or backend not in _PASS_EVENTS:
        return
    import importlib

    module, kind = _PASS_EVENTS[backend]
    _notices[backend] = compile_notice(backend)
    importlib.import_module(module).register(kind, _notices[backend])
