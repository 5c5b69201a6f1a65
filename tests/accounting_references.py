"""Independent references for the accountant tests: dp-accounting's own PLDAccountant on
dp_events, prv-accountant's own PRVAccountant, and the closed form of mu-GDP.

Events are tuples ((mechanism, noise multiplier, sampling rate, steps), ...).
"""

import functools
import math

import prv_accountant
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation
from scipy import optimize, special

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
    """(lower, estimate, upper) of prv-accountant's epsilon."""
    acc, steps = prv_reference(events, delta)
    return acc.compute_epsilon(delta, steps)


def prv_reference_delta(events, delta, epsilon):
    """(lower, estimate, upper) of prv-accountant's delta."""
    acc, steps = prv_reference(events, delta)
    return acc.compute_delta(epsilon, steps)


def gdp_delta(mu, eps):
    """Exact delta(eps) of mu-GDP: Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    return special.ndtr(-eps / mu + mu / 2) - math.exp(eps + special.log_ndtr(-eps / mu - mu / 2))


def gdp_epsilon(mu, delta):
    return optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, 100.0 + 10 * mu * mu, xtol=1e-13, rtol=1e-13)


def single(mechanism, z, q, steps):
    return ((mechanism, z, q, steps),)
