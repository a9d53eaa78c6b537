"""Models by name from the Hugging Face hub: `ORG/REPO[:QUANT]` -> a verified GGUF in its cache.

huggingface_hub does the talking (the repository's file list with sizes and sha256s, the download
into its own cache with its progress bar, HF_TOKEN); this module picks the file, verifies it, and
reads the cache when offline (--offline, HF_HUB_OFFLINE=1) or when the hub cannot be reached.

huggingface_hub reads HF_ENDPOINT, HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE once, when it is
imported; `settings()` reads them at each call (by the same rules) and passes them on, so that a
long-lived process, or a test, sees their current values.

Picking a file: GGUF files of the repository (multimodal projectors, `mmproj*`, left out) whose
name carries the quant (`Q4_K_M`, `q8_0`: case-insensitive, as a whole word of the name); without a
quant, Q4_K_M if there is one, else the first GGUF by name. A model split into several files
(`-00001-of-00003.gguf`) is refused until split files are supported.

Verifying a download: its size and sha256 against the hub's LFS metadata (its size and git blob
sha1 for a file outside LFS). A file that was already in the cache is checked by size and by its
blob's name, which the hub's cache gives as the sha256 it was checked against when downloaded.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .fetch import FetchError

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_QUANT = "Q4_K_M"
TIMEOUT_S = 10.0                          # per request to the hub's API
REF_PREFIXES = ("hf://", "hf.co/", "huggingface.co/", "https://huggingface.co/")
_REPO_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_QUANT_ARG_RE = re.compile(r"[A-Za-z0-9_]+")
# a quant type as a word of a file name: Q4_K_M, Q6_K, Q4_K_XL, Q8_0, Q4_0_4_4, IQ4_XS, IQ2_XXS,
# TQ1_0, MXFP4, BF16, F16, F32
_QUANT_RE = re.compile(r"(?<![A-Za-z0-9])(I?Q[1-8]_(?:K(?:_(?:S|M|L|XL))?|[01](?:_[48]_[48])?|XXS|"
                       r"XS|S|M|NL)|TQ[12]_0|MXFP4|BF16|F16|F32)(?![A-Za-z0-9])", re.IGNORECASE)
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


class HubError(FetchError):
    """A model could not be found, downloaded or verified; the message is one line."""


class _Unreachable(Exception):
    """The hub did not answer (no connection, a timeout, a server error): the cache may serve."""


@dataclass(frozen=True)
class HubRef:
    """A model on the hub: a repository and, optionally, the quant type to pick in it."""

    repo: str
    quant: str | None = None

    def __str__(self) -> str:
        return f"{self.repo}:{self.quant}" if self.quant else self.repo


@dataclass(frozen=True)
class Settings:
    endpoint: str
    cache_dir: Path
    offline: bool


@dataclass(frozen=True)
class RemoteFile:
    """A file of a repository as the hub lists it (files_metadata)."""

    name: str
    size: int | None
    sha256: str | None              # LFS files (every GGUF on the hub is one)
    blob_id: str | None             # git's sha1 of the blob, for a file outside LFS


@dataclass(frozen=True)
class CachedFile:
    """A GGUF in the hub's cache."""

    repo: str
    name: str                       # path inside the repository
    path: Path                      # the snapshot's entry (a link to the blob)
    blob: Path
    commit: str
    size: int
    modified: float                 # when its revision was last written


# --- settings and references ----------------------------------------------------------------------

def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def settings(offline: bool = False) -> Settings:
    """The hub's endpoint, cache folder and offline switch, from the environment now."""
    env = os.environ
    endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "huggingface")
        cache = os.path.join(home, "hub")
    return Settings(endpoint, Path(os.path.expandvars(os.path.expanduser(cache))),
                    offline or _is_true(env.get("HF_HUB_OFFLINE")))


def parse_ref(text: str) -> HubRef:
    """`ORG/REPO[:QUANT]`, optionally prefixed hf://, hf.co/ or huggingface.co/ -> HubRef;
    HubError when it is not one."""
    s = text.strip()
    for p in REF_PREFIXES:
        if s.lower().startswith(p):
            s = s[len(p):]
            break
    repo, _, quant = s.partition(":")
    if not _REPO_RE.fullmatch(repo) or ".." in repo or "--" in repo or (
            quant and not _QUANT_ARG_RE.fullmatch(quant)) or s.endswith(":"):
        raise HubError(f"'{text}' is not a hub model: expected ORG/REPO or ORG/REPO:QUANT "
                       f"(a repository of GGUF files and a quant type such as Q4_K_M)")
    return HubRef(repo, quant.upper() or None)


def hub_ref(model: str) -> HubRef | None:
    """The HubRef that a -m string names, or None when it names a file. A string with an hf://,
    hf.co/ or huggingface.co/ prefix is a hub model; so is a bare ORG/REPO[:QUANT] that is not
    an existing path and does not end in .gguf."""
    if any(model.lower().startswith(p) for p in REF_PREFIXES):
        return parse_ref(model)
    if os.path.exists(model) or model.lower().endswith(".gguf"):
        return None
    repo = model.partition(":")[0]
    return parse_ref(model) if _REPO_RE.fullmatch(repo) and model.count("/") == 1 else None


