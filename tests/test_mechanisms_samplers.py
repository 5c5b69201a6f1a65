"""Laws of the torch reference samplers and of the exact CKS20 discrete Gaussian sampler.

Every statistical test runs at a fixed seed, with a p-value threshold of 1e-3, and each law
test has a power check: it rejects the law with a scale off by 10%.
"""

import math
import random
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
from scipy import stats

from law_tests import chi2_vs_discrete_gaussian
from dpfa.errors import PrivacyParameterError
from dpfa.mechanisms import discrete_gaussian as dg
from dpfa.mechanisms import get

N = 200_000
P_MIN = 1e-3
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _gen(seed=20261125):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


_chi2_vs_pmf = chi2_vs_discrete_gaussian


# ------------------------------------------------------------------ exact pmf, variance


@pytest.mark.parametrize("sigma", [0.05, 0.5, 1.0, 1.3, 4.0, 20.0, 333.3])
def test_pmf_and_variance_against_mpmath(sigma):
    mpmath.mp.dps = 40
    s = mpmath.mpf(sigma)
    kmax = int(50 * sigma) + 3
    w = [mpmath.exp(-mpmath.mpf(z) ** 2 / (2 * s * s)) for z in range(-kmax, kmax + 1)]
    z_norm = mpmath.fsum(w)
    var = mpmath.fsum(mpmath.mpf(z) ** 2 * wz for z, wz in zip(range(-kmax, kmax + 1), w)) / z_norm
    for k in (0, 1, -2, int(3 * sigma) + 1):
        exact = float(mpmath.exp(-mpmath.mpf(k) ** 2 / (2 * s * s)) / z_norm)
        assert dg.pmf(k, sigma) == pytest.approx(exact, rel=1e-12)
    assert dg.variance(sigma) == pytest.approx(float(var), rel=1e-12)
    ks = np.arange(-kmax, kmax + 1)
    assert math.fsum(dg.pmf(ks, sigma)) == pytest.approx(1.0, abs=1e-12)


def test_pmf_edge_cases():
    assert dg.pmf(0, 0.0) == 1.0 and dg.pmf(3, 0.0) == 0.0
    assert dg.variance(0.0) == 0.0
    assert dg.variance(1.0) < 1.0 and dg.variance(1.0) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(dg.pmf(np.array([-3, 3]), 2.0), [dg.pmf(3, 2.0)] * 2)
    with pytest.raises(PrivacyParameterError, match="0.5"):
        dg.pmf(0.5, 1.0)
    with pytest.raises(PrivacyParameterError, match="-1"):
        dg.pmf(0, -1.0)


# ------------------------------------------------------------------ exact CKS sampler


@pytest.mark.parametrize("sigma", [0.5, 1.3, 4.0, 20.0])
def test_exact_sampler_chi_square(sigma):
    x = dg.sample_exact(20_000, sigma, rng=random.Random(int(sigma * 1000)))
    assert all(type(v) is int for v in x)
    p = _chi2_vs_pmf(x, sigma)
    assert p > P_MIN, f"exact sampler chi-square p={p:.3g} at sigma={sigma}"
    assert _chi2_vs_pmf(x, 1.1 * sigma) < 1e-6  # power: a sigma 10% off is rejected


class _NoFloatRandom(random.Random):
    """A seeded Random whose float methods raise: the exact sampler may use integers only."""

    def getrandbits(self, k):  # defined here so that randrange keeps its exact integer path
        return super().getrandbits(k)

    def random(self):  # noqa: D401
        raise AssertionError("the exact sampler drew a float")

    def uniform(self, a, b):
        raise AssertionError("the exact sampler drew a float")


def test_exact_sampler_uses_integers_only_and_is_reproducible():
    a = dg.sample_exact(2000, 2.7, rng=_NoFloatRandom(5))
    b = dg.sample_exact(2000, 2.7, rng=_NoFloatRandom(5))
    assert a == b
    assert dg.sample_exact(2000, 2.7, rng=_NoFloatRandom(6)) != a


def test_exact_sampler_inputs():
    x = dg.sample_exact(500, 3.0)  # default: the OS CSPRNG
    assert len(x) == 500 and all(isinstance(v, int) for v in x)
    assert dg.sample_exact(5, 0.0) == [0] * 5
    assert dg.sample_exact(0, 1.0) == []
    # rational sigma, given exactly: sigma^2 = 1/9
    y = dg.sample_exact(3000, Fraction(1, 3), rng=random.Random(1))
    assert set(y) <= {-2, -1, 0, 1, 2}
    assert dg.sample_exact(10, "7/2", rng=random.Random(0)) == dg.sample_exact(10, 3.5, rng=random.Random(0))
    mech = get("discrete_gaussian")()
    assert mech.sample_exact(10, 2.0, rng=random.Random(3)) == dg.sample_exact(10, 2.0, rng=random.Random(3))
    for bad in (-1.0, float("nan"), float("inf"), "abc"):
        with pytest.raises(PrivacyParameterError, match="sigma"):
            dg.sample_exact(3, bad)


