"""Privacy auditing with one training run (Steinke, Nasr & Jagielski 2023).

"Privacy Auditing with One (1) Training Run" (NeurIPS 2023, arXiv:2305.08846). Instead
of training many models on neighbouring datasets, insert m *canaries* into one run, each
independently with probability 1/2: S in {-1, +1}^m uniform (S_i = +1: canary i is in
the training set; the rest of the data is fixed). After training, the auditor scores
every canary from what the run released (e.g. -loss: high = looks included), guesses
T_i = +1 for the k+ highest scores, T_i = -1 for the k- lowest, and abstains (T_i = 0)
on the rest. With r = k+ + k- guesses, let W = #{i : T_i = S_i} be the correct ones.

Their main theorem: if the training algorithm is (epsilon, delta)-DP with respect to
each canary, then for every v

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..m} (f(v - i) - f(v)) / i,
    f(v) = P[ Binomial(r, e^epsilon / (1 + e^epsilon)) >= v ],

i.e. the correct guesses are no better than r guesses of randomised response with
epsilon, up to the delta term. (The max can stop at i = v: f(v - i) = 1 for i >= v, so
larger i only shrink the ratio.) For pure DP (delta = 0) this is the tail of the
binomial itself, which is exact for randomised response: the bound is tight.

The audit observes (r, v) and computes the p-value p(epsilon) = right-hand side above
(:func:`one_run_p_value`, the paper's ``p_value_DP_audit``). Every epsilon with
p(epsilon) < beta = 1 - confidence is rejected; the lower bound is the largest rejected
epsilon, found as in the paper's Appendix D (``get_eps_audit``): grow an upper bracket
by 1 until p(hi) >= beta, bisect 30 times keeping p(lo) < beta, return lo
(:func:`one_run_epsilon_lower_bound`). With probability >= confidence over the canaries'
coin flips and the training run, the true epsilon is >= the bound. Unlike the
membership attacks' bounds this is a certificate from ONE run: the randomness it needs
is the canaries' inclusion, not independent training runs.

Validity needs: the inclusion S uniform and independent of everything else; the guesses
a function of the run's output only. :func:`one_run_audit` breaks ties between equal
scores at random (a seeded permutation independent of S), so that the order in which
the canaries are listed cannot leak S into the guesses. Choosing (k+, k-) after seeing
the scores is a multiple test: :func:`one_run_audit` tries a fixed list of candidates
and takes each at significance beta / (number of candidates) (a union bound), so the
best of them keeps the stated confidence.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Tuple

import numpy as np
import torch
from scipy import stats

from dpfa import _validate
from dpfa.attacks.bounds import _confidence
from dpfa.errors import PrivacyParameterError, ShapeError

__all__ = ["OneRunAuditResult", "one_run_p_value", "one_run_epsilon_lower_bound", "one_run_guesses",
           "one_run_audit", "canary_inclusion", "default_guess_counts", "BISECTION_STEPS"]

BISECTION_STEPS = 30
"""Bisection steps of the paper's ``get_eps_audit``: the bound is within 2^-30 of the crossing, below it."""


def _int(value, name: str, minimum: int = 0) -> int:
    return _validate.count(value, name, minimum)


def _mrv(m, r, v) -> Tuple[int, int, int]:
    m, r, v = _int(m, "m", 1), _int(r, "r"), _int(v, "v")
    if not v <= r <= m:
        raise PrivacyParameterError(f"Expected 0 <= v <= r <= m (correct guesses <= guesses <= canaries), got "
                                    f"v={v}, r={r}, m={m}.")
    return m, r, v


