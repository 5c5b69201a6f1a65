"""The secure grid release: randomised rounding to the grid 2^-k, then integer discrete Gaussian noise.

Why. A floating-point sampler of a continuous law does not sample that law: the set of
floats that ``x + noise`` can take, and the frequency of their low-order bits, depend on
``x``, so an attacker who sees the bits of one release can tell neighbouring inputs apart
far more often than epsilon allows (Mironov, CCS 2012, "On significance of the least
significant bits for differential privacy", for the Laplace mechanism; Jin, McMurtry,
Rubinstein & Ohrimenko, IEEE S&P 2022, "Are we there yet? Timing and floating-point
attacks on differential privacy systems", for the Gaussian mechanism and DP-SGD). The
release here never adds floating-point noise to a floating-point value: it outputs
``gamma * (R(x / gamma) + Z)``, with gamma = 2^-k, ``R`` an integer rounding and ``Z``
integer noise, computed on integers, so every output is exactly on the grid and its
low-order bits (below gamma) are zero whatever ``x`` (``tests/test_mechanisms_secure.py``
checks both, and that the plain float Gaussian release fails the same test).

Algorithm, for x in R^d with L2 sensitivity Delta (in x's units), grid 2^-k:

1. ``m = R(x 2^k)``: randomised rounding, coordinate by coordinate, m_j = floor(x_j 2^k) + B_j,
   B_j ~ Bernoulli(frac(x_j 2^k)), so E[m] 2^-k = x (unbiased). x 2^k, its floor and its
   fractional part are exact in float64 (a power-of-two scaling and a floor).
2. ``Z ~ N_Z(0, sigma_g^2)^d``, sigma_g = z * Delta_g, from
   :class:`~dpfa.mechanisms.discrete_gaussian.DiscreteGaussianMechanism` with a generator
   keyed by 63 bits of the OS CSPRNG (``secrets``) for each call (or the exact CKS20
   sampler on ``secrets.SystemRandom`` with ``exact=True``).
3. output ``(m + Z) 2^-k`` (float64: exact while |m + Z| < 2^53).

Sensitivity, counted with the rounding. Delta_g = Delta 2^k + sqrt(d) grid units.
Proof: write the rounding with one uniform U_j per coordinate,
``R_U(a)_j = floor(a_j) + [U_j < frac(a_j)]``; the output's law on input x is the
mixture over U of N_Z(R_U(x 2^k), sigma_g^2). For two inputs a = x 2^k, b = x' 2^k and the
same U, ``e_j = (R_U(a)_j - R_U(b)_j) - (a_j - b_j)`` lies in (-1, 1): if frac(a_j) >=
frac(b_j) it is [frac(b_j) <= U_j < frac(a_j)] - (frac(a_j) - frac(b_j)), in
(-1, 0] or [0, 1) (symmetrically otherwise). So ||R_U(a) - R_U(b)||_2 <= ||a - b||_2 +
||e||_2 < Delta 2^k + sqrt(d) for every U, and an integer shift of that L2 norm costs
Renyi divergence alpha Delta_g^2 / (2 sigma_g^2) (Canonne, Kamath & Steinke 2020, Thm 14).
By the joint quasi-convexity of the Renyi divergence (van Erven & Harremoes 2014,
Thm 13), a mixture over the same U of pairs with divergence <= D has divergence <= D, so
the release is RDP alpha / (2 z^2): the accountant's discrete Gaussian with noise
multiplier z. Coordinates where x = x' round identically under the same U (e_j = 0), so
d may count only the coordinates that one record can move (the attention release uses
that). Cf. Kairouz, Liu & Steinke (ICML 2021), who round each client's vector and bound
the rounded norm; here the clipped sum is rounded once, with the (tighter in d,
deterministic) coupling bound.

Cost. Delta_g / (Delta 2^k) = 1 + sqrt(d) 2^-k / Delta: :func:`grid_bits_for` picks k so
this is at most 1 + ``slack`` (2^-7 by default), i.e. at most 0.8% more noise; the
discrete Gaussian's subsampled RDP bound (Zhu & Wang 2019) is looser than the exact
Gaussian one; the vectorised sampler runs a rejection loop in float64 (about 2x the work
of ``torch.randn``); ``exact=True`` is pure Python (about 10 us a sample).

What it does not fix: timing. The rejection samplers' running time depends on the noise
parameter and on the value drawn (Jin et al. 2022); see
:mod:`dpfa.attacks.timing` and the README's "sharp edges". The fast sampler's
randomness is torch's generator (MT19937 on CPU, Philox on CUDA) keyed from the OS CSPRNG
for each release, not a CSPRNG stream, and its acceptance probabilities are float64
(relative error about 2^-53): the output is integer-valued, so Mironov's attack on the
low-order bits does not apply, but the law is N_Z only up to that error. ``exact=True``
uses integers and ``secrets.SystemRandom`` throughout.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from fractions import Fraction
from typing import Any, Optional

import torch

from dpfa import _validate
from dpfa.errors import PrivacyParameterError
from dpfa.mechanisms.discrete_gaussian import _sample_torch, sample_exact

__all__ = ["SecureGridRelease", "grid_bits_for", "rounded_sensitivity", "randomized_round", "grid_release",
           "csprng_generator", "DEFAULT_SLACK", "MAX_GRID_INTEGER"]

#: default bound on the rounding's share of the sensitivity: sqrt(d) 2^-k <= DEFAULT_SLACK * Delta
DEFAULT_SLACK = 2.0**-7
#: grid integers stay below this in magnitude, so that (m + Z) 2^-k is exact in float64 (2^53),
#: with room for the noise
MAX_GRID_INTEGER = 2.0**51
#: the noise (grid units) must stay far below MAX_GRID_INTEGER: 40 of its scales (e^-800 tail)
_NOISE_TAILS = 40.0


def csprng_generator(device: Any = "cpu") -> torch.Generator:
    """A torch generator on ``device`` keyed by 63 fresh bits of the OS CSPRNG (``secrets``)."""
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbits(63))
    return g


def grid_bits_for(sensitivity: float, dim: int, slack: float = DEFAULT_SLACK) -> int:
    """Smallest k with sqrt(dim) 2^-k <= slack * sensitivity: the rounding then adds at most
    ``slack`` to the sensitivity, relative (:func:`rounded_sensitivity`)."""
    sensitivity = _validate.positive(sensitivity, "sensitivity")
    dim = _validate.count(dim, "dim")
    slack = _validate.positive(slack, "slack")
    k = math.ceil(math.log2(math.sqrt(dim) / (slack * sensitivity)))
    while math.sqrt(dim) * 2.0**-k > slack * sensitivity:  # log2's rounding
        k += 1
    return int(k)


def rounded_sensitivity(sensitivity, dim: int, grid_bits: int):
    """L2 sensitivity in grid units after randomised rounding: Delta 2^k + sqrt(dim) (module docstring).

    ``sensitivity``: a float or a float64 tensor (one per block of ``dim`` coordinates). Rounded up
    by a relative 1e-12 (float64 sums err by less), so it never under-counts.
    """
    return (sensitivity * 2.0**grid_bits + math.sqrt(dim)) * (1.0 + 1e-12)


def randomized_round(x: torch.Tensor, grid_bits: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """int64 tensor m with m_j = floor(x_j 2^k) + Bernoulli(frac(x_j 2^k)); E[m 2^-k] = x.

    Exact: x is taken to float64 (exact from every float dtype), x 2^k is a power-of-two
    scaling, floor and the fractional part are exact. |x 2^k| is first clamped to
    ``MAX_GRID_INTEGER`` (a 1-Lipschitz map: the sensitivity is unchanged, and the bound
    is public, so no data-dependent error is raised). NaN is refused (it has no grid point).
    """
    a = x.detach().to(torch.float64) * (2.0**grid_bits)
    if bool(torch.isnan(a).any()):
        raise PrivacyParameterError("The secure grid release got NaN values; there is no grid point to round them to.")
    a = a.clamp(-MAX_GRID_INTEGER, MAX_GRID_INTEGER)
    lo = torch.floor(a)
    u = torch.rand(a.shape, generator=generator, device=a.device, dtype=torch.float64)
    return lo.to(torch.int64) + (u < (a - lo)).to(torch.int64)


def _noise(shape, sigma, generator, device, exact: bool) -> torch.Tensor:
    """int64 N_Z(0, sigma^2) of ``shape``; ``sigma`` a float or a float64 tensor broadcastable to shape."""
    numel = math.prod(shape)
    sig = sigma if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma), dtype=torch.float64)
    sig = sig.to(device=device, dtype=torch.float64).expand(shape).reshape(-1)
    if not exact:
        return _sample_torch(numel, sig, generator, device).reshape(shape)
    out = torch.zeros(numel, dtype=torch.int64)
    flat = sig.cpu()
    for value in torch.unique(flat).tolist():  # the exact sampler takes one (rational) sigma per call
        if value > 0:
            idx = torch.nonzero(flat == value).flatten()
            out[idx] = torch.tensor(sample_exact(idx.numel(), Fraction(value)), dtype=torch.int64)
    return out.reshape(shape).to(device)


def grid_release(x: torch.Tensor, grid_bits: int, noise_scale, *, exact: bool = False,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``(R(x 2^k) + Z) 2^-k`` as float64, Z ~ N_Z(0, noise_scale^2) (grid units), every value on the grid.

    ``noise_scale``: a float, or a float64 tensor broadcastable to x (per-row scales). The
    caller calibrates it: noise_scale = z * :func:`rounded_sensitivity` for a z-noise release.
    ``generator`` defaults to a fresh :func:`csprng_generator`: pass one only for
    reproducible tests (it then keys the rounding and the fast sampler).
    """
    grid_bits = int(grid_bits)
    if isinstance(noise_scale, torch.Tensor):
        top = float(noise_scale.max()) if noise_scale.numel() else 0.0
        if bool((noise_scale < 0).any()) or not math.isfinite(top):
            raise PrivacyParameterError("Expected every noise_scale in [0, inf).")
    else:
        top = _validate.noise_multiplier(noise_scale, "noise_scale")
    if top * _NOISE_TAILS > MAX_GRID_INTEGER:
        raise PrivacyParameterError(
            f"noise_scale={top:.4g} grid steps is too large for exact grid values in float64 (at most "
            f"{MAX_GRID_INTEGER / _NOISE_TAILS:.4g}); use a coarser grid (smaller grid_bits).")
    generator = csprng_generator(x.device) if generator is None else generator
    m = randomized_round(x, grid_bits, generator)
    z = _noise(tuple(x.shape), noise_scale, generator, x.device, exact)
    return (m + z).to(torch.float64) * (2.0**-grid_bits)


