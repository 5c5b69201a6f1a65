"""Pinned reference values of other libraries, and what dpfa gives at the same settings.

Each reference is checked twice: the library that produced it must still produce it (so a
changed dependency shows up here), and dpfa must match it -- or, where dpfa differs, the
test pins the reason with an independent oracle instead of widening a tolerance.

1. dp-accounting's RDP of the Poisson-subsampled Gaussian, q 0.01, sigma 2.5, 50 steps.
   dpfa agrees to rtol 1e-4 at orders 2.5, 5, 50, 100. At order 1.5 dp-accounting is 3.2%
   ABOVE the exact value: its fractional-order series (``_compute_log_a_frac``) adds the
   absolute values of the terms of MTZ19's alternating binomial series with ``_log_add``,
   an upper bound; dpfa sums the signed series with a remainder bound, and a 50-digit
   quadrature of the Renyi divergence agrees with dpfa to 1e-9.
2. sigma 1.5, q 0.04, 2250 steps (90 epochs), delta 1e-5: 7.329 is Opacus' RDP accountant
   (``accountants_test.py::test_rdp_accountant``: 7.32911117143), i.e. the conversion of
   Balle et al. 2020 at order 3.9 -- the one dpfa uses (the classic log(1/delta)/(alpha-1)
   of Mironov 2017 gives 8.07). 6.777 is Opacus' PRV accountant (6.777395712150674): the
   upper end of the error interval with an ABSOLUTE eps_error of 0.01. dpfa's 'prv' reports
   the upper end with eps_error = 0.25% of epsilon (0.0169 here), so by default it is
   0.0069 higher (6.786); with eps_error_rel = 0.01 / 6.777 it reproduces 6.777.
"""

import math

import mpmath as mp
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from dpfa.accountants import PLDAccountant, PRVAccountant, RDPAccountant
from dpfa.accountants.prv import EPS_ERROR_REL
from dpfa.accountants.rdp_subsampling import poisson_gaussian_rdp

# ------------------------------------------------------------------ 1. RDP curve
ORDERS = [1.5, 2.5, 5.0, 50.0, 100.0]
DP_ACCOUNTING_RDP = [6.7058e-4, 1.0855e-3, 2.1808e-3, 2.3846e-2, 167.416]  # q 0.01, sigma 2.5, 50 steps
Q1, SIGMA1, STEPS1 = 0.01, 2.5, 50


def exact_rdp(q, sigma, alpha, dps=50):
    """(alpha - 1)^-1 log E_{N(0, s^2)}[((1-q) + q e^{(2x-1)/(2 s^2)})^alpha], 50-digit quadrature."""
    with mp.workdps(dps):
        q, s, a = mp.mpf(q), mp.mpf(sigma), mp.mpf(alpha)

        def integrand(x):
            return mp.npdf(x, 0, s) * ((1 - q) + q * mp.exp((2 * x - 1) / (2 * s * s))) ** a

        area = mp.quad(integrand, mp.linspace(-30 * s, 30 * s + a, 61))
        return float(mp.log(area) / (a - 1))


def test_dp_accounting_still_gives_the_pinned_rdp_curve():
    acc = rdp_privacy_accountant.RdpAccountant(orders=ORDERS)
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(Q1, dp_event.GaussianDpEvent(SIGMA1)),
                                             STEPS1))
    np.testing.assert_allclose(acc._rdp, DP_ACCOUNTING_RDP, rtol=1e-4)


@pytest.mark.parametrize("i", [1, 2, 3, 4])
def test_dpfa_rdp_curve_matches_dp_accounting(i):
    ours = STEPS1 * poisson_gaussian_rdp(Q1, SIGMA1, [ORDERS[i]])[0]
    assert ours == pytest.approx(DP_ACCOUNTING_RDP[i], rel=1e-4)
    # the accountant composes the same curve
    acc = RDPAccountant(orders=ORDERS).compose("gaussian", SIGMA1, Q1, STEPS1)
    assert acc.rdp()[i] == pytest.approx(ours, rel=1e-12)


