"""Random cases for the sampling chain, shared by the host (test_sampling), CPU-op (test_cpu_ops)
and CUDA-op (test_cuda_ops) tests: each option alone and combined, with tests/reference.py's pick;
the SamplerState of a case; the op's bookkeeping, checked on any backend."""
from __future__ import annotations

import numpy as np
import reference as R

from numbaformer.sampling import SamplingParams, resolve_seed

OFF = dict(top_k=0, top_p=1.0, min_p=0.0)          # no truncation

OPTIONS = {                                  # each option alone, then combined
    "temperature": dict(temperature=0.7),
    "top_k": dict(top_k=17),
    "top_p": dict(top_p=0.6),
    "min_p": dict(min_p=0.2),
    "repeat": dict(repeat_penalty=1.5, repeat_last_n=8),
    "presence": dict(presence_penalty=0.7, repeat_last_n=-1),
    "frequency": dict(frequency_penalty=0.4, repeat_last_n=16),
    "combined": dict(temperature=1.3, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.2,
                     presence_penalty=0.3, frequency_penalty=0.2, repeat_last_n=12),
    "greedy+penalties": dict(temperature=0.0, repeat_penalty=1.3, frequency_penalty=0.5,
                             repeat_last_n=-1),
}
ROBUST = 1e-4                                # the reference's margins below which a case is skipped


def chain_cases(n_vocab: int, options: dict, n: int = 12, seed: int = 0, scale: float = 3.0):
    """n random cases (logits, history, SamplingParams) of one option set, and the reference's
    pick, or None where a margin is below ROBUST (a near-tie float rounding may flip)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        logits = (rng.standard_normal(n_vocab) * scale).astype(np.float32)
        history = [int(t) for t in rng.integers(0, n_vocab, 30)]
        history[-5:] = [int(np.argmax(logits))] * 5             # penalties hit the top token
        p = SamplingParams(**{"temperature": 1.0, **OFF, **options,
                              "seed": int(rng.integers(0, 2**63))})
        window = (history if p.repeat_last_n == -1 else history[-p.repeat_last_n:]) \
            if p.has_penalties else []
        want, margins = R.sample_chain(
            logits, window, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
            min_p=p.min_p, repeat_penalty=p.repeat_penalty, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty, seed=p.seed, index=len(history))
        yield logits, history, p, want if min(margins.values()) > ROBUST else None


def robust_cases(n_vocab: int, options: dict, n: int, seed: int = 0, draws: int = 20):
    """The first n cases of chain_cases (up to draws * n of them) whose reference pick is robust:
    at a 128k vocabulary most random top-p cases put the cut within ROBUST of p (the nucleus ends
    among thousands of tokens of ~1e-5 probability each), so a fixed draw of n holds only a few."""
    found = 0
    for case in chain_cases(n_vocab, options, n=draws * n, seed=seed):
        if case[3] is not None:
            yield case
            found += 1
            if found == n:
                return


def op_state(ops, p: SamplingParams, history, n_vocab: int, n_ctx: int = 64, eog=(),
             stop_pos: int = 1 << 30, max_chunk: int = 16):
    """A SamplerState on backend `ops` for the `sample` op, as Model.start_sampling sets it: p's
    parameters, the token history and its penalty window's counts, the eog ids."""
    from numbaformer.backends.base import SamplerState, sampler_params
    fp, ip = sampler_params(p, resolve_seed(p.seed), stop_pos)
    hist = np.zeros(n_ctx, np.int32)
    hist[:len(history)] = history
    counts = np.zeros(n_vocab, np.int32)
    if p.has_penalties:
        window = history if p.repeat_last_n == -1 else history[-p.repeat_last_n:]
        np.add.at(counts, np.asarray(window, np.int64), 1)
    mask = np.zeros(n_vocab, np.uint8)
    mask[list(eog)] = 1
    dev = ops.to_device
    return SamplerState(dev(fp), dev(ip), dev(hist), dev(counts), dev(mask),
                        dev(np.zeros(2 + max_chunk, np.int32)))


def run_op(ops, logits, history, p: SamplingParams, **kw) -> int:
    """One `sample` step on backend `ops` (token history[-1] at position len(history) - 1)."""
    st = op_state(ops, p, history, len(logits), **kw)
    ids = ops.to_device(np.zeros(1, np.int32))
    pos = ops.to_device(np.array([len(history) - 1], np.int32))
    ops.sample(ops.to_device(np.asarray(logits, np.float32).copy()), ids, pos, st, 0)
    out = ops.to_host(st.out)
    assert out[0] == 1
    return int(out[2])


def check_bookkeeping(ops):
    """On backend `ops`: a pick is recorded (out, hist), moves the penalty window (counts) and is
    fed on (ids, pos); an eog id or the stop position ends the chain (out[1]) without feeding; a
    later step j of that chunk then does nothing."""
    V = 50
    p = SamplingParams(temperature=0.0, repeat_penalty=1.5, repeat_last_n=3)
    logits = np.arange(V, dtype=np.float32)              # the argmax: 49, unless penalized
    hist = [7, 49, 8, 9]                                 # window (last 3): 49, 8, 9

    def start(eog):
        st = op_state(ops, p, hist, V, n_ctx=8, eog=eog, stop_pos=6)
        return st, ops.to_device(np.zeros(1, np.int32)), ops.to_device(np.array([3], np.int32))

    def step(j):
        ops.sample(ops.to_device(logits.copy()), ids, pos, st, j)
        out = ops.to_host(st.out)
        return out[:3 + j].tolist(), (int(ops.to_host(ids)[0]), int(ops.to_host(pos)[0]))

    st, ids, pos = start(eog=())
    assert step(0) == ([1, 0, 48], (48, 4))              # 49 / 1.5 < 48
    counts = ops.to_host(st.counts)
    assert counts[48] == 1 and counts[49] == 0           # 49 left the window, 48 entered
    assert step(1) == ([2, 0, 48, 49], (49, 5))          # 48 penalized now
    assert step(2) == ([3, 1, 48, 49, 47], (49, 5))      # position 6 = stop: the last pick
    assert step(3) == ([3, 1, 48, 49, 47, 0], (49, 5))   # after the end: nothing
    assert ops.to_host(st.hist)[4:7].tolist() == [48, 49, 47]
    assert ops.to_host(st.counts).tolist() == np.bincount([48, 49, 47], minlength=V).tolist()
    st, ids, pos = start(eog=(48,))
    assert step(0) == ([1, 1, 48], (0, 3))               # an eog id: not fed on
    assert step(1) == ([1, 1, 48, 0], (0, 3))
    assert ops.to_host(st.counts).sum() == 3
