#!/usr/bin/env python3
"""Several `numbaformer serve` replicas behind sglang-router (cache-aware: requests that share a
prefix go to the replica that has it cached; a replica that dies is routed around).

usage: python scripts/serve_router.py [--replicas 2] [--port 8080] [--metrics-port 0]
           [--policy cache_aware] [--python PY] -- [numbaformer serve options: -m MODEL ...]

The replicas listen on 127.0.0.1 at PORT+1..PORT+N, the router on --host:PORT and its Prometheus
metrics on --host:METRICS_PORT (0, the default: a free port, picked just before the router
starts; printed with the URLs). The router is
`python -m sglang_router.launch_router` from sglang-router (`pip install sglang-router`; --python
names another interpreter that has it). Waits for every replica's /health, then for the router;
prints the URLs; SIGTERM or Ctrl-C stops the router and the replicas (each finishing what it has
in flight). Replicas on other machines: run `numbaformer serve --host 0.0.0.0` there and
launch_router with their URLs.
"""
from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
import urllib.request


# a replica that fails once is taken out at once (circuit breaker), checked every second, and the
# request retried on another: without these, sglang-router's defaults (10 failures) let the
# first requests after a replica dies fail
ROUTE_AROUND = ["--cb-failure-threshold", "1", "--health-check-interval-secs", "1",
                "--health-failure-threshold", "1", "--retry-max-retries", "3"]
# cache-aware until the replicas' loads differ by 2 requests (default 64: a small deployment
# would send everything to the replica holding the first prefix), then the least loaded
BALANCE = ["--balance-abs-threshold", "2", "--balance-rel-threshold", "1.0"]


def free_port(host: str) -> int:
    """A port nothing listens on at host now (the OS's pick)."""
    with socket.socket(socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_health(url: str, procs, timeout: float = 300.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"error: a process exited before {url} was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"error: {url} not ready after {timeout:.0f} s")


def main() -> int:
    argv = sys.argv[1:]
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--metrics-port", type=int, default=0,
                    help="the router's Prometheus exporter (0: a free port)")
    ap.add_argument("--policy", default="cache_aware",
                    choices=["cache_aware", "round_robin", "random", "power_of_two"])
    ap.add_argument("--python", default=sys.executable, help="interpreter with sglang-router")
    args = ap.parse_args(argv)
    urls = [f"http://127.0.0.1:{args.port + i + 1}" for i in range(args.replicas)]
    procs = [subprocess.Popen([sys.executable, "-m", "numbaformer.cli", "serve", "--host",
                               "127.0.0.1", "--port", str(args.port + i + 1), *serve_args])
             for i in range(args.replicas)]
    router = None

    def stop(*_):
        for p in ([router] if router else []) + procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in ([router] if router else []) + procs:
            try:
                p.wait(40)
            except subprocess.TimeoutExpired:
                p.kill()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for u in urls:
            wait_health(u, procs)
    except SystemExit as e:                     # a replica failed: stop the others too
        print(e, file=sys.stderr)
        stop()
    # the exporter's port is picked now, free at this moment: a port fixed beside the others (it
    # was PORT+N+1, free only when the caller looked, before the replicas loaded) was taken by
    # the time the router bound it in a CI run, and the router did not start
    metrics_port = args.metrics_port or free_port(args.host)
    router = subprocess.Popen([args.python, "-m", "sglang_router.launch_router", "--host",
                               args.host, "--port", str(args.port), "--policy", args.policy,
                               "--log-level", "warn", "--prometheus-host", args.host,
                               "--prometheus-port", str(metrics_port), *ROUTE_AROUND, *BALANCE,
                               "--worker-urls", *urls])
    try:
        wait_health(f"http://{args.host}:{args.port}", procs + [router])
    except SystemExit as e:
        print(e, file=sys.stderr)
        stop()
    print(f"router: http://{args.host}:{args.port} -> {' '.join(urls)} (metrics: "
          f"http://{args.host}:{metrics_port}/metrics)", flush=True)
    while all(p.poll() is None for p in [router]):
        time.sleep(0.5)
    stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
