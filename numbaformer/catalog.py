"""The models in the caches, for `numbaformer models`: the default model's cache (fetch.py) and the
GGUFs in the Hugging Face hub's cache (hub.py); listing and removing them by name.

Names: a file of the model cache by its file name; a hub GGUF as ORG/REPO:QUANT, or, where that
is ambiguous (two files of one quant, a file without a quant in its name, an older revision),
ORG/REPO/FILE with @COMMIT for a revision other than the newest.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import fetch, hub
from .gguf_file import GGUFError, open_gguf


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path
    size: int
    source: str                          # "numbaformer" (the model cache) or "hub"
    hub_file: hub.CachedFile | None = None
    repo: str | None = None


def _hub_names(files: list[hub.CachedFile]) -> list[str]:
    """The name of each cached hub file (see the module docstring); files newest revision first
    per repository, as hub.cached_files gives them."""
    newest = {}
    for c in files:
        newest.setdefault(c.repo, c.commit)
    short = [f"{c.repo}:{hub.quant_of(c.name)}" if hub.quant_of(c.name) else None for c in files]
    counts = Counter(short)
    return [s if s and counts[s] == 1 else
            f"{c.repo}/{c.name}" + ("" if c.commit == newest[c.repo] else f"@{c.commit[:7]}")
            for s, c in zip(short, files)]


def entries() -> list[Entry]:
    """Every GGUF in the model cache and every model GGUF in the hub's cache."""
    out = []
    folder = fetch.cache_dir()
    if folder.is_dir():
        out += [Entry(p.name, p, p.stat().st_size, "numbaformer")
                for p in sorted(folder.glob("*.gguf")) if p.is_file()]
    files = hub.cached_files(hub.settings().cache_dir)
    out += [Entry(name, c.path, c.size, "hub", c, c.repo)
            for name, c in zip(_hub_names(files), files)]
    return out


def describe(e: Entry) -> dict:
    """An entry as `models` shows it: name, size, architecture, quant type, path, source."""
    from .info import FILE_TYPES
    from .loader import is_vocab_only
    arch, qtype = "?", "?"
    try:
        with open_gguf(e.path) as gf:
            arch = str(gf.metadata.get("general.architecture", "?"))
            ft = gf.metadata.get("general.file_type")
            if is_vocab_only(gf):
                qtype = "vocab-only"
            elif isinstance(ft, int):
                qtype = FILE_TYPES.get(ft, f"#{ft}")
            elif gf.tensors:             # no file type: the most common tensor type
                qtype = Counter(t.type_name for t in gf.tensors.values()).most_common(1)[0][0]
    except GGUFError:
        qtype = "invalid"
    return {"name": e.name, "size_bytes": e.size, "architecture": arch, "type": qtype,
            "path": str(e.path), "source": e.source}


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_table(rows: list[dict]) -> str:
    """The listing as a table, or a line saying where nothing was found."""
    if not rows:
        return (f"no models in the caches ({fetch.cache_dir()}, {hub.settings().cache_dir}); "
                f"pull one with -hf ORG/REPO[:QUANT]")
    w = max(len(r["name"]) for r in rows)
    lines = [f"{'NAME':<{w}}  {'SIZE':>10}  {'ARCH':<8}  {'TYPE':<10}  PATH"]
    lines += [f"{r['name']:<{w}}  {_size(r['size_bytes']):>10}  {r['architecture']:<8}  "
              f"{r['type']:<10}  {r['path']}" for r in rows]
    return "\n".join(lines)


def find(name: str) -> list[Entry]:
    """The entries `name` designates: a listed name (the quant case-insensitive), ORG/REPO (all
    of its files), or a listed path; [] if none."""
    es = entries()
    want = name.strip()
    hit = [e for e in es if e.name == want or e.name.lower() == want.lower()
           or str(e.path) == want]
    if not hit:
        hit = [e for e in es if e.repo and e.repo.lower() == want.lower()]
    return hit


def remove(name: str) -> list[Entry]:
    """Remove the models `name` designates (see find); the entries removed. hub.HubError (a
    FetchError) when nothing matches, naming what there is."""
    hit = find(name)
    if not hit:
        names = [e.name for e in entries()]
        raise hub.HubError(f"no model '{name}' in the caches" + (
            f" (there are: {', '.join(names)})" if names else " (they are empty)"))
    for e in hit:
        if e.source == "numbaformer":
            e.path.unlink(missing_ok=True)
    hub_files = [e.hub_file for e in hit if e.hub_file is not None]
    if hub_files:
        hub.remove_cached(hub_files, hub.settings().cache_dir)
    return hit
