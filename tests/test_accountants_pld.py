"""The 'pld' accountant against dp-accounting, prv-accountant and the analytic Gaussian.

The library builds each release's PLD through the mechanism's ``pld()`` and picks the
discretisation interval per query; the references are computed here, independently:
dp-accounting's own PLDAccountant on dp_events at a fine, fixed interval, prv-accountant's
own PRVAccountant, and for q = 1 the closed form delta(eps) of the mu-GDP Gaussian. Every
estimate is pessimistic, so the accountant must sit at or above the true value, and its
documented overshoot is about 0.1%.
"""

import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation

from accounting_references import (CONFIGS, LAPLACE_CONFIGS, _dp_event, dp_accounting, gdp_epsilon,
                                   prv_reference_delta, prv_reference_epsilon, single)
from dpfa.accountants import PLDAccountant
from dpfa.errors import PrivacyParameterError

#: documented overshoot "about 0.1%"; allowed here: 0.2%
MAX_EXCESS = 2e-3
#: the references' own error
REF_TOL = 1e-4


# ------------------------------------------------------------------ helpers
def ours(events, **kwargs):
    acc = PLDAccountant()
    for e in events:
        acc.compose(*e, **kwargs)
    return acc


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
    refs = [dp_accounting(events).get_epsilon(delta), prv_reference_epsilon(events, delta)[1]]
    assert refs[0] == pytest.approx(refs[1], rel=REF_TOL)  # the references agree
    check_epsilon(ours(events).get_epsilon(delta), refs)


@pytest.mark.parametrize("z, q, steps, delta", CONFIGS)
def test_gaussian_delta_against_dp_accounting_and_prv_accountant(z, q, steps, delta):
    events = single("gaussian", z, q, steps)
    eps = dp_accounting(events).get_epsilon(delta)
    refs = [dp_accounting(events).get_delta(eps), prv_reference_delta(events, delta, eps)[1]]
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
    refs = [dp_accounting(events).get_epsilon(1e-5), prv_reference_epsilon(events, 1e-5)[1]]
    assert refs[0] == pytest.approx(refs[1], rel=REF_TOL)
    check_epsilon(ours(events).get_epsilon(1e-5), refs)


# ------------------------------------------------------------ heterogeneous
def test_two_gaussian_releases_against_both_references():
    events = (("gaussian", 1.0, 0.01, 600), ("gaussian", 2.0, 0.05, 300))
    delta = 1e-5
    refs = [dp_accounting(events).get_epsilon(delta), prv_reference_epsilon(events, delta)[1]]
    assert refs[0] == pytest.approx(refs[1], rel=REF_TOL)
    acc = ours(events)
    check_epsilon(acc.get_epsilon(delta), refs)
    check_delta(acc.get_delta(refs[0]), [dp_accounting(events).get_delta(refs[0]),
                                         prv_reference_delta(events, delta, refs[0])[1]])


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
