"""Amplification by subsampling of a pure-DP mechanism, against exact binomial sums and dp-accounting.

Both dominating pairs have only two or three outcomes, so the composition of T steps can
be computed exactly here: the privacy loss of T steps is a sum of T i.i.d. losses taking
two (Poisson) or three (without replacement) values, whose law is a binomial or a
trinomial. delta(eps) = E_P[(1 - e^{eps - L})_+] is then a finite sum, and epsilon comes
from a root finder. These sums share nothing with the library's PLD (grid, chords, FFT).
"""

import functools
import math

import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import optimize, special

from dpfa.accountants import SubsamplingAmplification
from dpfa.errors import PrivacyParameterError

SAMPLINGS = ["poisson", "without_replacement"]
# (base epsilon, sampling rate, steps, delta)
CONFIGS = [
    (1.0, 0.01, 1000, 1e-5),
    (2.0, 0.05, 200, 1e-6),
    (0.5, 0.2, 50, 1e-5),
    (3.0, 1.0, 30, 1e-5),  # no subsampling: T-fold randomised response
]
# small rates: both step losses far below 1e-4 (Poisson only: the trinomial is O(T^2))
SMALL_RATE_CONFIGS = [
    (1.0, 1e-4, 20_000, 1e-6),
    (2.0, 1e-3, 3000, 1e-7),
]


# ------------------------------------------------------------ exact references
def step_epsilon(e0, q):
    """BBG18: epsilon' = log(1 + q (e^e0 - 1))."""
    return math.log(1 + q * (math.exp(e0) - 1))


def log_binom(n, k):
    return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)


def two_point_composition(log_p, log_q, T):
    """(log P^T mass, loss) of each count l of outcome 0 in T draws of the pair (P, Q) on {0, 1}."""
    l = np.arange(T + 1)
    log_mass = log_binom(T, l) + l * log_p[0] + (T - l) * log_p[1]
    loss = l * (log_p[0] - log_q[0]) + (T - l) * (log_p[1] - log_q[1])
    return log_mass, loss


def hockey_stick(composition, eps):
    """delta(eps) = sum over outcomes of P (1 - e^{eps - loss})_+."""
    log_mass, loss = composition
    keep = loss > eps
    return float(np.sum(np.exp(log_mass[keep]) * -np.expm1(eps - loss[keep])))


@functools.lru_cache(maxsize=None)
def exact_compositions(e0, q, T, sampling):
    """The composed pairs, in both directions where they differ.

    Poisson: subsampled randomised response, P = (1-q) Q0 + q P0 against Q0, with
    (P0, Q0) = ((e^e0, 1), (1, e^e0)) / (1 + e^e0), and the reversed pair.
    Without replacement: the symmetric pair (e^e', e^e0 - e^e', 1) / (1 + e^e0) against its
    reverse (BBG18, Thm 9 attains (e^e' - e^eps)_+ / (1 + e^e0)); the loss of T steps is
    e' (n_0 - n_2) with (n_0, n_1, n_2) trinomial.
    """
    norm = 1 + math.exp(e0)
    if sampling == "poisson":
        p0 = np.array([math.exp(e0), 1.0]) / norm
        q0 = np.array([1.0, math.exp(e0)]) / norm
        mix = np.log((1 - q) * q0 + q * p0)
        return (two_point_composition(mix, np.log(q0), T), two_point_composition(np.log(q0), mix, T))
    e1 = step_epsilon(e0, q)
    lp0, lp2 = e1 - math.log(norm), -math.log(norm)
    middle = math.exp(e0) - math.exp(e1) if q < 1 else 0.0  # the no-information outcome
    n0, n2 = np.meshgrid(np.arange(T + 1), np.arange(T + 1), indexing="ij")
    n0, n2 = n0[n0 + n2 <= T], n2[n0 + n2 <= T]
    n1 = T - n0 - n2
    log_mass = (special.gammaln(T + 1) - special.gammaln(n0 + 1) - special.gammaln(n1 + 1)
                - special.gammaln(n2 + 1) + n0 * lp0 + n2 * lp2)
    if middle > 0:
        log_mass = log_mass + n1 * (math.log(middle) - math.log(norm))
    else:
        log_mass = np.where(n1 > 0, -np.inf, log_mass)
    return ((log_mass, (n0 - n2) * e1),)