def resolve(model: str, *, offline: bool = False, quiet: bool = False) -> Path | None:
    """The local path of the hub model that a -m string names (pulled if need be), or None when
    it names a file. A bare ORG/REPO that fails says that it is not a file either."""
    ref = hub_ref(model)
    if ref is None:
        return None
    try:
        return pull(ref, offline=offline, quiet=quiet)
    except HubError as e:
        if any(model.lower().startswith(p) for p in REF_PREFIXES):
            raise
        raise HubError(f"{model} is not a file; as a hub model: {e}") from None


# --- picking a file -------------------------------------------------------------------------------

def quant_of(name: str) -> str | None:
    """The quant type a GGUF file name carries (its last one), upper-case; None if none."""
    stem = _SPLIT_RE.sub("", Path(name).name)
    found = _QUANT_RE.findall(stem)
    return found[-1].upper() if found else None


def is_model_gguf(name: str) -> bool:
    """A GGUF that holds a model (not a multimodal projector)."""
    base = Path(name).name.lower()
    return base.endswith(".gguf") and not base.startswith("mmproj")


def _quants(names: list[str]) -> str:
    """The quants of these files for a message: `Q4_K_M, Q8_0` (file names where none shows)."""
    seen = dict.fromkeys(quant_of(n) or Path(n).name for n in sorted(names))
    return ", ".join(seen)


