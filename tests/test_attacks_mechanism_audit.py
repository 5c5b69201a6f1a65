"""Mechanism audits (dpfa.attacks.audit_mechanism): correct mechanisms stay below their claim, and near it;
broken ones (noise scale halved, sensitivity doubled) are caught, for every built-in type and a user's own.

Every audit is seeded, so each number below is fixed; the sample sizes keep the whole file to a few seconds.
"""

import json
import math

import numpy as np
import pytest
import torch

from dpfa import mechanisms
from dpfa.attacks import AuditResult, audit_mechanism, audit_samples
from dpfa.attacks.mechanism_audit import audits_add_noise
from dpfa.errors import MissingPrivacyCurveError, PrivacyParameterError, ShapeError, UnknownNameError
from dpfa.mechanisms import DiscreteGaussianMechanism, DPMechanism, GaussianMechanism, LaplaceMechanism

EPS, DELTA = 1.0, 1e-5
BUILT_INS = [GaussianMechanism, LaplaceMechanism, DiscreteGaussianMechanism]


def half_scale(base):
    """The bug 'noise scale halved': sample() draws half the noise it is asked for."""

    class HalfScale(base):
        def sample(self, shape, scale, generator=None, device="cpu", dtype=torch.float32):
            return super().sample(shape, scale / 2.0, generator=generator, device=device, dtype=dtype)

    return HalfScale()


def sensitivity_ignored(base):
    """The bug 'sensitivity doubled': calibrate() ignores its sensitivity and calibrates for 1."""

    class SensitivityIgnored(base):
        def calibrate(self, sensitivity, epsilon, delta=0.0):
            return super().calibrate(1.0, epsilon, delta)

    return SensitivityIgnored()


class UserLaplace(DPMechanism):
    """A user's mechanism that defines only add_noise(tensor, sensitivity, epsilon, delta): Lap(Delta / epsilon),
    drawn from torch's global generator through torch.distributions."""

    name = "user_laplace_for_tests"
    sensitivity_norm = "l1"
    factor = 1.0

    def add_noise(self, tensor, sensitivity, epsilon, delta):
        b = self.factor * sensitivity / epsilon
        noise = torch.distributions.Laplace(0.0, b).sample(tensor.shape)
        return tensor + noise.to(tensor.dtype)


class UserLaplaceHalf(UserLaplace):
    factor = 0.5


# ------------------------------------------------------------------- correct mechanisms
@pytest.mark.parametrize("name", ["gaussian", "laplace", "discrete_gaussian"])
def test_correct_mechanism_stays_below_its_claim(name):
    res = audit_mechanism(name, EPS, DELTA, n_samples=400_000, seed=0)
    assert res.passed and res.epsilon_lower_bound <= res.claimed_epsilon == EPS
    # and near it: a bound this far up means the audit really tests the claim
    assert res.epsilon_lower_bound > 0.5 * EPS
    assert res.confidence == 0.95 and res.n_samples == 400_000 and res.details["path"] == "calibrate+sample"


def test_gaussian_audit_is_tight():
    """Gaussian at epsilon 1, delta 1e-5 (sigma = 3.73 by the analytic calibration): bound >= 0.5 at 10^6 samples."""
    res = audit_mechanism("gaussian", 1.0, 1e-5, n_samples=1_000_000, seed=0)
    assert res.scale == pytest.approx(3.7306, abs=1e-3)
    assert 0.5 <= res.epsilon_lower_bound <= 1.0 and res.passed


def test_laplace_pure_dp_is_audited_at_delta_zero():
    res = audit_mechanism("laplace", 0.5, 0.0, sensitivity=3.0, n_samples=400_000, seed=1)
    assert res.scale == pytest.approx(6.0) and res.passed and res.epsilon_lower_bound > 0.4


# ------------------------------------------------------------------- broken mechanisms
@pytest.mark.parametrize("base", BUILT_INS, ids=lambda c: c.name)
def test_halved_noise_scale_is_caught(base):
    res = audit_mechanism(half_scale(base), EPS, DELTA, n_samples=200_000, seed=0)
    assert not res.passed and res.epsilon_lower_bound > 1.1 * EPS


@pytest.mark.parametrize("base", BUILT_INS, ids=lambda c: c.name)
def test_doubled_sensitivity_is_caught(base):
    # The neighbours differ by 2, the mechanism calibrates for 1.
    res = audit_mechanism(sensitivity_ignored(base), EPS, DELTA, sensitivity=2.0, n_samples=200_000, seed=0)
    assert not res.passed and res.epsilon_lower_bound > 1.1 * EPS
    # the same class with the sensitivity it calibrates for is fine: the audit sees the bug, not the class
    assert audit_mechanism(sensitivity_ignored(base), EPS, DELTA, sensitivity=1.0, n_samples=200_000, seed=0).passed


# ------------------------------------------------------------------------ user mechanisms
def test_user_mechanism_with_only_add_noise():
    mech = UserLaplace()
    assert not mech.has_sampler() and audits_add_noise(mech)
    res = audit_mechanism(mech, EPS, DELTA, n_samples=400_000, seed=0)
    assert res.passed and res.details["path"] == "add_noise" and res.scale is None
    assert res.epsilon_lower_bound > 0.9 * EPS
    broken = audit_mechanism(UserLaplaceHalf, EPS, DELTA, n_samples=200_000, seed=0)  # a class works too
    assert not broken.passed and broken.name == "user_laplace_for_tests" and broken.epsilon_lower_bound > 1.5