def exact_delta(e0, q, T, eps, sampling):
    return max(hockey_stick(c, eps) for c in exact_compositions(e0, q, T, sampling))


def epsilon_of(delta_fn, delta, upper):
    """The smallest eps >= 0 with delta_fn(eps) <= delta (delta_fn is decreasing)."""
    if delta_fn(0.0) <= delta:
        return 0.0
    return optimize.brentq(lambda e: delta_fn(e) - delta, 0.0, upper, xtol=1e-13, rtol=1e-13)


def exact_epsilon(e0, q, T, delta, sampling):
    return epsilon_of(lambda e: exact_delta(e0, q, T, e, sampling), delta, T * step_epsilon(e0, q))


def kov_delta(e1, T, eps):
    """Optimal T-fold composition of e1-DP mechanisms (Kairouz, Oh & Viswanath 2015, Thm 3.3):
    sum_l C(T, l) (e^{e1 (T - l)} - e^eps e^{e1 l})_+ / (1 + e^e1)^T, i.e. randomised response."""
    log_rr = np.array([e1, 0.0]) - math.log1p(math.exp(e1))
    return hockey_stick(two_point_composition(log_rr, log_rr[::-1], T), eps)


def kov_epsilon(e1, T, delta):
    return epsilon_of(lambda e: kov_delta(e1, T, e), delta, T * e1)


def drv_epsilon(e1, T, delta):
    """Advanced composition (Dwork, Rothblum & Vadhan 2010): T e1-DP steps are (eps, delta)-DP."""
    return math.sqrt(2 * T * math.log(1 / delta)) * e1 + T * e1 * math.expm1(e1)


def amp(e0, q, T, sampling="poisson"):
    return SubsamplingAmplification(e0, q, T, sampling=sampling)


# ------------------------------------------------------------------ one step
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("e0, q", [(1.0, 0.01), (0.3, 0.5), (4.0, 0.001), (2.0, 1.0)])
def test_one_step_is_the_bbg18_epsilon(e0, q, sampling):
    a = amp(e0, q, 1, sampling)
    e1 = math.log(1 + q * (math.exp(e0) - 1))
    assert a.step_epsilon == pytest.approx(e1, rel=1e-12)
    # as delta -> 0 the step costs e' (the pairs attain it); the composed PLD itself, not only
    # the pure-composition cap, says so
    assert a.compute_epsilon(1e-12) == pytest.approx(e1, abs=1e-9)
    assert a.pld().get_epsilon_for_delta(1e-12) == pytest.approx(exact_epsilon(e0, q, 1, 1e-12, sampling), rel=1e-9)
    assert a.pld().get_delta_for_epsilon(e1 * 1.001) < 1e-12
    # below e' the delta is the pair's hockey-stick divergence, in closed form
    eps = 0.5 * e1
    norm = 1 + math.exp(e0)
    if sampling == "poisson":
        p = np.array([1 + q * (math.exp(e0) - 1), q + (1 - q) * math.exp(e0)]) / norm
        p0 = np.array([1.0, math.exp(e0)]) / norm
        ref = max(np.sum(np.maximum(p - math.exp(eps) * p0, 0)), np.sum(np.maximum(p0 - math.exp(eps) * p, 0)))
    else:  # the advanced joint convexity bound of BBG18, Thm 2
        ref = (math.exp(e1) - math.exp(eps)) / norm
    assert a.compute_delta(eps) == pytest.approx(ref, rel=1e-6)
    assert a.compute_delta(eps) >= ref * (1 - 1e-9)


