"""Noise calibration: the smallest noise multiplier that meets a target (epsilon, delta)."""

from __future__ import annotations

from typing import Optional

from dpfa import _validate
from dpfa.accountants.events import normalize_sampling
from dpfa.accountants.registry import get as get_accountant
from dpfa.errors import PrivacyParameterError


def epsilon_for(noise_multiplier: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv",
                mechanism="gaussian", sampling: str = "poisson", dataset_size: Optional[int] = None,
                neighboring: Optional[str] = None) -> float:
    """epsilon at ``delta`` of ``steps`` releases with this noise multiplier and sampling.

    ``neighboring``: "add_remove" or "replace_one"; None picks the one that matches ``sampling``
    (as :meth:`Accountant.compose` does).
    """
    acc = get_accountant(accountant)()
    acc.compose(mechanism, noise_multiplier, sample_rate, steps, sampling=sampling, neighboring=neighboring,
                dataset_size=dataset_size)
    return acc.get_epsilon(delta)


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "prv", mechanism="gaussian", sampling: str = "poisson",
                         dataset_size: Optional[int] = None, rel_tol: float = 1e-3,
                         neighboring: Optional[str] = None) -> float:
    """Smallest noise multiplier z (to ``rel_tol``) with epsilon(z) <= target_epsilon, by bisection.

    epsilon is decreasing in z, so the bisection keeps an upper end that always meets the
    target: the returned z never overshoots the budget.
    """
    target_epsilon = _validate.epsilon(target_epsilon, "target_epsilon")
    delta = _validate.delta(delta)
    sample_rate = _validate.sample_rate(sample_rate)
    steps = _validate.count(steps, "steps")
    sampling = normalize_sampling(sampling)
    if not (0.0 < _validate.positive(rel_tol, "rel_tol") < 1.0):
        raise PrivacyParameterError(f"Expected rel_tol={rel_tol!r} in (0, 1).")

    def eps(z: float) -> float:
        return epsilon_for(z, delta, sample_rate, steps, accountant, mechanism, sampling, dataset_size, neighboring)

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e6:
            raise PrivacyParameterError(
                f"No noise multiplier up to {hi:g} reaches target_epsilon={target_epsilon!r} at delta={delta!r}."
            )
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
