"""Sampling: `make_sampler(...)` returns a callable picking the next token from host logits.

Order as llama.cpp's default chain: penalties -> top-k -> top-p -> min-p -> temperature -> draw.
Candidates are ordered by the float32 distance d = max - logit (increasing; equal distances by
increasing id), the order the device sampler uses too; top-k keeps the first k, top-p the shortest
prefix whose untempered mass reaches top_p of the top-k set's, min-p those with d <= -log(min_p).
The draw is Gumbel-max: argmax over the candidates of -d / temperature - log(-log(u)), u from
rng.py's Philox keyed by (seed, token index, id): the softmax of logit / temperature over the
candidates, and a pure function of the seed and the position, so the host and the device
(backends/*/sample.py) draw the same token from the same logits. Temperature 0 is greedy (argmax
after penalties).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .rng import philox4x32, uniform24

MASK64 = (1 << 64) - 1
_LO = np.uint64(0xFFFFFFFF)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40                 # 0: off
    top_p: float = 0.95             # 1.0: off
    min_p: float = 0.05             # 0.0: off
    repeat_penalty: float = 1.0     # 1.0: off
    repeat_last_n: int = 64         # penalties look at this many last tokens (-1: all, 0: none)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None         # None: a random seed

    def validate(self) -> None:
        """Raise ValueError with a one-line message, saying what is allowed, for a value no
        sampler can use (NaN and infinities included)."""
        finite = np.isfinite
        checks = [
            (finite(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
             "a finite number >= 0 (0 = greedy)"),
            (self.top_k >= 0, "top-k", self.top_k, "an integer >= 0 (0 = off)"),
            (0.0 < self.top_p <= 1.0, "top-p", self.top_p, "in (0, 1] (1 = off)"),
            (0.0 <= self.min_p <= 1.0, "min-p", self.min_p, "in [0, 1] (0 = off)"),
            (finite(self.repeat_penalty) and self.repeat_penalty > 0, "repeat-penalty",
             self.repeat_penalty, "a finite number > 0 (1 = off)"),
            (self.repeat_last_n >= -1, "repeat-last-n", self.repeat_last_n,
             "an integer >= -1 (-1 = all)"),
            (finite(self.presence_penalty), "presence-penalty", self.presence_penalty,
             "a finite number"),
            (finite(self.frequency_penalty), "frequency-penalty", self.frequency_penalty,
             "a finite number"),
        ]
        for ok, name, value, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, not {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0)


def apply_penalties(logits: np.ndarray, history: Sequence[int], p: SamplingParams) -> None:
    """llama.cpp's repetition (divide positive / multiply negative logits), presence and frequency
    penalties over the last repeat_last_n tokens, in place."""
    if not p.has_penalties or not history:
        return
    recent = history if p.repeat_last_n == -1 else history[-p.repeat_last_n:]
    counts = Counter(recent)
    ids = np.fromiter(counts.keys(), dtype=np.int64)
    n = np.fromiter(counts.values(), dtype=np.float32)
    v = logits[ids]
    v = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
    logits[ids] = v - n * p.frequency_penalty - p.presence_penalty


def distances(logits: np.ndarray) -> np.ndarray:
    """float32 d = max(logits) - logits (correctly rounded, as the device computes it); NaN and -inf
    logits are infinitely far."""
    lg = np.asarray(logits, np.float32)
    d = lg.max() - lg
    d[~(d >= 0)] = np.inf
    return d


def candidates(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Candidate ids after top-k, top-p and min-p (on untempered probabilities), in the sampling
    order (distance, then id), with their distances d (float64 of the float32 distance)."""
    d32 = distances(logits)
    n = len(d32)
    k = p.top_k if 0 < p.top_k < n else n
    dmin = -np.log(p.min_p) if p.min_p > 0 else np.inf
    if k < n:
        ids = np.flatnonzero(d32 <= np.partition(d32, k - 1)[k - 1])
    else:                                   # the min-p set holds every candidate
        ids = np.flatnonzero(d32.astype(np.float64) <= dmin)
    ids = ids[np.argsort(d32[ids], kind="stable")][:k]
    d = d32[ids].astype(np.float64)
    keep = len(ids)
    if p.top_p < 1.0:
        e = np.exp(-d)
        z = e.sum() if k < n else np.exp(-d32.astype(np.float64)).sum()
        keep = min(keep, int(np.searchsorted(np.cumsum(e), p.top_p * z)) + 1)
    keep = min(keep, max(1, int(np.sum(d <= dmin))))
    return ids[:keep], d[:keep]


def _truncate(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Candidate ids and their logits (float64), sorted by decreasing logit."""
    ids, _ = candidates(logits, p)
    return ids, np.asarray(logits)[ids].astype(np.float64)


def gumbel(seed: int, index: int, ids) -> np.ndarray:
    """float64 Gumbel noise -log(-log(u)) of each id at token index `index`: u from rng.py's Philox,
    counter (id >> 2, index, 0, 0), key (seed low, seed high), word id & 3."""
    ids = np.atleast_1d(np.asarray(ids)).astype(np.uint64)
    zero = np.zeros_like(ids)
    seed &= MASK64
    words = philox4x32(ids >> np.uint64(2), zero + np.uint64(index), zero, zero,
                       np.uint64(seed) & _LO, np.uint64(seed >> 32))
    u = uniform24(np.choose((ids & np.uint64(3)).astype(np.intp), words))
    return -np.log(-np.log(u))


def resolve_seed(seed: int | None) -> int:
    """The 64-bit seed of a generation: `seed` (its low 64 bits), or a random one for None."""
    return int(np.random.SeedSequence().entropy) & MASK64 if seed is None else seed & MASK64


def make_sampler(params: SamplingParams) -> Callable[..., int]:
    """A callable (logits (n_vocab,) f32 host array, token history, index=None) -> next token id.
    index: the token index the draw is keyed by (generation passes the position of the token being
    sampled, len(history)); None counts the calls. The logits are modified in place by the
    penalties. `.seed` is the 64-bit seed (random when params.seed is None)."""
    params.validate()
    seed = resolve_seed(params.seed)
    calls = [0]

    def sample(logits: np.ndarray, history: Sequence[int] = (), index: int | None = None) -> int:
        apply_penalties(logits, history, params)
        if params.greedy:
            return int(np.argmax(logits))
        if index is None:
            index, calls[0] = calls[0], calls[0] + 1
        ids, d = candidates(logits, params)
        return int(ids[np.argmax(-d / params.temperature + gumbel(seed, index, ids))])

    sample.params = params
    sample.seed = seed
    sample.device_ok = True        # its pick is the chain's (params, seed, the history's penalty
    return sample                  # window): a batched engine may make it on the device


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of a logits row."""
    lg = logits.astype(np.float64)
    m = lg.max()
    return lg - m - np.log(np.exp(lg - m).sum())