def test_user_add_noise_audit_is_repeatable_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    np.random.seed(5)
    before_t, before_n = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    a = audit_mechanism(UserLaplace(), EPS, DELTA, n_samples=20_000, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before_t)
    assert np.array_equal(np.random.get_state()[1], before_n)
    b = audit_mechanism(UserLaplace(), EPS, DELTA, n_samples=20_000, seed=3)
    c = audit_mechanism(UserLaplace(), EPS, DELTA, n_samples=20_000, seed=4)
    assert a == b and a.details == b.details and a.epsilon_lower_bound != c.epsilon_lower_bound


def test_a_subclass_overriding_add_noise_is_audited_through_add_noise():
    """A Gaussian whose add_noise halves the noise: auditing the parent's sample() would miss it."""

    class LeakyAddNoise(GaussianMechanism):
        def add_noise(self, tensor, sensitivity, epsilon, delta=0.0, generator=None):
            scale = self.calibrate(sensitivity, epsilon, delta) / 2.0
            return tensor + self.sample(tuple(tensor.shape), scale, generator=generator, dtype=tensor.dtype)

    mech = LeakyAddNoise()
    assert audits_add_noise(mech)
    res = audit_mechanism(mech, EPS, DELTA, n_samples=200_000, seed=0)
    assert not res.passed and res.details["path"] == "add_noise"


def test_which_path_is_audited():
    assert not any(audits_add_noise(c()) for c in BUILT_INS)  # discrete_gaussian defines both in one class
    assert not audits_add_noise(half_scale(GaussianMechanism))
    assert not audits_add_noise(sensitivity_ignored(DiscreteGaussianMechanism))


def test_seeded_audits_repeat():
    a = audit_mechanism("discrete_gaussian", EPS, DELTA, n_samples=50_000, seed=9)
    assert a == audit_mechanism("discrete_gaussian", EPS, DELTA, n_samples=50_000, seed=9)


# ------------------------------------------------------------------------- result object
def test_result_reports_and_serialises():
    res = audit_mechanism("gaussian", EPS, DELTA, n_samples=50_000, seed=0)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["passed"] is True and d["claimed_epsilon"] == 1.0 and d["confidence"] == 0.95
    assert d["details"]["positives"] == 25_000 and d["details"]["direction"] in ("high", "low")
    assert d["tightness"] == pytest.approx(res.epsilon_lower_bound)
    assert "PASS" in str(res) and "gaussian" in str(res)
    bad = audit_mechanism(half_scale(LaplaceMechanism), EPS, DELTA, n_samples=50_000, seed=0)
    assert "FAIL" in str(bad)


def test_audit_samples_on_given_outputs():
    rng = np.random.default_rng(0)
    y0 = rng.laplace(0.0, 1.0, 100_000)
    y1 = 1.0 + rng.laplace(0.0, 1.0, 100_000)
    assert audit_samples(y1, y0, 1.0).passed
    assert not audit_samples(y1, y0, 0.5).passed
    assert audit_samples(y1, y0, math.inf).passed  # no claim (no noise) is never refuted
    assert isinstance(audit_samples(y1, y0, 1.0), AuditResult)


@pytest.mark.parametrize("call, error, needle", [
    (lambda: audit_mechanism("nope", 1.0, 1e-5), UnknownNameError, "known: discrete_gaussian, gaussian, laplace"),
    (lambda: audit_mechanism(object(), 1.0, 1e-5), UnknownNameError, "DPMechanism"),
    (lambda: audit_mechanism("gaussian", 0.0, 1e-5), PrivacyParameterError, "epsilon=0.0"),
    (lambda: audit_mechanism("gaussian", 1.0, 0.0), PrivacyParameterError, "delta=0"),
    (lambda: audit_mechanism("gaussian", 1.0, 1.5), PrivacyParameterError, "delta=1.5"),
    (lambda: audit_mechanism("gaussian", 1.0, 1e-5, sensitivity=-1), PrivacyParameterError, "sensitivity=-1"),
    (lambda: audit_mechanism("discrete_gaussian", 1.0, 1e-5, sensitivity=1.5), PrivacyParameterError,
     "sensitivity=1.5"),
    (lambda: audit_mechanism("gaussian", 1.0, 1e-5, n_samples=2), PrivacyParameterError, "n_samples=2"),
    (lambda: audit_mechanism("gaussian", 1.0, 1e-5, seed=-1), PrivacyParameterError, "seed=-1"),
    (lambda: audit_samples([1.0, 2.0], [0.0, 1.0], float("nan")), PrivacyParameterError, "NaN"),
])
def test_bad_input_names_the_value(call, error, needle):
    with pytest.raises(error) as e:
        call()
    assert needle in str(e.value)


def test_mechanism_without_noise_is_a_clear_error():
    class NoNoise(DPMechanism):
        name = "no_noise_for_tests"

    with pytest.raises(MissingPrivacyCurveError, match="no_noise_for_tests"):
        audit_mechanism(NoNoise(), 1.0, 1e-5, n_samples=100)

    class WrongShape(DPMechanism):
        name = "wrong_shape_for_tests"

        def add_noise(self, tensor, sensitivity, epsilon, delta):
            return tensor.sum()

    with pytest.raises(ShapeError, match=r"WrongShape.add_noise returned Tensor of shape \(\)"):
        audit_mechanism(WrongShape(), 1.0, 1e-5, n_samples=100)


def test_registered_user_mechanism_is_found_by_name(monkeypatch):
    from dpfa.mechanisms import registry

    monkeypatch.setattr(registry, "_REGISTRY", registry.Registry("mechanism", DPMechanism))
    mechanisms.register(UserLaplace)
    res = audit_mechanism("user_laplace_for_tests", EPS, DELTA, n_samples=50_000, seed=0)
    assert res.passed and res.name == "user_laplace_for_tests"
