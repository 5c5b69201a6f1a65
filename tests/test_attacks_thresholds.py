"""How the rejection region is chosen (dpfa.attacks.thresholds): each strategy keeps its confidence."""

import math

import numpy as np
import pytest

from dpfa.attacks.bounds import _bound_arrays, clopper_pearson_lower, clopper_pearson_upper, epsilon_lower_bound
from dpfa.attacks.thresholds import (Bonferroni, Explicit, Split, bonferroni_significance, candidate_thresholds,
                                     epsilon_lower_bound_from_scores)
from dpfa.errors import PrivacyParameterError, ShapeError


def test_explicit_region_counts_and_bound():
    pos = np.array([0.1, 0.5, 0.5, 0.9, 2.0])
    neg = np.array([-1.0, 0.0, 0.5, 0.2])
    sb = epsilon_lower_bound_from_scores(pos, neg, strategy=Explicit(0.5, "high"))
    assert (sb.bound.true_positives, sb.bound.false_positives) == (4, 1)  # ties count as in the region
    assert sb.bound == epsilon_lower_bound(4, 5, 1, 4, 0.0, 0.95)
    low = epsilon_lower_bound_from_scores(pos, neg, strategy=Explicit(0.2, "low"))
    assert (low.bound.true_positives, low.bound.false_positives) == (1, 3)
    assert low.direction == "low" and low.strategy == "explicit"


def test_split_bounds_on_the_held_out_part_only():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1.0, 1.0, 1001), rng.normal(0.0, 1.0, 999)
    sb = epsilon_lower_bound_from_scores(pos, neg, strategy=Split(fraction=0.3, seed=5))
    assert sb.bound.positives == 1001 - round(1001 * 0.3) and sb.bound.negatives == 999 - round(999 * 0.3)
    # the same seed gives the same split and region; another seed another split
    assert epsilon_lower_bound_from_scores(pos, neg, strategy=Split(fraction=0.3, seed=5)) == sb
    assert epsilon_lower_bound_from_scores(pos, neg, strategy=Split(fraction=0.3, seed=6)).bound != sb.bound


def test_bonferroni_ends_are_at_the_corrected_significance():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(2.0, 1.0, 300), rng.normal(0.0, 1.0, 200)
    sb = epsilon_lower_bound_from_scores(pos, neg, confidence=0.9, strategy=Bonferroni(max_thresholds=None))
    s = bonferroni_significance(0.1, 300, 200, directions=2)
    assert s == pytest.approx(0.1 / (2 * 500))
    b = sb.bound
    assert b.confidence == 0.9
    assert b.tpr_interval[0] == pytest.approx(clopper_pearson_lower(b.true_positives, 300, s))
    assert b.fpr_interval[1] == pytest.approx(clopper_pearson_upper(b.false_positives, 200, s))
    # it is the best region over every distinct score at that significance
    t = np.unique(np.concatenate([pos, neg]))
    tp = (pos[None, :] >= t[:, None]).sum(1)
    fp = (neg[None, :] >= t[:, None]).sum(1)
    eps_high, _, _ = _bound_arrays(tp, 300, fp, 200, 0.0, s)
    tp_l = (pos[None, :] <= t[:, None]).sum(1)
    fp_l = (neg[None, :] <= t[:, None]).sum(1)
    eps_low, _, _ = _bound_arrays(tp_l, 300, fp_l, 200, 0.0, s)
    assert b.epsilon == pytest.approx(max(eps_high.max(), eps_low.max()))


def _null_rate(strategy_fn, reps=400, n=200, seed=3):
    """Fraction of runs with a positive bound when x0 and x1 have the same law (true epsilon = 0)."""
    rng = np.random.default_rng(seed)
    hits = 0
    for r in range(reps):
        pos, neg = rng.normal(size=n), rng.normal(size=n)
        hits += strategy_fn(pos, neg, r) > 0
    return hits / reps


