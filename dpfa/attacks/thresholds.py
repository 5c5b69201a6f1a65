"""From attack scores to an epsilon lower bound: which rejection region, chosen how.

An attack gives each trial a score; the rejection region is {score >= t} (or
{score <= t}). The bound of :func:`dpfa.attacks.bounds.epsilon_lower_bound` is valid
only for a region fixed before looking at the trials it is computed on, so choosing
the best t on the same trials needs a correction. Three strategies, as small frozen
dataclasses (after jax_privacy's ``auditing.py``):

- :class:`Split` (the default): choose t (and the direction) on a random fraction of the
  trials, compute the bound on the rest at the full confidence. Valid because the two
  parts are independent. The choice maximises a Bonferroni-style bound on the selection
  part, which prefers regions with enough counts to hold up on the rest.
- :class:`Bonferroni`: the bound at the best of many thresholds, all chosen from the
  data, with one-sided Clopper-Pearson ends at significance alpha / (D (n_pos + n_neg))
  (D = number of directions). Why that is enough for *every* threshold at once, even
  thresholds that depend on the data: FP(t) = #{negatives >= t} takes n_neg + 1 values;
  for each count k < n_neg let p_k be the CP upper end at k (at significance alpha'), and
  t_k the largest t with FPR(t) >= p_k (it exists: t -> P[X >= t] is left-continuous).
  An FPR end that fails at some t with FP(t) = k (FPR(t) > p_k, so t <= t_k) implies
  FP(t_k) <= k while FPR(t_k) >= p_k, an event of probability <= alpha'; so n_neg fixed
  events cover all t, however t was chosen (the argument behind jax_privacy's Bonferroni
  strategy). The same holds for the n_pos TPR ends and for each direction.
- :class:`Explicit`: a threshold (and direction) given in advance.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

import numpy as np

from dpfa import _validate
from dpfa.attacks.bounds import EpsilonBound, _bound_arrays, _confidence, _epsilon_bound, epsilon_lower_bound
from dpfa.errors import PrivacyParameterError, ShapeError

__all__ = ["Split", "Bonferroni", "Explicit", "ScoreBound", "epsilon_lower_bound_from_scores",
           "candidate_thresholds", "bonferroni_significance"]


@dataclasses.dataclass(frozen=True)
class Split:
    """Choose the region on ``fraction`` of the trials (drawn with ``seed``), bound it on the rest."""

    fraction: float = 0.5
    seed: Optional[int] = 0
    max_thresholds: int = 2000

    def __post_init__(self):
        if not (isinstance(self.fraction, (int, float)) and 0.0 < self.fraction < 1.0):
            raise PrivacyParameterError(f"Expected Split.fraction={self.fraction!r} in (0, 1).")
        _validate.count(self.max_thresholds, "max_thresholds", minimum=1)


@dataclasses.dataclass(frozen=True)
class Bonferroni:
    """The best of up to ``max_thresholds`` data-chosen cuts, each end at alpha / (D (n_pos + n_neg)).

    ``max_thresholds`` only limits the work (None: every distinct score); the correction
    does not depend on it (see the module docstring).
    """

    max_thresholds: Optional[int] = 2000

    def __post_init__(self):
        if self.max_thresholds is not None:
            _validate.count(self.max_thresholds, "max_thresholds", minimum=1)


@dataclasses.dataclass(frozen=True)
class Explicit:
    """A region fixed in advance: {score >= threshold} (``direction="high"``) or {score <= threshold} ("low")."""

    threshold: float
    direction: str = "high"

    def __post_init__(self):
        _validate._real("Explicit.threshold", self.threshold, "(-inf, inf)")
        _validate.choice(self.direction, "direction", ("high", "low"))


Strategy = Union[Split, Bonferroni, Explicit]


@dataclasses.dataclass(frozen=True)
class ScoreBound:
    """The bound and the region it was computed at: {score >= threshold} ("high") or {score <= threshold} ("low")."""

    bound: EpsilonBound
    threshold: float
    direction: str
    strategy: str

    @property
    def epsilon(self) -> float:
        return self.bound.epsilon

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "direction": self.direction, "strategy": self.strategy,
                **self.bound.to_dict()}


def _scores(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ShapeError(f"Expected {name} to be a non-empty 1-D array of scores, got shape {arr.shape}.")
    if np.isnan(arr).any():
        raise ShapeError(f"{name} contains NaN scores ({int(np.isnan(arr).sum())} of {arr.size}).")
    return arr


def candidate_thresholds(pooled: np.ndarray, k: Optional[int]) -> np.ndarray:
    """About ``k`` cuts at quantile levels of ``pooled``, dense in both tails (where the best regions lie).

    ``k=None``: every distinct value of ``pooled``.
    """
    if k is None or pooled.size <= k:
        return np.unique(pooled)
    n = pooled.size
    half = max(1, k // 2)
    lo = np.unique(np.concatenate([np.geomspace(1.0 / n, 0.5, half), [0.5]]))
    levels = np.unique(np.concatenate([lo, 1.0 - lo]))
    t = np.quantile(pooled, np.clip(levels, 0.0, 1.0), method="higher")
    return np.unique(t)


def _counts_at(sorted_scores: np.ndarray, thresholds: np.ndarray, direction: str) -> np.ndarray:
    """Number of scores in the region {s >= t} or {s <= t}, for each t."""
    if direction == "high":
        return sorted_scores.size - np.searchsorted(sorted_scores, thresholds, side="left")
    return np.searchsorted(sorted_scores, thresholds, side="right")


def _best_region(pos: np.ndarray, neg: np.ndarray, thresholds: np.ndarray, directions, delta: float,
                 significance: float) -> Tuple[float, float, str]:
    """(bound, threshold, direction) maximising the CP bound at ``significance`` per binomial."""
    pos_s, neg_s = np.sort(pos), np.sort(neg)
    best = (-1.0, -np.inf, float(thresholds[0]), "high")
    for d in directions:
        tp = _counts_at(pos_s, thresholds, d)
        fp = _counts_at(neg_s, thresholds, d)
        eps, _, _ = _bound_arrays(tp, pos.size, fp, neg.size, delta, significance)
        # tie-break (all zero bounds) on the point estimate, so that a region is still chosen sensibly
        with np.errstate(divide="ignore", invalid="ignore"):
            est = np.log((tp / pos.size) + 1e-12) - np.log((fp / neg.size) + 1e-12)
        i = int(np.lexsort((est, eps))[-1])
        if (eps[i], est[i]) > best[:2]:
            best = (float(eps[i]), float(est[i]), float(thresholds[i]), d)
    return best[0], best[2], best[3]


def epsilon_lower_bound_from_scores(positive_scores, negative_scores, delta: float = 0.0,
                                    confidence: float = 0.95, strategy: Strategy = Split(),
                                    two_sided: bool = True) -> ScoreBound:
    """Empirical epsilon lower bound (valid with prob >= ``confidence``) from the scores of independent trials.

    ``positive_scores``: scores of the trials on x1 (or of members), ``negative_scores``: on
    x0 (non-members). ``two_sided``: consider both {s >= t} and {s <= t} (the attacker
    need not know which side x1 falls on; with DP symmetric in x0, x1 both are valid).
    """
    pos = _scores(positive_scores, "positive_scores")
    neg = _scores(negative_scores, "negative_scores")
    conf = _confidence(confidence)
    delta = _validate.delta(delta, allow_zero=True)
    directions = ("high", "low") if two_sided else ("high",)
    alpha = 1.0 - conf

    def counts(p, n, t, d):
        return (int(_counts_at(np.sort(p), np.array([t]), d)[0]),
                int(_counts_at(np.sort(n), np.array([t]), d)[0]))

    if isinstance(strategy, Explicit):
        t, d = float(strategy.threshold), strategy.direction
        tp, fp = counts(pos, neg, t, d)
        return ScoreBound(epsilon_lower_bound(tp, pos.size, fp, neg.size, delta, conf), t, d, "explicit")
    if isinstance(strategy, Bonferroni):
        thresholds = candidate_thresholds(np.concatenate([pos, neg]), strategy.max_thresholds)
        significance = bonferroni_significance(alpha, pos.size, neg.size, len(directions))
        _, t, d = _best_region(pos, neg, thresholds, directions, delta, significance)
        tp, fp = counts(pos, neg, t, d)
        b = _epsilon_bound(tp, pos.size, fp, neg.size, delta, significance, conf)
        return ScoreBound(b, t, d, "bonferroni")
    if isinstance(strategy, Split):
        rng = np.random.default_rng(strategy.seed)
        pp, nn = rng.permutation(pos), rng.permutation(neg)
        kp = int(round(pos.size * strategy.fraction))
        kn = int(round(neg.size * strategy.fraction))
        if min(kp, kn) < 1 or kp >= pos.size or kn >= neg.size:
            raise ShapeError(f"Too few scores to split ({pos.size} positive, {neg.size} negative) at "
                             f"fraction={strategy.fraction}.")
        sel_p, sel_n, ev_p, ev_n = pp[:kp], nn[:kn], pp[kp:], nn[kn:]
        thresholds = candidate_thresholds(np.concatenate([sel_p, sel_n]), strategy.max_thresholds)
        # Choose with a corrected criterion on the selection part: the plain per-region bound there
        # over-rewards far-tail regions that are lucky (a winner's curse), and those have too few
        # counts to hold up on the evaluation part. Any rule is valid here: the evaluation part is
        # independent of the choice.
        significance = alpha / (2.0 * thresholds.size * len(directions))
        _, t, d = _best_region(sel_p, sel_n, thresholds, directions, delta, significance)
        tp, fp = counts(ev_p, ev_n, t, d)
        return ScoreBound(epsilon_lower_bound(tp, ev_p.size, fp, ev_n.size, delta, conf), t, d,
                          f"split({strategy.fraction:g})")
    raise PrivacyParameterError(f"Unknown threshold strategy {strategy!r}; expected Split, Bonferroni or Explicit.")


def bonferroni_significance(alpha: float, n_pos: int, n_neg: int, directions: int = 1) -> float:
    """Per-end significance alpha / (directions (n_pos + n_neg)) that covers every threshold at once."""
    return alpha / (directions * (n_pos + n_neg))