def test_at_order_1_5_dpfa_is_exact_and_dp_accounting_is_3_percent_above():
    ours = STEPS1 * poisson_gaussian_rdp(Q1, SIGMA1, [1.5])[0]
    exact = STEPS1 * exact_rdp(Q1, SIGMA1, 1.5)
    assert exact == pytest.approx(6.50071e-4, rel=1e-5)
    assert ours == pytest.approx(exact, rel=1e-8)
    assert ours >= exact * (1 - 1e-12)  # an upper bound, up to rounding
    # dp-accounting's value is a valid but loose upper bound here: 3.2% above the exact one
    assert DP_ACCOUNTING_RDP[0] / exact == pytest.approx(1.0316, abs=5e-4)
    # where dp-accounting's series has no sign problem (integer orders) the exact value is its value
    assert STEPS1 * exact_rdp(Q1, SIGMA1, 5.0) == pytest.approx(DP_ACCOUNTING_RDP[2], rel=1e-4)


# ------------------------------------------------------------- 2. RDP and PRV epsilon
Z2, Q2, STEPS2, DELTA2 = 1.5, 0.04, 2250, 1e-5
OPACUS_RDP = 7.32911117143        # opacus tests/accountants_test.py::test_rdp_accountant
OPACUS_PRV = 6.777395712150674    # opacus tests/accountants_test.py::test_prv_accountant
OPACUS_PRV_EPS_ERROR = 0.01       # opacus PRVAccountant.get_epsilon(eps_error=0.01), returns eps_upper


def test_rdp_epsilon_is_opacus_value_with_the_balle_et_al_conversion():
    acc = RDPAccountant().compose("gaussian", Z2, Q2, STEPS2)
    eps, order = acc.get_epsilon_and_order(DELTA2)
    assert eps == pytest.approx(7.329, rel=1e-3)
    assert eps == pytest.approx(OPACUS_RDP, rel=1e-9)  # same curve, same conversion, same best order
    assert order == 3.9
    # which conversion gives 7.329: Balle et al. 2020, Thm 21; Mironov 2017 gives 8.07 on the same curve
    orders, rdp = acc.orders, acc.rdp()
    balle = rdp + np.log1p(-1 / orders) - (math.log(DELTA2) + np.log(orders)) / (orders - 1)
    mironov = rdp + math.log(1 / DELTA2) / (orders - 1)
    assert balle.min() == pytest.approx(OPACUS_RDP, rel=1e-9)
    assert mironov.min() == pytest.approx(8.0738, rel=1e-4)


def test_prv_epsilon_with_opacus_error_parameter_is_opacus_value():
    acc = PRVAccountant(eps_error_rel=OPACUS_PRV_EPS_ERROR / 6.777).compose("gaussian", Z2, Q2, STEPS2)
    assert acc.get_epsilon(DELTA2) == pytest.approx(6.777, rel=1e-3)


def test_prv_epsilon_by_default_is_opacus_value_plus_the_wider_error_interval():
    """dpfa's default eps_error (0.25% of epsilon, 0.0169 here) is 0.0069 wider than Opacus' 0.01."""
    eps = PRVAccountant().compose("gaussian", Z2, Q2, STEPS2).get_epsilon(DELTA2)
    extra = EPS_ERROR_REL * OPACUS_PRV - OPACUS_PRV_EPS_ERROR
    assert eps == pytest.approx(OPACUS_PRV + extra, rel=1e-3)
    assert eps > 6.777  # dpfa is more conservative, never below the reference
    # the tight value (PLD, pessimistic) is below both upper ends, and within both error bars
    tight = PLDAccountant().compose("gaussian", Z2, Q2, STEPS2).get_epsilon(DELTA2)
    assert OPACUS_PRV - 2 * OPACUS_PRV_EPS_ERROR < tight < OPACUS_PRV < eps
    assert eps - tight < 2 * EPS_ERROR_REL * tight
