"""Privacy amplification by subsampling of a pure epsilon_0-DP mechanism, composed through a PLD.

One step runs an epsilon_0-DP mechanism on a subsample of rate q. Balle, Barthe &
Gaboardi 2018 ("Privacy amplification by subsampling", Thm 8 and 9; Table 1) show that
the step is epsilon'-DP with

    epsilon' = log(1 + q (e^{epsilon_0} - 1)),

for Poisson sampling under add/remove and for sampling without replacement (batch of
size q n) under replace-one; the base mechanism must be epsilon_0-DP under the same
relation (for a sum of terms clipped to C in L1 with Laplace noise b: epsilon_0 = C/b
under add/remove, 2C/b under replace-one). The steps are then composed *tightly* through
a dp-accounting PLD built from a dominating pair of distributions on a few points:

- Poisson, add/remove. With (P0, Q0) = ((e^e0, 1), (1, e^e0)) / (1 + e^e0), the
  randomised-response pair, every epsilon_0-DP pair is a post-processing of it (Kairouz,
  Oh & Viswanath 2015), so by joint convexity the *remove* pair ((1-q) Q0 + q P0, Q0) and
  the *add* pair (Q0, (1-q) Q0 + q P0) dominate the subsampled step in each direction
  (Zhu, Dong & Wang 2022, Thm 9), and they are attained (subsampled randomised response).
  Both are composed; the larger delta counts.
- Without replacement, replace-one. The advanced joint convexity of BBG18 (Thm 2) bounds
  the hockey-stick divergence of order e^eps >= 1 by (e^{epsilon'} - e^eps)_+ / (1 + e^e0).
  The symmetric three-point pair P* = (e^{e'}, e^{e0} - e^{e'}, 1) / (1 + e^{e0}), Q* = its
  reverse, attains that bound, and, the relation being symmetric, it also dominates the
  orders below 1; so it is a dominating pair of each step for any neighbouring pair, and
  its composition bounds the composed steps (Zhu, Dong & Wang 2022, Def. 7, Thm 10).

The privacy losses of both pairs are +-epsilon', +-epsilon'' and 0 with epsilon'' =
-log(1 - q (1 - e^{-epsilon_0})); the discretisation interval divides epsilon' exactly,
and the other losses are put on the grid by "connect the dots" (:func:`connect_the_dots`),
which yields a dominating pair again, so the results are upper bounds. Pure
composition, num_steps x epsilon', also holds (delta = 0) and caps the epsilon.

An (epsilon_0, delta_0)-DP base mechanism (``base_delta > 0``; Poisson sampling only). Its
canonical pair P0 = (delta_0, (1 - delta_0) e^{e0} / (1 + e^{e0}), (1 - delta_0) / (1 + e^{e0}), 0),
Q0 = P0 reversed, dominates every (epsilon_0, delta_0)-DP pair as a post-processing (Kairouz,
Oh & Viswanath 2015, Thm 2.1; Murtagh & Vadhan 2016), in both directions since it is
symmetric. So, by the same data-processing argument, the remove pair ((1-q) Q0 + q P0, Q0) and
the add pair (Q0, (1-q) Q0 + q P0) dominate the subsampled step, and their PLDs compose
tightly: the step's losses are +-epsilon', +-epsilon'', -+log(1 - q) and an infinite loss of
mass q delta_0 (the subsampled delta of Balle, Barthe & Gaboardi 2018). Nothing here adds
epsilons: the composition is the PLD's.
"""

from __future__ import annotations

import math
from typing import Optional

from dpfa import _validate
from dpfa.accountants.events import normalize_sampling
from dpfa.errors import PrivacyParameterError

#: target discretisation interval (the exact one divides epsilon')
TARGET_INTERVAL = 1e-4
#: Poisson: at least this many grid points per epsilon'', the loss that falls between them
MIN_POINTS_PER_LOSS = 20
#: cap on the size of the composed PLD grid, num_steps x (loss range) / interval
MAX_GRID = 2e7


