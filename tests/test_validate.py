"""Input checks name the value and the allowed range; nothing is clamped."""

import math

import pytest

from dpfa import _validate
from dpfa.errors import PrivacyParameterError


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "1", None, True])
def test_epsilon(bad):
    with pytest.raises(PrivacyParameterError, match="epsilon"):
        _validate.epsilon(bad)


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-9, 1.5, math.nan])
def test_delta(bad):
    with pytest.raises(PrivacyParameterError, match=r"delta"):
        _validate.delta(bad)
    assert _validate.delta(0.0, allow_zero=True) == 0.0


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.0001, math.nan])
def test_sample_rate(bad):
    with pytest.raises(PrivacyParameterError, match=r"\(0, 1\]"):
        _validate.sample_rate(bad)
    assert _validate.sample_rate(1) == 1.0


def test_noise_multiplier():
    assert _validate.noise_multiplier(0) == 0.0
    with pytest.raises(PrivacyParameterError, match="-2"):
        _validate.noise_multiplier(-2)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10"])
def test_count(bad):
    with pytest.raises(PrivacyParameterError, match="steps"):
        _validate.count(bad, "steps")
    assert _validate.count(7.0, "steps") == 7


def test_message_names_value():
    with pytest.raises(PrivacyParameterError) as e:
        _validate.delta(1.5)
    assert "delta=1.5" in str(e.value) and "(0, 1)" in str(e.value)