@dataclasses.dataclass(frozen=True)
class SecureGridRelease:
    """A z-noise release of x in R^``dim`` with L2 sensitivity ``sensitivity``, on the grid 2^-``grid_bits``.

    ``release(x)`` returns ``(R(x 2^k) + Z) 2^-k`` (float64, exactly on the grid), Z ~
    N_Z(0, sigma_g^2), sigma_g = z * Delta_g, Delta_g = sensitivity 2^k + sqrt(dim): the
    rounding is in the sensitivity, so one release is RDP alpha / (2 z^2) of every order
    (the discrete Gaussian's curve with noise multiplier z; module docstring has the proof).
    Account it as ``("discrete_gaussian", noise_multiplier)`` with sensitivity 1 under
    add/remove; a replace-one accountant doubles Delta_g (conservative: the rounding's
    sqrt(dim) needs no doubling).
    """

    noise_multiplier: float
    sensitivity: float
    dim: int
    grid_bits: int
    exact: bool = False

    def __post_init__(self):
        object.__setattr__(self, "noise_multiplier", _validate.noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "sensitivity", _validate.positive(self.sensitivity, "sensitivity"))
        object.__setattr__(self, "dim", _validate.count(self.dim, "dim"))
        if isinstance(self.grid_bits, bool) or int(self.grid_bits) != self.grid_bits or abs(self.grid_bits) > 1000:
            raise PrivacyParameterError(f"Expected an integer grid_bits in [-1000, 1000], got {self.grid_bits!r}.")
        object.__setattr__(self, "grid_bits", int(self.grid_bits))
        if self.noise_scale * _NOISE_TAILS > MAX_GRID_INTEGER:
            raise PrivacyParameterError(
                f"The noise ({self.noise_scale:.4g} grid steps of 2^-{self.grid_bits}) is too large for exact grid "
                "values in float64; use fewer grid_bits.")

    @classmethod
    def for_sum(cls, noise_multiplier: float, sensitivity: float, dim: int, grid_bits: Optional[int] = None,
                slack: float = DEFAULT_SLACK, exact: bool = False) -> "SecureGridRelease":
        """The release with ``grid_bits`` = :func:`grid_bits_for` (sensitivity, dim, slack) unless given."""
        k = grid_bits_for(sensitivity, dim, slack) if grid_bits is None else grid_bits
        return cls(noise_multiplier, sensitivity, dim, k, exact)

    @property
    def grid_step(self) -> float:
        return 2.0**-self.grid_bits

    @property
    def grid_sensitivity(self) -> float:
        """Delta_g = sensitivity 2^k + sqrt(dim), in grid units (rounded up)."""
        return rounded_sensitivity(self.sensitivity, self.dim, self.grid_bits)

    @property
    def noise_scale(self) -> float:
        """sigma_g = z Delta_g, in grid units (the discrete Gaussian's parameter)."""
        return self.noise_multiplier * self.grid_sensitivity

    @property
    def effective_noise_std(self) -> float:
        """Approximate standard deviation of the noise in x's units: sigma_g 2^-k."""
        return self.noise_scale * self.grid_step

    def rdp(self, alpha: float) -> float:
        """Renyi DP of order alpha of one release: alpha / (2 z^2) (CKS20 Thm 14 with the rounded sensitivity)."""
        return math.inf if self.noise_multiplier == 0 else alpha / (2.0 * self.noise_multiplier**2)

    def release(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x's release, float64 on the grid (see the class docstring). ``x`` holds at most ``dim`` of the
        coordinates that share the sensitivity (a parameter of the model, say; one call per tensor)."""
        if x.numel() > self.dim:
            raise PrivacyParameterError(
                f"The release was calibrated for dim={self.dim} coordinates, got a tensor of {x.numel()}.")
        return grid_release(x, self.grid_bits, self.noise_scale, exact=self.exact, generator=generator)

    __call__ = release
