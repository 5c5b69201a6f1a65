"""The audit of the DP attention release: tight on dpfa, and it catches a planted wrong
sensitivity, an unenforced score cap or value clip, and a wrong calibration."""

import pytest

import dpfa.attention as attention
import dpfa.kernels.flash_attention_reference as reference
from dpfa.attacks import audit_attention_release
from dpfa.mechanisms import GaussianMechanism


@pytest.mark.parametrize("mechanism, least", [("gaussian", 0.55), ("laplace", 0.9), ("discrete_gaussian", 0.45)])
def test_release_audit_is_below_the_claim_and_near_it(mechanism, least):
    res = audit_attention_release(mechanism, epsilon=1.0, delta=1e-5, n_samples=400_000, seed=0)
    assert res.passed and least < res.epsilon_lower_bound <= res.claimed_epsilon == 1.0
    # the pair moves the output by exactly the sensitivity the release claims (up to its fp slack)
    assert res.details["measured_shift"] == pytest.approx(res.details["sensitivity"], rel=1e-4)
    assert res.details["measured_shift"] <= res.details["sensitivity"]
    assert res.delta == (0.0 if mechanism == "laplace" else 1e-5)


def test_a_sensitivity_bound_too_small_is_caught(monkeypatch):
    real = attention.row_sensitivity
    monkeypatch.setattr(attention, "row_sensitivity", lambda *a, **k: 0.5 * real(*a, **k))
    res = audit_attention_release("gaussian", n_samples=200_000)
    assert not res.passed and res.epsilon_lower_bound > 1.2


@pytest.mark.parametrize("hook", ["cap_scores", "clip_value_rows"])
def test_an_unenforced_cap_or_clip_is_caught(monkeypatch, hook):
    monkeypatch.setattr(reference, hook, lambda x, *a, **k: x)
    res = audit_attention_release("laplace", n_samples=200_000)
    assert not res.passed and res.details["measured_shift"] > 1.3 * res.details["sensitivity"]


def test_a_wrong_calibration_is_caught(monkeypatch):
    right = GaussianMechanism.calibrate
    monkeypatch.setattr(GaussianMechanism, "calibrate", lambda self, s, e, d: 0.7 * right(self, s, e, d))
    res = audit_attention_release("gaussian", n_samples=400_000)
    assert not res.passed