# ------------------------------------------------------ T steps, exact sums
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("e0, q, T, delta", CONFIGS)
def test_composition_matches_the_exact_sum(e0, q, T, delta, sampling):
    a = amp(e0, q, T, sampling)
    ref = exact_epsilon(e0, q, T, delta, sampling)
    eps = a.compute_epsilon(delta)
    assert ref * (1 - 1e-6) <= eps <= ref * 1.01
    d_ref = exact_delta(e0, q, T, 0.8 * ref, sampling)
    assert d_ref * (1 - 1e-6) <= a.compute_delta(0.8 * ref) <= d_ref * 1.01


@pytest.mark.parametrize("e0, q, T, delta", SMALL_RATE_CONFIGS)
def test_poisson_grid_resolves_small_rates(e0, q, T, delta):
    """At q = 1e-4 both step losses are far below 1e-4; a grid of step e' alone overshot the
    exact epsilon by 20-35% (and delta by 10x)."""
    a = amp(e0, q, T)
    ref = exact_epsilon(e0, q, T, delta, "poisson")
    assert ref * (1 - 1e-6) <= a.compute_epsilon(delta) <= ref * 1.01
    d_ref = exact_delta(e0, q, T, ref, "poisson")
    assert d_ref * (1 - 1e-6) <= a.compute_delta(ref) <= d_ref * 1.01


def test_without_replacement_costs_more_than_poisson():
    """Same e' per step, but the replace-one pair is the worse one (its loss takes +-e')."""
    e0, q, T, delta = CONFIGS[0]
    wor = amp(e0, q, T, "without_replacement").compute_epsilon(delta)
    poisson = amp(e0, q, T).compute_epsilon(delta)
    assert wor > 1.1 * poisson
    assert exact_epsilon(e0, q, T, delta, "without_replacement") > 1.1 * exact_epsilon(e0, q, T, delta, "poisson")


# ------------------------------------------------- composition theorems
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("e0, q, T, delta", CONFIGS)
def test_below_pure_advanced_and_optimal_composition(e0, q, T, delta, sampling):
    """Each step is e'-DP, so T steps are at most: T e' (pure), the DRV10 bound, and the
    optimal composition of T e'-DP steps (KOV15), which q = 1 attains."""
    a = amp(e0, q, T, sampling)
    e1 = step_epsilon(e0, q)
    eps = a.compute_epsilon(delta)
    kov = kov_epsilon(e1, T, delta)
    assert kov <= T * e1 and kov <= drv_epsilon(e1, T, delta)
    assert eps <= kov * (1 + 1e-6)
    assert a.compute_delta(0.5 * kov) <= kov_delta(e1, T, 0.5 * kov) * (1 + 1e-6)
    if q == 1.0:
        assert eps == pytest.approx(kov, rel=1e-6)
    else:  # subsampling is strictly better than its e'-DP summary
        assert eps < 0.95 * kov


# ---------------------------------------------------- against dp-accounting
@functools.lru_cache(maxsize=None)
def dp_accounting_poisson(e0, q, T, interval, pessimistic):
    """dp-accounting's PLD of the subsampled randomised-response pair, both directions
    (``symmetric=False``), each loss rounded up (pessimistic) or down (optimistic)."""
    b = -math.log1p(math.exp(e0))
    lower = {0: b, 1: e0 + b}
    upper = {0: math.log1p(q * math.expm1(e0)) + b, 1: e0 + math.log1p(-q * -math.expm1(-e0)) + b}
    pld = pld_lib.from_two_probability_mass_functions(lower, upper, pessimistic_estimate=pessimistic,
                                                      value_discretization_interval=interval, symmetric=False)
    return pld.self_compose(T)


