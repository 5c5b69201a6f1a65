"""One place for checks of user input; each message names the value and the allowed range."""

from __future__ import annotations

import math
import numbers
from typing import Iterable

from dpfa.errors import PrivacyParameterError


def _real(name: str, value, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PrivacyParameterError(f"Expected {name} to be a real number in {allowed}, got {value!r}.")
    value = float(value)
    if math.isnan(value):
        raise PrivacyParameterError(f"Expected {name} to be a number in {allowed}, got NaN.")
    return value


def epsilon(value, name: str = "epsilon") -> float:
    """epsilon in (0, inf)."""
    v = _real(name, value, "(0, inf)")
    if not (0.0 < v < math.inf):
        raise PrivacyParameterError(f"Expected {name}={value!r} in (0, inf).")
    return v


def delta(value, name: str = "delta", allow_zero: bool = False) -> float:
    """delta in (0, 1), or [0, 1) when ``allow_zero``."""
    rng = "[0, 1)" if allow_zero else "(0, 1)"
    v = _real(name, value, rng)
    ok = (0.0 <= v < 1.0) if allow_zero else (0.0 < v < 1.0)
    if not ok:
        raise PrivacyParameterError(f"Expected {name}={value!r} in {rng}.")
    return v


def sample_rate(value, name: str = "sample_rate") -> float:
    """sampling rate q in (0, 1]."""
    v = _real(name, value, "(0, 1]")
    if not (0.0 < v <= 1.0):
        raise PrivacyParameterError(f"Expected {name}={value!r} in (0, 1].")
    return v


def noise_multiplier(value, name: str = "noise_multiplier") -> float:
    """noise multiplier in [0, inf); 0 means no noise (epsilon = inf)."""
    v = _real(name, value, "[0, inf)")
    if not (0.0 <= v < math.inf):
        raise PrivacyParameterError(f"Expected {name}={value!r} in [0, inf) (0 means no noise).")
    return v


def positive(value, name: str) -> float:
    """a finite real number > 0."""
    v = _real(name, value, "(0, inf)")
    if not (0.0 < v < math.inf):
        raise PrivacyParameterError(f"Expected {name}={value!r} in (0, inf).")
    return v


def count(value, name: str = "steps", minimum: int = 1) -> int:
    """an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise PrivacyParameterError(f"Expected {name} to be an integer >= {minimum}, got {value!r}.")
    if value < minimum:
        raise PrivacyParameterError(f"Expected {name}={value!r} to be an integer >= {minimum}.")
    return int(value)


def choice(value, name: str, allowed: Iterable[str]) -> str:
    """one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise PrivacyParameterError(f"Unknown {name}={value!r}; expected one of {', '.join(map(repr, allowed))}.")
    return value
