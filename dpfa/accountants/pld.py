"""The PLD accountant (through dp-accounting 0.6.0).

Privacy loss distributions (Koskela, Jalko & Honkela 2020; Meiser & Mohammadi 2018;
Doroshenko et al. 2022, "Connect the dots") of each release come from the mechanism's
``pld()`` (dp-accounting's ``from_gaussian_mechanism`` / ``from_laplace_mechanism`` for
the built-ins); each distinct release is ``self_compose``d ``count`` times and the
results are ``compose``d. Estimates are pessimistic: every privacy loss is rounded up
to the grid, so the reported epsilon and delta are upper bounds, up to dp-accounting's
1e-15 tail truncation. Both the remove and the add direction are kept for subsampled
releases (dp-accounting does that when ``sampling_prob < 1``).

Discretisation: unless fixed by ``value_discretization_interval``, the interval is
chosen per query from a coarse first pass, about sqrt(1e-3 epsilon / (5 T)) for T
releases (measured: the pessimistic overshoot grows like T x interval^2), so the
reported epsilon exceeds the exact one by about 0.1%. The interval is never so fine that
one release's grid exceeds :data:`MAX_RELEASE_POINTS` (see :meth:`PLDAccountant.loss_width`):
at very small noise the loss spans ~1/z^2 and a fixed interval would need gigabytes
(z = 1e-3: 21 GB and minutes); a wider interval keeps the estimate pessimistic, with a
relative error of about interval / width.

Failures (an error of dp-accounting, epsilon = inf at a delta below its ~1e-15 truncated
tail mass, a value above the RDP bound by more than rounding) fall back to the RDP bound with a warning
(:mod:`dpfa.accountants.numerical`).

Supported events: Poisson sampling at any rate under add/remove (Gaussian, Laplace) and
under replace-one (Gaussian: dp-accounting's REPLACE_ONE pair, where the replaced
example moves the sum from -C to +C); rate 1 under either relation (replace-one doubles
the sensitivity). Sampling without replacement (rate < 1) is refused: dp-accounting's
PLD has no such event; use 'rdp'.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

from dpfa import _validate
from dpfa.accountants.conversion import DEFAULT_ORDERS, epsilon_from_rdp
from dpfa.accountants.events import SampledMechanismEvent
from dpfa.accountants.numerical import NumericalAccountant, NumericalFailure
from dpfa.accountants.rdp import RELATION_SENSITIVITY
from dpfa.errors import DPFAError, MissingPrivacyCurveError, UnsupportedEventError

#: interval of the first, coarse pass (and of the dry run at compose time)
COARSE_INTERVAL = 3e-3
#: target relative pessimistic overshoot of epsilon
REL_ERROR = 1e-3
MIN_INTERVAL, MAX_INTERVAL = 1e-5, 1e-2
#: most grid points of one release's PLD (dp-accounting needs ~200 bytes a point at its peak)
MAX_RELEASE_POINTS = 1_000_000
#: the tail mass that dp-accounting's from_*_mechanism truncates (log_mass_truncation_bound=-50)
_TRUNCATED_MASS = math.exp(-50)


class PLDAccountant(NumericalAccountant):
    """PLD accountant; ``value_discretization_interval=None`` picks it per query (see module docstring).

    A fixed interval is still widened where one release's grid would exceed MAX_RELEASE_POINTS.
    """

    name = "pld"

    def __init__(self, value_discretization_interval: Optional[float] = None) -> None:
        super().__init__()
        if value_discretization_interval is not None:
            value_discretization_interval = _validate.positive(value_discretization_interval,
                                                               "value_discretization_interval")
        self.value_discretization_interval = value_discretization_interval
        self._plds: dict = {}
        self._checked: set[SampledMechanismEvent] = set()
        self._widths: dict[SampledMechanismEvent, float] = {}

    # ------------------------------------------------------------------ checks
    def _check_event(self, event: SampledMechanismEvent) -> None:
        mechanism = self.mechanism_of(event)
        if not mechanism.has_curve("pld"):
            raise MissingPrivacyCurveError(
                f"Mechanism {event.mechanism!r} has no privacy loss distribution, so the 'pld' accountant cannot "
                "account it; use accountant='rdp' (or define pld(noise_multiplier, sampling_prob, neighboring, "
                "value_discretization_interval) on it)."
            )
        if event.sampling == "without_replacement" and event.sample_rate < 1.0:
            raise UnsupportedEventError(
                f"The 'pld' accountant does not support sampling='without_replacement' "
                f"(sample_rate={event.sample_rate!r}): dp-accounting has no PLD for it; use accountant='rdp' "
                "(Wang, Balle & Kasiviswanathan 2019)."
            )
        key = event.with_count(1)
        if event.noise_multiplier > 0 and key not in self._checked:
            width = self.loss_width(key)
            interval = max(COARSE_INTERVAL, width / MAX_RELEASE_POINTS) if math.isfinite(width) else 1.0
            try:  # dry run: raises what the mechanism refuses
                self._release_pld(key, interval)
            except (ArithmeticError, ValueError, MemoryError) as exc:
                if isinstance(exc, DPFAError):
                    raise
                # a numerical failure (e.g. e^(1/z) overflows at tiny noise), not a refusal: the
                # queries fall back to the RDP bound (dpfa.accountants.numerical)
            self._checked.add(key)

    def loss_width(self, event: SampledMechanismEvent) -> float:
        """An estimate of the width of the privacy-loss support of one release (0 if unknown).

        Used only to size the grid: twice the epsilon that the RDP curve of the release without
        subsampling gives at the tail mass dp-accounting truncates (e^-50), about where the loss
        has that little mass left above it (Markov's inequality on e^{(alpha - 1) loss}); the
        lower tail is no wider for the built-in mechanisms. 0 for a mechanism without an RDP
        curve (no limit is applied).
        """
        key = event.with_count(1)
        if key not in self._widths:
            mechanism = self.mechanism_of(key)
            width = 0.0
            if mechanism.has_curve("rdp"):
                sens = RELATION_SENSITIVITY[key.neighboring]
                try:
                    curve = [float(mechanism.rdp(a, key.noise_multiplier, sens)) for a in DEFAULT_ORDERS]
                    width = 2.0 * epsilon_from_rdp(DEFAULT_ORDERS, curve, _TRUNCATED_MASS)[0]
                except (ArithmeticError, ValueError):
                    width = math.inf
                if math.isnan(width):
                    width = math.inf
            self._widths[key] = width
        return self._widths[key]

    def _interval_floor(self) -> float:
        """The finest interval at which no release's grid exceeds MAX_RELEASE_POINTS."""
        return max((self.loss_width(e) for e, _ in self._groups()), default=0.0) / MAX_RELEASE_POINTS

    # -------------------------------------------------------------- accounting
    def _release_pld(self, event: SampledMechanismEvent, interval: float):
        mechanism = self.mechanism_of(event)
        return mechanism.pld(event.noise_multiplier, event.sample_rate, neighboring=event.neighboring,
                             value_discretization_interval=interval)

    def _groups(self) -> tuple[tuple[SampledMechanismEvent, int], ...]:
        counts: dict[SampledMechanismEvent, int] = {}
        for e in self.history:
            key = e.with_count(1)
            counts[key] = counts.get(key, 0) + e.count
        return tuple(counts.items())

    def pld(self, interval: float):
        """The composed PrivacyLossDistribution of the history at this discretisation interval
        (or at the floor of :meth:`_interval_floor`, if that is wider)."""
        groups = self._groups()
        interval = max(interval, self._interval_floor())
        if not math.isfinite(interval):
            raise NumericalFailure("the privacy loss of a release overflows a float")
        key = (groups, interval)
        if key not in self._plds:
            composed = None
            for event, count in groups:
                part = self._release_pld(event, interval).self_compose(count)
                composed = part if composed is None else composed.compose(part)
            self._plds = {key: composed}  # keep only the latest
        return self._plds[key]

    def _interval(self, epsilon_estimate: float) -> float:
        if self.value_discretization_interval is not None:
            return self.value_discretization_interval
        steps = max(self.steps, 1)
        raw = math.sqrt(REL_ERROR * max(epsilon_estimate, 1e-3) / (5.0 * steps))
        raw = min(max(raw, MIN_INTERVAL), MAX_INTERVAL)
        return _snap(raw)

    def _numerical_epsilon(self, delta: float) -> float:
        if self.value_discretization_interval is not None:
            return self._guard(lambda: self.pld(self.value_discretization_interval).get_epsilon_for_delta(delta))
        coarse = self._guard(lambda: self.pld(COARSE_INTERVAL).get_epsilon_for_delta(delta))
        if math.isinf(coarse):
            return coarse
        interval = self._interval(coarse)
        if interval >= COARSE_INTERVAL:
            return coarse
        return min(coarse, self._guard(lambda: self.pld(interval).get_epsilon_for_delta(delta)))

    def _numerical_delta(self, epsilon: float) -> float:
        interval = self._interval(epsilon)
        return float(self._guard(lambda: self.pld(interval).get_delta_for_epsilon(epsilon)))

    @staticmethod
    def _guard(fn):
        try:
            return float(fn())
        except (ValueError, ArithmeticError, MemoryError) as exc:
            if isinstance(exc, (DPFAError, NumericalFailure)):
                raise
            raise NumericalFailure(f"dp-accounting failed: {type(exc).__name__}: {exc}") from exc


@functools.lru_cache(maxsize=None)
def _grid(k: int) -> float:
    return 10.0 ** (k / 4.0)


def _snap(x: float) -> float:
    """Round down to the grid 10^(k/4), so that nearby queries share a composed PLD."""
    return _grid(math.floor(4.0 * math.log10(x) + 1e-9))
