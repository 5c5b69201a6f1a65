"""secure_mode (issue 12, item 6): the secure grid release against floating-point attacks.

Mironov (CCS 2012) and Jin et al. (S&P 2022): a float sampler leaks through the low-order
bits of ``x + noise``. The secure release outputs ``(R(x 2^k) + Z) 2^-k`` with integer noise.
Checked here: every value on the grid bitwise; the low-order-bit histograms of
neighbouring inputs agree (and the same test rejects the plain float Gaussian release);
the rounding is in the sensitivity (the exact Renyi divergence of the real release's law
stays under the accountant's curve, and exceeds it when the slack is left out); the
engine's secure_mode releases through it and accounts the discrete Gaussian; the exact
sampler's running time is measured (it depends on sigma and on the value drawn).
"""

import math

import numpy as np
import pytest
import torch
from scipy import special, stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from law_tests import chi2_vs_discrete_gaussian
from dpfa import PrivacyEngine
from dpfa.accountants import epsilon_for
from dpfa.attacks.timing import exact_sampler_timing_report, welch_timing_test
from dpfa.errors import PrivacyParameterError
from dpfa.mechanisms import GaussianMechanism
from dpfa.mechanisms import discrete_gaussian as dg
from dpfa.mechanisms import secure
from dpfa.mechanisms.secure import SecureGridRelease

P_MIN = 1e-3


def _gen(seed=20261125):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _on_grid(y: torch.Tensor, grid_bits: int) -> bool:
    """Bitwise: y 2^k is an integer, exactly, in float64 (a power-of-two scaling is exact)."""
    a = y.to(torch.float64) * 2.0**grid_bits
    return bool(torch.isfinite(a).all()) and bool((a == torch.floor(a)).all())


# ------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_released_value_is_on_the_grid_bitwise(dtype):
    x = torch.cat([torch.randn(3000, generator=_gen()) * 10, torch.tensor([1 / 3, -1 / 3, 0.0, 1e-30, -7.5])])
    x = x.to(dtype)
    for z, exact in ((1.0, False), (0.0, False), (0.7, True)):
        rel = SecureGridRelease.for_sum(z, 1.0, x.numel(), exact=exact)
        y = rel.release(x[:300] if exact else x)
        assert y.dtype == torch.float64 and _on_grid(y, rel.grid_bits)
        if z == 0.0:  # no noise: the rounding alone, to a neighbouring grid point
            a = x.double() * 2.0**rel.grid_bits
            assert bool(((y * 2.0**rel.grid_bits == torch.floor(a)) | (y * 2.0**rel.grid_bits == torch.ceil(a))).all())
    rel = SecureGridRelease(1.0, 1.0, 10, grid_bits=-3)  # a grid coarser than 1 works the same way
    assert _on_grid(rel.release(torch.randn(10)), -3)


def test_randomized_rounding_is_unbiased():
    x = torch.full((200_000,), 0.3, dtype=torch.float64)
    m = secure.randomized_round(x, 0, _gen())
    assert set(m.unique().tolist()) == {0, 1}
    p = m.double().mean().item()
    assert abs(p - 0.3) < 4.42 * math.sqrt(0.3 * 0.7 / x.numel())


def test_grid_bits_and_sensitivity():
    k = secure.grid_bits_for(1.0, 10_000)
    assert math.sqrt(10_000) * 2.0**-k <= secure.DEFAULT_SLACK < math.sqrt(10_000) * 2.0**-(k - 1)
    rel = SecureGridRelease.for_sum(2.0, 1.0, 10_000)
    assert rel.grid_sensitivity >= 2.0**k + 100.0
    assert rel.noise_scale == pytest.approx(2.0 * (2.0**k + 100.0), rel=1e-9)
    assert rel.rdp(8.0) == pytest.approx(8.0 / 8.0)
    with pytest.raises(PrivacyParameterError, match="dim=10"):
        SecureGridRelease(1.0, 1.0, 10, 4).release(torch.zeros(11))
    with pytest.raises(PrivacyParameterError, match="too large"):
        SecureGridRelease(1.0, 1.0, 10, 60)
    with pytest.raises(PrivacyParameterError, match="NaN"):
        SecureGridRelease(1.0, 1.0, 10, 4).release(torch.tensor([math.nan]))