@pytest.mark.parametrize("e0, q, T, delta, interval", [
    (1.0, 0.01, 1000, 1e-5, 1e-5),  # rounding costs T x interval: 1e-2 here
    (2.0, 0.05, 200, 1e-6, 1e-4),
    (0.5, 0.2, 50, 1e-5, 1e-4),
])
def test_poisson_against_dp_accounting(e0, q, T, delta, interval):
    """Rounding each loss up (down) gives an upper (lower) bound; connect-the-dots, an error of
    second order, lies between the two."""
    a = amp(e0, q, T)
    up = dp_accounting_poisson(e0, q, T, interval, True)
    down = dp_accounting_poisson(e0, q, T, interval, False)
    eps = a.compute_epsilon(delta)
    assert eps == pytest.approx(up.get_epsilon_for_delta(delta), rel=0.01)
    assert down.get_epsilon_for_delta(delta) * (1 - 1e-9) <= eps <= up.get_epsilon_for_delta(delta) * (1 + 1e-9)
    # delta is steep in eps: rounding by T x interval moves it by more than 1%, so only the order
    d = a.compute_delta(0.8 * eps)
    assert down.get_delta_for_epsilon(0.8 * eps) * (1 - 1e-9) <= d <= up.get_delta_for_epsilon(0.8 * eps) * (1 + 1e-9)


# ------------------------------------------------------------- round trip
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("e0, q, T, delta", CONFIGS[:3])
def test_delta_of_epsilon_round_trip(e0, q, T, delta, sampling):
    a = amp(e0, q, T, sampling)
    eps = a.compute_epsilon(delta)
    assert a.compute_delta(eps) == pytest.approx(delta, rel=1e-4)
    assert a.compute_delta(eps) <= delta * (1 + 1e-9)
    assert a.compute_epsilon(a.compute_delta(0.5 * eps)) == pytest.approx(0.5 * eps, rel=1e-4)
    assert a.compute_delta(1.1 * eps) < delta < a.compute_delta(0.9 * eps)


def test_cli_spelling_and_explicit_interval():
    a = SubsamplingAmplification(1.0, 0.05, 100, sampling="without-replacement")
    assert a.sampling == "without_replacement" and a.neighboring == "replace_one"
    assert amp(1.0, 0.05, 100).neighboring == "add_remove"
    # an interval that does not divide e' is still an upper bound (the chords dominate)
    coarse = SubsamplingAmplification(1.0, 0.05, 100, value_discretization_interval=3.3e-3)
    ref = exact_epsilon(1.0, 0.05, 100, 1e-5, "poisson")
    assert ref * (1 - 1e-9) <= coarse.compute_epsilon(1e-5) <= ref * 1.05


# --------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs, word", [
    (dict(base_epsilon=0.0), "base_epsilon=0.0"),
    (dict(base_epsilon=-1.0), "base_epsilon=-1.0"),
    (dict(base_epsilon=float("inf")), "base_epsilon=inf"),
    (dict(base_epsilon=float("nan")), "base_epsilon.*NaN"),
    (dict(base_epsilon="1"), "base_epsilon.*'1'"),
    (dict(sampling_rate=0.0), "sampling_rate=0.0"),
    (dict(sampling_rate=1.5), "sampling_rate=1.5"),
    (dict(num_steps=0), "num_steps=0"),
    (dict(num_steps=2.5), "num_steps.*2.5"),
    (dict(sampling="bernoulli"), "sampling='bernoulli'"),
    (dict(value_discretization_interval=-1e-4), "value_discretization_interval=-0.0001"),
])
def test_bad_parameters(kwargs, word):
    args = dict(base_epsilon=1.0, sampling_rate=0.1, num_steps=10)
    args.update(kwargs)
    with pytest.raises(PrivacyParameterError, match=word):
        SubsamplingAmplification(**args)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5, float("nan")])
def test_bad_delta(delta):
    with pytest.raises(PrivacyParameterError, match="delta"):
        amp(1.0, 0.1, 10).compute_epsilon(delta)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_epsilon(epsilon):
    with pytest.raises(PrivacyParameterError, match="epsilon"):
        amp(1.0, 0.1, 10).compute_delta(epsilon)
