"""The Laplace mechanism: x + Lap(b)^d for x with L1 sensitivity Delta.

Pure DP: epsilon_0 = Delta / b (Dwork et al. 2006). Its exact (epsilon, delta)
profile is delta(epsilon) = 1 - exp((epsilon - epsilon_0) / 2) for epsilon < epsilon_0
(integrate the privacy loss of Lap(0, b) against Lap(Delta, b)), so the smallest b
for a target (epsilon, delta) is Delta / (epsilon - 2 log(1 - delta)).
Renyi DP (Mironov 2017, Prop. 6), lambda = b / Delta:

    (1 / (alpha - 1)) log( alpha/(2 alpha - 1) e^{(alpha-1)/lambda}
                           + (alpha-1)/(2 alpha - 1) e^{-alpha/lambda} ).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from dpfa import _validate
from dpfa.mechanisms.base import DPMechanism
from dpfa.mechanisms.device_samplers import laplace_sampler


class LaplaceMechanism(DPMechanism):
    """Additive Lap(b) noise; sensitivity in L1; scale = b (std = sqrt(2) b)."""

    name = "laplace"
    sensitivity_norm = "l1"
    triton_sampler = laplace_sampler

    def sample(self, shape: Sequence[int], scale: float, generator: Optional[torch.Generator] = None,
               device: Any = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = _validate.noise_multiplier(scale, "scale")
        work = torch.float64 if dtype == torch.float64 else torch.float32
        # Lap(b) = b (E1 - E2) with E1, E2 ~ Exp(1) independent: no log(0) at the ends of (0, 1).
        e1 = torch.empty(tuple(shape), device=device, dtype=work).exponential_(generator=generator)
        e2 = torch.empty(tuple(shape), device=device, dtype=work).exponential_(generator=generator)
        return ((e1 - e2) * scale).to(dtype)

    def rdp(self, alpha: float, scale: float, sensitivity: float = 1.0) -> float:
        if scale == 0:
            return math.inf
        inv_lam = sensitivity / scale
        if math.isinf(alpha):
            return inv_lam
        if alpha == 1.0:  # KL divergence, the limit alpha -> 1
            return inv_lam + math.exp(-inv_lam) - 1.0
        log_terms = np.logaddexp(
            math.log(alpha / (2 * alpha - 1)) + (alpha - 1) * inv_lam,
            math.log((alpha - 1) / (2 * alpha - 1)) - alpha * inv_lam,
        )
        return float(log_terms / (alpha - 1))

    def epsilon(self, scale: float, sensitivity: float, delta: float) -> float:
        if scale == 0:
            return math.inf
        return max(0.0, sensitivity / scale + 2.0 * math.log1p(-delta))

    def pld(self, noise_multiplier: float, sampling_prob: float = 1.0, neighboring: str = "add_remove",
            value_discretization_interval: float = 1e-4):
        """dp-accounting PLD (pessimistic) of one Poisson-subsampled Laplace release.

        add_remove: ``from_laplace_mechanism(parameter=z, sensitivity=1, sampling_prob=q)``
        (remove and add pairs both kept). replace_one moves the sum by up to 2 C: with
        q = 1 it is the Laplace mechanism of sensitivity 2; q < 1 is not supported by
        dp-accounting for the Laplace (UnsupportedEventError).
        """
        from dp_accounting.pld import privacy_loss_distribution as pld_lib

        from dpfa.errors import UnsupportedEventError

        z = _validate.positive(noise_multiplier, "noise_multiplier")
        q = _validate.sample_rate(sampling_prob, "sampling_prob")
        _validate.choice(neighboring, "neighboring", ("add_remove", "replace_one"))
        if neighboring == "replace_one" and q < 1.0:
            raise UnsupportedEventError(
                f"No privacy loss distribution for the Poisson-subsampled Laplace (sampling_prob={q!r}) under "
                "neighboring='replace_one'; supported: add_remove, or replace_one with sampling_prob=1."
            )
        return pld_lib.from_laplace_mechanism(
            parameter=z,
            sensitivity=2.0 if neighboring == "replace_one" else 1.0,
            sampling_prob=q,
            value_discretization_interval=_validate.positive(value_discretization_interval,
                                                             "value_discretization_interval"),
            pessimistic_estimate=True,
        )

    def prv(self, noise_multiplier: float, sampling_prob: float = 1.0, neighboring: str = "add_remove",
            direction: str = "remove"):
        """prv-accountant PrivacyRandomVariable of one Poisson-subsampled Laplace release.

        q = 1: ``LaplaceMechanism(mu = Delta / b)`` with Delta = 1 (add_remove) or 2
        (replace_one). q < 1, add_remove: :class:`dpfa.accountants.prv.
        PoissonSubsampledLaplacePRV` in the given direction (closed-form cdf of the
        privacy loss of the mixture). q < 1 with replace_one: UnsupportedEventError.
        """
        import prv_accountant

        from dpfa.accountants.prv import PoissonSubsampledLaplacePRV
        from dpfa.errors import UnsupportedEventError

        z = _validate.positive(noise_multiplier, "noise_multiplier")
        q = _validate.sample_rate(sampling_prob, "sampling_prob")
        _validate.choice(neighboring, "neighboring", ("add_remove", "replace_one"))
        _validate.choice(direction, "direction", ("remove", "add"))
        if q == 1.0:
            return prv_accountant.LaplaceMechanism(mu=(2.0 if neighboring == "replace_one" else 1.0) / z)
        if neighboring == "replace_one":
            raise UnsupportedEventError(
                f"No privacy random variable for the Poisson-subsampled Laplace (sampling_prob={q!r}) under "
                "neighboring='replace_one'; supported: add_remove, or replace_one with sampling_prob=1."
            )
        return PoissonSubsampledLaplacePRV(sampling_probability=q, noise_multiplier=z, direction=direction)

    def calibrate(self, sensitivity: float, epsilon: float, delta: float = 0.0) -> float:
        """b = Delta / (epsilon - 2 log(1 - delta)); delta = 0 gives the pure-DP b = Delta / epsilon."""
        sensitivity = _validate.positive(sensitivity, "sensitivity")
        epsilon = _validate.epsilon(epsilon)
        delta = _validate.delta(delta, allow_zero=True)
        return sensitivity / (epsilon - 2.0 * math.log1p(-delta))
