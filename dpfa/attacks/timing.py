"""What the exact discrete Gaussian sampler's running time tells an observer (Jin et al. 2022).

Jin, McMurtry, Rubinstein & Ohrimenko (IEEE S&P 2022), "Are we there yet? Timing and
floating-point attacks on differential privacy systems", showed that rejection samplers of
the discrete Laplace and Gaussian take time that depends on the value they return, so an
adversary who times a release learns about the noise, and hence about the input. The
exact CKS20 sampler (:func:`dpfa.mechanisms.discrete_gaussian.sample_exact`) is such a
sampler: its discrete Laplace step draws a geometric V one Bernoulli(e^-1) at a time
(|Y| ~ t V, so about |Y| / t + 1 iterations), its integers grow with sigma, and the
number of rejection rounds is random. This module measures it; it fixes nothing.

- :func:`time_exact_sampler`: per-sample wall time (``time.perf_counter_ns``) and value.
- :func:`welch_timing_test`: Welch's unequal-variance t-test between two sets of times,
  winsorised at the pooled 99th percentile (a busy machine's scheduler stalls are
  milliseconds long and would otherwise swamp microsecond effects).
- :func:`exact_sampler_timing_report`: time against sigma (two noise scales, calls
  interleaved so that load drift hits both alike) and, at one sigma, time against the
  magnitude of the value drawn (|Y| <= sigma against |Y| > 2 sigma).

A significant t-test is a leak: the time separates the two groups. A non-significant one
is not a proof of constant time (the test has finite power, and the machine's own noise
hides small effects); constant-time sampling is out of dpfa's scope (see the README's
"sharp edges"). The numbers depend on the machine: report them with it.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Optional

import numpy as np
from scipy import stats

from dpfa import _validate
from dpfa.mechanisms.discrete_gaussian import sample_exact

__all__ = ["time_exact_sampler", "welch_timing_test", "WelchResult", "TimingReport",
           "exact_sampler_timing_report"]


@dataclasses.dataclass(frozen=True)
class WelchResult:
    """Welch's t-test between times ``a`` and ``b`` (nanoseconds): t > 0 when ``a`` is slower."""

    t: float
    p_value: float
    mean_a_ns: float
    mean_b_ns: float
    median_a_ns: float
    median_b_ns: float
    n_a: int
    n_b: int


@dataclasses.dataclass(frozen=True)
class TimingReport:
    """Time against sigma (``by_sigma``: the larger sigma as ``a``) and against |value| at one sigma
    (``by_magnitude``: |Y| > 2 sigma as ``a``, |Y| <= sigma as ``b``)."""

    sigmas: tuple[float, float]
    magnitude_sigma: float
    by_sigma: WelchResult
    by_magnitude: WelchResult


def time_exact_sampler(sigma, n: int, rng: Optional[random.Random] = None) -> tuple[np.ndarray, np.ndarray]:
    """(values, nanoseconds): ``n`` calls of ``sample_exact(1, sigma, rng)``, each timed alone."""
    n = _validate.count(n, "n")
    rng = random.SystemRandom() if rng is None else rng
    values = np.empty(n, dtype=np.int64)
    times = np.empty(n, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        (y,) = sample_exact(1, sigma, rng)
        times[i] = clock() - t0
        values[i] = y
    return values, times


def welch_timing_test(times_a, times_b, winsorize: float = 0.99) -> WelchResult:
    """Welch's t-test (scipy ``ttest_ind(equal_var=False)``) of two arrays of times, both clipped
    at the pooled ``winsorize`` quantile (1.0: raw times). Means are of the clipped times, medians
    of the raw ones."""
    a = np.asarray(times_a, dtype=np.float64)
    b = np.asarray(times_b, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        raise ValueError(f"Expected at least 2 times per group, got {a.size} and {b.size}.")
    if not (0.5 < winsorize <= 1.0):
        raise ValueError(f"Expected winsorize={winsorize!r} in (0.5, 1].")
    top = float(np.quantile(np.concatenate([a, b]), winsorize))
    ca, cb = np.minimum(a, top), np.minimum(b, top)
    res = stats.ttest_ind(ca, cb, equal_var=False)
    return WelchResult(t=float(res.statistic), p_value=float(res.pvalue), mean_a_ns=float(ca.mean()),
                       mean_b_ns=float(cb.mean()), median_a_ns=float(np.median(a)), median_b_ns=float(np.median(b)),
                       n_a=int(a.size), n_b=int(b.size))


def exact_sampler_timing_report(sigmas=(2.0, 2000.0), magnitude_sigma: float = 8.0, n: int = 2000,
                                rng: Optional[random.Random] = None) -> TimingReport:
    """Measure the exact sampler: ``n`` timed samples at each of ``sigmas``, and ``n`` at ``magnitude_sigma``.

    ``rng``: the sampler's randomness (default ``random.SystemRandom``, the OS CSPRNG, as in
    secure mode; its system calls are part of the time).
    """
    lo, hi = (float(s) for s in sigmas)
    n = _validate.count(n, "n")
    t_lo, t_hi = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    for i in range(n):  # interleaved
        t_lo[i] = time_exact_sampler(lo, 1, rng)[1][0]
        t_hi[i] = time_exact_sampler(hi, 1, rng)[1][0]
    by_sigma = welch_timing_test(t_hi, t_lo)
    s = float(magnitude_sigma)
    values, times = time_exact_sampler(s, n, rng)
    mag = np.abs(values)
    big, small = times[mag > 2.0 * s], times[mag <= s]
    by_magnitude = welch_timing_test(big, small)
    return TimingReport(sigmas=(lo, hi), magnitude_sigma=s, by_sigma=by_sigma, by_magnitude=by_magnitude)
