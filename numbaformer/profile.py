"""Per-op profile of one decode step, against the memory bandwidth measured in the same run.

`profile_decode(model, pos)` records the ops of one decode step (model.py's graph, through a
recording wrapper of the backend), then times each recorded call alone with the backend's timer
(CUDA: many copies captured in a graph, timed by events, so no host launch gaps; CPU: wall time
over repetitions) and counts the bytes it must read: weight matrices as stored on the device, the
K and V cache up to the position, and the activation arrays. Decode is memory-bound, so GB/s
against the backend's measured copy bandwidth says how far each op is from its ceiling.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

SKIP = {"alloc", "to_device", "to_host", "copy_in", "synchronize", "replay", "upload", "stats",
        "check_memory", "check_batch_memory", "kv_dtype", "time_us", "copy_bandwidth",
        "upload_matrix"}


@dataclass
class OpRow:
    """One op of a decode step (calls of the same op on weights of the same kind added up)."""

    op: str
    calls: int = 0
    us: float = 0.0
    nbytes: int = 0

    def gbps(self) -> float:
        return self.nbytes / self.us / 1e3 if self.us > 0 else 0.0


def _nbytes(op: str, arg, kv_len: int, n_tokens: int) -> int:
    """Bytes op `op` reads of one argument: a weight matrix's stored data (embed: the rows of its
    n_tokens ids), the KV cache's used part for attention (K and V, every head, kv_len positions of
    one layer; one position for the ops that store into it), an array's size."""
    if hasattr(arg, "qtype") and hasattr(arg, "data"):
        if op == "embed":
            return int(arg.data.nbytes) // arg.rows * n_tokens
        return int(arg.data.nbytes)
    if hasattr(arg, "k") and hasattr(arg, "v") and hasattr(arg.k, "shape"):
        n_layer, n_kv, n_ctx, head_dim = arg.k.shape
        positions = kv_len if op == "attention" else n_tokens
        return 2 * n_kv * positions * head_dim * arg.k.dtype.itemsize
    if isinstance(arg, (tuple, list)):
        return sum(_nbytes(op, a, kv_len, n_tokens) for a in arg)
    return int(getattr(arg, "nbytes", 0) or 0)


def _key(name: str, args) -> str:
    """op name, with the first weight matrix's role and type: `norm_matmul:attn_q:Q4_K`."""
    for a in args:
        for w in (a if isinstance(a, (tuple, list)) else (a,)):
            if hasattr(w, "qtype") and hasattr(w, "name"):
                role = w.name.split(".")[-2] if "." in w.name else w.name
                return f"{name}:{role}:{w.type_name}"
    return name


class Recorder:
    """Wraps a backend: every op call of a one-token step is recorded as (key, bound op, args,
    kwargs, bytes read) and run."""

    def __init__(self, ops, kv_len: int):
        self.ops, self.kv_len, self.calls = ops, kv_len, []

    def __getattr__(self, name):
        f = getattr(self.ops, name)
        if not callable(f) or name in SKIP or name.startswith("_"):
            return f

        def record(*args, **kw):
            nbytes = sum(_nbytes(name, a, self.kv_len, 1) for a in (*args, *kw.values()))
            self.calls.append((_key(name, args), f, args, kw, nbytes))
            return f(*args, **kw)
        return record


def record_decode_step(model, pos: int) -> list:
    """The op calls of one decode step at position `pos` (token 1), recorded while it runs."""
    model.ops.copy_in(model.buf.ids, np.array([1], np.int32))
    model.ops.copy_in(model.buf.pos, np.array([pos], np.int32))
    ops = model.ops
    rec = Recorder(ops, pos + 1)
    model.ops = rec
    try:
        model._run(model.buf.rows(1), "greedy")
    finally:
        model.ops = ops
    ops.synchronize()
    return rec.calls


@dataclass
class Profile:
    """A decode step's ops (slowest first), the step's time as one run of its ops, the backend's
    copy bandwidth measured in the same run."""

    position: int
    ops: list[OpRow]
    step_us: float
    copy_gbps: float
    launches: int | None = None       # kernels a step launches, where the backend counts them

    def as_dict(self) -> dict:
        bw = self.copy_gbps
        return {"position": self.position, "step_us": round(self.step_us, 1),
                "copy_GBps": round(bw, 1), "launches": self.launches,
                "ops": [{"op": r.op, "calls": r.calls, "us": round(r.us, 2), "bytes": r.nbytes,
                         "GBps": round(r.gbps(), 1), "pct_of_copy_bw": round(100 * r.gbps() / bw, 1)}
                        for r in self.ops]}

    def table(self, title: str) -> str:
        """The table `numbaformer bench --kernels` prints: per op calls, time per step, share, MB
        read, GB/s, % of the copy bandwidth; a total row."""
        rows, bw = self.ops, self.copy_gbps
        total = sum(r.us for r in rows)
        launches = "" if self.launches is None else f"{self.launches} kernel launches, "
        lines = [f"{title}: {launches}{sum(r.calls for r in rows)} op calls, {total:.0f} us timed "
                 f"one by one, {self.step_us:.0f} us as one step; copy bandwidth {bw:.0f} GB/s",
                 "| op | calls | us/step | % of step | MB read | GB/s | % of copy BW |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows + [OpRow("total", sum(r.calls for r in rows), total,
                               sum(r.nbytes for r in rows))]:
            g = r.gbps()
            lines.append(f"| {r.op} | {r.calls} | {r.us:.1f} | {100 * r.us / total:.1f} | "
                         f"{r.nbytes / 1e6:.2f} | {g:.0f} | {100 * g / bw:.1f} |")
        return "\n".join(lines)


def profile_decode(model, pos: int, reps: int = 20) -> Profile:
    """Every op of a decode step at position pos timed alone `reps` times, with its bytes."""
    if not 0 <= pos < model.n_ctx:
        raise ValueError(f"position {pos} is outside the context of {model.n_ctx} tokens")
    calls = record_decode_step(model, pos)           # (compiles what the step needs)
    rows: dict[str, OpRow] = defaultdict(lambda: OpRow(""))
    for key, fn, args, kw, nbytes in calls:
        r = rows[key]
        r.op = key
        r.calls += 1
        r.us += model.ops.time_us(lambda: fn(*args, **kw), reps)
        r.nbytes += nbytes
    ops = model.ops

    def step():
        model._run(model.buf.rows(1), "greedy")
    step_us = ops.time_us(step, reps)
    return Profile(pos, sorted(rows.values(), key=lambda r: -r.us), step_us, ops.copy_bandwidth(),
                   ops.count_launches(step))

