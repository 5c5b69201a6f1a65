"""Clopper-Pearson intervals and the empirical epsilon lower bound (dpfa.attacks.bounds).

Hand-computed cases, scipy's exact binomial test, exact and Monte-Carlo coverage at a fixed
seed, and the formula eps >= log((TPR - delta) / FPR) with the conservative ends.
"""

import json
import math

import numpy as np
import pytest
from scipy import stats

from dpfa.attacks import bounds
from dpfa.attacks.bounds import (clopper_pearson, clopper_pearson_lower, clopper_pearson_upper, epsilon_from_rates,
                                 epsilon_lower_bound)
from dpfa.errors import PrivacyParameterError


# ----------------------------------------------------------------- Clopper-Pearson
def test_clopper_pearson_hand_cases():
    a = 0.025  # each side of a 95% interval
    # k = 0 of 10: (0, 1 - a^(1/10)) = (0, 0.30850); k = n: (a^(1/n), 1).
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 0.3084971078187608), abs=1e-12)
    assert clopper_pearson(0, 10)[1] == pytest.approx(1 - a ** 0.1, abs=1e-12)
    assert clopper_pearson(10, 10) == pytest.approx((a ** 0.1, 1.0), abs=1e-12)
    # k = 1 of 4: the lower end solves P[Bin(4, p) >= 1] = 1 - (1 - p)^4 = a, so p = 1 - (1 - a)^(1/4) = 0.0063095;
    # the upper end solves P[Bin(4, p) <= 1] = (1 - p)^4 + 4 p (1 - p)^3 = a (0.80588 by bisection of the polynomial).
    lo, hi = clopper_pearson(1, 4)
    assert lo == pytest.approx(1 - (1 - a) ** 0.25, abs=1e-12)
    assert lo == pytest.approx(0.0063095, abs=1e-7)
    assert (1 - hi) ** 4 + 4 * hi * (1 - hi) ** 3 == pytest.approx(a, abs=1e-12)
    assert hi == pytest.approx(0.80588, abs=1e-5)