class SubsamplingAmplification:
    """``num_steps`` runs of an ``base_epsilon``-DP mechanism, each on a subsample of ``sampling_rate``.

    ``sampling``: "poisson" (add/remove relation) or "without_replacement" (replace-one;
    the base mechanism must be ``base_epsilon``-DP under replace-one). ``base_delta``: the base
    mechanism is (base_epsilon, base_delta)-DP (Poisson only; see the module docstring).
    """

    def __init__(self, base_epsilon: float, sampling_rate: float, num_steps: int, sampling: str = "poisson",
                 value_discretization_interval: Optional[float] = None, base_delta: float = 0.0) -> None:
        self.base_epsilon = _validate.epsilon(base_epsilon, "base_epsilon")
        self.base_delta = _validate.delta(base_delta, "base_delta", allow_zero=True)
        self.sampling_rate = _validate.sample_rate(sampling_rate, "sampling_rate")
        self.num_steps = _validate.count(num_steps, "num_steps")
        self.sampling = normalize_sampling(sampling)
        if self.base_delta > 0 and self.sampling != "poisson":
            raise PrivacyParameterError(
                f"base_delta={self.base_delta!r} > 0 is supported with sampling='poisson' only; for sampling without "
                "replacement give a pure-DP base mechanism (base_delta=0).")
        if value_discretization_interval is not None:
            value_discretization_interval = _validate.positive(value_discretization_interval,
                                                               "value_discretization_interval")
        self._interval_override = value_discretization_interval
        self._pld = None

    @property
    def neighboring(self) -> str:
        return "add_remove" if self.sampling == "poisson" else "replace_one"

    @property
    def step_epsilon(self) -> float:
        """epsilon' = log(1 + q (e^{epsilon_0} - 1)) of one subsampled step (BBG18)."""
        return math.log1p(self.sampling_rate * math.expm1(self.base_epsilon))

    @property
    def value_discretization_interval(self) -> float:
        """An interval that divides epsilon' (so it is represented exactly)."""
        eps1 = self.step_epsilon
        if self._interval_override is not None:
            return self._interval_override
        if self.sampling == "poisson":
            # -epsilon'' is off the grid: resolve it even where a small sampling rate makes both
            # losses far smaller than TARGET_INTERVAL (else the chords overshoot by tens of %)
            eps2 = -math.log1p(-self.sampling_rate * -math.expm1(-self.base_epsilon))
            tail = -math.log1p(-self.sampling_rate) if self.base_delta > 0 and self.sampling_rate < 1 else 0.0
            target = max(min(TARGET_INTERVAL, eps2 / MIN_POINTS_PER_LOSS),
                         2.0 * self.num_steps * (eps1 + eps2 + tail) / MAX_GRID)
        else:
            target = max(TARGET_INTERVAL, 2.0 * self.num_steps * (eps1 + self.base_epsilon) / MAX_GRID)
        return eps1 / max(1, math.ceil(eps1 / target))

    def _log_pairs(self) -> tuple[dict, dict]:
        """(log P, log Q) of the dominating pair, as dicts outcome -> log mass."""
        e0, q = self.base_epsilon, self.sampling_rate
        log_norm = math.log1p(math.exp(e0)) if e0 < 30 else e0 + math.log1p(math.exp(-e0))
        if self.sampling == "poisson":
            # P0 = (d0, (1-d0) e^e0/(1+e^e0), (1-d0)/(1+e^e0), 0), Q0 = P0 reversed; upper = (1-q) Q0 + q P0
            d0 = self.base_delta
            log_keep = math.log1p(-d0) - log_norm
            log_d = math.log(d0) if d0 > 0 else -math.inf
            log_q = math.log(q)
            log_1mq = math.log1p(-q) if q < 1 else -math.inf
            upper = {0: math.log1p(q * math.expm1(e0)) + log_keep,               # 1 + q (e^e0 - 1)
                     1: e0 + math.log1p(-q * -math.expm1(-e0)) + log_keep,        # q + (1-q) e^e0
                     "a": log_q + log_d, "b": log_1mq + log_d}
            lower = {0: log_keep, 1: e0 + log_keep, "a": -math.inf, "b": log_d}
            return lower, upper
        eps1 = self.step_epsilon
        middle = e0 + math.log(-math.expm1(eps1 - e0)) if eps1 < e0 else -math.inf  # e^e0 - e^e'
        upper = {0: eps1 - log_norm, 1: middle - log_norm, 2: -log_norm}
        lower = {0: -log_norm, 1: middle - log_norm, 2: eps1 - log_norm}
        return lower, upper

    def pld(self):
        """The composed dp-accounting PrivacyLossDistribution of all steps."""
        if self._pld is None:
            from dp_accounting.pld import privacy_loss_distribution as pld_lib

            lower, upper = self._log_pairs()
            h = self.value_discretization_interval
            pmf_remove, inf_remove = connect_the_dots(upper, lower, h)
            if self.sampling == "poisson":
                pmf_add, inf_add = connect_the_dots(lower, upper, h)
                one = pld_lib.PrivacyLossDistribution.create_from_rounded_probability(
                    pmf_remove, inf_remove, h, pessimistic_estimate=True,
                    rounded_probability_mass_function_add=pmf_add, infinity_mass_add=inf_add, symmetric=False)
            else:  # the three-point pair is symmetric
                one = pld_lib.PrivacyLossDistribution.create_from_rounded_probability(
                    pmf_remove, inf_remove, h, pessimistic_estimate=True)
            self._pld = one.self_compose(self.num_steps)
        return self._pld

    def compute_epsilon(self, delta: float) -> float:
        """Smallest epsilon such that the ``num_steps`` subsampled steps are (epsilon, delta)-DP."""
        delta = _validate.delta(delta)
        pure = self.num_steps * self.step_epsilon
        if delta < -math.expm1(self.num_steps * math.log1p(-self.sampling_rate * self.base_delta)):
            pure = math.inf  # basic composition holds only at delta >= 1 - (1 - q delta_0)^T
        try:
            eps = float(self.pld().get_epsilon_for_delta(delta))
        except (ValueError, OverflowError, MemoryError) as exc:
            raise PrivacyParameterError(f"Amplification PLD failed numerically ({exc}).") from exc
        return max(0.0, min(eps, pure))

    def compute_delta(self, epsilon: float) -> float:
        """Smallest delta such that the ``num_steps`` subsampled steps are (epsilon, delta)-DP."""
        epsilon = _validate.epsilon(epsilon)
        if epsilon >= self.num_steps * self.step_epsilon and self.base_delta == 0:
            return 0.0
        return float(min(1.0, max(0.0, self.pld().get_delta_for_epsilon(epsilon))))

    def __repr__(self) -> str:
        extra = f", base_delta={self.base_delta!r}" if self.base_delta else ""
        return (f"SubsamplingAmplification(base_epsilon={self.base_epsilon!r}, sampling_rate={self.sampling_rate!r}, "
                f"num_steps={self.num_steps!r}, sampling={self.sampling!r}{extra})")


