"""The discrete Gaussian mechanism: x + Y, Y ~ N_Z(0, sigma^2)^d, for integer-valued x.

The discrete Gaussian on the integers has pmf

    N_Z(0, sigma^2)(y) = exp(-y^2 / (2 sigma^2)) / sum_{z in Z} exp(-z^2 / (2 sigma^2)),

(sigma is its parameter, not its standard deviation, which is slightly smaller: see
:func:`variance`). Added to a vector with L2 sensitivity Delta on the integer grid
(``sensitivity_norm = "l2_grid"``: neighbouring inputs differ by an integer vector of
L2 norm <= Delta), it satisfies (Delta^2 / (2 sigma^2))-concentrated DP, i.e. Renyi DP
alpha Delta^2 / (2 sigma^2) of every order alpha > 1, exactly the curve of the
continuous Gaussian (Canonne, Kamath & Steinke 2020, "The Discrete Gaussian for
Differential Privacy", Thm 14 for the multivariate case). Values stay integers, so the
release is exact in finite arithmetic and secure aggregation can sum it.

Three samplers:

- :func:`sample_exact` (and ``DiscreteGaussianMechanism.sample_exact``): the exact
  sampler of CKS20 (Algorithms 1-3) with Python integers and a CSPRNG
  (``secrets.SystemRandom`` by default): every accept/reject decision compares random
  integers with integers, no floating point. Slow (pure Python); it is the reference.
- ``DiscreteGaussianMechanism.sample``: a vectorised torch sampler for large tensors
  (rejection from the discrete Laplace in float64, the algorithm of the device sampler).
- ``triton_sampler`` = :func:`dpfa.mechanisms.device_samplers.discrete_gaussian_sampler`,
  the same rejection scheme inside Triton kernels (its docstring has the proof and the
  failure bound).

Calibration goes through the RDP curve and the conversion of Balle et al. 2020, which
``epsilon`` also optimises over a continuous order (every order gives a valid bound).
For a single integer coordinate (d = 1), :func:`delta_exact_1d` gives the exact
privacy profile (CKS20 Thm 7), which the tests use to check that the calibration is
conservative; it is not used for calibration because a tensor release is
multi-dimensional, where it is not an upper bound in general.
"""

from __future__ import annotations

import math
import random
import secrets
from fractions import Fraction
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from scipy import optimize

from dpfa import _validate
from dpfa.errors import PrivacyParameterError
from dpfa.mechanisms.base import DPMechanism
from dpfa.mechanisms.device_samplers import discrete_gaussian_sampler

Rational = Union[int, float, Fraction, str]

# --------------------------------------------------------------------------- exact pmf


def _validate_sigma(sigma, name: str = "sigma") -> float:
    return _validate.noise_multiplier(sigma, name)


def _log_normaliser(sigma: float) -> float:
    """log sum_{z in Z} exp(-z^2 / (2 sigma^2)), to double precision, for sigma > 0.

    sigma <= 1: the direct sum (terms beyond |z| = 40 sigma are below e^{-800}).
    sigma > 1: Poisson summation, sum_z e^{-z^2/(2 s^2)} = sqrt(2 pi) s sum_k e^{-2 pi^2 s^2 k^2},
    an identity whose k != 0 terms are below 2.7e-9 and vanish fast.
    """
    if sigma <= 1.0:
        zmax = int(math.ceil(40.0 * sigma)) + 1
        total = math.fsum(math.exp(-z * z / (2.0 * sigma * sigma)) for z in range(-zmax, zmax + 1))
        return math.log(total)
    c = 2.0 * math.pi**2 * sigma * sigma
    s = math.fsum([1.0] + [2.0 * math.exp(-c * k * k) for k in range(1, 6)])
    return 0.5 * math.log(2.0 * math.pi) + math.log(sigma) + math.log(s)


def pmf(k, sigma: float):
    """N_Z(0, sigma^2)(k) for an integer ``k`` (float) or an array of integers (ndarray).

    Exact up to double rounding: the normaliser is a math.fsum over all integers that
    matter (or its Poisson-summation form for sigma > 1). sigma = 0 is the point mass at 0.
    """
    sigma = _validate_sigma(sigma)
    arr = np.asarray(k)
    if arr.dtype.kind not in "iu":
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise PrivacyParameterError(f"pmf of the discrete Gaussian is defined on integers; got k={k!r}.")
        arr = arr.astype(np.int64)
    if sigma == 0.0:
        out = (arr == 0).astype(np.float64)
    else:
        kf = arr.astype(np.float64)
        out = np.exp(-kf * kf / (2.0 * sigma * sigma) - _log_normaliser(sigma))
    return float(out) if np.ndim(out) == 0 else out


