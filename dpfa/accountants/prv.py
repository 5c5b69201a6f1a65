"""The PRV accountant (through prv-accountant 0.2.0) and the privacy random variables it lacks.

Gopi, Lee & Wutschitz 2021 ("Numerical composition of differential privacy") compose
privacy random variables (the privacy loss log(P(o)/Q(o)) of one release, o ~ P) by FFT
on a truncated, discretised domain, with explicit error bounds: for error parameters
(eps_error, delta_error) the true epsilon lies in [eps_low, eps_up] and the true delta
in [delta_low, delta_up]. This accountant reports the conservative ends, ``eps_up`` and
``delta_up``.

Error chosen here: eps_error = 0.25% of epsilon (at least 1e-3; sized by a coarse first
pass at 5%) and delta_error = 0.1% of delta. So ``get_epsilon`` exceeds the true
epsilon by about 0.25% (at most 0.5%), and ``get_delta(eps)`` returns at most
delta(eps - eps_error) + delta_error.

Both directions of Poisson subsampling under add/remove are composed, the *remove* pair
((1-q) mu_0 + q mu_1 vs mu_0) and the *add* pair (mu_0 vs (1-q) mu_0 + q mu_1), and the
larger epsilon/delta is reported: prv-accountant ships only the former, which is the
larger one for the Gaussian in every case we know, but nothing in the composition
theorem guarantees that for every mechanism and every number of steps.

Failures fall back to the RDP bound with a warning (:mod:`dpfa.accountants.numerical`):
an error of prv-accountant (0.2.0 raises "Floating point errors will dominate" below the
delta its grid resolves, e.g. sigma 1, q 0.02, 500 steps, delta <= 1e-14), epsilon = inf,
a domain of more than :data:`MAX_DOMAIN_POINTS` points (very small noise), a value above
the RDP bound, or a non-monotone jump: epsilon at 2 delta above epsilon at delta by more
than the error (microsoft/prv_accountant issue 17: 0.056 at delta 1.10e-18, 3.8 at
1.13e-18).

Supported events: Poisson sampling under add/remove at any rate; any scheme at rate 1
under either relation (replace-one doubles the sensitivity). Sampling without
replacement and Poisson sampling under replace-one are refused: use 'rdp' (WBK19) for
the former and 'pld' (Gaussian) for the latter. A mechanism's ``prv()`` may accept
``neighboring`` and ``direction`` keywords; one that does not must return a PRV valid
for both directions, and then cannot be accounted under replace-one.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional

import numpy as np
import prv_accountant
from prv_accountant import composers, discretisers
from prv_accountant.accountant import compute_safe_domain_size
from prv_accountant.domain import Domain
from prv_accountant.other_accountants import RDP as _PRVRDP
from prv_accountant.privacy_random_variables import (
    PoissonSubsampledGaussianMechanism,
    PrivacyRandomVariable,
    PrivacyRandomVariableTruncated,
)
from scipy import integrate, special

from dpfa.accountants.conversion import delta_from_rdp
from dpfa.accountants.events import SampledMechanismEvent
from dpfa.accountants.numerical import NumericalAccountant, NumericalFailure
from dpfa.accountants.rdp_subsampling import poisson_gaussian_rdp, poisson_subsampled_rdp
from dpfa.errors import DPFAError, MissingPrivacyCurveError, PrivacyParameterError, UnsupportedEventError

#: eps_error as a fraction of epsilon, its floor, and delta_error as a fraction of delta
EPS_ERROR_REL = 2.5e-3
#: eps_error of the first, coarse pass that sizes the fine one
COARSE_EPS_ERROR_REL = 5e-2
EPS_ERROR_MIN = 1e-3
DELTA_ERROR_REL = 1e-3
DELTA_ERROR_MIN = 1e-15
#: below this delta_error the FFTs run in long double, as prv-accountant does
FLOAT64_MIN_DELTA_ERROR = 1e-11
#: most points of the discretised domain (~1 s a million); the accountants' usual
#: configurations need < 1e6, very small noise multipliers 1e7 and more
MAX_DOMAIN_POINTS = 5_000_000

DIRECTIONS = ("remove", "add")


# ============================================================ privacy random variables
class _PoissonMixturePRV(PrivacyRandomVariable):
    """Privacy loss of Poisson subsampling of an additive-noise mechanism with monotone ratio.

    mu_0 is the noise law, mu_1 the law shifted by the sensitivity, r(x) = mu_1(x)/mu_0(x)
    non-decreasing, and x(s) the point where (1 - q) + q r(x) = e^s. Direction "remove":
    P = (1-q) mu_0 + q mu_1, Q = mu_0, loss log((1-q) + q r(X)), X ~ P (non-decreasing in X).
    Direction "add": P = mu_0, Q = (1-q) mu_0 + q mu_1, loss -log((1-q) + q r(X)), X ~ mu_0
    (non-increasing in X). Subclasses give the cdf/sf of mu_0 and x(s) on (l_min, l_max).
    """

    def __init__(self, sampling_probability: float, direction: str) -> None:
        if direction not in DIRECTIONS:
            raise PrivacyParameterError(f"Expected direction in {DIRECTIONS}, got {direction!r}.")
        self.q = float(sampling_probability)
        self.direction = direction
        self._rdp_cache: dict[float, float] = {}

    # mu_0 law and the shift
    shift: float = 1.0

    def _cdf0(self, x):
        raise NotImplementedError

    def _sf0(self, x):
        raise NotImplementedError

    def _loss_range(self) -> tuple[float, float]:
        raise NotImplementedError

    def _x_of(self, s):
        raise NotImplementedError

    def _p_le(self, x):  # P(X <= x) under the remove mixture
        return (1 - self.q) * self._cdf0(x) + self.q * self._cdf0(x - self.shift)

    def _p_gt(self, x):
        return (1 - self.q) * self._sf0(x) + self.q * self._sf0(x - self.shift)

    def _cdf_sf(self, t):
        t = np.asarray(t, dtype=np.float64)
        lo, hi = self._loss_range()
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            if self.direction == "remove":
                inside = (t >= lo) & (t < hi)
                x = self._x_of(np.where(inside, t, 0.5 * (lo + hi) if math.isfinite(hi) else lo + 1.0))
                cdf = np.where(t < lo, 0.0, np.where(t >= hi, 1.0, self._p_le(x)))
                sf = np.where(t < lo, 1.0, np.where(t >= hi, 0.0, self._p_gt(x)))
            else:  # loss <= t  <=>  X >= x(-t)
                s = -t
                inside = (s > lo) & (s <= hi)
                x = self._x_of(np.where(inside, s, 0.5 * (lo + hi) if math.isfinite(hi) else lo + 1.0))
                cdf = np.where(s > hi, 0.0, np.where(s <= lo, 1.0, self._sf0(x)))
                sf = np.where(s > hi, 1.0, np.where(s <= lo, 0.0, self._cdf0(x)))
        return cdf, sf

    def cdf(self, t):
        return self._cdf_sf(t)[0]

    def sf(self, t):
        return self._cdf_sf(t)[1]

    @property
    def atoms(self) -> tuple[float, ...]:
        """Points where the cdf jumps (the ends of the loss range, where finite)."""
        lo, hi = self._loss_range()
        ends = (lo, hi) if self.direction == "remove" else (-hi, -lo)
        return tuple(t for t in ends if math.isfinite(t))

    def probability(self, a, b):
        """P(a < L <= b), from the cdf in the lower half and the survival function in the upper
        half (no cancellation in the upper tail, which is what delta is made of)."""
        cdf_a, sf_a = self._cdf_sf(a)
        cdf_b, sf_b = self._cdf_sf(b)
        return np.maximum(np.where(cdf_b < 0.5, cdf_b - cdf_a, sf_a - sf_b), 0.0)


class PoissonSubsampledGaussianPRV(PoissonSubsampledGaussianMechanism):
    """prv-accountant's Poisson-subsampled Gaussian (the *remove* direction), with our RDP.

    The cdf is prv-accountant's. ``rdp`` (which only sizes the domain) is Mironov, Talwar &
    Zhang 2019 from :mod:`dpfa.accountants.rdp_subsampling`, memoised: the package's copy of
    the TF-Privacy series is slow at fractional orders and is called for every order at
    every query.
    """

    def __init__(self, sampling_probability: float, noise_multiplier: float) -> None:
        super().__init__(sampling_probability=sampling_probability, noise_multiplier=noise_multiplier)
        self._rdp_cache: dict[float, float] = {}

    def rdp(self, alpha: float) -> float:
        if alpha not in self._rdp_cache:
            self._rdp_cache[alpha] = float(poisson_gaussian_rdp(float(self.p), float(self.sigma), [alpha])[0])
        return self._rdp_cache[alpha]


class PoissonSubsampledGaussianAddPRV(_PoissonMixturePRV):
    """The *add* direction of the Poisson-subsampled Gaussian (prv-accountant has the remove one).

    P = N(0, z^2), Q = (1-q) N(0, z^2) + q N(1, z^2); the loss -log(1 - q + q e^{(2X-1)/(2 z^2)})
    is at most -log(1 - q), and L <= t iff X >= x(-t), x(s) = z^2 log((e^s - 1 + q)/q) + 1/2,
    so cdf(t) = Phi(-x(-t)/z) for t < -log(1-q) (Zhu, Dong & Wang 2022 discuss both
    directions). Its RDP is at most that of the remove pair (Mironov, Talwar & Zhang 2019,
    Thm 5), which sizes the domain.
    """

    def __init__(self, sampling_probability: float, noise_multiplier: float) -> None:
        super().__init__(sampling_probability, "add")
        self.sigma = float(noise_multiplier)

    def _cdf0(self, x):
        return special.ndtr(x / self.sigma)

    def _sf0(self, x):
        return special.ndtr(-x / self.sigma)

    def _loss_range(self):
        return math.log1p(-self.q), math.inf

    def _x_of(self, s):
        return self.sigma**2 * np.log((np.expm1(s) + self.q) / self.q) + 0.5

    def rdp(self, alpha: float) -> float:
        if alpha not in self._rdp_cache:
            self._rdp_cache[alpha] = float(poisson_gaussian_rdp(self.q, self.sigma, [alpha])[0])
        return self._rdp_cache[alpha]


class PoissonSubsampledLaplacePRV(_PoissonMixturePRV):
    """Poisson-subsampled Laplace mechanism, either direction, in closed form.

    Noise Lap(b) with b = z (in units of the L1 sensitivity 1), lambda = 1/z. With mu_0 =
    Lap(0, 1) and mu_1 = Lap(lambda, 1), r(x) = e^{|x| - |x - lambda|} is e^{-lambda} for
    x <= 0, e^{2x - lambda} on [0, lambda] and e^{lambda} beyond, so the loss has atoms at
    l_min = log(1 - q + q e^{-lambda}) and l_max = log(1 - q + q e^{lambda}) and, in
    between, x(s) = (lambda + log((e^s - 1 + q)/q)) / 2. The cdf is the mixture cdf
    (1-q) F_0(x) + q F_0(x - lambda) at x(t) (remove) or 1 - F_0(x(-t)) (add). Its RDP
    for sizing the domain is the bound of Zhu & Wang 2019, Thm 6.
    """

    def __init__(self, sampling_probability: float, noise_multiplier: float, direction: str = "remove") -> None:
        super().__init__(sampling_probability, direction)
        self.lam = 1.0 / float(noise_multiplier)
        self.shift = self.lam

    @staticmethod
    def _cdf0(x):
        return np.where(x < 0, 0.5 * np.exp(np.minimum(x, 0.0)), 1.0 - 0.5 * np.exp(-np.maximum(x, 0.0)))

    @staticmethod
    def _sf0(x):
        return np.where(x < 0, 1.0 - 0.5 * np.exp(np.minimum(x, 0.0)), 0.5 * np.exp(-np.maximum(x, 0.0)))

    def _loss_range(self):
        q, lam = self.q, self.lam
        return math.log1p(q * math.expm1(-lam)), math.log1p(q * math.expm1(lam))

    def _x_of(self, s):
        x = 0.5 * (self.lam + np.log((np.expm1(s) + self.q) / self.q))
        return np.clip(x, 0.0, self.lam)

    def _laplace_rdp(self, alpha: float) -> float:
        from dpfa.mechanisms.laplace import LaplaceMechanism

        return LaplaceMechanism().rdp(alpha, 1.0 / self.lam, 1.0)

    def rdp(self, alpha: float) -> float:
        if alpha not in self._rdp_cache:
            self._rdp_cache[alpha] = float(poisson_subsampled_rdp(self.q, self._laplace_rdp, [alpha])[0])
        return self._rdp_cache[alpha]


class _TruncatedPRV(PrivacyRandomVariableTruncated):
    """prv-accountant's truncation, whose mean also splits the integral at the PRV's atoms.

    The discretiser checks the discrete mean against this continuous one to dt/2; a
    quadrature across a jump of the cdf (the Laplace PRVs have two) misses that.
    """

    def mean(self) -> float:
        points = [-1e-1, -1e-2, -1e-3, -1e-4, -1e-5, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
        points += list(_atoms(self.prv))
        points = sorted({self.t_min, self.t_max, *(p for p in points if self.t_min < p < self.t_max)})
        m = 0.0
        for left, right in zip(points[:-1], points[1:]):
            # t dF on (left, right] = right F(right) - left F(left) - int F; F is smooth inside
            inner, _ = integrate.quad(self.cdf, left, right, limit=500)
            m += right * float(self.cdf(right)) - left * float(self.cdf(left)) - inner
        return m


def _atoms(prv) -> tuple[float, ...]:
    """Where the cdf of ``prv`` jumps: its ``atoms``, and for prv-accountant's full-batch
    LaplaceMechanism (loss in [-mu, mu], mass e^{-mu}/2 at -mu and 1/2 at mu) the two ends.
    Without them the quadrature of the mean crosses the jumps and prv-accountant's discretiser
    refuses the PRV ("Discrete mean differs from continuous mean"), e.g. z 7.5, 224 steps."""
    if isinstance(prv, prv_accountant.LaplaceMechanism):
        return (-float(prv.mu), float(prv.mu))
    return tuple(getattr(prv, "atoms", ()))


def compose_prvs(prvs, counts, eps_error: float, delta_error: float):
    """The composed, discretised PRV of ``counts[i]`` copies of ``prvs[i]`` (Gopi et al. 2021).

    The steps of prv-accountant's ``PRVAccountant.__init__`` and ``compute_composition``
    (safe domain from RDP, Remark 5.6; mesh from Thm 5.5; cell-centred discretisation;
    FFT self-composition, then convolution), with the truncation above.
    """
    total = sum(counts)
    half_width = compute_safe_domain_size(prvs, counts, eps_error=eps_error, delta_error=delta_error)
    mesh = eps_error / math.sqrt(total / 2 * math.log(12 / delta_error))
    points = 2 * half_width / mesh
    if not points <= MAX_DOMAIN_POINTS:
        raise NumericalFailure(f"its domain would have {points:.3g} points, more than {MAX_DOMAIN_POINTS:.0e}")
    domain = Domain.create_aligned(-half_width, half_width, mesh)
    dprvs = [discretisers.CellCentred().discretise(_TruncatedPRV(p, domain.t_min(), domain.t_max()), domain)
             for p in prvs]
    if delta_error >= FLOAT64_MIN_DELTA_ERROR:
        # FFTs in float64 instead of long double: 3-5x faster; the rounding (~1e-16 per cell)
        # stays far below delta_error at these deltas (epsilons agree to ~1e-9 relative)
        for d in dprvs:
            d.pmf = np.asarray(d.pmf, dtype=np.float64)
    return composers.Heterogeneous(dprvs).compute_composition(num_self_compositions=list(counts))


# ========================================================================= accountant
class PRVAccountant(NumericalAccountant):
    """PRV accountant (Gopi, Lee & Wutschitz 2021) through the prv-accountant package.

    ``eps_error_rel`` / ``delta_error_rel``: the error parameters as fractions of epsilon
    and delta (see the module docstring for what they guarantee).
    """

    name = "prv"

    def __init__(self, eps_error_rel: float = EPS_ERROR_REL, delta_error_rel: float = DELTA_ERROR_REL) -> None:
        super().__init__()
        self.eps_error_rel = float(eps_error_rel)
        self.delta_error_rel = float(delta_error_rel)
        self._prv_cache: dict[tuple[SampledMechanismEvent, str], Optional[PrivacyRandomVariable]] = {}

    # ------------------------------------------------------------------ checks
    def _check_event(self, event: SampledMechanismEvent) -> None:
        mechanism = self.mechanism_of(event)
        if not mechanism.has_curve("prv"):
            raise MissingPrivacyCurveError(
                f"Mechanism {event.mechanism!r} has no privacy random variable, so the 'prv' accountant cannot "
                "account it; use accountant='rdp' (or define prv(noise_multiplier, sampling_prob) on it)."
            )
        if event.sampling == "without_replacement" and event.sample_rate < 1.0:
            raise UnsupportedEventError(
                f"The 'prv' accountant does not support sampling='without_replacement' "
                f"(sample_rate={event.sample_rate!r}); use accountant='rdp' (Wang, Balle & Kasiviswanathan 2019)."
            )
        if event.noise_multiplier > 0:
            for direction in DIRECTIONS:
                self._prv(event, direction)  # dry run: raises what the mechanism refuses

    def _prv(self, event: SampledMechanismEvent, direction: str) -> Optional[PrivacyRandomVariable]:
        """The PRV of one release in ``direction``; None for "add" when it equals "remove"."""
        key = (event.with_count(1), direction)
        if key in self._prv_cache:
            return self._prv_cache[key]
        mechanism = self.mechanism_of(event)
        params = inspect.signature(mechanism.prv).parameters
        kwargs = {}
        if event.neighboring != "add_remove":
            if "neighboring" not in params:
                raise UnsupportedEventError(
                    f"Mechanism {event.mechanism!r}: its prv() takes no `neighboring` argument, so it cannot be "
                    f"accounted under neighboring={event.neighboring!r} by the 'prv' accountant; use 'rdp'."
                )
            kwargs["neighboring"] = event.neighboring
        symmetric = event.sample_rate == 1.0 or "direction" not in params
        if direction == "add" and symmetric:
            result = None
        else:
            if "direction" in params:
                kwargs["direction"] = direction
            result = mechanism.prv(event.noise_multiplier, event.sample_rate, **kwargs)
        self._prv_cache[key] = result
        return result

    def _groups(self) -> tuple[list[SampledMechanismEvent], list[int]]:
        """Distinct releases and their total counts (composition commutes)."""
        counts: dict[SampledMechanismEvent, int] = {}
        for e in self.history:
            key = e.with_count(1)
            counts[key] = counts.get(key, 0) + e.count
        return list(counts), list(counts.values())

    def _direction_prvs(self) -> tuple[list[list[PrivacyRandomVariable]], list[int]]:
        events, counts = self._groups()
        remove = [self._prv(e, "remove") for e in events]
        add = [self._prv(e, "add") for e in events]
        lists = [remove]
        if any(p is not None for p in add):
            lists.append([a if a is not None else r for a, r in zip(add, remove)])
        return lists, counts

    # -------------------------------------------------------------- accounting
    def _compose(self, prvs, counts, eps_error: float, delta_error: float):
        if not (math.isfinite(eps_error) and eps_error > 0):
            raise NumericalFailure(f"no usable error parameter (eps_error={eps_error!r})")
        try:
            return compose_prvs(prvs, counts, eps_error, delta_error)
        except (ValueError, RuntimeError, ArithmeticError, NotImplementedError, MemoryError) as exc:
            if isinstance(exc, (NumericalFailure, DPFAError)):
                raise
            raise NumericalFailure(f"prv-accountant failed: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _solve_epsilon(composed, delta: float, eps_error: float, delta_error: float) -> tuple[float, float]:
        """(estimate, upper end) of epsilon at ``delta``, after two sanity checks: both finite,
        and epsilon at min(2 delta, (1 + delta) / 2) not above the estimate by more than the error
        (epsilon cannot grow with delta: a jump means the grid no longer resolves delta)."""
        try:
            _, est, up = composed.compute_epsilon(delta, delta_error, eps_error)
        except (ValueError, RuntimeError, ArithmeticError) as exc:
            raise NumericalFailure(f"prv-accountant cannot resolve delta={delta!r}: {exc}") from exc
        est, up = float(est), float(up)
        if not (math.isfinite(est) and math.isfinite(up)):
            raise NumericalFailure(f"prv-accountant returned epsilon={up!r} at delta={delta!r}")
        probe = min(2.0 * delta, 0.5 * (1.0 + delta))
        try:
            probe_est = float(composed.compute_epsilon(probe, delta_error, eps_error)[1])
        except (ValueError, RuntimeError, ArithmeticError):
            probe_est = -math.inf  # no check possible at the larger delta
        if probe_est > est + eps_error:
            raise NumericalFailure(
                f"non-monotone: epsilon {probe_est:.6g} at delta={probe:.3g} is above {est:.6g} at delta={delta!r}"
            )
        return est, up

    def _numerical_epsilon(self, delta: float) -> float:
        lists, counts = self._direction_prvs()
        delta_error = max(self.delta_error_rel * delta, DELTA_ERROR_MIN)
        # coarse pass per direction: an estimate to size the fine pass, and a rigorous upper end
        coarse = []
        for prvs in lists:
            eps_ref = float(_PRVRDP(prvs=prvs).compute_epsilon(delta=delta, num_self_compositions=counts)[2])
            eps_error = max(COARSE_EPS_ERROR_REL * eps_ref, EPS_ERROR_MIN)
            est, up = self._solve_epsilon(self._compose(prvs, counts, eps_error, delta_error), delta, eps_error,
                                          delta_error)
            coarse.append((up, est, eps_error, prvs))
        best = 0.0
        for up, est, coarse_error, prvs in sorted(coarse, key=lambda c: -c[0]):
            if up <= best:  # this direction's epsilon <= up <= what is already reported
                continue
            eps_error = max(self.eps_error_rel * max(est, 0.0), EPS_ERROR_MIN)
            if eps_error < coarse_error:
                _, up = self._solve_epsilon(self._compose(prvs, counts, eps_error, delta_error), delta, eps_error,
                                            delta_error)
            best = max(best, up)
        return best

    def _numerical_delta(self, epsilon: float) -> float:
        lists, counts = self._direction_prvs()
        eps_error = max(self.eps_error_rel * epsilon, EPS_ERROR_MIN)
        coarse = []
        for prvs in lists:
            rdp = _PRVRDP(prvs=prvs)
            total = sum(r * n for r, n in zip(rdp.rdps, counts))
            delta_ref = delta_from_rdp(rdp.orders, total, epsilon)[0]
            delta_error = max(self.delta_error_rel * delta_ref, DELTA_ERROR_MIN)
            coarse_eps_error = max(COARSE_EPS_ERROR_REL * epsilon, EPS_ERROR_MIN)
            composed = self._compose(prvs, counts, coarse_eps_error, delta_error)
            est = float(composed.compute_delta_estimate(epsilon))
            up = float(composed.compute_delta_estimate(epsilon - coarse_eps_error)) + delta_error
            coarse.append((up, est, delta_error, prvs))
        best = 0.0
        for up, est, delta_error, prvs in sorted(coarse, key=lambda c: -c[0]):
            if up <= best:
                continue
            delta_error = min(delta_error, max(self.delta_error_rel * max(est, 0.0), DELTA_ERROR_MIN))
            composed = self._compose(prvs, counts, eps_error, delta_error)
            up = composed.compute_delta_estimate(epsilon - eps_error) + delta_error
            best = max(best, float(up))
        return best