@pytest.mark.parametrize("k, n", [(0, 1), (1, 1), (0, 7), (3, 7), (7, 7), (17, 50), (500, 1000), (2, 100000),
                                  (99998, 100000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.999])
def test_clopper_pearson_matches_scipy_binomtest(k, n, confidence):
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    lo, hi = clopper_pearson(k, n, confidence)
    assert lo == pytest.approx(ci.low, abs=1e-10) and hi == pytest.approx(ci.high, abs=1e-10)


def test_one_sided_ends_are_the_two_sided_ends_at_half_the_significance():
    k = np.array([0, 3, 10, 20])
    lo = clopper_pearson_lower(k, 20, 0.025)
    hi = clopper_pearson_upper(k, 20, 0.025)
    los, his = clopper_pearson(k, 20, 0.95)
    np.testing.assert_allclose(lo, los, atol=1e-14)
    np.testing.assert_allclose(hi, his, atol=1e-14)
    assert lo[0] == 0.0 and hi[-1] == 1.0


def test_exact_coverage_is_at_least_the_confidence():
    """sum_k Bin(n, p)(k) 1[p in CI(k)] >= confidence for every p: exact, no sampling."""
    for n in (5, 30, 200):
        k = np.arange(n + 1)
        lo, hi = clopper_pearson(k, n, 0.95)
        one_lo = clopper_pearson_lower(k, n, 0.05)
        for p in np.linspace(0.001, 0.999, 333):
            pmf = stats.binom.pmf(k, n, p)
            assert pmf[(lo <= p) & (p <= hi)].sum() >= 0.95 - 1e-12
            assert pmf[one_lo <= p].sum() >= 0.95 - 1e-12


def test_monte_carlo_coverage_at_a_fixed_seed():
    """Draw Bin(n, p) 20000 times per p; the 95% interval covers p at least 95% of the time, each end fails <= 2.5%."""
    rng = np.random.default_rng(7)
    n = 40
    for p in (0.003, 0.05, 0.3, 0.5, 0.8, 0.97):
        k = rng.binomial(n, p, size=20000)
        lo, hi = clopper_pearson(k, n, 0.95)
        assert np.mean((lo <= p) & (p <= hi)) >= 0.95
        assert np.mean(lo > p) <= 0.025 and np.mean(hi < p) <= 0.025


# ----------------------------------------------------------- epsilon from a test
def test_epsilon_from_rates_point_formula():
    assert epsilon_from_rates(0.5, 0.1) == pytest.approx(math.log(5.0))
    assert epsilon_from_rates(0.5, 0.1, delta=0.1) == pytest.approx(math.log(4.0))
    # the complementary inequality: log((1 - FPR - delta) / (1 - TPR))
    assert epsilon_from_rates(0.99, 0.7) == pytest.approx(math.log(0.3 / 0.01))
    assert epsilon_from_rates(0.3, 0.3) == 0.0
    assert epsilon_from_rates(0.5, 0.0) == math.inf


def test_epsilon_lower_bound_hand_case_all_and_nothing():
    """100 of 100 x1 runs and 0 of 100 x0 runs in the region: tpr_lo = 0.025^(1/100), fpr_hi = 1 - tpr_lo."""
    b = epsilon_lower_bound(100, 100, 0, 100, delta=0.0, confidence=0.95)
    t = 0.025 ** 0.01
    assert b.tpr_interval[0] == pytest.approx(t, abs=1e-12) and b.fpr_interval[1] == pytest.approx(1 - t, abs=1e-12)
    assert b.epsilon == pytest.approx(math.log(t / (1 - t)), abs=1e-10)
    assert b.epsilon == pytest.approx(3.2814, abs=1e-4)
    assert b.estimate == math.inf  # the point estimate divides by FPR = 0; the bound never does
    # with delta, the numerator loses delta: log((tpr_lo - delta) / fpr_hi)
    bd = epsilon_lower_bound(100, 100, 0, 100, delta=0.1)
    assert bd.epsilon == pytest.approx(max(math.log((t - 0.1) / (1 - t)), math.log((t - 0.1) / (1 - t))), abs=1e-10)


@pytest.mark.parametrize("tp, fp, delta, which", [(600, 100, 1e-3, "tpr/fpr"), (990, 700, 1e-3, "tnr/fnr")])
def test_epsilon_lower_bound_uses_the_conservative_ends(tp, fp, delta, which):
    """eps >= log((TPR - delta)/FPR) at (tpr_lo, fpr_hi), and log((1 - FPR - delta)/(1 - TPR)) at the same ends."""
    n = 1000
    b = epsilon_lower_bound(tp, n, fp, n, delta=delta, confidence=0.95)
    tpr_lo = stats.beta.ppf(0.025, tp, n - tp + 1)  # CP lower end of TPR, alpha/2 = 0.025
    fpr_hi = stats.beta.ppf(0.975, fp + 1, n - fp)  # CP upper end of FPR
    e1 = math.log((tpr_lo - delta) / fpr_hi)
    e2 = math.log((1 - fpr_hi - delta) / (1 - tpr_lo))
    assert b.epsilon == pytest.approx(max(e1, e2, 0.0), abs=1e-10)
    assert (e1 > e2) == (which == "tpr/fpr")
    assert b.tpr_interval[0] == pytest.approx(tpr_lo) and b.fpr_interval[1] == pytest.approx(fpr_hi)
    # every other choice of ends is larger: the bound takes the one that favours the mechanism
    tpr_hi = stats.beta.ppf(0.975, tp + 1, n - tp)
    fpr_lo = stats.beta.ppf(0.025, fp, n - fp + 1)
    for t, f in ((tpr_hi, fpr_hi), (tpr_lo, fpr_lo), (tpr_hi, fpr_lo), (tp / n, fp / n)):
        other = max(math.log((t - delta) / f), math.log((1 - f - delta) / (1 - t)))
        assert other > b.epsilon
    assert b.estimate == pytest.approx(epsilon_from_rates(tp / n, fp / n, delta))


def test_epsilon_lower_bound_covers_the_true_epsilon_monte_carlo():
    """With true rates (TPR, FPR), the bound exceeds the epsilon those rates prove at most 5% of the time."""
    rng = np.random.default_rng(11)
    n_pos, n_neg, reps = 20000, 20000, 4000
    for tpr, fpr, delta in ((0.3, 0.05, 0.0), (0.02, 0.002, 1e-4), (0.999, 0.8, 1e-5)):
        truth = epsilon_from_rates(tpr, fpr, delta)
        tp = rng.binomial(n_pos, tpr, size=reps)
        fp = rng.binomial(n_neg, fpr, size=reps)
        eps, _, _ = bounds._bound_arrays(tp, n_pos, fp, n_neg, delta, 0.025)
        assert np.mean(eps > truth) <= 0.05
        assert np.median(eps) > 0.5 * truth  # and it is not vacuous


def test_bound_result_serialises():
    b = epsilon_lower_bound(np.int64(40), np.int64(100), 5, 100, delta=1e-5)
    d = json.loads(json.dumps(b.to_dict()))
    assert d["true_positives"] == 40 and d["confidence"] == 0.95 and d["epsilon"] == pytest.approx(b.epsilon)


@pytest.mark.parametrize("call, needle", [
    (lambda: clopper_pearson(-1, 10), "successes=-1"),
    (lambda: clopper_pearson(11, 10), "successes=11"),
    (lambda: clopper_pearson(1, 0), "trials=0"),
    (lambda: clopper_pearson(1.5, 10), "integer counts"),
    (lambda: clopper_pearson(1, 10, confidence=1.5), "confidence=1.5"),
    (lambda: clopper_pearson(1, 10, confidence=float("nan")), "NaN"),
    (lambda: clopper_pearson_lower(1, 10, 0.0), "significance=0.0"),
    (lambda: epsilon_lower_bound(5, 10, 11, 10), "false_positives=11"),
    (lambda: epsilon_lower_bound(5, 0, 1, 10), "positives=0"),
    (lambda: epsilon_lower_bound(5.0, 10, 1, 10), "true_positives to be an integer"),
    (lambda: epsilon_lower_bound(True, 10, 1, 10), "true_positives to be an integer"),
    (lambda: epsilon_lower_bound(5, 10, 1, 10, delta=1.5), "delta=1.5"),
    (lambda: epsilon_from_rates(1.2, 0.1), "rates in [0, 1]"),
])
def test_bad_input_names_the_value(call, needle):
    with pytest.raises(PrivacyParameterError) as e:
        call()
    assert needle in str(e.value)