def variance(sigma: float) -> float:
    """Var of N_Z(0, sigma^2) (its mean is 0); below sigma^2, and equal to it within 1e-7 for sigma >= 1.

    sigma <= 1: the direct sum. sigma > 1: from the Poisson-summation form of the normaliser
    theta, E[Y^2] = sigma^3 theta'(sigma) / theta(sigma)
    = sigma^2 (1 - 4 pi^2 sigma^2 sum_k k^2 e^{-2 pi^2 sigma^2 k^2} / sum_k e^{-2 pi^2 sigma^2 k^2}).
    """
    sigma = _validate_sigma(sigma)
    if sigma == 0.0:
        return 0.0
    if sigma <= 1.0:
        zmax = int(math.ceil(40.0 * sigma)) + 1
        w = [math.exp(-z * z / (2.0 * sigma * sigma)) for z in range(-zmax, zmax + 1)]
        num = math.fsum(z * z * wz for z, wz in zip(range(-zmax, zmax + 1), w))
        return num / math.fsum(w)
    c = 2.0 * math.pi**2 * sigma * sigma
    terms = [math.exp(-c * k * k) for k in range(1, 6)]
    s = math.fsum([1.0] + [2.0 * t for t in terms])
    s2 = math.fsum(2.0 * k * k * t for k, t in zip(range(1, 6), terms))
    return sigma * sigma * (1.0 - 2.0 * c * s2 / s)


def delta_exact_1d(sigma: float, sensitivity: int, epsilon: float) -> float:
    """Exact delta(epsilon) of ONE integer coordinate plus N_Z(0, sigma^2), |shift| <= ``sensitivity``.

    CKS20 Thm 7: delta = P[Y > eps sigma^2 / D - D / 2] - e^eps P[Y > eps sigma^2 / D + D / 2],
    Y ~ N_Z(0, sigma^2), D the integer sensitivity. Only valid for scalar releases (d = 1);
    for vectors, use the RDP curve (what ``calibrate`` does).
    """
    sigma = _validate_sigma(sigma)
    if isinstance(sensitivity, bool) or int(sensitivity) != sensitivity or sensitivity < 1:
        raise PrivacyParameterError(f"Expected an integer sensitivity >= 1, got sensitivity={sensitivity!r}.")
    if sigma == 0.0:
        return 1.0
    d = int(sensitivity)
    zmax = int(math.ceil(40.0 * sigma)) + 2 * d + 2
    z = np.arange(-zmax, zmax + 1)
    p = pmf(z, sigma)
    x1 = epsilon * sigma * sigma / d - d / 2.0
    x2 = x1 + d
    t1 = math.fsum(p[z > x1])
    t2 = math.fsum(p[z > x2])
    return max(0.0, t1 - math.exp(epsilon) * t2) if t2 > 0 else max(0.0, t1)


# ------------------------------------------------------------------ exact CKS20 sampler


def _bernoulli_exp_le1(num: int, den: int, rng: random.Random) -> bool:
    """Bernoulli(exp(-num/den)) for 0 <= num <= den (CKS20 Alg. 1, gamma in [0, 1]).

    K = 1; while Bernoulli(gamma / K): K += 1; return K odd. P(K odd) = e^{-gamma}.
    Bernoulli(num / (den K)) is ``randrange(den K) < num``: integers only.
    """
    k = 1
    while rng.randrange(den * k) < num:
        k += 1
    return k % 2 == 1


def _bernoulli_exp(num: int, den: int, rng: random.Random) -> bool:
    """Bernoulli(exp(-num/den)) for num >= 0, den >= 1 (CKS20 Alg. 1, gamma > 1 part).

    exp(-gamma) = exp(-1)^floor(gamma) exp(-(gamma - floor gamma)): a product of
    independent Bernoullis, each stopped at the first failure.
    """
    while num > den:
        if not _bernoulli_exp_le1(1, 1, rng):
            return False
        num -= den
    return _bernoulli_exp_le1(num, den, rng)


