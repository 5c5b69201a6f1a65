"""White-box audit of the DP-SGD engine (issue 12, item 10; Nasr et al. 2023).

A gradient canary (a Dirac of norm C on one coordinate) through T real full-batch steps of
the PrivacyEngine: the empirical GDP mu of the canary coordinate's updates must match the
accountant's mu = sqrt(T) / sigma within 10%, and a noise multiplier halved in the
optimizer (the accountant still told the original) must be reported as a violation.
"""

import math

import numpy as np
import pytest

from dpfa import accountants
from dpfa.attacks import WhiteBoxAuditResult, accountant_mu, audit_dpsgd_whitebox, empirical_mu
from dpfa.errors import PrivacyParameterError, UnsupportedEventError

SIGMA, STEPS, TRIALS = 2.5, 25, 2000  # mu = sqrt(25) / 2.5 = 2; mu_hat's standard error ~ 0.04


def test_empirical_mu_of_the_engine_matches_the_accountant():
    res = audit_dpsgd_whitebox(SIGMA, STEPS, TRIALS, seed=1)
    assert res.mu_claimed == pytest.approx(math.sqrt(STEPS) / SIGMA, rel=1e-12)
    assert res.within(0.10), res
    assert not res.violation and res.ci_low < res.mu_hat < res.ci_high
    assert res.details["mean_update_in"] == pytest.approx(1.0, abs=0.02)  # the canary's C, minus the noise


def test_halved_noise_in_the_optimizer_is_a_violation():
    def halve(engine, optimizer):
        optimizer.noise_multiplier /= 2  # the bug: the accountant is still told SIGMA

    res = audit_dpsgd_whitebox(SIGMA, STEPS, TRIALS, tamper=halve, seed=2)
    assert res.mu_claimed == pytest.approx(2.0)
    assert res.violation and res.ratio > 1.8, res


def test_secure_mode_engine_passes_the_audit():
    """secure_mode adds a little more noise than the claim needs (the rounding slack), never less."""
    res = audit_dpsgd_whitebox(SIGMA, STEPS, TRIALS, engine_kwargs={"secure_mode": True})
    assert res.details["mechanism"] == "discrete_gaussian" and res.details["accountant"] == "rdp"
    assert res.within(0.10) and not res.violation, res


def test_empirical_mu_and_its_interval():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(200):
        mu, lo, hi = empirical_mu(rng.normal(1.5, 1.0, 400), rng.normal(0.0, 1.0, 400), confidence=0.9)
        covered += lo <= 1.5 <= hi
    assert 0.84 <= covered / 200 <= 0.96
    with pytest.raises(PrivacyParameterError, match="confidence"):
        empirical_mu([0, 1], [0, 1], confidence=1.0)


def test_accountant_mu_reads_the_ledger():
    acc = accountants.create("rdp").compose("gaussian", 2.0, 1.0, 9).compose("discrete_gaussian", 3.0, 1.0, 9)
    assert accountant_mu(acc) == pytest.approx(math.sqrt(9 / 4 + 9 / 9))
    with pytest.raises(UnsupportedEventError, match="full-batch"):
        accountant_mu(accountants.create("rdp").compose("gaussian", 1.0, 0.1, 3))
    r = WhiteBoxAuditResult(mu_hat=2.2, ci_low=2.1, ci_high=2.3, mu_claimed=2.0, steps=1, trials=2, confidence=0.95)
    assert r.violation and r.ratio == pytest.approx(1.1) and r.within(0.11) and not r.within(0.09)
