"""The mechanism contract: registry, user subclasses, calibration, add_noise, bad input.

Calibrations are checked against formulas written out here and against dp-accounting
(analytic Gaussian of Balle & Wang 2018, Laplace and discrete Gaussian PLDs).
"""

import math

import pytest
import torch
from dp_accounting import gaussian_mechanism as dpa_gaussian
from dp_accounting.pld import privacy_loss_distribution as dpa_pld
from scipy import stats

import dpfa
from dpfa.errors import MissingPrivacyCurveError, PrivacyParameterError, UnknownNameError
from dpfa.mechanisms import DPMechanism, discrete_gaussian as dg, registry
from dpfa.mechanisms.base import bisect_scale

BUILTIN = ("gaussian", "laplace", "discrete_gaussian")


def _balle_wang_delta(sigma, sens, eps):
    """delta(eps) of the Gaussian mechanism, Balle & Wang 2018 Thm 8, written out independently."""
    a, b = sens / (2 * sigma), eps * sigma / sens
    return stats.norm.cdf(a - b) - math.exp(eps) * stats.norm.cdf(-a - b)


@pytest.fixture
def clean_registry():
    """Register test mechanisms without leaking them into other tests."""
    saved = dict(registry._REGISTRY._classes)
    yield
    registry._REGISTRY._classes.clear()
    registry._REGISTRY._classes.update(saved)


# --------------------------------------------------------------------------- registry


def test_registry_builtins():
    for name in BUILTIN:
        cls = dpfa.mechanisms.get(name)
        assert issubclass(cls, DPMechanism) and cls.name == name
        mech = cls()
        assert mech.name == name
        assert mech.triton_sampler is not None
        assert mech.has_sampler() and mech.has_curve("rdp")
    assert set(BUILTIN) <= set(dpfa.mechanisms.names())
    assert dpfa.mechanisms.get("gaussian")().sensitivity_norm == "l2"
    assert dpfa.mechanisms.get("laplace")().sensitivity_norm == "l1"
    assert dpfa.mechanisms.get("discrete_gaussian")().sensitivity_norm == "l2_grid"
    assert isinstance(registry.resolve("laplace"), dpfa.mechanisms.LaplaceMechanism)
    import dp_flash_attention

    assert dp_flash_attention.mechanisms.get("gaussian") is dpfa.mechanisms.GaussianMechanism


def test_unknown_name_lists_known_ones():
    with pytest.raises(UnknownNameError) as err:
        dpfa.mechanisms.get("gausian")
    msg = str(err.value)
    assert "gausian" in msg
    for name in BUILTIN:
        assert name in msg
    assert isinstance(err.value, ValueError)


def test_register_rejects_bad_classes(clean_registry):
    with pytest.raises(TypeError):
        dpfa.mechanisms.register(int)

    class NoName(DPMechanism):
        pass

    with pytest.raises(TypeError, match="name"):
        dpfa.mechanisms.register(NoName)

    class Clash(DPMechanism):
        name = "gaussian"

    with pytest.raises(ValueError, match="already registered"):
        dpfa.mechanisms.register(Clash)
    with pytest.raises(TypeError, match="sensitivity_norm"):

        class BadNorm(DPMechanism):  # noqa: F841
            name = "bad_norm"
            sensitivity_norm = "linf"


class ScaledGaussian(DPMechanism):
    """A user mechanism that defines only name, sample and rdp (Gaussian noise, L2 by default)."""

    name = "test_user_gaussian"

    def sample(self, shape, scale, generator=None, device="cpu", dtype=torch.float32):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float64).mul(scale).to(dtype)

    def rdp(self, alpha, scale, sensitivity=1.0):
        return math.inf if scale == 0 else alpha * sensitivity**2 / (2 * scale**2)