def _p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomised response: e^eps / (1 + e^eps)
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0.0 or v == 0:
        return min(tail, 1.0)
    # f(v - i) - f(v) = P[v - i <= Binomial(r, q) < v] = sum_{j=1..i} pmf(v - j), for i = 1..v
    gaps = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = max(0.0, float(np.max(gaps / np.arange(1, v + 1))))
    return min(tail + alpha * delta * 2 * m, 1.0)


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Upper bound on P[W >= v] under (epsilon, delta)-DP: f(v) + 2 m delta max_i (f(v - i) - f(v)) / i.

    ``m`` canaries, ``r`` guesses, ``v`` correct; f(v) = P[Binomial(r, e^eps / (1 + e^eps))
    >= v] (see the module docstring). Capped at 1. Example: m = r = v = 1, delta = 0:
    e^eps / (1 + e^eps) (one correct guess is as likely as randomised response's).
    """
    m, r, v = _mrv(m, r, v)
    eps = _validate._real("epsilon", epsilon, "[0, inf)")
    if not 0.0 <= eps < math.inf:
        raise PrivacyParameterError(f"Expected epsilon={epsilon!r} in [0, inf).")
    return _p_value(m, r, v, eps, _validate.delta(delta, allow_zero=True))


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct guesses out of ``r`` (``m`` canaries) reject at ``confidence``.

    The paper's Appendix D search: lo = 0, hi = 1; hi += 1 while p(hi) < beta
    (beta = 1 - confidence); then :data:`BISECTION_STEPS` halvings keeping p(lo) < beta <=
    p(hi); returns lo (0 when nothing is rejected). Examples (delta = 0): r = v = 10 at
    95% gives log(q / (1 - q)) with q = 0.05^(1/10), 1.0519; v <= r / 2 gives 0.
    """
    m, r, v = _mrv(m, r, v)
    delta = _validate.delta(delta, allow_zero=True)
    beta = 1.0 - _confidence(confidence)
    lo, hi = 0.0, 1.0
    while _p_value(m, r, v, hi, delta) < beta:
        hi += 1.0
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2.0
        if _p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


# ------------------------------------------------------------------ the audit
def canary_inclusion(m: int, seed: Optional[int] = None) -> np.ndarray:
    """m independent fair coins: True = the canary goes into the training set (S_i = +1).

    ``seed=None`` draws from the OS's entropy (an audit's coins should be unpredictable
    by the training code); a seed makes them repeatable.
    """
    m = _validate.count(m, "m")
    if seed is not None:
        seed = _validate.count(seed, "seed", minimum=0)
    return np.random.default_rng(seed).random(m) < 0.5


def _scores(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to(torch.float64).cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ShapeError(f"Expected scores to be a non-empty 1-D array (one per canary), got shape {arr.shape}.")
    if np.isnan(arr).any():
        i = int(np.flatnonzero(np.isnan(arr))[0])
        raise ShapeError(f"scores has {int(np.isnan(arr).sum())} NaN values (first: scores[{i}]).")
    return arr


def one_run_guesses(scores, k_plus: int, k_minus: int, seed: int = 0) -> np.ndarray:
    """Guesses T in {-1, 0, +1}^m: +1 for the ``k_plus`` highest scores, -1 for the ``k_minus`` lowest, else 0.

    Ties are broken by a random permutation drawn from ``seed`` (not by position, which
    could depend on which canaries were included).
    """
    s = _scores(scores)
    m = s.size
    kp, km = _int(k_plus, "k_plus"), _int(k_minus, "k_minus")
    if kp + km > m:
        raise PrivacyParameterError(f"k_plus + k_minus = {kp} + {km} exceeds the {m} canaries.")
    perm = np.random.default_rng(_validate.count(seed, "seed", minimum=0)).permutation(m)
    order = perm[np.argsort(s[perm], kind="stable")]  # increasing score, ties in random order
    t = np.zeros(m, dtype=np.int8)
    if km:
        t[order[:km]] = -1
    if kp:
        t[order[m - kp:]] = 1
    return t


def default_guess_counts(m: int) -> Tuple[Tuple[int, int], ...]:
    """The (k+, k-) candidates tried by default: r = m/100, m/50, m/20, m/10, m/5, m/2, m guesses.

    Each r as all "in" guesses (k+ = r), all "out" (k- = r) and half of each; duplicates
    and r = 0 dropped. A memorising model is caught by its k+ (the members it is sure
    of), an overfitting one by its k- (the non-members it gets wrong).
    """
    m = _validate.count(m, "m")
    out = []
    for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
        r = int(round(f * m))
        if r < 1:
            continue
        for pair in ((r, 0), (0, r), (r - r // 2, r // 2)):
            if pair not in out:
                out.append(pair)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class OneRunAuditResult:
    """A one-run audit: with probability >= ``confidence``, the true epsilon >= ``epsilon_lower_bound``.

    ``m`` canaries (``n_included`` of them in the run), the chosen guesses (``k_plus``,
    ``k_minus``; ``r`` = their sum) of which ``v`` were correct; ``candidates``: every
    (k+, k-) tried, each at significance (1 - confidence) / len(candidates), with its r, v
    and bound. ``passed``: the bound does not exceed ``claimed_epsilon`` (True without a
    claim).
    """

    epsilon_lower_bound: float
    confidence: float
    delta: float
    m: int
    n_included: int
    k_plus: int
    k_minus: int
    r: int
    v: int
    claimed_epsilon: Optional[float] = None
    candidates: Tuple[dict, ...] = dataclasses.field(default=(), compare=False)

    @property
    def passed(self) -> bool:
        return self.claimed_epsilon is None or self.epsilon_lower_bound <= self.claimed_epsilon

    @property
    def precision(self) -> float:
        """v / r, the fraction of correct guesses (0 without guesses)."""
        return self.v / self.r if self.r else 0.0

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["candidates"] = [dict(c) for c in self.candidates]
        out["passed"] = self.passed
        out["precision"] = self.precision
        return out

    def __str__(self) -> str:
        claim = "" if self.claimed_epsilon is None else (
            f"; claimed {self.claimed_epsilon:.4g}: {'PASS' if self.passed else 'FAIL'}")
        return (f"one-run audit ({self.m} canaries, {self.n_included} included): {self.v} of {self.r} guesses "
                f"correct (k+ {self.k_plus}, k- {self.k_minus}); epsilon >= {self.epsilon_lower_bound:.4g} at "
                f"{self.confidence:.0%} (delta {self.delta:g}, {len(self.candidates)} candidates){claim}")


def _pairs(guesses, m: int) -> Tuple[Tuple[int, int], ...]:
    if guesses is None:
        return default_guess_counts(m)
    if (isinstance(guesses, (tuple, list)) and len(guesses) == 2
            and all(isinstance(g, (numbers.Integral, np.integer)) for g in guesses)):
        guesses = [tuple(guesses)]
    pairs = []
    for g in guesses:
        if not (isinstance(g, (tuple, list)) and len(g) == 2):
            raise PrivacyParameterError(f"Expected guesses to be (k_plus, k_minus) or a list of such pairs, got "
                                        f"{guesses!r}.")
        kp, km = _int(g[0], "k_plus"), _int(g[1], "k_minus")
        if kp + km > m:
            raise PrivacyParameterError(f"Guesses (k_plus={kp}, k_minus={km}) exceed the {m} canaries.")
        pairs.append((kp, km))
    if not pairs:
        raise PrivacyParameterError("guesses is empty; give at least one (k_plus, k_minus) pair.")
    return tuple(dict.fromkeys(pairs))


def one_run_audit(scores, included, *, guesses=None, delta: float = 0.0, confidence: float = 0.95,
                  claimed_epsilon: Optional[float] = None, seed: int = 0) -> OneRunAuditResult:
    """Steinke, Nasr & Jagielski's one-run audit from per-canary ``scores`` and the coins ``included``.

    ``scores`` (m,): higher = the run looks like it trained on the canary (e.g. minus its
    loss); ``included`` (m,) bool: whether it was (S_i = +1), drawn as fair coins before
    training (:func:`canary_inclusion`). ``guesses``: one (k_plus, k_minus) pair, a list
    of pairs, or None for :func:`default_guess_counts`; each pair is evaluated
    (:func:`one_run_guesses`, v = correct guesses) and bounded with
    :func:`one_run_epsilon_lower_bound` at significance (1 - confidence) / (number of
    pairs), and the largest bound is returned: valid at ``confidence`` by the union bound.
    ``delta``: the delta of the (epsilon, delta) claim being tested.
    """
    s = _scores(scores)
    inc = included.detach().cpu().numpy() if isinstance(included, torch.Tensor) else np.asarray(included)
    if inc.dtype != np.bool_:
        raise ShapeError(f"Expected included to be a boolean array (the canaries' coins), got dtype {inc.dtype}.")
    if inc.shape != s.shape:
        raise ShapeError(f"included has shape {inc.shape} but scores has {s.shape}: one coin per canary.")
    m = s.size
    conf = _confidence(confidence)
    delta = _validate.delta(delta, allow_zero=True)
    if claimed_epsilon is not None:
        claimed_epsilon = _validate.epsilon(claimed_epsilon, "claimed_epsilon")
    pairs = _pairs(guesses, m)
    per_conf = 1.0 - (1.0 - conf) / len(pairs)
    truth = np.where(inc, 1, -1)
    rows, best = [], None
    for kp, km in pairs:
        t = one_run_guesses(s, kp, km, seed)
        r = kp + km
        v = int(np.sum(t == truth))  # abstentions (0) never match
        eps = one_run_epsilon_lower_bound(m, r, v, delta, per_conf)
        row = {"k_plus": kp, "k_minus": km, "r": r, "v": v, "epsilon_lower_bound": eps}
        rows.append(row)
        if best is None or eps > best["epsilon_lower_bound"]:
            best = row
    return OneRunAuditResult(
        epsilon_lower_bound=best["epsilon_lower_bound"], confidence=conf, delta=delta, m=m,
        n_included=int(inc.sum()), k_plus=best["k_plus"], k_minus=best["k_minus"], r=best["r"], v=best["v"],
        claimed_epsilon=claimed_epsilon, candidates=tuple(rows),
    )