def test_per_element_noise_scales_follow_their_laws():
    """The vectorised sampler with a tensor of scales: each half has its own N_Z law, and a constant
    tensor draws the same numbers as the float (the path of the scalar sampler suites)."""
    n = 40_000
    sig = torch.cat([torch.full((n,), 1.5), torch.full((n,), 7.0), torch.zeros(10)]).double()
    y = dg._sample_torch(sig.numel(), sig, _gen(), "cpu")
    assert chi2_vs_discrete_gaussian(y[:n].numpy(), 1.5) > P_MIN
    assert chi2_vs_discrete_gaussian(y[n:2 * n].numpy(), 7.0) > P_MIN
    assert bool((y[2 * n:] == 0).all())
    assert torch.equal(dg._sample_torch(1000, 3.0, _gen(5), "cpu"),
                       dg._sample_torch(1000, torch.full((1000,), 3.0).double(), _gen(5), "cpu"))


# --------------------------------------------------------------- low-order bits


def _low_significand_bits(y: torch.Tensor, bits: int = 8) -> np.ndarray:
    """The ``bits`` lowest bits of the IEEE significand of each value, as stored."""
    if y.dtype == torch.float64:
        return (y.view(torch.int64) & ((1 << bits) - 1)).numpy()
    return (y.view(torch.int32) & ((1 << bits) - 1)).numpy().astype(np.int64)


