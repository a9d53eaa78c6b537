"""`numbaformer serve` under faults and load (a real server, SmolLM2 on the CPU, -np 2, a queue
of 6): clients that disconnect free their sequences within a second, streaming or not; rounds of
abandoned requests leave the server as it was (KV blocks, RSS, the next answer); a full server
answers 429 with Retry-After; a stalled reader does not hold up the others; SIGTERM lets the
request in flight finish and exits 0."""
from __future__ import annotations

import random
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import API_KEY, AUTH, Server, sse_events, wait_until

pytest.importorskip("fastapi")
pytest.importorskip("openai")

N_SEQS, MAX_QUEUE = 2, 6
LONG = 400                      # tokens: a request that runs far longer than the test waits
CHAT = [{"role": "user", "content": "Write a long story about a dragon."}]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    s = Server(smollm2_path, tmp_path_factory.mktemp("serve_faults") / "server.log", "-np",
               N_SEQS, "-c", 512, "--max-queue", MAX_QUEUE)
    try:
        yield s.started()
    finally:
        s.stop()
    assert "Traceback" not in s.output(), s.output()


def idle(server) -> bool:
    m = server.metrics()
    return (m["numbaformer_kv_blocks_used"] == 0 and m["numbaformer_requests_running"] == 0
            and m["numbaformer_requests_waiting"] == 0)


def busy(server) -> bool:
    return server.metrics()["numbaformer_kv_blocks_used"] > 0


def reference(server) -> str:
    r = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_a_streaming_client_that_disconnects_frees_its_sequence_within_1s(server):
    assert idle(server)
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, json={
            "messages": CHAT, "max_tokens": LONG, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        events = sse_events([next(lines) for _ in range(6)])
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert busy(server)
    t0 = time.monotonic()                               # the connection is closed here
    wait_until(lambda: idle(server), timeout=1.0)
    assert time.monotonic() - t0 < 1.0


def test_a_waiting_client_that_disconnects_frees_its_sequence_within_1s(server):
    assert idle(server)
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": LONG,
                                        "temperature": 0}, timeout=1.0)
    wait_until(lambda: idle(server), timeout=1.0)


def _abandon(server, i: int) -> int:
    """One request of a kind picked by i, given up after 0.5 s; its status."""
    chat, stream = i % 2 == 0, i % 3 == 0
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"max_tokens": LONG, "temperature": 0.7, "seed": i, "stream": stream,
            **({"messages": CHAT} if chat else {"prompt": PROMPT})}
    try:
        if stream:
            with httpx.stream("POST", server.url + path, headers=AUTH, json=body,
                              timeout=0.5) as r:
                t0 = time.monotonic()
                for _ in r.iter_lines():
                    if time.monotonic() - t0 > 0.5:
                        break
                return r.status_code
        return server.post(path, body, timeout=0.5).status_code
    except httpx.ReadTimeout:
        return 0


def test_abandoned_requests_leave_the_server_as_it_was(server):
    ref = reference(server)
    rss, statuses = [], []
    with ThreadPoolExecutor(N_SEQS + MAX_QUEUE) as pool:
        for round_ in range(3):                         # 3 rounds, 200 requests in all
            n = 67 if round_ < 2 else 66
            statuses += pool.map(lambda i: _abandon(server, i), range(round_ * 67,
                                                                       round_ * 67 + n))
            wait_until(lambda: idle(server), timeout=10.0)   # each within 1 s: tested above
            assert reference(server) == ref
            rss.append(server.rss_kib())
    assert len(statuses) == 200 and set(statuses) <= {0, 200, 429}
    assert statuses.count(0) + statuses.count(200) > 50
    assert rss[2] - rss[0] < 32 * 1024, rss             # KiB: no growth round after round
    m = server.metrics()
    assert m['numbaformer_requests_total{finish_reason="abort"}'] >= 50


def test_past_the_queue_is_429_with_retry_after(server):
    n = N_SEQS + MAX_QUEUE + 4

    def one(i):
        return server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": LONG,
                                               "seed": i}, timeout=1.5)

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        results = []
        for f in futures:
            try:
                results.append(f.result())
            except httpx.ReadTimeout:
                results.append(None)
    refused = [r for r in results if r is not None and r.status_code == 429]
    assert len(refused) >= 4, [r and r.status_code for r in results]
    assert results.count(None) >= N_SEQS
    for r in refused:
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    wait_until(lambda: idle(server), timeout=3.0)


def test_a_stalled_reader_does_not_hold_up_the_others(server):
    ref = reference(server)
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = (b'{"prompt": "Once upon a time", "max_tokens": %d, "stream": true, '
            b'"temperature": 0}' % LONG)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 + API_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    try:
        wait_until(lambda: busy(server), timeout=5.0)
        t0 = time.monotonic()
        assert reference(server) == ref                  # never reading the stream meanwhile
        assert time.monotonic() - t0 < 10
        assert busy(server)                              # the stalled one is still there
    finally:
        sock.close()
    wait_until(lambda: idle(server), timeout=2.0)


def test_concurrent_chat_and_completions_with_disconnects(server):
    ref = reference(server)
    rng = random.Random(0)

    def normal(i):
        r = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 8,
                                            "temperature": 0})
        return r.status_code == 200 and r.json()["choices"][0]["text"] == ref

    with ThreadPoolExecutor(N_SEQS + MAX_QUEUE) as pool:
        kinds = [rng.random() < 0.5 for _ in range(8)]
        futures = [pool.submit(normal if k else (lambda i: _abandon(server, i) in (0, 200)), i)
                   for i, k in enumerate(kinds)]
        assert all(f.result() for f in futures)
    wait_until(lambda: idle(server), timeout=3.0)


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(server):
    """Last: it stops the module's server."""
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, json={
            "messages": CHAT, "max_tokens": 12, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        first = sse_events([next(lines)])
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):        # no longer accepting
            httpx.get(server.url + "/health", timeout=2)
        rest = sse_events(list(lines))
    assert first[0]["choices"][0]["delta"]["role"] == "assistant"
    assert rest[-1] == "[DONE]"
    assert rest[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.proc.wait(30) == 0
    assert "Traceback" not in server.output()
