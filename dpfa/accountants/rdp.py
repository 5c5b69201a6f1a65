"""The Renyi-DP accountant (our own implementation; dp-accounting serves only as a test oracle).

Each event contributes ``count`` times the RDP curve of one release at a fixed set of
orders (RDP composes by addition, Mironov 2017, Prop. 1); the total is converted to
(epsilon, delta) with the bound of Balle et al. 2020 (:mod:`dpfa.accountants.conversion`).
The curve of one release, by sampling scheme and neighbouring relation:

=========================  ===========  ============================================
sampling                   neighboring  RDP of one release
=========================  ===========  ============================================
any, ``sample_rate`` = 1   add_remove   ``rdp(alpha, z, sensitivity=1)``
any, ``sample_rate`` = 1   replace_one  ``rdp(alpha, z, sensitivity=2)``
poisson                    add_remove   Gaussian: Mironov, Talwar & Zhang 2019 (exact,
                                        integer and fractional orders); any other
                                        curve: Zhu & Wang 2019, Thm 6
without_replacement        replace_one  Wang, Balle & Kasiviswanathan 2019, Thm 9 on
                                        the curve of sensitivity 2
poisson                    replace_one  refused (UnsupportedEventError)
without_replacement        add_remove   refused (UnsupportedEventError)
=========================  ===========  ============================================

Replace-one doubles the sensitivity: with noise z C on a sum of terms clipped to C,
replacing one example moves the sum by up to 2 C (dp-accounting issue 378 came from
forgetting this). Poisson sampling under replace-one has no RDP bound here: use
``accountant='pld'`` (Gaussian) or the add/remove relation.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from dpfa.accountants.base import Accountant
from dpfa.accountants.conversion import DEFAULT_ORDERS, delta_from_rdp, epsilon_from_rdp
from dpfa.accountants.events import SampledMechanismEvent
from dpfa.accountants.rdp_subsampling import (
    poisson_gaussian_rdp,
    poisson_subsampled_rdp,
    without_replacement_rdp,
)
from dpfa.errors import MissingPrivacyCurveError, PrivacyParameterError, UnsupportedEventError
from dpfa.mechanisms.gaussian import GaussianMechanism

#: L2/L1 change of a sum of clipped terms, in units of the clipping bound C, per relation
RELATION_SENSITIVITY = {"add_remove": 1.0, "replace_one": 2.0}

SUPPORTED = ("sample_rate=1 with either relation, sampling='poisson' with neighboring='add_remove', "
             "sampling='without_replacement' with neighboring='replace_one'")


class RDPAccountant(Accountant):
    """Renyi-DP accountant over the orders ``orders`` (default: :data:`DEFAULT_ORDERS`)."""

    name = "rdp"

    def __init__(self, orders: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        orders = DEFAULT_ORDERS if orders is None else tuple(float(a) for a in orders)
        if not orders or any(not (a > 1) for a in orders):
            raise PrivacyParameterError(f"Expected RDP orders > 1, got {orders!r}.")
        self.orders = np.asarray(orders, dtype=np.float64)
        self._curves: dict[SampledMechanismEvent, np.ndarray] = {}

    # ------------------------------------------------------------------ checks
    def _check_event(self, event: SampledMechanismEvent) -> None:
        mechanism = self.mechanism_of(event)
        if not mechanism.has_curve("rdp"):
            raise MissingPrivacyCurveError(
                f"Mechanism {event.mechanism!r} has no RDP curve, so the 'rdp' accountant cannot account it; "
                "define rdp(alpha, scale, sensitivity) on the mechanism."
            )
        if event.sample_rate == 1.0:
            return
        if event.sampling == "poisson" and event.neighboring == "replace_one":
            raise UnsupportedEventError(
                f"The 'rdp' accountant has no bound for sampling='poisson' with neighboring='replace_one' "
                f"(sample_rate={event.sample_rate!r}); supported: {SUPPORTED}. For the Gaussian use "
                "accountant='pld', which handles Poisson sampling under replace-one."
            )
        if event.sampling == "without_replacement" and event.neighboring == "add_remove":
            raise UnsupportedEventError(
                f"The 'rdp' accountant analyses sampling='without_replacement' under neighboring='replace_one' "
                f"(Wang, Balle & Kasiviswanathan 2019), not 'add_remove' (sample_rate={event.sample_rate!r}); "
                f"supported: {SUPPORTED}."
            )

    # ------------------------------------------------------------------ curves
    def release_rdp(self, event: SampledMechanismEvent) -> np.ndarray:
        """RDP curve (at ``self.orders``) of ONE release of ``event`` (noise > 0)."""
        key = event.with_count(1)
        if key not in self._curves:
            self._curves[key] = self._release_rdp(event)
        return self._curves[key]

    def _release_rdp(self, event: SampledMechanismEvent) -> np.ndarray:
        mechanism = self.mechanism_of(event)
        z, q = event.noise_multiplier, event.sample_rate
        sens = RELATION_SENSITIVITY[event.neighboring]

        def base(alpha: float) -> float:
            try:
                return float(mechanism.rdp(alpha, z, sens))
            except (ZeroDivisionError, OverflowError):  # z so small that z^2 underflows: no privacy left
                return math.inf

        if q == 1.0:
            return np.array([base(a) for a in self.orders])
        if event.sampling == "poisson":  # add/remove (checked)
            if type(mechanism) is GaussianMechanism:
                return poisson_gaussian_rdp(q, z, self.orders)
            return poisson_subsampled_rdp(q, base, self.orders)
        return without_replacement_rdp(q, base, self.orders, eps_inf=_pure_epsilon(base))

    def rdp(self) -> np.ndarray:
        """Total RDP curve of the history at ``self.orders``."""
        total = np.zeros_like(self.orders)
        for event in self.history:
            if event.noise_multiplier == 0:
                return np.full_like(self.orders, math.inf)
            total = total + event.count * self.release_rdp(event)
        return total

    # -------------------------------------------------------------- conversion
    def _epsilon(self, delta: float) -> float:
        return epsilon_from_rdp(self.orders, self.rdp(), delta)[0]

    def _delta(self, epsilon: float) -> float:
        return delta_from_rdp(self.orders, self.rdp(), epsilon)[0]

    def get_epsilon_and_order(self, delta: float) -> tuple[float, float]:
        """(epsilon, the order that attains it)."""
        eps = self.get_epsilon(delta)
        if not self.history or math.isinf(eps):
            return eps, math.nan
        return epsilon_from_rdp(self.orders, self.rdp(), delta)


def _pure_epsilon(base) -> float:
    """The curve's limit at alpha = inf (pure DP), or inf when the curve does not give one."""
    try:
        value = float(base(math.inf))
    except (ArithmeticError, ValueError, TypeError):
        return math.inf
    return value if value >= 0 and not math.isnan(value) else math.inf