def test_user_subclass_registered_and_used(clean_registry):
    dpfa.mechanisms.register(ScaledGaussian)
    assert "test_user_gaussian" in dpfa.mechanisms.names()
    mech = dpfa.mechanisms.get("test_user_gaussian")()
    assert mech.sensitivity_norm == "l2" and mech.triton_sampler is None
    assert mech.has_curve("rdp") and not mech.has_curve("pld") and not mech.has_curve("prv")
    # default calibration: RDP curve + Balle et al. 2020 conversion, then bisection
    sigma = mech.calibrate(1.0, 1.0, 1e-5)
    assert mech.epsilon(sigma, 1.0, 1e-5) <= 1.0
    assert mech.epsilon(sigma * (1 - 1e-6), 1.0, 1e-5) > 1.0 - 1e-6
    # RDP is looser than the exact analytic Gaussian, but not by much
    exact = dpfa.mechanisms.get("gaussian")().calibrate(1.0, 1.0, 1e-5)
    assert exact < sigma < 1.25 * exact
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(50_000, dtype=torch.float64)
    noisy = mech.add_noise(x, sensitivity=1.0, epsilon=1.0, delta=1e-5, generator=g)
    assert noisy.dtype == torch.float64
    assert noisy.std().item() == pytest.approx(sigma, rel=0.02)
    with pytest.raises(MissingPrivacyCurveError, match="test_user_gaussian"):
        mech.pld(1.0)


def test_subclass_without_curve(clean_registry):
    @dpfa.mechanisms.register
    class NoCurve(DPMechanism):
        name = "test_no_curve"

        def sample(self, shape, scale, generator=None, device="cpu", dtype=torch.float32):
            return torch.zeros(tuple(shape), dtype=dtype)

    mech = dpfa.mechanisms.get("test_no_curve")()
    assert mech.sample((3,), 1.0).shape == (3,)  # it runs
    assert not mech.has_curve("rdp")
    with pytest.raises(MissingPrivacyCurveError, match="test_no_curve"):
        mech.calibrate(1.0, 1.0, 1e-5)
    with pytest.raises(MissingPrivacyCurveError):
        mech.add_noise(torch.zeros(3), 1.0, 1.0, 1e-5)
    with pytest.raises(MissingPrivacyCurveError):
        mech.rdp(2.0, 1.0)
    with pytest.raises(MissingPrivacyCurveError):
        mech.prv(1.0)


def test_subclass_without_sampler_says_so():
    class CurveOnly(DPMechanism):
        name = "test_curve_only"

        def rdp(self, alpha, scale, sensitivity=1.0):
            return alpha / (2 * scale**2)

    mech = CurveOnly()
    assert not mech.has_sampler()
    with pytest.raises(MissingPrivacyCurveError, match="sampler"):
        mech.add_noise(torch.zeros(3), 1.0, 1.0, 1e-5)


# ------------------------------------------------------------------------- add_noise


@pytest.mark.parametrize("eps,delta,sens", [(1.0, 1e-5, 1.0), (0.5, 1e-6, 2.5), (4.0, 1e-5, 0.3)])
def test_gaussian_add_noise_has_analytic_sigma(eps, delta, sens):
    """output - input has std = the analytic-Gaussian sigma, to 5 standard errors (about 1.1%).

    A sigma 10% off, or the classic sqrt(2 ln(1.25/delta)) Delta / eps (30-50% larger here),
    fails this test.
    """
    n = 200_000
    mech = dpfa.mechanisms.get("gaussian")()
    g = torch.Generator().manual_seed(1234)
    x = torch.rand(n, dtype=torch.float64, generator=g) * 10
    out = mech.add_noise(x, sensitivity=sens, epsilon=eps, delta=delta, generator=g)
    assert out.shape == x.shape and out.dtype == x.dtype
    noise = (out - x).numpy()
    sigma = mech.calibrate(sens, eps, delta)
    assert _balle_wang_delta(sigma, sens, eps) == pytest.approx(delta, rel=1e-6)
    tol = 5 / math.sqrt(2 * n)
    assert abs(noise.std() / sigma - 1) < tol
    assert abs(noise.mean()) < 5 * sigma / math.sqrt(n)
    classic = sens * math.sqrt(2 * math.log(1.25 / delta)) / eps
    assert abs(noise.std() / classic - 1) > 10 * tol
    assert classic > 1.1 * sigma


