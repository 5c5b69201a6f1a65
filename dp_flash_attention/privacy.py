"""The seed's ``dp_flash_attention.privacy``: ``RenyiAccountant`` with ``add_step`` and ``get_epsilon``.

What ``add_step`` takes, and how each kind composes:

- ``add_step(stats)`` (the :class:`~dpfa.attention.PrivacyStats` of a dpfa layer or call) or
  ``add_step(event)`` (a :class:`~dpfa.accountants.SampledMechanismEvent`), or
  ``add_step(noise_multiplier=z, sampling_rate=q)`` (a DP-SGD step of a dpfa mechanism): the
  events go to a dpfa accountant (``accountant="rdp"``, the Renyi accountant the seed's name
  promises; "prv" or "pld" also work), so they compose exactly as that accountant composes them.
- ``add_step(epsilon, delta, sampling_rate=q)``: one run of a mechanism that is only known to be
  (epsilon, delta)-DP, on a Poisson subsample of rate q. Its privacy loss is dominated by the
  canonical (epsilon, delta) pair subsampled (:class:`dpfa.accountants.SubsamplingAmplification`
  with ``base_delta``), whose PLD is composed: the tight composition of such steps, never
  epsilons added up. There is no finite RDP curve for delta > 0, so a history with such steps is
  composed through PLDs (the events' too, which then need a PLD curve).
- stats of a mechanism that only overrides ``add_noise`` (``accounting="basic_composition"``)
  carry an (epsilon, delta) claim and no events: they are composed as such raw steps (rate 1).

``get_epsilon(delta)`` returns inf where no finite epsilon holds at that delta (below the
composed infinity mass 1 - (1 - q delta_0)^T of the raw steps).
"""

from __future__ import annotations

import math
from typing import Optional

from dpfa import _validate
from dpfa.accountants import registry
from dpfa.accountants.amplification import SubsamplingAmplification
from dpfa.accountants.events import SampledMechanismEvent
from dpfa.accountants.pld import PLDAccountant
from dpfa.errors import PrivacyParameterError

__all__ = ["RenyiAccountant"]

#: PLD discretisation interval of a history that mixes raw (epsilon, delta) steps with events
MIXED_INTERVAL = 1e-4


class RenyiAccountant:
    """The seed's accountant over dpfa's: see the module docstring for what each step means."""

    def __init__(self, accountant: str = "rdp"):
        self.accountant = registry.create(accountant)
        self.raw: dict[tuple[float, float, float], int] = {}  # (epsilon, delta, rate) -> steps

    def add_step(self, epsilon=None, delta: Optional[float] = None, sampling_rate: float = 1.0, *,
                 noise_multiplier: Optional[float] = None, mechanism="gaussian", steps: int = 1) -> "RenyiAccountant":
        """Record ``steps`` steps; see the module docstring for the accepted forms."""
        steps = _validate.count(steps, "steps")
        first = epsilon
        if hasattr(first, "events") and hasattr(first, "epsilon_spent"):  # PrivacyStats
            if getattr(first, "accounting", "accountant") == "basic_composition":
                return self.add_step(first.epsilon_spent, first.delta_spent or None, steps=steps)
            if not first.is_private:
                raise PrivacyParameterError("These stats are of a release without noise (epsilon = inf).")
            for _ in range(steps):
                for e in first.events:
                    self.accountant.compose_event(e)
            return self
        if isinstance(first, SampledMechanismEvent):
            self.accountant.compose_event(first.with_count(first.count * steps))
            return self
        if noise_multiplier is not None:
            if epsilon is not None:
                raise PrivacyParameterError("Give either epsilon (a generic step) or noise_multiplier, not both.")
            self.accountant.compose(mechanism, noise_multiplier, sampling_rate, steps)
            return self
        if epsilon is None:
            raise PrivacyParameterError(
                "add_step needs PrivacyStats, a SampledMechanismEvent, noise_multiplier=..., or the (epsilon, delta) "
                "of a step with its sampling_rate.")
        eps = _validate.epsilon(epsilon)
        d0 = _validate.delta(delta, allow_zero=True) if delta is not None else 0.0
        q = _validate.sample_rate(sampling_rate, "sampling_rate")
        key = (eps, d0, q)
        self.raw[key] = self.raw.get(key, 0) + steps
        return self

    @property
    def steps(self) -> int:
        return self.accountant.steps + sum(self.raw.values())

    def get_epsilon(self, delta: float) -> float:
        """Smallest epsilon such that every recorded step together is (epsilon, delta)-DP."""
        delta = _validate.delta(delta)
        if not self.raw:
            return self.accountant.get_epsilon(delta)
        if not self.accountant.history and len(self.raw) == 1:
            (eps, d0, q), t = next(iter(self.raw.items()))
            return SubsamplingAmplification(eps, q, t, base_delta=d0).compute_epsilon(delta)
        relations = {e.neighboring for e in self.accountant.history}
        if relations - {"add_remove"}:
            raise PrivacyParameterError(
                "Raw (epsilon, delta) steps are composed under add/remove neighbours; the recorded events are under "
                f"{sorted(relations)} (a DP attention release protects a replaced record). Account them apart.")
        composed = None
        for (eps, d0, q), t in self.raw.items():
            part = SubsamplingAmplification(eps, q, t, base_delta=d0,
                                            value_discretization_interval=MIXED_INTERVAL).pld()
            composed = part if composed is None else composed.compose(part)
        if self.accountant.history:
            pld = PLDAccountant(value_discretization_interval=MIXED_INTERVAL)
            for e in self.accountant.history:
                pld.compose_event(e)
            composed = composed.compose(pld.pld(MIXED_INTERVAL))
        eps = float(composed.get_epsilon_for_delta(delta))
        return max(0.0, eps) if not math.isnan(eps) else math.inf

    def __repr__(self) -> str:
        return f"RenyiAccountant(accountant={self.accountant.name!r}, steps={self.steps})"