def test_strategies_keep_their_confidence_under_the_null():
    """At confidence 0.8, at most 20% of null runs may prove epsilon > 0; choosing on the same data without a
    correction (the winner's curse the strategies avoid) proves it in most runs, so the test has power."""
    conf = 0.8
    split = _null_rate(lambda p, q, r: epsilon_lower_bound_from_scores(
        p, q, confidence=conf, strategy=Split(seed=r)).epsilon)
    bonf = _null_rate(lambda p, q, r: epsilon_lower_bound_from_scores(
        p, q, confidence=conf, strategy=Bonferroni()).epsilon)
    assert split <= 1 - conf and bonf <= 1 - conf

    def naive(p, q, r):
        best = 0.0
        for a, b in ((p, q), (-p, -q)):  # both directions, every threshold, ends at (1 - conf) / 2
            t = np.unique(np.concatenate([a, b]))
            tp = (a[None, :] >= t[:, None]).sum(1)
            fp = (b[None, :] >= t[:, None]).sum(1)
            best = max(best, _bound_arrays(tp, a.size, fp, b.size, 0.0, (1 - conf) / 2)[0].max())
        return best

    assert _null_rate(naive) > 0.5


def test_bonferroni_bound_stays_below_a_known_epsilon():
    """Laplace shift: every region has log-likelihood ratio <= 1 / b, so epsilon = 1 / b exactly (delta = 0)."""
    rng = np.random.default_rng(4)
    b, reps, n = 1.0, 200, 4000
    bounds_ = []
    for _ in range(reps):
        pos, neg = 1.0 + rng.laplace(0, b, n), rng.laplace(0, b, n)
        bounds_.append(epsilon_lower_bound_from_scores(pos, neg, strategy=Bonferroni()).epsilon)
    bounds_ = np.array(bounds_)
    assert np.mean(bounds_ > 1.0 / b) <= 0.05
    assert np.median(bounds_) > 0.6  # a real test of the claim, not a vacuous 0


def test_ties_on_integer_scores():
    pos = np.array([0, 1, 1, 1, 2, 2, 3])
    neg = np.array([-1, 0, 0, 1, 1, 2])
    thr = candidate_thresholds(np.concatenate([pos, neg]).astype(float), None)
    np.testing.assert_array_equal(thr, [-1, 0, 1, 2, 3])
    sb = epsilon_lower_bound_from_scores(pos, neg, strategy=Explicit(1.0))
    assert (sb.bound.true_positives, sb.bound.false_positives) == (6, 3)


def test_candidate_thresholds_are_dense_in_both_tails():
    x = np.arange(100000, dtype=float)
    t = candidate_thresholds(x, 200)
    assert t.size <= 205 and t.min() <= 2 and t.max() >= 99997 and np.all(np.diff(t) > 0)


@pytest.mark.parametrize("call, error, needle", [
    (lambda: Split(fraction=1.5), PrivacyParameterError, "fraction=1.5"),
    (lambda: Split(max_thresholds=0), PrivacyParameterError, "max_thresholds=0"),
    (lambda: Bonferroni(max_thresholds=-3), PrivacyParameterError, "max_thresholds=-3"),
    (lambda: Explicit(0.0, "up"), PrivacyParameterError, "direction='up'"),
    (lambda: Explicit(float("nan")), PrivacyParameterError, "NaN"),
    (lambda: epsilon_lower_bound_from_scores([1.0, float("nan")], [0.0, 1.0]), ShapeError, "NaN"),
    (lambda: epsilon_lower_bound_from_scores([], [0.0, 1.0]), ShapeError, "positive_scores"),
    (lambda: epsilon_lower_bound_from_scores(np.ones((2, 2)), [0.0]), ShapeError, "shape (2, 2)"),
    (lambda: epsilon_lower_bound_from_scores([1.0], [0.0]), ShapeError, "Too few scores to split"),
    (lambda: epsilon_lower_bound_from_scores([1.0, 2.0], [0.0, 1.0], strategy="best"), PrivacyParameterError,
     "'best'"),
    (lambda: epsilon_lower_bound_from_scores([1.0, 2.0], [0.0, 1.0], confidence=0), PrivacyParameterError,
     "confidence=0"),
])
def test_bad_input_names_the_value(call, error, needle):
    with pytest.raises(error) as e:
        call()
    assert needle in str(e.value)


def test_no_region_proves_anything_on_identical_scores():
    x = np.linspace(-3, 3, 1000)
    sb = epsilon_lower_bound_from_scores(x, x.copy(), strategy=Bonferroni())
    assert sb.epsilon == 0.0 and math.isfinite(sb.bound.estimate)
