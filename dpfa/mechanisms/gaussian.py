"""The Gaussian mechanism: x + N(0, sigma^2 I) for x with L2 sensitivity Delta.

Privacy curve: Renyi DP of order alpha is alpha Delta^2 / (2 sigma^2) (Mironov 2017,
Prop. 7); the exact (epsilon, delta) profile is that of the analytic Gaussian
mechanism (Balle & Wang 2018, Thm 8):

    delta(epsilon) = Phi(Delta / (2 sigma) - epsilon sigma / Delta)
                     - e^epsilon Phi(-Delta / (2 sigma) - epsilon sigma / Delta),

which ``calibrate`` inverts for sigma (tighter than the classic
sigma = Delta sqrt(2 ln(1.25/delta)) / epsilon, which is also only valid for epsilon < 1).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from scipy import optimize, special

from dpfa import _validate
from dpfa.errors import PrivacyParameterError
from dpfa.mechanisms.base import DPMechanism, bisect_scale
from dpfa.mechanisms.device_samplers import gaussian_sampler


def analytic_gaussian_delta(sigma: float, sensitivity: float, epsilon: float) -> float:
    """delta(epsilon) of the Gaussian mechanism with std ``sigma`` (Balle & Wang 2018, Thm 8)."""
    if sigma == 0:
        return 1.0
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    # Phi(a - b) - exp(eps) Phi(-a - b), the second term in log space to avoid overflow.
    first = special.ndtr(a - b)
    second = math.exp(min(epsilon + special.log_ndtr(-a - b), 700.0))
    return float(max(0.0, first - second))


def analytic_gaussian_epsilon(sigma: float, sensitivity: float, delta: float) -> float:
    """Smallest epsilon >= 0 with delta(epsilon) <= ``delta`` for the Gaussian mechanism."""
    if sigma == 0:
        return math.inf
    if analytic_gaussian_delta(sigma, sensitivity, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while analytic_gaussian_delta(sigma, sensitivity, hi) > delta:
        hi *= 2.0
    # delta(eps) is decreasing; return the upper end of the bracket (errs on the private side).
    root = optimize.brentq(lambda e: analytic_gaussian_delta(sigma, sensitivity, e) - delta, 0.0, hi,
                           xtol=1e-12, rtol=1e-10)
    return float(root * (1 + 1e-9))


class GaussianMechanism(DPMechanism):
    """Additive N(0, sigma^2) noise; sensitivity in L2; scale = sigma."""

    name = "gaussian"
    sensitivity_norm = "l2"
    triton_sampler = gaussian_sampler

    def sample(self, shape: Sequence[int], scale: float, generator: Optional[torch.Generator] = None,
               device: Any = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = _validate.noise_multiplier(scale, "scale")
        work = torch.float64 if dtype == torch.float64 else torch.float32
        z = torch.randn(tuple(shape), generator=generator, device=device, dtype=work)
        return (z * scale).to(dtype)

    def rdp(self, alpha: float, scale: float, sensitivity: float = 1.0) -> float:
        """alpha Delta^2 / (2 sigma^2) (Mironov 2017, Prop. 7)."""
        if scale == 0:
            return math.inf
        return alpha * sensitivity**2 / (2.0 * scale**2)

    def epsilon(self, scale: float, sensitivity: float, delta: float) -> float:
        return analytic_gaussian_epsilon(scale, sensitivity, delta)

    def pld(self, noise_multiplier: float, sampling_prob: float = 1.0, neighboring: str = "add_remove",
            value_discretization_interval: float = 1e-4):
        """dp-accounting PLD (pessimistic, connect-the-dots) of one Poisson-subsampled release.

        add_remove: the pairs (1-q) N(0, z^2) + q N(1, z^2) vs N(0, z^2) (remove) and its
        converse (add), both kept (Zhu, Dong & Wang 2022; Doroshenko et al. 2022).
        replace_one: dp-accounting's REPLACE_ONE pair, (1-q) N(0, z^2) + q N(-1, z^2) vs
        (1-q) N(0, z^2) + q N(1, z^2): replacing one example moves the sum by up to 2 C,
        so with q = 1 it is the Gaussian of sensitivity 2.
        """
        from dp_accounting.pld import privacy_loss_distribution as pld_lib
        from dp_accounting.privacy_accountant import NeighboringRelation

        relation = {"add_remove": NeighboringRelation.ADD_OR_REMOVE_ONE,
                    "replace_one": NeighboringRelation.REPLACE_ONE}[_validate.choice(
                        neighboring, "neighboring", ("add_remove", "replace_one"))]
        return pld_lib.from_gaussian_mechanism(
            standard_deviation=_validate.positive(noise_multiplier, "noise_multiplier"),
            sensitivity=1.0,
            sampling_prob=_validate.sample_rate(sampling_prob, "sampling_prob"),
            neighboring_relation=relation,
            value_discretization_interval=_validate.positive(value_discretization_interval,
                                                             "value_discretization_interval"),
            pessimistic_estimate=True,
        )

    def prv(self, noise_multiplier: float, sampling_prob: float = 1.0, neighboring: str = "add_remove",
            direction: str = "remove"):
        """prv-accountant PrivacyRandomVariable of one Poisson-subsampled release.

        q = 1: ``GaussianMechanism`` of sensitivity 1 (add_remove) or 2 (replace_one); both
        directions coincide. q < 1, add_remove: direction "remove" is prv-accountant's
        ``PoissonSubsampledGaussianMechanism``, the pair (1-q) N(0, z^2) + q N(1, z^2) vs
        N(0, z^2) (as :class:`dpfa.accountants.prv.PoissonSubsampledGaussianPRV`, with a
        faster RDP for sizing its domain); direction "add" is the converse pair
        (:class:`dpfa.accountants.prv.PoissonSubsampledGaussianAddPRV`). q < 1 with
        replace_one is not provided (UnsupportedEventError): use the 'pld' accountant.
        """
        import prv_accountant

        from dpfa.accountants.prv import PoissonSubsampledGaussianAddPRV, PoissonSubsampledGaussianPRV
        from dpfa.errors import UnsupportedEventError

        z = _validate.positive(noise_multiplier, "noise_multiplier")
        q = _validate.sample_rate(sampling_prob, "sampling_prob")
        _validate.choice(neighboring, "neighboring", ("add_remove", "replace_one"))
        _validate.choice(direction, "direction", ("remove", "add"))
        if q == 1.0:
            return prv_accountant.GaussianMechanism(noise_multiplier=z,
                                                    l2_sensitivity=2.0 if neighboring == "replace_one" else 1.0)
        if neighboring == "replace_one":
            raise UnsupportedEventError(
                f"No privacy random variable for the Poisson-subsampled Gaussian (sampling_prob={q!r}) under "
                "neighboring='replace_one'; use accountant='pld', which supports it."
            )
        if direction == "remove":
            return PoissonSubsampledGaussianPRV(sampling_probability=q, noise_multiplier=z)
        return PoissonSubsampledGaussianAddPRV(sampling_probability=q, noise_multiplier=z)

    def calibrate(self, sensitivity: float, epsilon: float, delta: float) -> float:
        """Smallest sigma with delta(epsilon) <= delta (analytic Gaussian mechanism)."""
        sensitivity = _validate.positive(sensitivity, "sensitivity")
        epsilon = _validate.epsilon(epsilon)
        delta = _validate.delta(delta, allow_zero=True)
        if delta == 0.0:
            raise PrivacyParameterError(
                "The Gaussian mechanism needs delta in (0, 1); got delta=0 (use mechanism='laplace' for pure DP)."
            )
        return bisect_scale(lambda s: analytic_gaussian_delta(s, sensitivity, epsilon) <= delta, sensitivity,
                            rel_tol=1e-10)
