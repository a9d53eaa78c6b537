"""Test helper: a real `numbaformer serve` process on a free loopback port (CPU backend), the
clients that talk to it (the official openai client, raw httpx) and readers of its SSE stream and
/metrics."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

API_KEY = "sk-test-numbaformer"
ALIAS = "smollm2-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m numbaformer.cli serve -m MODEL --port P --device cpu -t 1 --api-key ... ARGS`;
    started() waits for /health to be 200 and records the statuses it saw before. One thread:
    on a shared machine whose cores are busy, numba's parallel loops with two threads took
    10x longer than with one (25 s against 2 s for 24 tokens), and these tests time things."""

    def __init__(self, model: Path, log: Path, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "numbaformer.cli", "serve", "-m", str(model), "--port",
               str(self.port), "--device", "cpu", "-t", "1", "--api-key", API_KEY, "--alias", ALIAS,
               *map(str, args)]
        env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
        env.pop("CUDA_FORCE_CPU", None)
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.health_seen: list[int] = []

    def started(self, timeout: float = 180.0) -> Server:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.output()}")
            try:
                code = httpx.get(self.url + "/health", timeout=2).status_code
                self.health_seen.append(code)
                if code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s: {self.output()}")

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def client(self, **kw):
        import openai
        kw = {"api_key": API_KEY, "max_retries": 0, "timeout": 120, **kw}
        return openai.OpenAI(base_url=self.url + "/v1", **kw)

    def post(self, path: str, body=None, *, content=None, headers=None, timeout=120.0):
        h = {**AUTH, **(headers or {})}
        if content is None:
            return httpx.post(self.url + path, json=body, headers=h, timeout=timeout)
        return httpx.post(self.url + path, content=content, headers=h, timeout=timeout)

    def metrics(self) -> dict[str, float]:
        """/metrics as {name{labels}: value}."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


def sse_events(lines) -> list:
    """The `data:` payloads of an SSE stream's lines: parsed JSON, or the string '[DONE]'.
    Every non-empty line must be a `data: ` line."""
    out = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_until(predicate, timeout: float, step: float = 0.05) -> float:
    """Seconds until predicate() is true; raises AssertionError after timeout."""
    t0 = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(step)
