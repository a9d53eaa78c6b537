"""Two `numbaformer serve` replicas (CPU, -np 2) behind sglang-router, started by
scripts/serve_router.py on loopback: concurrent requests spread over both, requests that share a
prefix land on one replica, and a replica killed outright is routed around without a failed
request; the router's Prometheus metrics are on the port the script prints (one picked free
when the router starts). Skipped without sglang-router (pip install sglang-router)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import free_port
from vocab_files import REPO_ROOT

pytest.importorskip("sglang_router")

REPLICAS = 2
SYSTEM = ("You are a helpful assistant who answers questions about the history of the Roman "
          "empire in great detail. ") * 3


@pytest.fixture(scope="module")
def deployment(smollm2_path, tmp_path_factory):
    port = free_port()
    while any(_in_use(port + i) for i in range(1, REPLICAS + 1)):
        port = free_port()
    log = open(tmp_path_factory.mktemp("router") / "router.log", "w+")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts" / "serve_router.py"),
                             "--replicas", str(REPLICAS), "--port", str(port), "--",
                             "-m", str(smollm2_path), "-np", "2", "-c", "512", "-t", "1",
                             "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 240:
        log.seek(0)
        ready = re.search(r"router: http.* \(metrics: (\S+)\)", log.read())
        if ready:
            break
        assert proc.poll() is None, _tail(log)
        time.sleep(0.5)
    assert ready, _tail(log)
    replicas = [f"http://127.0.0.1:{port + i + 1}" for i in range(REPLICAS)]
    try:
        yield f"http://127.0.0.1:{port}", replicas, ready.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _in_use(port: int) -> bool:
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tail(log) -> str:
    log.seek(0)
    return log.read()[-3000:]


def served(replicas) -> list[float]:
    """Requests each replica has ended (its /metrics)."""
    out = []
    for url in replicas:
        text = httpx.get(url + "/metrics", timeout=5).text
        out.append(sum(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("numbaformer_requests_total{")))
    return out


def complete(router: str, prompt: str, n: int = 2) -> httpx.Response:
    return httpx.post(router + "/v1/completions", json={
        "model": "m", "prompt": prompt, "max_tokens": n, "temperature": 0}, timeout=60)


def test_concurrent_requests_spread_over_the_replicas(deployment):
    router, replicas, _ = deployment
    before = served(replicas)
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda i: complete(router, f"{i * 7919} is a number that", 24),
                           range(8)))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    after = served(replicas)
    assert sum(after) - sum(before) == 8
    assert all(a > b for a, b in zip(after, before)), (before, after)


def test_requests_sharing_a_prefix_land_together(deployment):
    router, replicas, _ = deployment
    before = served(replicas)
    for i in range(4):
        assert complete(router, SYSTEM + f"Question {i}:").status_code == 200
    delta = sorted(a - b for a, b in zip(served(replicas), before))
    assert delta == [0, 4]


def test_the_routers_metrics_are_where_the_script_says(deployment):
    router, replicas, metrics = deployment
    assert metrics.startswith("http://127.0.0.1:")
    r = httpx.get(metrics, timeout=5)
    assert r.status_code == 200 and "# TYPE" in r.text


def test_a_killed_replica_is_routed_around(deployment):
    router, replicas, _ = deployment
    port = int(replicas[-1].rsplit(":", 1)[1])
    pid = int(subprocess.check_output(["pgrep", "-f", f"serve --host 127.0.0.1 --port {port}"])
              .split()[0])
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    rs = [complete(router, f"{i * 104729} after the kill") for i in range(6)]
    assert [r.status_code for r in rs] == [200] * 6, [r.text for r in rs]
