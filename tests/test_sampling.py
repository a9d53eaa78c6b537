"""sampling.py and rng.py: greedy, the candidate sets of top-k / top-p / min-p (on hand-made
logits), llama.cpp's penalties, the distribution temperature gives (a chi-square test on seeded draws),
seeded determinism, the validation of every parameter; Philox-4x32-10 against Random123's known
answers; the whole host chain against tests/reference.py's independent one on random logits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import reference as R
from reference import log_softmax as ref_log_softmax
from sampling_cases import OPTIONS, chain_cases

from numbaformer.rng import philox4x32, uniform24
from numbaformer.sampling import (SamplingParams, _truncate, apply_penalties, gumbel,
                                  log_softmax, make_sampler)

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


def test_draw_is_keyed_by_seed_and_index():
    """A draw depends on (seed, index) only: asked out of order, or by another sampler with the
    same seed, index 5 gives the same token; the call counter stands in when no index is given."""
    logits = np.random.default_rng(4).standard_normal(300).astype(np.float32)
    p = params(temperature=1.0, seed=42)
    a, b = make_sampler(p), make_sampler(p)
    picks = [a(logits.copy(), index=i) for i in (5, 0, 5, 3)]
    assert picks[0] == picks[2] == b(logits.copy(), index=5)
    assert [b(logits.copy()) for _ in range(4)] == [a(logits.copy(), index=i) for i in range(4)]
    assert len({a(logits.copy(), index=i) for i in range(40)}) > 5
    assert make_sampler(params(seed=None)).seed != make_sampler(params(seed=None)).seed
    assert make_sampler(params(seed=-1)).seed == 2**64 - 1


def test_candidate_ties_go_to_the_smaller_id():
    logits = np.array([1.0, 3.0, 2.0, 3.0, 3.0, 2.0], np.float32)
    assert kept_of(logits, top_k=2) == [1, 3]
    assert kept_of(logits, top_k=4) == [1, 3, 4, 2]


def kept_of(logits, **kw):
    return _truncate(logits.copy(), params(**kw))[0].tolist()


# --- rng.py: Philox-4x32-10 -----------------------------------------------------------------------

# Random123's kat_vectors: counter, key, the four output words
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,words", PHILOX_KAT)
def test_philox_known_answers(ctr, key, words):
    u = np.uint64
    assert R.philox4x32_10(ctr, key) == words
    assert tuple(int(w) for w in philox4x32(*map(u, ctr), *map(u, key))) == words
    arrays = philox4x32(*(np.full(3, c, np.uint64) for c in ctr), *map(u, key))
    assert all((a == w).all() for a, w in zip(arrays, words))      # numpy arrays: same words


def test_philox_and_gumbel_against_the_reference():
    rng = np.random.default_rng(1)
    for _ in range(50):
        ctr = tuple(int(c) for c in rng.integers(0, 2**32, 4))
        key = tuple(int(c) for c in rng.integers(0, 2**32, 2))
        got = philox4x32(*(np.uint64(c) for c in ctr), *(np.uint64(c) for c in key))
        assert tuple(int(w) for w in got) == R.philox4x32_10(ctr, key)
    seed, index = 2**64 - 12345, 77
    ids = np.array([0, 1, 2, 3, 4, 1001, 128255])
    want = [R.gumbel(seed, index, int(t)) for t in ids]
    assert np.array_equal(gumbel(seed, index, ids), want)
    assert np.array_equal(R.gumbel(seed, index, ids), want)        # the reference, vectorized
    assert uniform24(np.uint64(0)) == 2.0 ** -25 and uniform24(np.uint64(2**32 - 1)) < 1.0


# --- the whole chain against the reference --------------------------------------------------------

@pytest.mark.parametrize("name", OPTIONS)
def test_host_chain_matches_reference(name):
    checked = 0
    for logits, history, p, want in chain_cases(1000, OPTIONS[name]):
        got = make_sampler(p)(logits.copy(), history, index=len(history))
        if want is not None:
            assert got == want
            checked += 1
    assert checked >= 8


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
