"""Test helper: run the `numbaformer` command in-process (through numbaformer.cli.main) or as a real
process, and hold it to the error contract: one line `error: ...` on stderr, exit code 2, no
traceback."""
from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from types import SimpleNamespace

from click.testing import CliRunner

from numbaformer.cli import main

HAS_GPU_DRIVER = bool(ctypes.util.find_library("cuda")) or any(
    os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl", "/usr/lib64/libcuda.so"))
# no simulated GPU either: --device auto/cuda must see this machine as it is
NO_SIM = {"NUMBA_ENABLE_CUDASIM": "0", "CUDA_FORCE_CPU": None}


def cli(*args, input=None, env=None) -> SimpleNamespace:
    """Run `numbaformer ARGS` in-process, with the variables of `env` set (None: unset); returns
    code, out (stdout), err (stderr)."""
    runner = CliRunner()
    env = {k: None if v is None else str(v) for k, v in {**NO_SIM, **(env or {})}.items()}
    with runner.isolation(input=input, env=env) as (out, err, _):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        sys.stdout.flush()                     # what a real process flushes at exit
        sys.stderr.flush()
    return SimpleNamespace(code=code, out=out.getvalue().decode(), err=err.getvalue().decode())


def assert_one_line_error(r, *fragments) -> str:
    """Exit 2, nothing on stdout, exactly one line `error: ...` on stderr, no traceback."""
    assert r.code == 2, (r.code, r.out, r.err)
    assert "Traceback" not in r.out + r.err
    assert r.out == ""
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def run_process(*args, input: bytes | None = None, stdin: str | None = None,
                env: dict | None = None) -> SimpleNamespace:
    """Run `python -m numbaformer.cli ARGS` (an argument may be bytes: not decodable as UTF-8);
    stdin: None (input, or the test's), "closed" (`<&-`) or "write-only" (`0>/dev/null`); env:
    variables to set (None: unset) over the test's environment."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "CUDA_FORCE_CPU": None, **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    cmd = [sys.executable, "-m", "numbaformer.cli", *(a if isinstance(a, bytes) else str(a)
                                                      for a in args)]
    if stdin is not None:
        redirect = {"closed": "<&-", "write-only": "0>/dev/null"}[stdin]
        cmd = ["bash", "-c", f'exec "$@" {redirect}', "bash", *cmd]
    p = subprocess.run(cmd, input=input, capture_output=True, env=env, timeout=300)
    return SimpleNamespace(returncode=p.returncode, stdout=p.stdout.decode(errors="replace"),
                           stderr=p.stderr.decode(errors="replace"))


def assert_process_error(p, *fragments, lines_before: int = 0) -> str:
    """Exit 2, no traceback, stderr's last line the one `error: ...` line (after `lines_before`
    lines of notes, e.g. chat's banner)."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stdout + p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == lines_before + 1, p.stderr
    assert lines[-1].startswith("error: ") and [x for x in lines if "error" in x] == lines[-1:]
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])
    return lines[-1]
