"""Sampling: `make_sampler(...)` returns a callable picking the next token from host logits.

Order as llama.cpp's default chain: penalties -> top-k -> top-p -> min-p -> temperature -> draw.
Temperature 0 is greedy (argmax after penalties). Same seed and settings -> same choices.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


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


def _truncate(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Candidate ids and their logits after top-k, top-p and min-p (on untempered probabilities),
    sorted by decreasing logit."""
    if 0 < p.top_k < len(logits):
        ids = np.argpartition(-logits, p.top_k - 1)[:p.top_k]
    else:
        ids = np.arange(len(logits))
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    lg = logits[ids].astype(np.float64)
    probs = np.exp(lg - lg[0])
    probs /= probs.sum()
    keep = len(ids)
    if p.top_p < 1.0:
        keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1)
    if p.min_p > 0.0:
        keep = min(keep, max(1, int(np.sum(probs >= p.min_p * probs[0]))))
    return ids[:keep], lg[:keep]


def make_sampler(params: SamplingParams) -> Callable[[np.ndarray, Sequence[int]], int]:
    """A callable (logits (n_vocab,) f32 host array, token history) -> next token id.
    The logits array is modified in place by the penalties."""
    params.validate()
    rng = np.random.default_rng(params.seed)

    def sample(logits: np.ndarray, history: Sequence[int] = ()) -> int:
        apply_penalties(logits, history, params)
        if params.greedy:
            return int(np.argmax(logits))
        ids, lg = _truncate(logits, params)
        w = np.exp((lg - lg[0]) / params.temperature)
        u = rng.random() * w.sum()
        return int(ids[min(int(np.searchsorted(np.cumsum(w), u, side="right")), len(ids) - 1)])

    sample.params = params
    return sample


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of a logits row."""
    lg = logits.astype(np.float64)
    m = lg.max()
    return lg - m - np.log(np.exp(lg - m).sum())