def test_laplace_add_noise_scale():
    n = 200_000
    mech = dpfa.mechanisms.get("laplace")()
    g = torch.Generator().manual_seed(99)
    x = torch.zeros(n, dtype=torch.float64)
    noise = mech.add_noise(x, sensitivity=2.0, epsilon=0.5, generator=g).numpy()
    b = 2.0 / 0.5
    assert stats.kstest(noise, stats.laplace(scale=b).cdf).pvalue > 1e-3
    assert stats.kstest(noise, stats.laplace(scale=1.1 * b).cdf).pvalue < 1e-12


def test_discrete_gaussian_add_noise_integers():
    mech = dpfa.mechanisms.get("discrete_gaussian")()
    g = torch.Generator().manual_seed(5)
    x = torch.arange(20_000, dtype=torch.int32)
    out = mech.add_noise(x, sensitivity=3.0, epsilon=1.0, delta=1e-6, generator=g)
    assert out.dtype == torch.int32
    sigma = mech.calibrate(3.0, 1.0, 1e-6)
    noise = (out - x).double()
    assert noise.std().item() == pytest.approx(math.sqrt(dg.variance(sigma)), rel=0.03)
    xf = torch.zeros(1000, dtype=torch.float32)
    outf = mech.add_noise(xf, sensitivity=3.0, epsilon=1.0, delta=1e-6, generator=g)
    assert outf.dtype == torch.float32 and torch.equal(outf, torch.round(outf))


# ---------------------------------------------------------------------- calibration


CONFIGS = [(0.1, 1e-5, 1.0), (1.0, 1e-5, 1.0), (3.0, 1e-6, 2.0), (8.0, 1e-9, 0.5), (0.5, 0.01, 10.0)]


@pytest.mark.parametrize("eps,delta,sens", CONFIGS)
def test_gaussian_calibration_round_trip_against_dp_accounting(eps, delta, sens):
    mech = dpfa.mechanisms.get("gaussian")()
    sigma = mech.calibrate(sens, eps, delta)
    # Balle-Wang, written out here: delta(eps(sigma)) = delta, and sigma is the smallest such
    assert _balle_wang_delta(sigma, sens, eps) <= delta * (1 + 1e-9)
    assert _balle_wang_delta(sigma, sens, eps) == pytest.approx(delta, rel=1e-6)
    assert _balle_wang_delta(sigma * (1 - 1e-6), sens, eps) > delta
    # dp-accounting's analytic Gaussian (unit sensitivity: sigma scales with Delta)
    assert sigma == pytest.approx(sens * dpa_gaussian.get_sigma_gaussian(eps, delta), rel=1e-6)
    eps_back = mech.epsilon(sigma, sens, delta)
    assert eps_back == pytest.approx(eps, rel=1e-6)
    assert eps_back == pytest.approx(dpa_gaussian.get_epsilon_gaussian(sigma / sens, delta), rel=1e-6)
    # RDP curve (Mironov 2017)
    assert mech.rdp(3.0, sigma, sens) == pytest.approx(3.0 * sens**2 / (2 * sigma**2))


@pytest.mark.parametrize("eps,delta,sens", [(0.5, 1e-5, 1.0), (1.0, 0.0, 1.0), (2.0, 1e-3, 3.0), (5.0, 1e-7, 0.2)])
def test_laplace_calibration_against_dp_accounting(eps, delta, sens):
    mech = dpfa.mechanisms.get("laplace")()
    b = mech.calibrate(sens, eps, delta)
    assert b == pytest.approx(sens / (eps - 2 * math.log(1 - delta)), rel=1e-12)
    assert mech.epsilon(b, sens, delta) == pytest.approx(eps, rel=1e-9)
    pld = dpa_pld.from_laplace_mechanism(b, sensitivity=sens, value_discretization_interval=1e-5)
    # the exact profile: delta(eps) = 1 - exp((eps - Delta/b) / 2), so eps(delta) is the target
    assert pld.get_epsilon_for_delta(delta) == pytest.approx(eps, abs=2e-4)
    if delta > 0:
        assert pld.get_delta_for_epsilon(eps) == pytest.approx(delta, rel=1e-2)
        # the pure-DP b would be looser (larger): delta buys less noise
        assert b < sens / eps


