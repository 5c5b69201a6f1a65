"""Renyi DP of subsampled mechanisms: the math behind the 'rdp' accountant.

Each function returns, for an array of orders alpha > 1, an upper bound on the RDP
epsilon(alpha) of ONE subsampled release. Orders and bounds:

- :func:`poisson_gaussian_rdp`: the Poisson-subsampled Gaussian, exactly (Mironov,
  Talwar & Zhang 2019, "Renyi differential privacy of the sampled Gaussian
  mechanism", Sec. 3.3), at integer and fractional orders.
- :func:`poisson_subsampled_rdp`: any mechanism with an RDP curve under Poisson
  subsampling, add/remove relation (Zhu & Wang 2019, "Poisson subsampled Renyi
  differential privacy", Thm 6, the general upper bound), at integer orders.
- :func:`without_replacement_rdp`: any mechanism with an RDP curve under sampling
  without replacement, replace-one relation (Wang, Balle & Kasiviswanathan 2019,
  "Subsampled Renyi differential privacy and analytical moments accountant", Thm 9),
  at integer orders.

Fractional orders of the two general bounds come from the convexity of the cumulant
K(alpha) = (alpha - 1) D_alpha(P || Q) = log E_Q[(P/Q)^alpha] in alpha (Hoelder; this
is WBK19 Cor. 10): between the integers floor(alpha) and ceil(alpha), and between
K(1) = 0 and K(2) below 2, the true K lies below the chord of the integer bounds, so
the chord is a valid (if slightly loose) bound. Every bound is also capped by the RDP
of the mechanism without subsampling (subsampling never hurts: joint convexity of
exp(K)).

``base(alpha)`` always denotes the RDP curve of the mechanism on the batch under the
event's relation (for sums of clipped terms: sensitivity 1 for add/remove, 2 for
replace-one).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy import special

#: relative accuracy to which the alternating tails of the MTZ19 series are summed;
#: the first omitted terms are added as a bound on the rest, so the result stays an
#: upper bound whatever this is.
_SERIES_RTOL = 1e-10
_SERIES_MAX_TERMS = 1 << 22


def _log_comb(n, k):
    """log |binom(n, k)| for real n >= 0 and integer k >= 0 (arrays allowed)."""
    return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)


def _is_int(a: float) -> bool:
    return float(a).is_integer()


# ------------------------------------------------------------------ MTZ19 Gaussian
def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for integer alpha (MTZ19 Sec. 3.2):

        A_alpha = sum_{k=0}^{alpha} binom(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2)).
    """
    k = np.arange(alpha + 1, dtype=np.float64)
    log_terms = (_log_comb(float(alpha), k) + k * math.log(q) + (alpha - k) * math.log1p(-q)
                 + (k * k - k) / (2.0 * sigma**2))
    return float(special.logsumexp(log_terms))


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha for fractional alpha (MTZ19 Sec. 3.3), as an upper bound (NaN if not computable).

    With z0 = sigma^2 log(1/q - 1) + 1/2 the point where q mu_1 = (1 - q) mu_0,
    A_alpha = A_1 + A_2 with the two convergent binomial series

        A_1 = sum_i binom(alpha, i) (1-q)^(alpha-i) q^i     e^{(i^2 - i)/(2 sigma^2)} Phi((z0 - i) / sigma)
        A_2 = sum_i binom(alpha, i) q^(alpha-i) (1-q)^i     e^{(j^2 - j)/(2 sigma^2)} Phi((j - z0) / sigma),  j = alpha - i.

    For i > alpha the terms alternate in sign and shrink like i^(-alpha-2); the sums are
    truncated once the terms fall below _SERIES_RTOL (A - 1), and the magnitude of the
    first omitted terms is added (alternating-series remainder), so the value returned
    is >= the true A_alpha.
    """
    z0 = sigma**2 * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    n = 256
    while True:
        i = np.arange(n, dtype=np.float64)
        j = alpha - i
        log_coef = _log_comb(alpha, i)
        sign = special.gammasgn(alpha - i + 1.0)
        log_s0 = (log_coef + i * log_q + j * log_1mq + (i * i - i) / (2 * sigma**2)
                  + special.log_ndtr((z0 - i) / sigma))
        log_s1 = (log_coef + j * log_q + i * log_1mq + (j * j - j) / (2 * sigma**2)
                  + special.log_ndtr((j - z0) / sigma))
        log_all = np.concatenate([log_s0, log_s1])
        signs = np.concatenate([sign, sign])
        m = float(np.max(log_all))
        scaled = np.exp(log_all - m)
        total = float(np.sum(signs * scaled))  # sum / e^m
        # remainder bound: the last computed term of each series bounds what follows;
        # plus a margin for the rounding of the signed sum
        tail = float(scaled[n - 1] + scaled[-1])
        if not (total > 0 and math.isfinite(total) and math.isfinite(m) and math.isfinite(tail)):
            return math.nan  # the series is not computable in floats (tiny sigma): the caller caps
        log_a = math.log(total) + m
        # compare the tail with A - 1 (A >= 1), both scaled by e^-m
        excess = -math.expm1(-log_a) * total  # (A - 1) / e^m
        if tail <= _SERIES_RTOL * excess or n >= _SERIES_MAX_TERMS:
            rounding = 8 * np.finfo(float).eps * float(np.sum(scaled))
            return math.log(total + tail + rounding) + m
        n *= 4


def _subsampled(q: float, base: Callable[[float], float], orders: Sequence[float], cgf_int) -> np.ndarray:
    """RDP at ``orders`` from ``cgf_int(eps, alpha)``, the subsampled cumulant at integer alpha given the
    base curve ``eps`` tabulated at integer orders; q = 1 returns ``base`` itself."""
    orders = np.asarray(orders, dtype=np.float64)
    if q == 1.0:
        return np.array([float(base(a)) for a in orders])
    finite = orders[np.isfinite(orders)]
    max_order = int(math.ceil(float(finite.max()))) if finite.size else 2
    eps = _base_curve(base, max(max_order, 2))
    return _from_integer_cgf(lambda a: cgf_int(eps, a), base, orders)


def poisson_gaussian_rdp(q: float, sigma: float, orders: Sequence[float]) -> np.ndarray:
    """RDP of the Poisson-subsampled Gaussian (Mironov, Talwar & Zhang 2019).

    One release adds N(0, sigma^2) to the sum of a Poisson(q) subsample of terms each of
    L2 norm <= 1 (add/remove relation). MTZ19 show that its RDP of order alpha is
    log(A_alpha) / (alpha - 1), with A_alpha = E_{x ~ mu_0}[(mu(x) / mu_0(x))^alpha],
    mu_0 = N(0, sigma^2), mu = (1 - q) mu_0 + q N(1, sigma^2) (the other direction is
    smaller, their Thm 5). Integer orders are a finite sum, fractional ones the
    series of their Sec. 3.3. q = 1 gives alpha / (2 sigma^2).
    """
    orders = np.asarray(orders, dtype=np.float64)
    square = sigma * sigma
    if square == 0.0 or math.isinf(0.5 / square):  # sigma = 0, or so small that 1/sigma^2 leaves the floats
        return np.full(orders.shape, math.inf)
    if q == 1.0:
        return orders / (2.0 * sigma**2)
    out = np.empty(orders.shape)
    for idx, a in enumerate(orders):
        if math.isinf(a):
            out[idx] = math.inf
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            log_a = _log_a_int(q, sigma, int(a)) if _is_int(a) else _log_a_frac(q, sigma, float(a))
            # never above the unsubsampled Gaussian (A_alpha <= e^{(alpha-1) alpha / (2 sigma^2)}); that
            # cap is also the value where the series breaks down (NaN from inf - inf at tiny sigma)
            cap = a / (2.0 * sigma**2)
        out[idx] = cap if math.isnan(log_a) else min(max(log_a, 0.0) / (a - 1.0), cap)
    return out


# ------------------------------------------------------- general (integer) bounds
def _base_curve(base: Callable[[float], float], max_order: int) -> np.ndarray:
    """[nan, nan, eps(2), ..., eps(max_order)] (index = order)."""
    eps = np.full(max_order + 1, np.nan)
    for order in range(2, max_order + 1):
        eps[order] = float(base(order))
    return eps


def _poisson_cgf_int(q: float, eps: np.ndarray, alpha: int) -> float:
    """(alpha - 1) x ZW19 Thm 6 bound at integer alpha >= 2:

        log[ (1-q)^(alpha-1) (alpha q - q + 1) + binom(alpha, 2) q^2 (1-q)^(alpha-2) e^{eps(2)}
             + 3 sum_{l=3}^{alpha} binom(alpha, l) (1-q)^(alpha-l) q^l e^{(l-1) eps(l)} ].
    """
    log_q, log_1mq = math.log(q), math.log1p(-q)
    terms = [(alpha - 1) * log_1mq + math.log1p((alpha - 1) * q),
             float(_log_comb(alpha, 2)) + 2 * log_q + (alpha - 2) * log_1mq + eps[2]]
    if alpha >= 3:
        ell = np.arange(3, alpha + 1, dtype=np.float64)
        t = (math.log(3.0) + _log_comb(float(alpha), ell) + ell * log_q + (alpha - ell) * log_1mq
             + (ell - 1) * eps[3:alpha + 1])
        terms.extend(t.tolist())
    return float(special.logsumexp(terms))


def _log_expm1(x: float) -> float:
    """log(e^x - 1) for x > 0 (inf for x = inf)."""
    if math.isinf(x):
        return math.inf
    if x > 30:
        return x + math.log1p(-math.exp(-x))
    return math.log(math.expm1(x))


def _wor_cgf_int(q: float, eps: np.ndarray, eps_inf: float, alpha: int) -> float:
    """(alpha - 1) x WBK19 Thm 9 bound at integer alpha >= 2:

        log[ 1 + q^2 binom(alpha, 2) min{4 (e^{eps(2)} - 1), e^{eps(2)} min{2, (e^{eps(inf)} - 1)^2}}
             + sum_{j=3}^{alpha} q^j binom(alpha, j) e^{(j-1) eps(j)} min{2, (e^{eps(inf)} - 1)^j} ].
    """
    log_q = math.log(q)
    lem1_inf = _log_expm1(eps_inf)
    t2 = min(math.log(4.0) + _log_expm1(eps[2]) if eps[2] > 0 else -math.inf,
             eps[2] + min(math.log(2.0), 2 * lem1_inf))
    terms = [0.0, float(_log_comb(alpha, 2)) + 2 * log_q + t2]
    if alpha >= 3:
        j = np.arange(3, alpha + 1, dtype=np.float64)
        t = (j * log_q + _log_comb(float(alpha), j) + (j - 1) * eps[3:alpha + 1]
             + np.minimum(math.log(2.0), j * lem1_inf))
        terms.extend(t.tolist())
    return float(special.logsumexp(terms))


def _from_integer_cgf(cgf_int: Callable[[int], float], base: Callable[[float], float],
                      orders: np.ndarray) -> np.ndarray:
    """RDP at ``orders`` from an integer-order cumulant bound, chords in between, capped by ``base``."""
    cache: dict[int, float] = {1: 0.0}

    def k(order: int) -> float:
        if order not in cache:
            cache[order] = cgf_int(order)
        return cache[order]

    out = np.empty(orders.shape)
    for idx, a in enumerate(orders):
        if math.isinf(a):
            out[idx] = float(base(a))
            continue
        lo, hi = math.floor(a), math.ceil(a)
        if lo == hi:
            cgf = k(lo)
        else:
            t = a - lo
            cgf = (1 - t) * k(lo) + t * k(hi)
        value = max(cgf, 0.0) / (a - 1.0)
        try:
            cap = float(base(a))
        except (ArithmeticError, ValueError):  # a curve defined at integer orders only
            cap = math.inf
        out[idx] = min(value, cap) if not math.isnan(cap) else value
    return out


def poisson_subsampled_rdp(q: float, base: Callable[[float], float], orders: Sequence[float]) -> np.ndarray:
    """RDP of any mechanism under Poisson subsampling, add/remove (Zhu & Wang 2019, Thm 6).

    ``base(alpha)`` is the mechanism's RDP on the batch (sensitivity 1). The general
    upper bound of ZW19 Thm 6 is evaluated at integer orders >= 2; fractional orders
    use the chord of the cumulant (see the module docstring). q = 1 returns ``base``.
    """
    return _subsampled(q, base, orders, lambda eps, a: _poisson_cgf_int(q, eps, a))


def without_replacement_rdp(q: float, base: Callable[[float], float], orders: Sequence[float],
                            eps_inf: float = math.inf) -> np.ndarray:
    """RDP of any mechanism under sampling without replacement, replace-one (WBK19, Thm 9).

    ``q`` = m / n, the batch size over the dataset size; ``base(alpha)`` the mechanism's
    RDP on the batch under replace-one (for a sum of terms clipped to C with noise
    z C: the curve of sensitivity 2); ``eps_inf`` its pure-DP epsilon (inf if none).
    Integer orders >= 2 as in the theorem; fractional orders by the chord of the cumulant.
    """
    return _subsampled(q, base, orders, lambda eps, a: _wor_cgf_int(q, eps, eps_inf, a))
