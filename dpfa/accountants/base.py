"""Accountant: composes a history of privacy events into (epsilon, delta).

Modelled on dp-accounting's ``privacy_accountant.py``: ``supports(event)`` is a dry run,
``compose`` is chainable and appends to a ledger, and every event carries its
neighbouring relation. Subclasses implement ``_check_event`` (raise if the event cannot
be accounted), ``get_epsilon`` and ``get_delta``.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar, Optional

from dpfa import _validate
from dpfa.accountants.events import DEFAULT_RELATION, SampledMechanismEvent, normalize_sampling
from dpfa.errors import DPFAError, PrivacyParameterError, StateMismatchError
from dpfa.mechanisms import registry as mechanism_registry
from dpfa.mechanisms.base import DPMechanism

STATE_VERSION = 1


class Accountant(abc.ABC):
    """Base class of privacy accountants over a history of :class:`SampledMechanismEvent`."""

    #: registry name: "rdp", "prv" or "pld"
    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.history: list[SampledMechanismEvent] = []

    # ------------------------------------------------------------------ ledger
    def compose(self, mechanism, noise_multiplier: float, sample_rate: float = 1.0, steps: int = 1,
                sampling: str = "poisson", neighboring: Optional[str] = None,
                dataset_size: Optional[int] = None) -> "Accountant":
        """Record ``steps`` releases of ``mechanism`` (a registered name, class or instance).

        ``neighboring`` defaults to the relation that matches ``sampling``: add/remove for
        Poisson, replace-one for sampling without replacement. Returns ``self``.
        """
        sampling = normalize_sampling(sampling)
        event = SampledMechanismEvent(
            mechanism=self._mechanism_name(mechanism),
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            count=steps,
            sampling=sampling,
            neighboring=neighboring if neighboring is not None else DEFAULT_RELATION[sampling],
            dataset_size=dataset_size,
        )
        return self.compose_event(event)

    def compose_event(self, event: SampledMechanismEvent) -> "Accountant":
        """Append an event after checking that this accountant can account it."""
        self._check_event(event)
        if self.history and self.history[-1].same_release(event):
            self.history[-1] = event.with_count(self.history[-1].count + event.count)
        else:
            self.history.append(event)
        return self

    def supports(self, event: SampledMechanismEvent) -> bool:
        """Dry run: whether ``compose_event(event)`` would be accepted."""
        try:
            self._check_event(event)
        except DPFAError:
            return False
        return True

    @staticmethod
    def _mechanism_name(mechanism) -> str:
        if isinstance(mechanism, str):
            mechanism_registry.get(mechanism)  # raises UnknownNameError listing the known names
            return mechanism
        cls = type(mechanism) if isinstance(mechanism, DPMechanism) else mechanism
        if not (isinstance(cls, type) and issubclass(cls, DPMechanism)):
            raise PrivacyParameterError(
                f"Expected a mechanism name, DPMechanism subclass or instance, got {mechanism!r}."
            )
        if cls.name not in mechanism_registry._REGISTRY or mechanism_registry.get(cls.name) is not cls:
            raise PrivacyParameterError(
                f"Mechanism class {cls.__qualname__} is not registered; call dpfa.mechanisms.register("
                f"{cls.__name__}) first so that saved accountant states can name it."
            )
        return cls.name

    @staticmethod
    def mechanism_of(event: SampledMechanismEvent) -> DPMechanism:
        return mechanism_registry.get(event.mechanism)()

    @property
    def steps(self) -> int:
        """Total number of releases recorded."""
        return sum(e.count for e in self.history)

    # --------------------------------------------------------------- accounting
    @abc.abstractmethod
    def _check_event(self, event: SampledMechanismEvent) -> None:
        """Raise a DPFAError if this accountant cannot account ``event``."""

    @abc.abstractmethod
    def _epsilon(self, delta: float) -> float:
        """epsilon of the history at ``delta`` (history non-empty, all noise > 0)."""

    @abc.abstractmethod
    def _delta(self, epsilon: float) -> float:
        """delta of the history at ``epsilon`` (history non-empty, all noise > 0)."""

    def _no_noise(self) -> bool:
        return any(e.noise_multiplier == 0 for e in self.history)

    def get_epsilon(self, delta: float) -> float:
        """Smallest epsilon such that the history is (epsilon, delta)-DP (inf without noise)."""
        delta = _validate.delta(delta)
        if not self.history:
            return 0.0
        if self._no_noise():
            return math.inf
        return self._not_nan(float(self._epsilon(delta)), "epsilon", f"delta={delta!r}")

    def get_delta(self, epsilon: float) -> float:
        """Smallest delta such that the history is (epsilon, delta)-DP (1 without noise)."""
        epsilon = _validate.epsilon(epsilon)
        if not self.history:
            return 0.0
        if self._no_noise():
            return 1.0
        # (a NaN would pass min/max as 0.0: a claim of no privacy loss at all)
        return float(min(1.0, max(0.0, self._not_nan(float(self._delta(epsilon)), "delta",
                                                     f"epsilon={epsilon!r}"))))

    def _not_nan(self, value: float, what: str, at: str) -> float:
        if math.isnan(value):
            raise PrivacyParameterError(f"The {self.name!r} accountant computed {what}=nan at {at}; "
                                        "no bound can be reported.")
        return value

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable state: the accountant's name and its whole history."""
        return {
            "accountant": self.name,
            "version": STATE_VERSION,
            "history": [e.to_dict() for e in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`.

        Refuses a state that would drop releases already recorded here (a resumed run must
        never under-count): the current history must be a prefix of the loaded one.
        """
        if not isinstance(state, dict) or "history" not in state:
            raise StateMismatchError(f"Expected a dict from Accountant.state_dict(), got {type(state).__name__}.")
        if state.get("version") != STATE_VERSION:
            raise StateMismatchError(f"Unsupported accountant state version {state.get('version')!r}; "
                                     f"expected {STATE_VERSION}.")
        loaded = [SampledMechanismEvent.from_dict(d) for d in state["history"]]
        for e in loaded:
            self._check_event(e)
        if not _is_prefix(self.history, loaded):
            raise StateMismatchError(
                f"Loading this state would drop privacy already spent: this accountant has {self.steps} "
                f"recorded releases that the state ({sum(e.count for e in loaded)} releases) does not contain."
            )
        self.history = loaded

    def __repr__(self) -> str:
        return f"{type(self).__name__}(events={len(self.history)}, steps={self.steps})"


def _is_prefix(mine: list[SampledMechanismEvent], theirs: list[SampledMechanismEvent]) -> bool:
    """Whether the releases in ``mine`` are a prefix of those in ``theirs`` (counts may grow)."""
    if not mine:
        return True
    if len(mine) > len(theirs):
        return False
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if i < len(mine) - 1:
            if a != b:
                return False
        elif not (a.same_release(b) and b.count >= a.count):
            return False
    return True