@pytest.mark.parametrize("eps,delta,sens", [(0.5, 1e-5, 1.0), (1.0, 1e-6, 2.0), (4.0, 1e-5, 5.0)])
def test_discrete_gaussian_calibration_round_trip(eps, delta, sens):
    mech = dpfa.mechanisms.get("discrete_gaussian")()
    sigma = mech.calibrate(sens, eps, delta)
    eps_back = mech.epsilon(sigma, sens, delta)
    assert eps_back <= eps
    assert eps_back == pytest.approx(eps, rel=1e-6)
    assert mech.epsilon(sigma * (1 - 1e-6), sens, delta) > eps * (1 - 1e-6)
    # the continuous-order search is sound (every order is a valid bound) and never looser
    assert mech.epsilon(sigma, sens, delta) <= DPMechanism.epsilon(mech, sigma, sens, delta)
    # conservative: the exact scalar profile (CKS20 Thm 7) at the calibrated sigma is below delta
    d1 = dg.delta_exact_1d(sigma, int(sens), eps)
    assert d1 <= delta
    pld = dpa_pld.from_discrete_gaussian_mechanism(sigma, sensitivity=int(sens), value_discretization_interval=1e-5)
    assert pld.get_delta_for_epsilon(eps) == pytest.approx(d1, rel=0.05, abs=1e-12)
    # the same RDP curve as the Gaussian (CKS20 Thm 14)
    assert mech.rdp(7.0, sigma, sens) == dpfa.mechanisms.get("gaussian")().rdp(7.0, sigma, sens)
    # and not much more noise than the continuous analytic Gaussian
    assert sigma < 1.3 * dpfa.mechanisms.get("gaussian")().calibrate(sens, eps, delta)


def test_delta_exact_1d_against_dp_accounting():
    for sigma, sens, eps in [(0.8, 1, 0.5), (2.0, 1, 1.0), (5.0, 3, 0.7)]:
        pld = dpa_pld.from_discrete_gaussian_mechanism(sigma, sensitivity=sens, value_discretization_interval=1e-6)
        assert dg.delta_exact_1d(sigma, sens, eps) == pytest.approx(pld.get_delta_for_epsilon(eps), rel=1e-3)
    with pytest.raises(PrivacyParameterError, match="1.5"):
        dg.delta_exact_1d(1.0, 1.5, 1.0)


def test_bisect_scale_errs_on_private_side():
    s = bisect_scale(lambda x: x >= 3.14159, 1.0)
    assert 3.14159 <= s < 3.14159 * (1 + 1e-7)


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("bad_eps", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_epsilon(name, bad_eps):
    mech = dpfa.mechanisms.get(name)()
    with pytest.raises(PrivacyParameterError, match="epsilon") as err:
        mech.calibrate(1.0, bad_eps, 1e-5)
    assert ("NaN" if math.isnan(bad_eps) else repr(bad_eps)) in str(err.value)
    with pytest.raises(PrivacyParameterError):
        mech.add_noise(torch.zeros(3), 1.0, bad_eps, 1e-5)


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("bad_delta", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_delta(name, bad_delta):
    mech = dpfa.mechanisms.get(name)()
    with pytest.raises(PrivacyParameterError, match="delta") as err:
        mech.calibrate(1.0, 1.0, bad_delta)
    assert ("NaN" if math.isnan(bad_delta) else repr(bad_delta)) in str(err.value)


@pytest.mark.parametrize("name", ["gaussian", "discrete_gaussian"])
def test_zero_delta_needs_pure_dp_mechanism(name):
    with pytest.raises(PrivacyParameterError, match="delta=0"):
        dpfa.mechanisms.get(name)().calibrate(1.0, 1.0, 0.0)


@pytest.mark.parametrize("name", BUILTIN)
def test_bad_sensitivity_and_scale(name):
    mech = dpfa.mechanisms.get(name)()
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(PrivacyParameterError, match="sensitivity"):
            mech.calibrate(bad, 1.0, 1e-5)
    with pytest.raises(PrivacyParameterError, match="-2.0"):
        mech.sample((4,), -2.0)
    with pytest.raises(PrivacyParameterError, match="epsilon"):
        mech.calibrate(1.0, "1.0", 1e-5)