@pytest.mark.parametrize("num,den", [(3, 10), (1, 1), (5, 2), (7, 3)])
def test_bernoulli_exp(num, den):
    rng = random.Random(num * 100 + den)
    n = 40_000
    hits = sum(dg._bernoulli_exp(num, den, rng) for _ in range(n))
    assert stats.binomtest(hits, n, math.exp(-num / den)).pvalue > P_MIN


def test_discrete_laplace_int():
    rng = random.Random(9)
    t, n = 3, 40_000
    x = np.array([dg._discrete_laplace_int(t, rng) for _ in range(n)])
    q = math.exp(-1 / t)
    k = np.arange(-12, 13)
    p = (1 - q) / (1 + q) * q ** np.abs(k)
    obs = np.array([np.sum(x == v) for v in k] + [np.sum(np.abs(x) > 12)])
    exp = np.append(p, 1 - p.sum()) * n
    assert stats.chisquare(obs, exp).pvalue > P_MIN


# ------------------------------------------------------------------- torch samplers


def test_gaussian_torch_sampler_law():
    sigma = 1.7
    x = get("gaussian")().sample((N,), sigma, generator=_gen(), dtype=torch.float64).numpy()
    assert stats.kstest(x, stats.norm(scale=sigma).cdf).pvalue > P_MIN
    assert stats.kstest(x, stats.norm(scale=1.1 * sigma).cdf).pvalue < 1e-12
    assert abs(x.mean()) < 5 * sigma / math.sqrt(N)
    assert abs(x.std() / sigma - 1) < 5 / math.sqrt(2 * N)
    # tail: P(|X| > 3 sigma)
    assert stats.binomtest(int(np.sum(np.abs(x) > 3 * sigma)), N, 2 * stats.norm.sf(3)).pvalue > P_MIN


def test_laplace_torch_sampler_law():
    b = 0.8
    x = get("laplace")().sample((N,), b, generator=_gen(), dtype=torch.float64).numpy()
    assert stats.kstest(x, stats.laplace(scale=b).cdf).pvalue > P_MIN
    assert stats.kstest(x, stats.laplace(scale=1.1 * b).cdf).pvalue < 1e-12
    assert abs(x.mean()) < 5 * math.sqrt(2) * b / math.sqrt(N)
    assert abs(x.var() - 2 * b * b) < 5 * math.sqrt(20 / N) * b * b
    for k in (3.0, 7.0):
        assert stats.binomtest(int(np.sum(np.abs(x) > k * b)), N, math.exp(-k)).pvalue > P_MIN


@pytest.mark.parametrize("sigma", [0.5, 1.3, 4.0, 20.0])
def test_discrete_gaussian_torch_sampler_chi_square(sigma):
    x = get("discrete_gaussian")().sample((N,), sigma, generator=_gen(int(sigma * 10)), dtype=torch.float64)
    x = x.numpy()
    assert np.all(x == np.round(x))
    p = _chi2_vs_pmf(x, sigma)
    assert p > P_MIN, f"torch discrete Gaussian chi-square p={p:.3g} at sigma={sigma}"
    assert _chi2_vs_pmf(x, 1.1 * sigma) < 1e-6
    v = dg.variance(sigma)
    assert abs(x.var() - v) < 5 * v * math.sqrt(3 / N)  # crude SE bound (kurtosis <= 3 + 1/sigma^2 ...)
    assert abs(x.mean()) < 5 * math.sqrt(v / N)


@pytest.mark.parametrize("name", ["gaussian", "laplace", "discrete_gaussian"])
def test_torch_sampler_reproducible_with_generator(name):
    mech = get(name)()
    a = mech.sample((4, 500), 2.0, generator=_gen(1))
    b = mech.sample((4, 500), 2.0, generator=_gen(1))
    c = mech.sample((4, 500), 2.0, generator=_gen(2))
    assert a.shape == (4, 500)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a != c).float().mean() > 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["gaussian", "laplace", "discrete_gaussian"])
def test_torch_sampler_dtypes(name, dtype):
    mech = get(name)()
    x = mech.sample((3, 1000), 1.5, generator=_gen(3), dtype=dtype)
    assert x.dtype == dtype and x.shape == (3, 1000) and x.device.type == "cpu"
    assert torch.isfinite(x).all()
    assert 0.5 < x.double().std().item() < 4.0
    if name == "discrete_gaussian":
        assert torch.equal(x, torch.round(x))
        ref = mech.sample((3, 1000), 1.5, generator=_gen(3), dtype=torch.int64)
        torch.testing.assert_close(x.to(torch.int64), ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gaussian", "laplace", "discrete_gaussian"])
def test_torch_sampler_scale_zero_and_bad_scale(name):
    mech = get(name)()
    assert torch.all(mech.sample((100,), 0.0) == 0)
    assert mech.sample((0, 3), 1.0).shape == (0, 3)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(PrivacyParameterError, match="scale"):
            mech.sample((10,), bad)
