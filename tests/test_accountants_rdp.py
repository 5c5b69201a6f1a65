"""The 'rdp' accountant: MTZ19 against an mpmath oracle, ZW19/WBK19, and dp-accounting as reference.

dp-accounting is used here only as an independent reference; the library computes its
own curves (dpfa.accountants.rdp_subsampling).
"""

import functools
import math
import time

import mpmath as mp
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from dpfa.accountants import RDPAccountant
from dpfa.accountants.conversion import DEFAULT_ORDERS
from dpfa.accountants.rdp_subsampling import (
    poisson_gaussian_rdp,
    poisson_subsampled_rdp,
    without_replacement_rdp,
)
from dpfa.errors import UnsupportedEventError
from dpfa.mechanisms import DiscreteGaussianMechanism, GaussianMechanism, LaplaceMechanism

NeighborRel = rdp_privacy_accountant.NeighborRel

# (noise multiplier, sampling rate, steps, delta)
CONFIGS = [
    (1.0, 0.01, 1000, 1e-5),   # the reference configuration: dp-accounting gives 2.101
    (2.0, 0.05, 300, 1e-6),
    (0.8, 0.2, 100, 1e-5),
    (1.5, 0.1, 200, 1e-4),
    (0.7, 0.001, 3000, 1e-7),
]


def dpacc_rdp(z, q, steps, delta, event=None, relation=NeighborRel.ADD_OR_REMOVE_ONE):
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    event = event or dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z))
    acc.compose(dp_event.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


@functools.lru_cache(maxsize=None)
def dpacc_pld(z, q, steps, delta, mechanism="gaussian"):
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    inner = dp_event.GaussianDpEvent(z) if mechanism == "gaussian" else dp_event.LaplaceDpEvent(z)
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, inner), steps))
    return acc.get_epsilon(delta)


def ours(z, q, steps, delta, mechanism="gaussian", **kw):
    return RDPAccountant().compose(mechanism, z, q, steps, **kw).get_epsilon(delta)


# ------------------------------------------------------------ MTZ19 and mpmath
def renyi_oracle(q, sigma, alpha, dps=25):
    """(alpha - 1)^-1 log E_{N(0, s^2)}[((1-q) + q e^{(2x-1)/(2 s^2)})^alpha] by mpmath quadrature."""
    mp.mp.dps = dps
    q, s, a = mp.mpf(q), mp.mpf(sigma), mp.mpf(alpha)
    z0 = s * s * mp.log(1 / q - 1) + mp.mpf(1) / 2

    def integrand(x):
        return mp.npdf(x, 0, s) * ((1 - q) + q * mp.exp((2 * x - 1) / (2 * s * s))) ** a

    area = mp.quad(integrand, [-mp.inf, -10 * s, 0, z0, 1, a, 10 * s + a, mp.inf])
    return float(mp.log(area) / (a - 1))


@pytest.mark.parametrize("q, sigma", [(0.01, 1.0), (0.05, 0.6), (0.3, 0.5), (0.5, 4.0), (0.9, 1.0), (0.001, 0.8)])
def test_mtz19_matches_the_renyi_divergence_at_fractional_and_integer_orders(q, sigma):
    orders = [1.01, 1.5, 2.5, 7.3, 8.0]
    got = poisson_gaussian_rdp(q, sigma, orders)
    for a, g in zip(orders, got):
        ref = renyi_oracle(q, sigma, a)
        assert g == pytest.approx(ref, rel=1e-6), a
        assert g >= ref * (1 - 1e-9), a  # an upper bound, up to float rounding


def test_mtz19_limits():
    orders = np.array([1.5, 2.0, 32.0])
    assert np.allclose(poisson_gaussian_rdp(1.0, 2.0, orders), orders / 8.0)
    assert np.all(np.isinf(poisson_gaussian_rdp(0.5, 0.0, orders)))
    # subsampling only helps, and less noise costs more
    assert np.all(poisson_gaussian_rdp(0.1, 1.0, DEFAULT_ORDERS) <= np.array(DEFAULT_ORDERS) / 2.0)
    assert np.all(poisson_gaussian_rdp(0.1, 0.9, DEFAULT_ORDERS) >= poisson_gaussian_rdp(0.1, 1.0, DEFAULT_ORDERS))


def test_zw19_general_bound_is_above_the_exact_gaussian():
    """ZW19 Thm 6 on the Gaussian curve upper-bounds MTZ19's exact value (factor 3 on the tail)."""
    g = GaussianMechanism()
    for q, z in [(0.01, 1.0), (0.2, 0.8), (0.5, 3.0)]:
        exact = poisson_gaussian_rdp(q, z, DEFAULT_ORDERS)
        general = poisson_subsampled_rdp(q, lambda a: g.rdp(a, z, 1.0), DEFAULT_ORDERS)
        assert np.all(general >= exact * (1 - 1e-9))
        # and never above the mechanism without subsampling
        assert np.all(general <= np.array(DEFAULT_ORDERS) / (2 * z**2) * (1 + 1e-12))


# ---------------------------------------------------- against dp-accounting
def test_reference_configuration():
    eps = ours(1.0, 0.01, 1000, 1e-5)
    assert eps == pytest.approx(2.101, abs=0.005)
    assert eps == pytest.approx(dpacc_rdp(1.0, 0.01, 1000, 1e-5), rel=1e-3)


