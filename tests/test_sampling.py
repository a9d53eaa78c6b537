"""sampling.py: greedy, the candidate sets of top-k / top-p / min-p (on hand-made logits),
llama.cpp's penalties, the distribution temperature gives (a chi-square test on seeded draws),
seeded determinism, and the validation of every parameter."""
from __future__ import annotations

import math

import numpy as np
import pytest
from reference import log_softmax as ref_log_softmax

from numbaformer.sampling import (SamplingParams, _truncate, apply_penalties, log_softmax,
                                  make_sampler)

OFF = dict(top_k=0, top_p=1.0, min_p=0.0)          # no truncation
# probabilities 0.5, 0.3, 0.15, 0.05 on ids 2, 0, 3, 1
PROBS = {2: 0.5, 0: 0.3, 3: 0.15, 1: 0.05}
LOGITS = np.log(np.array([PROBS[i] for i in range(4)])).astype(np.float32) + np.float32(3.0)


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, **OFF, **kw})


def kept(**kw) -> list[int]:
    ids, lg = _truncate(LOGITS.copy(), params(**kw))
    assert np.array_equal(lg, LOGITS[ids].astype(np.float64))          # logits of those ids
    assert (np.diff(lg) <= 0).all()                                    # decreasing
    return ids.tolist()


# --- greedy ---------------------------------------------------------------------------------------

def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    sample = make_sampler(SamplingParams(temperature=0.0, top_k=1, top_p=0.5, min_p=0.9))
    for _ in range(50):
        logits = rng.standard_normal(1000).astype(np.float32)
        assert sample(logits.copy(), [1, 2, 3]) == int(np.argmax(logits))
    assert sample(np.array([1.0, 3.0, 3.0, 2.0], np.float32)) == 1      # first of equal maxima


# --- truncation: exactly the right candidates -----------------------------------------------------

def test_top_k():
    assert kept(top_k=1) == [2]
    assert kept(top_k=3) == [2, 0, 3]
    assert kept(top_k=0) == [2, 0, 3, 1]          # off
    assert kept(top_k=10) == [2, 0, 3, 1]         # more than the vocab


@pytest.mark.parametrize("top_p,ids", [(0.49, [2]), (0.51, [2, 0]), (0.79, [2, 0]),
                                       (0.81, [2, 0, 3]), (0.94, [2, 0, 3]), (0.96, [2, 0, 3, 1]),
                                       (1.0, [2, 0, 3, 1])])
def test_top_p_smallest_set_reaching_p(top_p, ids):
    assert kept(top_p=top_p) == ids


@pytest.mark.parametrize("min_p,ids", [(0.09, [2, 0, 3, 1]), (0.11, [2, 0, 3]), (0.29, [2, 0, 3]),
                                       (0.31, [2, 0]), (0.59, [2, 0]), (0.61, [2]), (1.0, [2])])
def test_min_p_relative_to_the_top(min_p, ids):
    assert kept(min_p=min_p) == ids


def test_top_p_renormalizes_after_top_k():
    """llama.cpp's order: top-k first, then top-p on the renormalized survivors. Over all four
    tokens 0.83 needs three (0.5, 0.8, 0.95); after top-k 3 the shares are 0.526, 0.842: two."""
    assert kept(top_p=0.83) == [2, 0, 3]
    assert kept(top_k=3, top_p=0.83) == [2, 0]


def test_truncations_combine_to_the_smallest():
    assert kept(top_k=3, top_p=0.96, min_p=0.31) == [2, 0]
    assert kept(top_k=2, top_p=0.99, min_p=0.01) == [2, 0]
    assert kept(top_k=4, top_p=0.51, min_p=0.01) == [2, 0]


def test_min_p_keeps_ties_with_the_top():
    ids, _ = _truncate(np.array([1.0, 5.0, 5.0, 4.0], np.float32), params(min_p=1.0))
    assert sorted(ids.tolist()) == [1, 2]


def test_sampling_never_leaves_the_candidates():
    sample = make_sampler(params(temperature=5.0, top_k=2, seed=3))
    draws = {sample(LOGITS.copy()) for _ in range(300)}
    assert draws == {2, 0}


# --- penalties, as llama.cpp defines them ---------------------------------------------------------

def penalized(logits, history, **kw) -> np.ndarray:
    x = np.array(logits, np.float32)
    apply_penalties(x, history, SamplingParams(**kw))
    return x


def test_repeat_penalty_divides_positive_multiplies_negative():
    got = penalized([2.0, -2.0, 1.0, 0.5, 0.0], [0, 1, 1, 4], repeat_penalty=2.0)
    assert got.tolist() == [1.0, -4.0, 1.0, 0.5, 0.0]      # once per token, whatever its count


def test_frequency_penalty_by_count():
    got = penalized([2.0, -2.0, 1.0], [0, 1, 1, 1], frequency_penalty=0.5)
    assert got.tolist() == [1.5, -3.5, 1.0]


def test_presence_penalty_once():
    got = penalized([2.0, -2.0, 1.0], [0, 1, 1, 1], presence_penalty=0.25)
    assert got.tolist() == [1.75, -2.25, 1.0]