def _discrete_laplace_int(t: int, rng: random.Random) -> int:
    """Y with P(Y = y) proportional to exp(-|y| / t), integer t >= 1 (CKS20 Alg. 2, s = 1).

    U uniform on {0..t-1} kept with probability e^{-U/t}, V geometric (P(V >= v) = e^{-v}),
    X = U + t V is then geometric with P(X = x) proportional to e^{-x/t}; a fair sign B,
    rejecting (B = 1, X = 0) so that 0 is not counted twice.
    """
    while True:
        u = rng.randrange(t)
        if not _bernoulli_exp(u, t, rng):
            continue
        v = 0
        while _bernoulli_exp_le1(1, 1, rng):
            v += 1
        x = u + t * v
        negative = rng.randrange(2) == 1
        if negative and x == 0:
            continue
        return -x if negative else x


def sample_exact(n: int, sigma: Rational, rng: Optional[random.Random] = None) -> list[int]:
    """``n`` independent exact samples of N_Z(0, sigma^2) (CKS20 Alg. 3), as Python ints.

    ``sigma`` is converted to a Fraction exactly (a float's binary value, a str such as
    "1/3", an int or a Fraction), sigma^2 = Fraction(sigma)**2. With t = floor(sigma) + 1,
    draw Y from the discrete Laplace of scale t and accept it with probability
    exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)), a rational exponent, decided by
    :func:`_bernoulli_exp` on integers. ``rng`` defaults to ``secrets.SystemRandom()``
    (the OS CSPRNG); pass a seeded ``random.Random`` only for reproducible tests. Only
    ``rng.randrange`` is called, which is exact on integers for ``random.Random`` and its
    subclasses that keep ``getrandbits`` (a subclass overriding ``random`` alone would make
    it go through floats).
    """
    n = _validate.count(n, "n", minimum=0)
    try:
        s = Fraction(sigma)
    except (TypeError, ValueError, OverflowError) as exc:
        raise PrivacyParameterError(f"Expected sigma to be a rational number, got {sigma!r}.") from exc
    if s < 0 or (isinstance(sigma, float) and not math.isfinite(sigma)):
        raise PrivacyParameterError(f"Expected sigma={sigma!r} in [0, inf).")
    if s == 0:
        return [0] * n
    rng = secrets.SystemRandom() if rng is None else rng
    s2 = s * s
    p, q = s2.numerator, s2.denominator  # sigma^2 = p / q
    t = math.floor(s) + 1
    # gamma(y) = (|y| - sigma^2 / t)^2 / (2 sigma^2) = (|y| q t - p)^2 / (2 p q t^2)
    den = 2 * p * q * t * t
    out = []
    for _ in range(n):
        while True:
            y = _discrete_laplace_int(t, rng)
            if _bernoulli_exp((abs(y) * q * t - p) ** 2, den, rng):
                out.append(y)
                break
    return out


# --------------------------------------------------------------- torch reference sampler


def _sample_torch(numel: int, sigma, generator: Optional[torch.Generator], device: Any) -> torch.Tensor:
    """``numel`` samples of N_Z(0, sigma^2) as int64: the device sampler's algorithm, in torch float64.

    Round: E1, E2, E3 ~ Exp(1) (as -log(1 - U), U in [0, 1) with 53 bits, so never log 0),
    Y = floor(sigma E1) - floor(sigma E2) (a discrete Laplace of scale sigma), accept iff
    E3 >= (|Y| - sigma)^2 / (2 sigma^2). See ``discrete_gaussian_sampler`` for the proof
    that the accepted law is N_Z(0, sigma^2). Rounds repeat on the still-pending elements.
    ``sigma``: a float, or a float64 tensor of ``numel`` per-element parameters (sigma = 0
    gives 0 there); a float draws the same numbers as a tensor filled with it.
    """
    out = torch.zeros(numel, dtype=torch.int64, device=device)
    if isinstance(sigma, torch.Tensor):
        sig = sigma.to(device=device, dtype=torch.float64).reshape(-1).expand(numel)
        pending = torch.nonzero(sig > 0).flatten()
    else:
        sig = torch.full((numel,), float(sigma), dtype=torch.float64, device=device)
        pending = torch.arange(numel, device=device) if sigma > 0 else out[:0]
    while pending.numel() > 0:
        m = pending.numel()
        s = sig[pending]
        u = torch.rand((3, m), generator=generator, device=device, dtype=torch.float64)
        e = -torch.log1p(-u)
        y = torch.floor(s * e[0]) - torch.floor(s * e[1])
        d = y.abs() - s
        accept = e[2] >= d * d * (0.5 / (s * s))
        out[pending[accept]] = y[accept].to(torch.int64)
        pending = pending[~accept]
    return out


