"""Renyi DP -> (epsilon, delta) conversion.

For a mechanism with RDP curve r(alpha), Balle, Barthe, Gaboardi, Hsu & Sato 2020
("Hypothesis testing interpretations and Renyi differential privacy", Thm 21) give,
for every alpha > 1,

    epsilon(delta) = r(alpha) + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1),

which improves the classic ``r(alpha) + log(1/delta) / (alpha - 1)`` of Mironov 2017.
Solving for delta:

    log delta(epsilon) = (alpha - 1) (r(alpha) - epsilon + log(1 - 1/alpha)) - log alpha.

Both are minimised over the orders at which the curve is known.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

#: Orders used by default: dense near 1 (tight for large epsilon), then integers, then a
#: geometric tail (tight for small noise). The same grid as dp-accounting's RDP accountant
#: plus a few fractional orders below 1.1.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1.0 + x / 100.0 for x in range(1, 10)]
    + [1.0 + x / 10.0 for x in range(1, 100)]
    + list(range(11, 64))
    + [64, 80, 96, 128, 192, 256, 384, 512, 768, 1024]
)


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """Smallest epsilon at ``delta`` over ``orders``; returns (epsilon, best order)."""
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    if a.shape != r.shape or np.any(a <= 1):
        raise ValueError("orders must be > 1 and match rdp in length.")
    if np.any(np.isnan(r)):
        raise ValueError("RDP curve contains NaN.")
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = r + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    eps = np.where(np.isnan(eps), np.inf, eps)
    i = int(np.argmin(eps))
    return max(0.0, float(eps[i])), float(a[i])


def delta_from_rdp(orders: Sequence[float], rdp: Sequence[float], epsilon: float) -> tuple[float, float]:
    """Smallest delta at ``epsilon`` over ``orders``; returns (delta, best order)."""
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    if a.shape != r.shape or np.any(a <= 1):
        raise ValueError("orders must be > 1 and match rdp in length.")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_delta = (a - 1.0) * (r - epsilon + np.log1p(-1.0 / a)) - np.log(a)
    log_delta = np.where(np.isnan(log_delta), np.inf, log_delta)
    i = int(np.argmin(log_delta))
    return float(min(1.0, math.exp(min(0.0, log_delta[i])))), float(a[i])
