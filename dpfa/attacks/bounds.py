"""Clopper-Pearson intervals and the empirical epsilon lower bound of a hypothesis test.

The hypothesis-testing view of differential privacy (Wasserman & Zhou 2010; Kairouz,
Oh & Viswanath 2015): an attacker sees the output of a mechanism M run on one of two
neighbouring inputs x0, x1 and answers "x1" when the output falls in a rejection
region R. With TPR = P[M(x1) in R] and FPR = P[M(x0) in R], every (epsilon, delta)-DP
mechanism satisfies, for every R (and with x0, x1 swapped),

    TPR      <= e^epsilon FPR       + delta,
    1 - FPR  <= e^epsilon (1 - TPR) + delta,

so any observed pair (FPR, TPR) proves

    epsilon >= max( log((TPR - delta) / FPR), log((1 - FPR - delta) / (1 - TPR)) ).

TPR and FPR are only estimated, from k successes in n independent trials each. The
Clopper-Pearson interval (Clopper & Pearson 1934) is the exact binomial confidence
interval: with p_lo = Beta^{-1}(a; k, n - k + 1) and p_hi = Beta^{-1}(1 - a; k + 1, n - k),
P[p < p_lo] <= a and P[p > p_hi] <= a whatever p is. With probability at least
1 - alpha (a union bound over the two binomials, alpha / 2 each) TPR >= tpr_lo and
FPR <= fpr_hi hold together, and then the right-hand side above, evaluated at
(fpr_hi, tpr_lo), is a lower bound on the true epsilon: that is
:func:`epsilon_lower_bound`. This is the audit of Jagielski, Ullman & Oprea 2020 and
Nasr et al. 2021.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Tuple

import numpy as np
from scipy import stats

from dpfa import _validate
from dpfa.errors import PrivacyParameterError

__all__ = [
    "clopper_pearson", "clopper_pearson_lower", "clopper_pearson_upper", "epsilon_from_rates",
    "epsilon_lower_bound", "EpsilonBound",
]


def _confidence(value, name: str = "confidence") -> float:
    v = _validate._real(name, value, "(0, 1)")
    if not 0.0 < v < 1.0:
        raise PrivacyParameterError(f"Expected {name}={value!r} in (0, 1).")
    return v


def _counts(successes, trials, name: str = "successes",
            trials_name: str = "trials") -> Tuple[np.ndarray, np.ndarray]:
    k = np.asarray(successes)
    n = np.asarray(trials)
    for arr, nm in ((k, name), (n, trials_name)):
        if arr.dtype.kind not in "iu":
            if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)) or not np.all(np.mod(arr, 1) == 0):
                raise PrivacyParameterError(f"Expected {nm} to be integer counts, got {arr!r}.")
    k = k.astype(np.int64)
    n = n.astype(np.int64)
    if np.any(n < 1):
        raise PrivacyParameterError(f"Expected {trials_name} >= 1, got {trials_name}={trials!r}.")
    if np.any(k < 0) or np.any(k > n):
        raise PrivacyParameterError(
            f"Expected 0 <= {name} <= {trials_name}, got {name}={successes!r}, {trials_name}={trials!r}.")
    return k, n


def _out(x: np.ndarray):
    return float(x) if np.ndim(x) == 0 else x


def clopper_pearson_lower(successes, trials, significance: float):
    """One-sided lower bound p_lo with P[p < p_lo] <= significance: Beta^{-1}(significance; k, n - k + 1).

    Vectorised over ``successes``/``trials``; 0 when k = 0.
    """
    k, n = _counts(successes, trials)
    a = _confidence(significance, "significance")
    with np.errstate(invalid="ignore"):
        lo = stats.beta.ppf(a, np.maximum(k, 1), n - k + 1)
    return _out(np.where(k > 0, lo, 0.0))


def clopper_pearson_upper(successes, trials, significance: float):
    """One-sided upper bound p_hi with P[p > p_hi] <= significance: Beta^{-1}(1 - significance; k + 1, n - k).

    Vectorised; 1 when k = n.
    """
    k, n = _counts(successes, trials)
    a = _confidence(significance, "significance")
    with np.errstate(invalid="ignore"):
        hi = stats.beta.ppf(1.0 - a, k + 1, np.maximum(n - k, 1))
    return _out(np.where(k < n, hi, 1.0))


def clopper_pearson(successes, trials, confidence: float = 0.95):
    """Exact two-sided interval (p_lo, p_hi) for a binomial proportion at ``confidence``.

    Each side fails with probability at most (1 - confidence) / 2, so the interval covers
    the true p with probability >= ``confidence`` (Clopper & Pearson 1934). Example: 0
    successes in 10 trials at 95% gives (0, 1 - 0.025^(1/10)) = (0, 0.3085).
    """
    a = (1.0 - _confidence(confidence)) / 2.0
    return clopper_pearson_lower(successes, trials, a), clopper_pearson_upper(successes, trials, a)


def epsilon_from_rates(tpr, fpr, delta: float = 0.0):
    """The epsilon that a test with these rates proves: max(log((TPR - delta)/FPR), log((1 - FPR - delta)/(1 - TPR))).

    A point estimate (no confidence): clipped at 0, and inf when a rate is 0 on the wrong
    side (FPR = 0 with TPR > delta). Vectorised.
    """
    delta = _validate.delta(delta, allow_zero=True)
    tpr = np.asarray(tpr, dtype=np.float64)
    fpr = np.asarray(fpr, dtype=np.float64)
    if np.any((tpr < 0) | (tpr > 1) | (fpr < 0) | (fpr > 1)) or np.any(np.isnan(tpr) | np.isnan(fpr)):
        raise PrivacyParameterError(f"Expected rates in [0, 1], got tpr={tpr!r}, fpr={fpr!r}.")
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.where(tpr > delta, np.log(np.maximum(tpr - delta, 1e-300)) - np.log(fpr), -np.inf)
        tnr, fnr = 1.0 - fpr, 1.0 - tpr
        e2 = np.where(tnr > delta, np.log(np.maximum(tnr - delta, 1e-300)) - np.log(fnr), -np.inf)
    return _out(np.maximum(0.0, np.maximum(e1, e2)))


@dataclasses.dataclass(frozen=True)
class EpsilonBound:
    """An empirical lower bound on epsilon from one test: with probability >= ``confidence``, eps >= ``epsilon``.

    ``estimate`` is the point estimate at the observed rates; ``tpr_interval`` and
    ``fpr_interval`` are the Clopper-Pearson bounds used (each side at (1 - confidence)/2).
    """

    epsilon: float
    estimate: float
    confidence: float
    delta: float
    tpr: float
    fpr: float
    tpr_interval: Tuple[float, float]
    fpr_interval: Tuple[float, float]
    true_positives: int
    positives: int
    false_positives: int
    negatives: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _bound_arrays(tp, n_pos, fp, n_neg, delta, significance):
    """Vectorised core: lower bound on epsilon at per-binomial significance ``significance``."""
    tpr_lo = np.asarray(clopper_pearson_lower(tp, n_pos, significance))
    fpr_hi = np.asarray(clopper_pearson_upper(fp, n_neg, significance))
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.where(tpr_lo > delta, np.log(np.maximum(tpr_lo - delta, 1e-300)) - np.log(fpr_hi), -np.inf)
        tnr_lo, fnr_hi = 1.0 - fpr_hi, 1.0 - tpr_lo
        e2 = np.where(tnr_lo > delta, np.log(np.maximum(tnr_lo - delta, 1e-300)) - np.log(fnr_hi), -np.inf)
    eps = np.maximum(0.0, np.maximum(e1, e2))
    return eps, tpr_lo, fpr_hi


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise PrivacyParameterError(f"Expected {name} to be an integer count, got {value!r}.")
    return int(value)


def _epsilon_bound(tp: int, n_pos: int, fp: int, n_neg: int, delta: float, significance: float,
                   confidence: float) -> EpsilonBound:
    """The bound with each one-sided Clopper-Pearson end at ``significance``; reported at ``confidence``.

    The caller is responsible for the union bound that makes ``confidence`` true (2
    binomials at (1 - confidence) / 2 for one fixed region; more for a chosen one).
    """
    eps, tpr_lo, fpr_hi = _bound_arrays(tp, n_pos, fp, n_neg, delta, significance)
    tpr, fpr = tp / n_pos, fp / n_neg
    return EpsilonBound(
        epsilon=float(eps), estimate=float(epsilon_from_rates(tpr, fpr, delta)), confidence=float(confidence),
        delta=float(delta), tpr=float(tpr), fpr=float(fpr),
        tpr_interval=(float(tpr_lo), float(clopper_pearson_upper(tp, n_pos, significance))),
        fpr_interval=(float(clopper_pearson_lower(fp, n_neg, significance)), float(fpr_hi)),
        true_positives=int(tp), positives=int(n_pos), false_positives=int(fp), negatives=int(n_neg),
    )


def epsilon_lower_bound(true_positives, positives, false_positives, negatives, delta: float = 0.0,
                        confidence: float = 0.95) -> EpsilonBound:
    """Lower bound on epsilon, valid with probability >= ``confidence``, from one rejection region.

    ``true_positives`` of ``positives`` runs on x1 and ``false_positives`` of ``negatives``
    runs on x0 fell in the region (all runs independent, the region fixed before looking
    at these runs). With a = (1 - confidence) / 2, tpr_lo = CP lower bound of TPR at a,
    fpr_hi = CP upper bound of FPR at a; the bound is (see the module docstring)

        max(0, log((tpr_lo - delta) / fpr_hi), log((1 - fpr_hi - delta) / (1 - tpr_lo))).

    It is finite: fpr_hi > 0 and tpr_lo < 1 always. Example: 100 of 100 and 0 of 100 at
    95%, delta = 0: tpr_lo = 0.025^(1/100), fpr_hi = 1 - 0.025^(1/100), epsilon = 3.2814.
    """
    conf = _confidence(confidence)
    delta = _validate.delta(delta, allow_zero=True)
    tp = _check_count(true_positives, "true_positives")
    n_pos = _check_count(positives, "positives")
    fp = _check_count(false_positives, "false_positives")
    n_neg = _check_count(negatives, "negatives")
    _counts(tp, n_pos, "true_positives", "positives")
    _counts(fp, n_neg, "false_positives", "negatives")
    return _epsilon_bound(tp, n_pos, fp, n_neg, delta, (1.0 - conf) / 2.0, conf)
