"""The 'pld' accountant against dp-accounting, prv-accountant and the analytic Gaussian.

The library builds each release's PLD through the mechanism's ``pld()`` and picks the
discretisation interval per query; the references are computed here, independently:
dp-accounting's own PLDAccountant on dp_events at a fine, fixed interval, prv-accountant's
own PRVAccountant, and for q = 1 the closed form delta(eps) of the mu-GDP Gaussian. Every
estimate is pessimistic, so the accountant must sit at or above the true value, and its
documented overshoot is about 0.1%.
"""

import functools
import math

import prv_accountant
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation
from scipy import optimize, special

from dpfa.accountants import PLDAccountant
from dpfa.errors import PrivacyParameterError

# (noise multiplier, sampling rate, steps, delta)
CONFIGS = [
    (1.0, 0.01, 1000, 1e-5),  # the reference configuration: dp-accounting gives 1.828
    (0.8, 0.2, 100, 1e-5),
    (1.5, 0.1, 200, 1e-4),
    (0.7, 0.001, 3000, 1e-7),
    (2.0, 1.0, 50, 1e-5),     # full batch
]
LAPLACE_CONFIGS = [
    (1.0, 0.01, 1000, 1e-5),
    (0.8, 0.2, 100, 1e-5),
    (2.0, 0.05, 300, 1e-6),
]
#: documented overshoot "about 0.1%"; allowed here: 0.2%
MAX_EXCESS = 2e-3
#: the references' own error
REF_TOL = 1e-4


# ------------------------------------------------------------------ references
def _dp_event(mechanism, z, q):
    inner = dp_event.GaussianDpEvent(z) if mechanism == "gaussian" else dp_event.LaplaceDpEvent(z)
    return inner if q == 1.0 else dp_event.PoissonSampledDpEvent(q, inner)


@functools.lru_cache(maxsize=None)
def dp_accounting(events, relation=NeighboringRelation.ADD_OR_REMOVE_ONE):
    """dp-accounting's PLDAccountant after composing ((mechanism, z, q, steps), ...).

    Interval 1e-4; for Gaussians alone 1e-4 x sqrt(1000 / steps), at least 1e-4: their
    pessimistic overshoot, which grows like steps x interval^2, stays at ~1e-5 of epsilon
    (the Laplace's loss has atoms, which connect-the-dots rounds less well).
    """
    steps = sum(e[3] for e in events)
    gaussian = all(e[0] == "gaussian" for e in events)
    interval = 1e-4 * max(1.0, math.sqrt(1000 / steps)) if gaussian else 1e-4
    acc = pld_privacy_accountant.PLDAccountant(neighboring_relation=relation, value_discretization_interval=interval)
    for mechanism, z, q, count in events:
        acc.compose(dp_event.SelfComposedDpEvent(_dp_event(mechanism, z, q), count))
    return acc


@functools.lru_cache(maxsize=None)
def prv_reference(events, delta):
    """prv-accountant's own PRVAccountant (Gaussian and full-batch Laplace only).

    For Gaussians its error bound is 1% of epsilon (sized from dp-accounting's value), and
    its estimate, which is what the tests compare, is far closer; the Laplace's atoms need
    the bound itself small (1e-3).
    """
    prvs = []
    for mechanism, z, q, _ in events:
        if mechanism == "gaussian":
            prvs.append(prv_accountant.PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=z)
                        if q < 1 else prv_accountant.GaussianMechanism(noise_multiplier=z))
        else:
            assert q == 1.0
            prvs.append(prv_accountant.LaplaceMechanism(mu=1.0 / z))
    steps = [e[3] for e in events]
    gaussian = all(e[0] == "gaussian" for e in events)
    eps_error = max(1e-2 * dp_accounting(events).get_epsilon(delta), 1e-3) if gaussian else 1e-3
    return prv_accountant.PRVAccountant(prvs=prvs, max_self_compositions=steps, eps_error=eps_error,
                                        delta_error=1e-3 * delta), steps


