"""Random cases for the sampling chain, shared by the host (test_sampling), CPU-op (test_cpu_ops) and
CUDA-op (test_cuda_ops) tests: each option alone and combined, with tests/reference.py's pick."""
from __future__ import annotations

import numpy as np
import reference as R

from numbaformer.sampling import SamplingParams

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