@pytest.mark.parametrize("z, q, steps, delta", CONFIGS)
def test_poisson_gaussian_against_dp_accounting(z, q, steps, delta):
    eps = ours(z, q, steps, delta)
    assert eps == pytest.approx(dpacc_rdp(z, q, steps, delta), rel=0.01)
    assert eps >= dpacc_pld(z, q, steps, delta)  # RDP is an upper bound of the tight value


@pytest.mark.parametrize("z, q, steps, delta", CONFIGS[:3])
def test_poisson_laplace_is_an_upper_bound_of_the_pld(z, q, steps, delta):
    assert dpacc_pld(z, q, steps, delta, "laplace") <= ours(z, q, steps, delta, "laplace") < math.inf


def test_full_batch_laplace_matches_dp_accounting():
    ref = dpacc_rdp(1.5, 1.0, 20, 1e-5, event=dp_event.LaplaceDpEvent(1.5))
    assert ours(1.5, 1.0, 20, 1e-5, "laplace") == pytest.approx(ref, rel=1e-3)


def test_discrete_gaussian_through_the_general_bound():
    """CKS20's curve is the Gaussian's, so ZW19 on it sits above MTZ19 on the Gaussian."""
    dg = ours(1.0, 0.01, 1000, 1e-5, "discrete_gaussian")
    assert ours(1.0, 0.01, 1000, 1e-5) <= dg < 1.5 * ours(1.0, 0.01, 1000, 1e-5)
    # without subsampling the two curves coincide
    assert ours(2.0, 1.0, 10, 1e-5, "discrete_gaussian") == pytest.approx(ours(2.0, 1.0, 10, 1e-5), rel=1e-12)


# --------------------------------------------------- replace-one / WBK19
@pytest.mark.parametrize("z, q, steps, delta", [(1.0, 0.01, 1000, 1e-5), (2.0, 0.05, 300, 1e-6),
                                                 (4.0, 0.5, 50, 1e-3)])
def test_without_replacement_uses_sensitivity_two(z, q, steps, delta):
    """WBK19 on the sensitivity-2 curve.

    dp-accounting's RDP takes the noise multiplier relative to the replace-one
    sensitivity, so its value at z/2 is the matching reference (its Thm-27 refinement is
    at most ours). Dropping the factor 2 would give about its value at z: far below.
    """
    n = 10_000
    event = lambda s: dp_event.SampledWithoutReplacementDpEvent(n, int(round(q * n)), dp_event.GaussianDpEvent(s))
    eps = ours(z, q, steps, delta, sampling="without_replacement")
    ref_half = dpacc_rdp(z, q, steps, delta, event=event(z / 2), relation=NeighborRel.REPLACE_ONE)
    ref_same = dpacc_rdp(z, q, steps, delta, event=event(z), relation=NeighborRel.REPLACE_ONE)
    assert ref_half * (1 - 1e-9) <= eps <= 1.05 * ref_half
    assert eps > 1.5 * ref_same


def test_wbk19_general_curve_bounds():
    lap = LaplaceMechanism()
    orders = np.array([1.5, 2.0, 3.0, 10.5, 64.0])
    base = lambda a: lap.rdp(a, 2.0, 2.0)
    wor = without_replacement_rdp(0.05, base, orders, eps_inf=1.0)
    assert np.all(wor > 0) and np.all(wor <= [base(a) for a in orders])
    # the pure-DP limit can only help
    assert np.all(wor <= without_replacement_rdp(0.05, base, orders) + 1e-15)


def test_full_batch_replace_one_matches_dp_accounting_at_half_the_noise():
    ref = dpacc_rdp(1.0, 1.0, 10, 1e-5, event=dp_event.GaussianDpEvent(0.5))
    assert ours(1.0, 1.0, 10, 1e-5, neighboring="replace_one") == pytest.approx(ref, rel=1e-9)


def test_poisson_replace_one_is_refused_not_treated_as_add_remove():
    with pytest.raises(UnsupportedEventError, match="'pld'"):
        RDPAccountant().compose("gaussian", 1.0, 0.01, 10, neighboring="replace_one")
    with pytest.raises(UnsupportedEventError, match="replace_one"):
        RDPAccountant().compose("gaussian", 1.0, 0.01, 10, sampling="without_replacement",
                                neighboring="add_remove")


# ------------------------------------------------------------------ misc
def test_custom_orders_and_best_order():
    acc = RDPAccountant(orders=[2, 4, 8, 16, 32]).compose("gaussian", 1.0, 0.01, 1000)
    eps, order = acc.get_epsilon_and_order(1e-5)
    assert order in (2, 4, 8, 16, 32)
    assert eps >= ours(1.0, 0.01, 1000, 1e-5)  # fewer orders, looser
    with pytest.raises(ValueError):
        RDPAccountant(orders=[0.5, 2])


def test_thousand_steps_are_fast():
    start = time.perf_counter()
    RDPAccountant().compose("gaussian", 1.0, 0.01, 1000).get_epsilon(1e-5)
    RDPAccountant().compose("laplace", 1.0, 0.01, 1000).get_epsilon(1e-5)
    assert time.perf_counter() - start < 1.0


def test_discrete_gaussian_mechanism_class_is_the_registered_one():
    assert DiscreteGaussianMechanism().has_curve("rdp")
    assert not DiscreteGaussianMechanism().has_curve("pld")