def prv_reference_epsilon(events, delta):
    acc, steps = prv_reference(events, delta)
    return acc.compute_epsilon(delta, steps)[1]  # the estimate


def prv_reference_delta(events, delta, epsilon):
    acc, steps = prv_reference(events, delta)
    return acc.compute_delta(epsilon, steps)[1]


def gdp_delta(mu, eps):
    """Exact delta(eps) of mu-GDP: Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    return special.ndtr(-eps / mu + mu / 2) - math.exp(eps + special.log_ndtr(-eps / mu - mu / 2))


def gdp_epsilon(mu, delta):
    return optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, 100.0 + 10 * mu * mu, xtol=1e-13, rtol=1e-13)


def ours(events, **kwargs):
    acc = PLDAccountant()
    for e in events:
        acc.compose(*e, **kwargs)
    return acc


def single(mechanism, z, q, steps):
    return ((mechanism, z, q, steps),)


def check_epsilon(eps, refs):
    """Within 1% of each reference, at or above the true value (which they pin down), and at
    most the documented overshoot above."""
    for ref in refs:
        assert eps == pytest.approx(ref, rel=0.01)
    assert min(refs) * (1 - REF_TOL) <= eps <= max(refs) * (1 + MAX_EXCESS)


def check_delta(d, refs):
    for ref in refs:
        assert d == pytest.approx(ref, rel=0.01)
    assert d >= min(refs) * (1 - 1e-3)


# --------------------------------------------------------------- Gaussian
def test_reference_configuration():
    events = single("gaussian", 1.0, 0.01, 1000)
    assert dp_accounting(events).get_epsilon(1e-5) == pytest.approx(1.828, abs=1e-3)  # pinned, next to the live
    assert ours(events).get_epsilon(1e-5) == pytest.approx(dp_accounting(events).get_epsilon(1e-5), rel=0.01)


@pytest.mark.parametrize("z, q, steps, delta", CONFIGS)
def test_gaussian_epsilon_against_dp_accounting_and_prv_accountant(z, q, steps, delta):
    events = single("gaussian", z, q, steps)
    refs = [dp_accounting(events).get_epsilon(delta), prv_reference_epsilon(events, delta)]
    assert refs[0] == pytest.approx(refs[1], rel=REF_TOL)  # the references agree
    check_epsilon(ours(events).get_epsilon(delta), refs)


@pytest.mark.parametrize("z, q, steps, delta", CONFIGS)
def test_gaussian_delta_against_dp_accounting_and_prv_accountant(z, q, steps, delta):
    events = single("gaussian", z, q, steps)
    eps = dp_accounting(events).get_epsilon(delta)
    refs = [dp_accounting(events).get_delta(eps), prv_reference_delta(events, delta, eps)]
    assert refs[0] == pytest.approx(refs[1], rel=1e-3)
    check_delta(ours(events).get_delta(eps), refs)
    check_delta(ours(events).get_delta(0.7 * eps), [dp_accounting(events).get_delta(0.7 * eps)])


@pytest.mark.parametrize("z, steps, delta", [(2.0, 50, 1e-5), (5.0, 10, 1e-3), (0.5, 1, 1e-6)])
def test_full_batch_is_an_upper_bound_of_the_analytic_gaussian(z, steps, delta):
    """q = 1: T releases are mu-GDP with mu = sqrt(T)/z, whose delta(eps) is known exactly."""
    mu = math.sqrt(steps) / z
    exact = gdp_epsilon(mu, delta)
    acc = ours(single("gaussian", z, 1.0, steps))
    check_epsilon(acc.get_epsilon(delta), [exact])
    assert acc.get_epsilon(delta) >= exact * (1 - 1e-9)
    check_delta(acc.get_delta(exact), [delta])
    assert acc.get_delta(exact) >= delta * (1 - 1e-9)


# ----------------------------------------------------------------- Laplace
@pytest.mark.parametrize("z, q, steps, delta", LAPLACE_CONFIGS)
def test_poisson_laplace_against_dp_accounting(z, q, steps, delta):
    events = single("laplace", z, q, steps)
    ref = dp_accounting(events)
    acc = ours(events)
    check_epsilon(acc.get_epsilon(delta), [ref.get_epsilon(delta)])
    eps = ref.get_epsilon(delta)
    check_delta(acc.get_delta(eps), [ref.get_delta(eps)])


def test_full_batch_laplace_against_both_references():
    events = single("laplace", 1.5, 1.0, 20)
    refs = [dp_accounting(events).get_epsilon(1e-5), prv_reference_epsilon(events, 1e-5)]
    assert refs[0] == pytest.approx(refs[1], rel=REF_TOL)
    check_epsilon(ours(events).get_epsilon(1e-5), refs)


# ------------------------------------------------------------ heterogeneous
def test_two_gaussian_releases_against_both_references():
    events = (("gaussian", 1.0, 0.01, 600), ("gaussian", 2.0, 0.05, 300))
    delta = 1e-5
    refs = [dp_accounting(events).get_epsilon(delta), prv_reference_epsilon(events, delta)]
    assert refs[0] == pytest.approx(refs[1], rel=REF_TOL)
    acc = ours(events)
    check_epsilon(acc.get_epsilon(delta), refs)
    check_delta(acc.get_delta(refs[0]), [dp_accounting(events).get_delta(refs[0]),
                                         prv_reference_delta(events, delta, refs[0])])


def test_gaussian_and_laplace_releases_against_dp_accounting():
    events = (("gaussian", 1.2, 0.05, 200), ("laplace", 3.0, 0.1, 100), ("gaussian", 4.0, 1.0, 5))
    delta = 1e-6
    ref = dp_accounting(events)
    acc = ours(events)
    check_epsilon(acc.get_epsilon(delta), [ref.get_epsilon(delta)])
    check_delta(acc.get_delta(ref.get_epsilon(delta)), [delta])


# -------------------------------------------------------------- replace-one
@pytest.mark.parametrize("z, q, steps, delta", [(1.0, 0.01, 1000, 1e-5), (2.0, 0.1, 100, 1e-5)])
def test_poisson_replace_one_gaussian_against_dp_accounting(z, q, steps, delta):
    """The one event that only 'pld' supports: dp-accounting's REPLACE_ONE pair."""
    events = single("gaussian", z, q, steps)
    ref = dp_accounting(events, NeighboringRelation.REPLACE_ONE)
    acc = ours(events, neighboring="replace_one")
    check_epsilon(acc.get_epsilon(delta), [ref.get_epsilon(delta)])
    eps = ref.get_epsilon(delta)
    check_delta(acc.get_delta(eps), [ref.get_delta(eps)])
    # replacing one example costs clearly more than adding or removing one
    assert acc.get_epsilon(delta) > 1.5 * dp_accounting(events).get_epsilon(delta)


# --------------------------------------------------------------- the interval
def test_a_fixed_interval_is_dp_accountings_value_at_that_interval():
    events = single("gaussian", 1.5, 0.1, 200)
    fixed = PLDAccountant(value_discretization_interval=1e-3).compose("gaussian", 1.5, 0.1, 200)
    ref = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    ref.compose(dp_event.SelfComposedDpEvent(_dp_event("gaussian", 1.5, 0.1), 200))
    assert fixed.get_epsilon(1e-4) == pytest.approx(ref.get_epsilon(1e-4), rel=1e-9)
    assert fixed.get_delta(3.0) == pytest.approx(ref.get_delta(3.0), rel=1e-9)
    # a coarse interval is still an upper bound, only a looser one
    coarse = PLDAccountant(value_discretization_interval=1e-2).compose("gaussian", 1.5, 0.1, 200)
    assert coarse.get_epsilon(1e-4) > fixed.get_epsilon(1e-4) > dp_accounting(events).get_epsilon(1e-4)


@pytest.mark.parametrize("interval", [0.0, -1e-4, float("inf"), float("nan")])
def test_bad_interval(interval):
    with pytest.raises(PrivacyParameterError, match="value_discretization_interval"):
        PLDAccountant(value_discretization_interval=interval)