def choose(repo: str, quant: str | None, names: list[str], where: str = "") -> str:
    """The file of `names` (GGUF names in `repo`) that `quant` picks; HubError if none, or if
    the pick is a split model. `where` ends messages about what is missing (e.g. ' in the
    cache')."""
    names = sorted(n for n in names if is_model_gguf(n))
    if not names:
        raise HubError(f"{repo} holds no GGUF model file{where}")
    if quant:
        picks = [n for n in names if quant_of(n) == quant] or [
            n for n in names
            if re.search(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", n, re.I)]
        if not picks:
            raise HubError(f"{repo} has no GGUF file for quant {quant}{where}; it has: "
                           f"{_quants(names)}")
    else:
        picks = [n for n in names if quant_of(n) == DEFAULT_QUANT] or names[:1]
    pick = picks[0]
    split = _SPLIT_RE.search(pick)
    if split:
        raise HubError(f"{repo}: {Path(pick).name} is one part of a model split into "
                       f"{int(split.group(2))} files; split GGUFs are not supported yet (merge "
                       f"them with llama.cpp's llama-gguf-split --merge)")
    return pick


# --- the hub --------------------------------------------------------------------------------------

def _note(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"note: {msg}", file=sys.stderr)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _remote_files(ref: HubRef, s: Settings) -> tuple[list[RemoteFile], str | None]:
    """The repository's files with their metadata, and the commit they belong to (one API
    request); HubError on a missing or inaccessible repository, _Unreachable when the hub does
    not answer."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    try:
        info = HfApi(endpoint=s.endpoint).model_info(ref.repo, files_metadata=True,
                                                     timeout=TIMEOUT_S)
    except _transport_errors() as e:
        raise _Unreachable(_first_line(e)) from None
    except GatedRepoError:
        raise HubError(f"{ref.repo} is gated on {s.endpoint}: accept its terms on the hub and "
                       f"set HF_TOKEN") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise HubError(f"{ref.repo}: no such repository on {s.endpoint} (a private one needs "
                       f"HF_TOKEN)") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        if status >= 500:
            raise _Unreachable(f"HTTP {status}") from None
        raise HubError(f"{ref.repo}: the hub at {s.endpoint} answered HTTP {status}") from None
    except (ValueError, KeyError, TypeError) as e:          # not JSON, not a hub's model info
        raise HubError(f"{ref.repo}: {s.endpoint} does not answer as the hub does "
                       f"({_first_line(e)})") from None
    files = [RemoteFile(f.rfilename, f.lfs.size if f.lfs else f.size,
                        f.lfs.sha256 if f.lfs else None, f.blob_id)
             for f in info.siblings or []]
    return files, info.sha


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Errors of huggingface_hub's HTTP client that mean the hub could not be reached."""
    import httpx2                              # huggingface_hub 2.x's HTTP client
    from huggingface_hub.errors import OfflineModeIsEnabled
    return (httpx2.TransportError, OfflineModeIsEnabled)


def pull(ref: HubRef, *, offline: bool = False, quiet: bool = False) -> Path:
    """The local path of the GGUF that `ref` names: downloaded into the hub's cache and verified
    if it is not there yet. offline (or HF_HUB_OFFLINE=1): the cache only. When the hub cannot be
    reached, a cached file is used with a note on stderr (none when quiet)."""
    s = settings(offline)
    if s.offline:
        return cached(ref, s, "offline (--offline or HF_HUB_OFFLINE=1)")
    try:
        files, commit = _remote_files(ref, s)
    except _Unreachable as e:
        why = f"cannot reach the hub at {s.endpoint} ({e})"
        path = cached(ref, s, why)
        _note(f"{why}: using the cached {path.name}", quiet)
        return path
    name = choose(ref.repo, ref.quant, [f.name for f in files])
    remote = next(f for f in files if f.name == name)
    return download(ref.repo, remote, commit, s)


def download(repo: str, f: RemoteFile, commit: str | None, s: Settings) -> Path:
    """f into the hub's cache at `commit` (with the progress bar), then verified; the path."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from .progress import download_bar
    was = try_to_load_from_cache(repo, f.name, cache_dir=s.cache_dir, revision=commit) \
        if commit else None
    try:
        path = Path(hf_hub_download(repo, f.name, revision=commit, cache_dir=s.cache_dir,
                                    endpoint=s.endpoint, etag_timeout=TIMEOUT_S,
                                    tqdm_class=download_bar(Path(f.name).name)))
    except _transport_errors() as e:
        raise HubError(f"{repo}/{f.name}: the download from {s.endpoint} failed: "
                       f"{_first_line(e)}") from None
    except OSError as e:                      # the client's size check, a full disk, ...
        raise HubError(f"{repo}/{f.name}: the download failed: {_first_line(e)}") from None
    verify(path, f, fresh=not isinstance(was, str), label=f"{repo}/{f.name}")
    return path


def _digest(path: Path, algo: str, prefix: bytes = b"") -> str:
    h = hashlib.new(algo, prefix)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, f: RemoteFile, *, fresh: bool, label: str) -> None:
    """Hold the file at `path` to the hub's metadata `f`: its size, and its sha256 (git blob
    sha1 outside LFS) when `fresh` or when its blob is not named by that sha256. A mismatch
    removes the file from the cache (so that the next run downloads it again) and raises."""
    size = path.stat().st_size
    problem = None
    if f.size is not None and size != f.size:
        problem = f"{size} bytes, the hub says {f.size}"
    elif f.sha256 and (fresh or path.resolve().name != f.sha256):
        got = _digest(path, "sha256")
        if got != f.sha256:
            problem = f"sha256 {got[:16]}..., the hub says {f.sha256[:16]}..."
    elif not f.sha256 and f.blob_id and fresh:
        got = _digest(path, "sha1", b"blob %d\0" % size)
        if got != f.blob_id:
            problem = f"git blob sha1 {got[:16]}..., the hub says {f.blob_id[:16]}..."
    if problem:
        blob = path.resolve()
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise HubError(f"{label}: the downloaded file does not match the hub ({problem}); "
                       f"removed it from the cache, try again")


# --- the cache ------------------------------------------------------------------------------------

def cached_files(cache_dir: Path | None = None) -> list[CachedFile]:
    """Every model GGUF in the hub's cache (every revision), newest revision first."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound
    cache_dir = cache_dir or settings().cache_dir
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    out = []
    for r in info.repos:
        if r.repo_type != "model":
            continue
        for rev in r.revisions:
            for f in rev.files:
                name = f.file_path.relative_to(rev.snapshot_path).as_posix()
                if is_model_gguf(name):
                    out.append(CachedFile(r.repo_id, name, f.file_path, f.blob_path,
                                          rev.commit_hash, f.size_on_disk, rev.last_modified))
    return sorted(out, key=lambda c: (c.repo.lower(), -c.modified, c.name))


def cached(ref: HubRef, s: Settings, why: str) -> Path:
    """The cached file that `ref` picks in the newest cached revision of its repository that
    holds a model GGUF; HubError saying `why` the cache is the only place to look."""
    mine = [c for c in cached_files(s.cache_dir) if c.repo.lower() == ref.repo.lower()]
    if not mine:
        raise HubError(f"{why}, and no GGUF of {ref.repo} is in the cache ({s.cache_dir})")
    newest = [c for c in mine if c.commit == mine[0].commit]
    name = choose(ref.repo, ref.quant, [c.name for c in newest], where=" in the cache")
    return next(c.path for c in newest if c.name == name)


def remove_cached(files: list[CachedFile], cache_dir: Path) -> None:
    """Remove these cached GGUFs: their snapshot entries, each blob that no other entry links
    to, snapshot folders left empty, and a repository's folder when no snapshot file is left."""
    everything = cached_files(cache_dir)
    gone = {f.path for f in files}
    for f in files:
        f.path.unlink(missing_ok=True)
        if not any(o.blob == f.blob and o.path not in gone for o in everything):
            f.blob.unlink(missing_ok=True)
    for f in files:
        snapshot = f.path.parents[len(Path(f.name).parts) - 1]
        repo_dir = snapshot.parent.parent
        if snapshot.exists() and not _has_files(snapshot):
            shutil.rmtree(snapshot)
        if repo_dir.exists() and not _has_files(repo_dir / "snapshots"):
            shutil.rmtree(repo_dir)


def _has_files(folder: Path) -> bool:
    return folder.exists() and any(p.is_symlink() or p.is_file() for p in folder.rglob("*"))
