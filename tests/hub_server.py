"""A local stand-in for the Hugging Face hub, for the real `huggingface_hub` client pointed at it
with HF_ENDPOINT: the routes that `HfApi.model_info` and `hf_hub_download` call, served from memory
by http.server on a free loopback port, in a thread.

    GET  /api/models/{org}/{repo}[/revision/{rev}]   model info; ?blobs=true adds each file's size,
                                                     git blob id and LFS size/sha256
    HEAD /{org}/{repo}/resolve/{rev}/{path}          the file's metadata: X-Repo-Commit, ETag,
                                                     X-Linked-Etag (the LFS sha256), X-Linked-Size
    GET  /{org}/{repo}/resolve/{rev}/{path}          the same headers and the bytes

Errors carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), which the
client turns into its exceptions. Every request is recorded (method, path, Authorization).

Run it alone to try the CLI by hand: `python tests/hub_server.py` serves test-org/tiny-GGUF (two
tiny models, Q4_K_M and Q8_0) until Ctrl-C and prints the HF_ENDPOINT to use.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    token: str | None = None                       # private: only this token sees it
    served: dict[str, bytes] = field(default_factory=dict)   # bytes sent instead (corruption)

    def sibling(self, name: str) -> dict:
        data = self.files[name]
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return {"rfilename": name, "size": len(data), "blobId": blob,
                "lfs": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                        "pointerSize": 134}}


class TestHub:
    """The server and its repositories: `add` a repository, read `requests`, `url` for
    HF_ENDPOINT, set `status` for an outage; `close` when done."""

    __test__ = False                               # not a pytest test class

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.status: int | None = None             # when set, every request gets it (an outage)
        hub = self

        class Handler(_Handler):
            owner = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo_id: str, files: dict[str, bytes], token: str | None = None) -> Repo:
        h = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            h.update(name.encode() + b"\0" + files[name])
        commit = h.hexdigest()
        self.repos[repo_id] = Repo(dict(files), commit, token)
        return self.repos[repo_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    owner: TestHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):                  # quiet
        pass

    def _send(self, status: int, headers: dict, body: bytes = b"", head: bool = False) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, head: bool, extra: dict | None = None) -> None:
        body = json.dumps({"error": code}).encode()
        self._send(status, {"X-Error-Code": code, "Content-Type": "application/json",
                            **(extra or {})}, body, head)

    def _repo(self, repo_id: str, head: bool) -> Repo | None:
        repo = self.owner.repos.get(repo_id)
        auth = self.headers.get("Authorization")
        if repo is None or (repo.token and auth != f"Bearer {repo.token}"):
            self._error(401 if repo is not None else 404, "RepoNotFound", head)
            return None
        return repo

    def _route(self, head: bool) -> None:
        url = urlsplit(self.path)
        self.owner.requests.append((self.command, url.path, self.headers.get("Authorization")))
        if self.owner.status is not None:
            return self._error(self.owner.status, "Outage", head)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._info(parts[2] + "/" + parts[3], parts[4:], url.query, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), head)
        self._error(404, "NotFound", head)

    def _info(self, repo_id: str, rest: list[str], query: str, head: bool) -> None:
        repo = self._repo(repo_id, head)
        if repo is None:
            return
        if rest and (rest[0] != "revision" or rest[1:] not in (["main"], [repo.commit])):
            return self._error(404, "RevisionNotFound", head)
        blobs = "blobs=true" in query.lower()
        siblings = [repo.sibling(n) if blobs else {"rfilename": n} for n in sorted(repo.files)]
        body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": repo.commit,
                           "private": bool(repo.token), "siblings": siblings}).encode()
        self._send(200, {"Content-Type": "application/json"}, body, head)

    def _resolve(self, repo_id: str, revision: str, name: str, head: bool) -> None:
        repo = self._repo(repo_id, head)
        if repo is None:
            return
        if revision not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound", head)
        if name not in repo.files:
            return self._error(404, "EntryNotFound", head, {"X-Repo-Commit": repo.commit})
        meta = repo.sibling(name)
        body = repo.served.get(name, repo.files[name])
        self._send(200, {"X-Repo-Commit": repo.commit, "ETag": f'"{meta["blobId"]}"',
                         "X-Linked-Etag": f'"{meta["lfs"]["sha256"]}"',
                         "X-Linked-Size": str(meta["size"]), "Accept-Ranges": "bytes",
                         "Content-Type": "application/octet-stream",
                         "Content-Length": str(len(body))}, body, head)

    def do_GET(self):
        self._route(head=False)

    def do_HEAD(self):
        self._route(head=True)


def tiny_gguf(file_type: int, seed: int) -> bytes:
    """tests/gguf_builder's tiny llama with its general.file_type set (15: Q4_K_M, 7: Q8_0)."""
    from gguf_builder import tiny_llama
    b = tiny_llama(seed=seed)
    b.set("general.file_type", file_type)
    return b.to_bytes()


TINY_REPO = "test-org/tiny-GGUF"


def tiny_repo_files() -> dict[str, bytes]:
    """test-org/tiny-GGUF: the tiny model as Q4_K_M (seed 0) and Q8_0 (seed 1), a README."""
    return {"tiny-Q4_K_M.gguf": tiny_gguf(15, 0), "tiny-Q8_0.gguf": tiny_gguf(7, 1),
            "README.md": b"# tiny\n"}


if __name__ == "__main__":
    import sys
    import time
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    hub = TestHub()
    hub.add(TINY_REPO, tiny_repo_files())
    print(f"serving {TINY_REPO}: export HF_ENDPOINT={hub.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.close()