def test_penalties_combined():
    got = penalized([3.0, -1.0, 1.0], [0, 1, 1], repeat_penalty=1.5, frequency_penalty=0.5,
                    presence_penalty=0.25)
    assert got.tolist() == pytest.approx([3.0 / 1.5 - 0.5 - 0.25, -1.0 * 1.5 - 1.0 - 0.25, 1.0])


def test_penalty_window():
    logits = [2.0, 2.0, 2.0]
    assert penalized(logits, [0, 0, 1], repeat_penalty=2.0, repeat_last_n=1).tolist() == \
        [2.0, 1.0, 2.0]
    assert penalized(logits, [0, 0, 1], repeat_penalty=2.0, repeat_last_n=0).tolist() == logits
    assert penalized(logits, [0, 0, 1], repeat_penalty=2.0, repeat_last_n=-1).tolist() == \
        [1.0, 1.0, 2.0]
    assert penalized(logits, [0, 0, 1], frequency_penalty=1.0, repeat_last_n=2).tolist() == \
        [1.0, 1.0, 2.0]
    assert penalized(logits, [0, 1]).tolist() == logits               # defaults: off
    assert penalized(logits, [], repeat_penalty=2.0).tolist() == logits


def test_greedy_applies_penalties():
    sample = make_sampler(SamplingParams(temperature=0.0, repeat_penalty=1.1))
    assert sample(np.array([3.0, 2.9], np.float32), [0]) == 1          # 3 / 1.1 < 2.9
    assert sample(np.array([3.0, 2.9], np.float32), [1]) == 0


# --- temperature: the distribution ----------------------------------------------------------------

def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square with 4 degrees of freedom exceeds 18.47 with probability 0.001
CHI2_4DF_999 = 18.47


def draw_counts(logits, n, **kw) -> np.ndarray:
    sample = make_sampler(params(**kw))
    counts = np.zeros(len(logits))
    for _ in range(n):
        counts[sample(np.array(logits, np.float32))] += 1
    return counts


@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
def test_temperature_gives_softmax_of_logits_over_t(temp):
    logits = np.array([2.0, 1.0, 0.0, -1.0, 0.5])
    counts = draw_counts(logits, 20000, temperature=temp, seed=11)
    want = np.exp(logits / temp) / np.exp(logits / temp).sum()
    assert chi_square(counts, want) < CHI2_4DF_999
    for other in (0.5, 1.0, 2.0):               # and the test can tell temperatures apart
        if other != temp:
            p = np.exp(logits / other) / np.exp(logits / other).sum()
            assert chi_square(counts, p) > 10 * CHI2_4DF_999


def test_temperature_after_truncation():
    """top-k 2 then temperature 0.5: the two survivors in the ratio exp((l0 - l1) / T)."""
    counts = draw_counts([2.0, 1.0, 0.0, -1.0, 0.5], 20000, temperature=0.5, top_k=2, seed=12)
    assert counts[2:].sum() == 0
    p0 = 1 / (1 + math.exp(-2.0))
    expected = np.array([p0, 1 - p0]) * counts.sum()
    assert (((counts[:2] - expected) ** 2) / expected).sum() < 10.83      # 1 df, p = 0.001


# --- seeds ----------------------------------------------------------------------------------------

def draws(seed, n=200) -> list[int]:
    rng = np.random.default_rng(99)
    sample = make_sampler(SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.01,
                                         seed=seed))
    return [sample(rng.standard_normal(500).astype(np.float32)) for _ in range(n)]


def test_same_seed_same_draws():
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


# --- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,message", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"top_k": -1}, "top-k"),
    ({"top_p": 0.0}, "top-p"), ({"top_p": 1.5}, "top-p"), ({"top_p": float("nan")}, "top-p"),
    ({"min_p": -0.01}, "min-p"), ({"min_p": 1.01}, "min-p"),
    ({"repeat_penalty": 0.0}, "repeat-penalty"), ({"repeat_penalty": -1.0}, "repeat-penalty"),
    ({"repeat_penalty": float("nan")}, "repeat-penalty"), ({"repeat_last_n": -2}, "repeat-last-n"),
    ({"presence_penalty": float("nan")}, "presence-penalty"),
    ({"frequency_penalty": float("inf")}, "frequency-penalty"),
])
def test_validation_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(SamplingParams(**kw))


def test_edge_values_are_valid():
    for kw in ({"temperature": 0.0}, {"top_p": 1.0}, {"min_p": 0.0}, {"min_p": 1.0},
               {"top_k": 0}, {"repeat_last_n": -1}, {"presence_penalty": -1.0}):
        make_sampler(SamplingParams(**kw))


# --- log_softmax ----------------------------------------------------------------------------------

def test_log_softmax():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(1000) * 10).astype(np.float32)
    assert np.allclose(log_softmax(x), ref_log_softmax(x), rtol=0, atol=1e-12)
    big = np.array([1e4, 1e4 - 1, -1e4], np.float32)
    assert np.allclose(np.exp(log_softmax(big)).sum(), 1.0)
    assert log_softmax(big)[0] == pytest.approx(-math.log1p(math.exp(-1)))
