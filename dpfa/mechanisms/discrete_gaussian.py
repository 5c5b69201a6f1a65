"""Discrete Gaussian mechanism (placeholder; the mechanisms work replaces this file)."""

from __future__ import annotations

import math

from dpfa.mechanisms.base import DPMechanism


class DiscreteGaussianMechanism(DPMechanism):
    """Integer noise N_Z(0, sigma^2); sensitivity in L2 on the integer grid; scale = sigma."""

    name = "discrete_gaussian"
    sensitivity_norm = "l2_grid"

    def rdp(self, alpha: float, scale: float, sensitivity: float = 1.0) -> float:
        """alpha Delta^2 / (2 sigma^2) (Canonne, Kamath & Steinke 2020, Thm 14)."""
        if scale == 0:
            return math.inf
        return alpha * sensitivity**2 / (2.0 * scale**2)