def connect_the_dots(log_upper: dict, log_lower: dict, interval: float) -> tuple[dict[int, float], float]:
    """Rounded PLD (index k -> mass of loss k x interval, infinity mass) of the pair (upper, lower).

    A loss l strictly between grid points a < l < b, with mass p under ``upper`` and
    p e^{-l} under ``lower``, is split into masses p_a = p expm1(b - l) / expm1(b - a) at a
    and p - p_a at b, which keeps both distributions' masses (Doroshenko, Ghazi, Kamath,
    Kumar & Manurangsi 2022, "Connect the dots"). The split pair's hockey-stick divergence
    is, as a function of e^eps, the chord of the original's convex hinge between e^a and
    e^b, hence above it for every order: the split pair dominates the original, and
    composing it gives upper bounds, with an error of second order in the interval
    (rounding every loss up, as ``from_two_probability_mass_functions`` does, costs first order).
    """
    pmf: dict[int, float] = {}
    infinity_mass = 0.0
    expm1_h = math.expm1(interval)
    for outcome, log_p in log_upper.items():
        if log_p == -math.inf:
            continue
        p = math.exp(log_p)
        log_q = log_lower.get(outcome, -math.inf)
        if log_q == -math.inf:
            infinity_mass += p
            continue
        loss = log_p - log_q
        x = loss / interval
        a = math.floor(x)
        if x == a:
            pmf[a] = pmf.get(a, 0.0) + p
            continue
        b_minus_l = (a + 1) * interval - loss
        p_a = p * math.expm1(b_minus_l) / expm1_h
        pmf[a] = pmf.get(a, 0.0) + p_a
        pmf[a + 1] = pmf.get(a + 1, 0.0) + (p - p_a)
    return pmf, infinity_mass
