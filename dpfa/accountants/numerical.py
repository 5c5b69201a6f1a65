"""The numerical accountants ('prv', 'pld') and their safety net, the RDP bound.

FFT accountants are exact up to stated errors inside their numerical range and fail at
its edges, sometimes silently. Failures other libraries have shipped:

- prv-accountant (microsoft/prv_accountant issue 17): epsilon 0.056 at delta 1.10e-18
  and 3.8 at 1.13e-18 (RDP: 0.669) -- a jump, and the small value is an under-report.
  Version 0.2.0 raises ``ValueError("Floating point errors will dominate...")`` instead,
  e.g. for sigma 1, q 0.02, 500 steps at every delta <= 1e-14; it also returns inf, or
  raises "Cannot compute epsilon" / "Discrete mean differs from continuous mean", at
  small noise.
- dp-accounting's PLD moves ~1e-15 of truncated tail mass to the infinity mass, so at
  the same settings it returns inf at delta <= 1e-15 (RDP: 7.69 at 1e-16), and loose
  values just above (dpfa's 'pld' gives 7.11 at delta 1e-14 where RDP gives 6.91).

:class:`NumericalAccountant` accepts the numerical value of ``get_epsilon`` (or
``get_delta``) only if it was computed without error, is finite and not NaN, passes
the subclass' own checks (a non-monotone jump raises :class:`NumericalFailure`) and is
at most the RDP bound of the same history, up to its rounding (1% + 2e-3 in epsilon; for
delta, the RDP delta at an epsilon that much smaller): within it, the smaller of the two
upper bounds is reported silently. Otherwise it returns the RDP bound -- an upper bound
too, Mironov 2017 with the conversion of Balle et al. 2020 -- with an
:class:`AccountingFallbackWarning` (a ``RuntimeWarning``) that names the failure. Where
the 'rdp' accountant cannot account the history (Poisson sampling under replace-one, a
mechanism without an RDP curve), a failed value raises
:class:`dpfa.errors.PrivacyParameterError` instead, and a good one is returned unchecked.
"""

from __future__ import annotations

import abc
import math
import warnings
from typing import Callable, Optional

from dpfa.accountants.base import Accountant
from dpfa.accountants.rdp import RDPAccountant
from dpfa.errors import DPFAError, PrivacyParameterError

#: a numerical value above the RDP bound by at most this fraction is rounding (e.g. of the PLD grid
#: next to a pure-DP atom, where RDP is tight): the bound is reported without a warning; beyond
#: it the method is out of its range (truncated tails, unresolved delta): bound and warning
ABOVE_BOUND_RTOL = 0.01
#: and by this much in epsilon (prv's error is at least 1e-3 on each side: near epsilon = 0 its
#: upper end is up to 2e-3 above the exact value, where RDP can be tight, e.g. one Laplace release)
ABOVE_BOUND_EPSILON_ATOL = 2e-3
#: errors of the numerical libraries that mean "no trustworthy value" (not a bad input)
LIBRARY_ERRORS = (ArithmeticError, ValueError, RuntimeError, MemoryError)


class AccountingFallbackWarning(RuntimeWarning):
    """A numerical accountant failed and the RDP bound (valid, looser) was reported instead."""


class NumericalFailure(ArithmeticError):
    """Internal: a numerical accountant has no trustworthy value; the message says why."""


class NumericalAccountant(Accountant):
    """An accountant computed numerically, guarded by the RDP bound of the same history.

    Subclasses implement ``_numerical_epsilon`` and ``_numerical_delta``; they may raise
    :class:`NumericalFailure` (or let the libraries' errors through) where they cannot
    give a value.
    """

    def __init__(self) -> None:
        super().__init__()
        self._rdp = RDPAccountant()  # the fallback; it caches the curve of each release

    @abc.abstractmethod
    def _numerical_epsilon(self, delta: float) -> float:
        """epsilon at ``delta`` from the numerical method (may raise NumericalFailure)."""

    @abc.abstractmethod
    def _numerical_delta(self, epsilon: float) -> float:
        """delta at ``epsilon`` from the numerical method (may raise NumericalFailure)."""

    # ------------------------------------------------------------------ the RDP bound
    def _rdp_bound(self, fn: Callable[[RDPAccountant], float]) -> tuple[Optional[float], str]:
        """(fn of the 'rdp' accountant over this history, "") or (None, why it is not available)."""
        for event in self.history:
            try:
                self._rdp._check_event(event)
            except DPFAError as exc:
                return None, str(exc)
        self._rdp.history = list(self.history)
        try:
            return float(fn(self._rdp)), ""
        except LIBRARY_ERRORS as exc:
            return None, f"the 'rdp' accountant failed too: {exc}"

    def _rounding_margin(self, what: str, value: float, bound: float) -> float:
        """The most a working numerical method may exceed the RDP bound by: ABOVE_BOUND_RTOL (and
        ABOVE_BOUND_EPSILON_ATOL) in epsilon; for delta at ``value`` = epsilon, the RDP delta at an
        epsilon that much smaller (delta curves are steep: an error in epsilon is many in delta)."""
        if what == "epsilon":
            return bound * (1.0 + ABOVE_BOUND_RTOL) + ABOVE_BOUND_EPSILON_ATOL
        smaller = value / (1.0 + ABOVE_BOUND_RTOL) - ABOVE_BOUND_EPSILON_ATOL
        return self._rdp.get_delta(smaller) if smaller > 0 else 1.0

    # ------------------------------------------------------------------ guarded queries
    def _epsilon(self, delta: float) -> float:
        return self._guarded("epsilon", "delta", delta, self._numerical_epsilon,
                             lambda rdp: rdp.get_epsilon(delta))

    def _delta(self, epsilon: float) -> float:
        return self._guarded("delta", "epsilon", epsilon, self._numerical_delta,
                             lambda rdp: rdp.get_delta(epsilon))

    def _guarded(self, what: str, given: str, value: float, numerical, rdp_fn) -> float:
        reason = None
        try:
            result = float(numerical(value))
        except NumericalFailure as exc:
            reason = str(exc)
        except LIBRARY_ERRORS as exc:
            if isinstance(exc, DPFAError):
                raise
            reason = f"{type(exc).__name__}: {exc}"
        else:
            if math.isnan(result):
                reason = f"it returned {what}=nan"
            elif math.isinf(result) and what == "epsilon":
                reason = "it returned epsilon=inf for a noisy history"
        bound, why_not = self._rdp_bound(rdp_fn)
        if reason is None:
            if bound is None or result <= bound:
                return result
            if result <= self._rounding_margin(what, value, bound):
                return bound  # two upper bounds: report the smaller; the numerics' rounding is no failure
            reason = f"its {what}={result:.6g} is above the RDP bound {bound:.6g} by more than its rounding"
        if bound is None:
            raise PrivacyParameterError(
                f"The {self.name!r} accountant failed at {given}={value!r} ({reason}), and the RDP bound that "
                f"would replace it is not available for this history ({why_not})."
            )
        warnings.warn(
            f"The {self.name!r} accountant failed at {given}={value!r} ({reason}); reporting the RDP bound "
            f"{what}={bound:.6g} instead, a valid upper bound (looser where the {self.name!r} accountant works).",
            AccountingFallbackWarning, stacklevel=4,
        )
        return bound