class DiscreteGaussianMechanism(DPMechanism):
    """Integer noise N_Z(0, sigma^2); sensitivity in L2 on the integer grid; scale = sigma."""

    name = "discrete_gaussian"
    sensitivity_norm = "l2_grid"
    triton_sampler = discrete_gaussian_sampler

    def sample(self, shape: Sequence[int], scale: float, generator: Optional[torch.Generator] = None,
               device: Any = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Integer-valued N_Z(0, scale^2) noise in ``dtype`` (a float or an integer dtype).

        Values are exact integers in float16 up to 2048, bfloat16 up to 256, float32 up to 2^24.
        """
        scale = _validate.noise_multiplier(scale, "scale")
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        return _sample_torch(numel, scale, generator, device).reshape(shape).to(dtype)

    def sample_exact(self, n: int, scale: Rational, rng: Optional[random.Random] = None) -> list[int]:
        """Exact CKS20 samples (Python ints, CSPRNG by default); see :func:`sample_exact`."""
        return sample_exact(n, scale, rng)

    def pmf(self, k, scale: float):
        """N_Z(0, scale^2)(k); see :func:`pmf`."""
        return pmf(k, scale)

    def variance(self, scale: float) -> float:
        """Variance of N_Z(0, scale^2); see :func:`variance`."""
        return variance(scale)

    def rdp(self, alpha: float, scale: float, sensitivity: float = 1.0) -> float:
        """alpha Delta^2 / (2 sigma^2) (Canonne, Kamath & Steinke 2020, Thm 14).

        Valid for the multivariate discrete Gaussian with integer-grid L2 sensitivity Delta.
        """
        if scale == 0:
            return math.inf
        return alpha * sensitivity**2 / (2.0 * scale**2)

    def epsilon(self, scale: float, sensitivity: float, delta: float) -> float:
        """epsilon at ``delta`` from rho-zCDP, rho = Delta^2 / (2 sigma^2), via Balle et al. 2020.

        eps(alpha) = alpha rho + log(1 - 1/alpha) - (log delta + log alpha) / (alpha - 1) is a valid
        bound for EVERY alpha > 1, so the minimum over the default grid and over a continuous
        search (bounded Brent) is sound, and at least as tight as the grid alone.
        """
        grid = super().epsilon(scale, sensitivity, delta)
        if scale == 0 or not math.isfinite(grid):
            return grid
        rho = sensitivity**2 / (2.0 * scale**2)
        log_delta = math.log(delta)

        def eps_at(log_am1: float) -> float:
            a = 1.0 + math.exp(log_am1)
            return a * rho + math.log1p(-1.0 / a) - (log_delta + math.log(a)) / (a - 1.0)

        res = optimize.minimize_scalar(eps_at, bounds=(math.log(1e-6), math.log(1e6)), method="bounded",
                                       options={"xatol": 1e-10})
        best = min(grid, eps_at(float(res.x)))
        return max(0.0, best)

    def add_noise(self, tensor: torch.Tensor, sensitivity: float, epsilon: float, delta: float = 0.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``tensor`` + N_Z(0, sigma^2) noise, sigma calibrated for (epsilon, delta).

        The caller guarantees integer-grid L2 sensitivity ``sensitivity``. An integer tensor
        stays integer (the noise is cast to its dtype); a float tensor gets float noise.
        """
        scale = self.calibrate(sensitivity, epsilon, delta)
        if tensor.is_floating_point():
            return tensor + self.sample(tuple(tensor.shape), scale, generator=generator, device=tensor.device,
                                        dtype=tensor.dtype)
        noise = self.sample(tuple(tensor.shape), scale, generator=generator, device=tensor.device,
                            dtype=torch.int64)
        return (tensor.to(torch.int64) + noise).to(tensor.dtype)


__all__ = ["DiscreteGaussianMechanism", "sample_exact", "pmf", "variance", "delta_exact_1d"]