def _same_histogram_p(a: np.ndarray, b: np.ndarray, cells: int) -> float:
    """Chi-square test of homogeneity of two histograms over ``cells``; 1.0 when both are the same point mass."""
    table = np.vstack([np.bincount(a, minlength=cells), np.bincount(b, minlength=cells)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 1.0 if (table[0] > 0).all() == (table[1] > 0).all() else 0.0
    return float(stats.chi2_contingency(table)[1])


N_BITS = 50_000
NEIGHBOURS = (0.0, 1.0 / 3.0)  # L2 distance 1/3 < C = 1, the second one with a full float64 significand


def test_low_order_bits_of_neighbouring_releases_have_the_same_histogram():
    rel = SecureGridRelease.for_sum(1.0, 1.0, N_BITS)
    y0, y1 = (rel.release(torch.full((N_BITS,), x, dtype=torch.float64), generator=_gen(i))
              for i, x in enumerate(NEIGHBOURS))
    # the stored significand: nothing below the grid, whatever the input
    b0, b1 = _low_significand_bits(y0), _low_significand_bits(y1)
    assert (b0 == 0).all() and (b1 == 0).all()
    assert _same_histogram_p(b0, b1, 256) == 1.0
    # the low-order bits of the grid integers: the same (near-uniform) law for both inputs
    m0, m1 = ((y * 2.0**rel.grid_bits).to(torch.int64) & 255 for y in (y0, y1))
    p = _same_histogram_p(m0.numpy(), m1.numpy(), 256)
    assert p > P_MIN, p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_plain_float_gaussian_release_fails_the_same_test(dtype):
    """x + N(0, 1) computed in floating point: the low bits of the stored significand separate the
    two neighbours (p ~ 0), although sigma = 3 Delta; the test above has teeth."""
    mech = GaussianMechanism()
    y0, y1 = (torch.full((N_BITS,), x, dtype=dtype) + mech.sample((N_BITS,), 1.0, generator=_gen(i), dtype=dtype)
              for i, x in enumerate(NEIGHBOURS))
    p = _same_histogram_p(_low_significand_bits(y0), _low_significand_bits(y1), 256)
    assert p < 1e-10, p


# ------------------------------------------------------- accounting must be earned


def _log_pmf(y: np.ndarray, center: float, sigma: float) -> np.ndarray:
    return -((y - center) ** 2) / (2.0 * sigma * sigma) - dg._log_normaliser(sigma)


def _renyi(log_p: np.ndarray, log_q: np.ndarray, alpha: float) -> float:
    """D_alpha(P || Q) = log sum p^alpha q^(1 - alpha) / (alpha - 1), in log space."""
    return float(special.logsumexp(alpha * log_p + (1.0 - alpha) * log_q) / (alpha - 1.0))


def _worst_divergence(rel: SecureGridRelease, noise_scale: float, alphas) -> list[float]:
    """Exact Renyi divergences (both directions) of the release's law at x = 0 and x' = the sensitivity,
    d = 1: R(0) = 0; R(x') is floor/ceil of x' 2^k with the fractional part as probability."""
    y = np.arange(-4000, 4001, dtype=np.float64)
    a = rel.sensitivity * 2.0**rel.grid_bits
    lo, f = math.floor(a), a - math.floor(a)
    log_p = _log_pmf(y, 0.0, noise_scale)
    log_q = np.logaddexp(math.log1p(-f) + _log_pmf(y, lo, noise_scale), math.log(f) + _log_pmf(y, lo + 1, noise_scale))
    return [max(_renyi(log_p, log_q, al), _renyi(log_q, log_p, al)) for al in alphas]


def test_rounding_slack_is_counted_in_the_sensitivity():
    """One coordinate, grid step 1, sensitivity 1/2 (a quarter of a step would do as well): the
    neighbour 1/2 rounds to 0 or 1, an integer shift of 1. The real release (noise z (1/2 + 1))
    stays under the accountant's curve alpha / (2 z^2) at every order; the same release with the
    slack left out (noise z / 2) exceeds it, so this test fails if the slack is dropped."""
    z, alphas = 1.0, [1.5, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
    rel = SecureGridRelease(z, 0.5, 1, grid_bits=0)
    claim = [rel.rdp(a) for a in alphas]
    real = _worst_divergence(rel, rel.noise_scale, alphas)
    assert all(r <= c for r, c in zip(real, claim)), (real, claim)
    no_slack = _worst_divergence(rel, z * rel.sensitivity * 2.0**rel.grid_bits, alphas)
    assert any(r > c for r, c in zip(no_slack, claim)), (no_slack, claim)
    # and the release samples the law the divergence was computed for: 1/2 N_Z(0) + 1/2 N_Z(1)
    x = torch.full((60_000,), 0.5, dtype=torch.float64)  # 60000 independent one-coordinate releases
    y = secure.grid_release(x, rel.grid_bits, rel.noise_scale, generator=_gen()).to(torch.int64).numpy()
    s = rel.noise_scale
    k = np.arange(-5, 7)  # cells with expected counts >= 5, and the rest pooled
    pmf = 0.5 * (dg.pmf(k, s) + dg.pmf(k - 1, s))
    counts = np.array([(y == v).sum() for v in k])
    obs, exp = np.append(counts, len(y) - counts.sum()), np.append(pmf * len(y), len(y) * (1 - pmf.sum()))
    assert exp.min() >= 5 and stats.chisquare(obs, exp).pvalue > P_MIN


# ------------------------------------------------------------------ the engine


def _engine_run(steps=3, secure_mode=True, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    data = TensorDataset(torch.randn(64, 6), torch.randint(0, 2, (64,)))
    engine = PrivacyEngine(secure_mode=secure_mode, **kw)
    model, opt, loader = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                             DataLoader(data, batch_size=16), noise_multiplier=1.1,
                                             target_delta=1e-5, max_grad_norm=1.0)
    done = 0
    while done < steps:
        for x, y in loader:
            if done == steps:
                break
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            done += 1
    return engine, opt


def test_engine_secure_mode_releases_on_the_grid_and_accounts_the_discrete_gaussian(monkeypatch):
    released = []
    original = SecureGridRelease.release

    def spy(self, x, generator=None):
        y = original(self, x, generator)
        released.append((self, y))
        return y

    monkeypatch.setattr(SecureGridRelease, "release", spy)
    engine, opt = _engine_run(steps=3)
    dim = sum(p.numel() for p in opt.params)
    assert len(released) == 3 * len(opt.params)
    for rel, y in released:
        assert rel.dim == dim and rel.noise_multiplier == 1.1 and rel.sensitivity == 1.0
        assert _on_grid(y, rel.grid_bits)
    # E[B] = 16 is a power of two and the values fit float32: the gradients stay on a grid too
    k = released[-1][0].grid_bits
    assert all(_on_grid(p.grad * 16, k) for p in opt.params)
    assert engine.accountant.name == "rdp" and engine.mechanism.name == "discrete_gaussian"
    assert {e.mechanism for e in engine.accountant.history} == {"discrete_gaussian"}
    expected = epsilon_for(1.1, 1e-5, 0.25, 3, accountant="rdp", mechanism="discrete_gaussian")
    assert engine.get_epsilon(1e-5) == pytest.approx(expected, rel=1e-9)


def test_engine_secure_mode_noise_level():
    """Zero gradients (Opacus's test_noise_level): the noise of the sum has std z (C + 2^-k sqrt(d))."""
    model = nn.Linear(400, 10, bias=False)
    engine = PrivacyEngine(secure_mode=True)
    data = TensorDataset(torch.zeros(8, 400))
    model, opt, loader = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                             DataLoader(data, batch_size=8), noise_multiplier=2.0,
                                             target_delta=1e-5, max_grad_norm=0.5, loss_reduction="sum")
    (x,) = next(iter(loader))
    model(x).sum().backward()
    opt.step()
    noise = model.weight.grad.double() * opt.expected_batch_size
    rel = SecureGridRelease.for_sum(2.0, 0.5, 4000)
    assert rel.effective_noise_std == pytest.approx(2.0 * (0.5 + math.sqrt(4000) * rel.grid_step), rel=1e-9)
    assert abs(noise.std().item() / rel.effective_noise_std - 1) < 4.42 / math.sqrt(2 * 4000)
    assert _on_grid(noise, rel.grid_bits)


def test_engine_secure_mode_refuses_what_it_cannot_protect():
    with pytest.raises(PrivacyParameterError, match="seed"):
        PrivacyEngine(secure_mode=True, seed=3)
    with pytest.raises(PrivacyParameterError, match="accountant"):
        PrivacyEngine(secure_mode=True, accountant="prv")
    with pytest.raises(PrivacyParameterError, match="mechanism"):
        PrivacyEngine(secure_mode=True, mechanism="laplace")
    engine = PrivacyEngine(secure_mode=True, mechanism="discrete_gaussian")
    assert engine.secure_rng and engine.accountant.name == "rdp"
    assert PrivacyEngine().accountant.name == "prv"  # the default without secure_mode is unchanged


def test_engine_secure_mode_calibrates_to_a_target_epsilon():
    model = nn.Linear(4, 1)
    data = TensorDataset(torch.randn(100, 4))
    engine = PrivacyEngine(secure_mode=True)
    engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=10),
                        target_epsilon=2.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0)
    eps = epsilon_for(engine.noise_multiplier, 1e-5, 0.1, 20, accountant="rdp", mechanism="discrete_gaussian")
    assert 1.9 < eps <= 2.0


# -------------------------------------------------------------------- timing


def test_timing_of_the_exact_sampler_is_measured():
    """The measurement runs and gives finite statistics. It does NOT assert that timing is
    constant: the CKS20 sampler's running time depends on sigma and on |Y| (see
    dpfa.attacks.timing and the README's sharp edges)."""
    rep = exact_sampler_timing_report(sigmas=(2.0, 2000.0), magnitude_sigma=8.0, n=400)
    for r in (rep.by_sigma, rep.by_magnitude):
        assert math.isfinite(r.t) and 0.0 <= r.p_value <= 1.0
        assert r.mean_a_ns > 0 and r.mean_b_ns > 0 and r.n_a >= 2 and r.n_b >= 2
    w = welch_timing_test([1, 2, 3, 4], [10, 11, 12, 13])
    assert w.t < 0 and w.p_value < 0.01
