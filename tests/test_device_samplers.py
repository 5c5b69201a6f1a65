"""The Triton device samplers through fill_noise (under TRITON_INTERPRET=1 without a GPU).

Law tests at fixed seeds (KS against scipy for the continuous laws, chi-square against the
exact pmf for the discrete Gaussian), reproducibility (same seed + offsets, any block shape,
int32 or int64 offsets), scale 0, and power checks: the same tests reject a scale off by 10%.
"""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from scipy import optimize, stats

from law_tests import chi2_vs_discrete_gaussian
from dpfa.errors import PrivacyParameterError, ShapeError
from dpfa.kernels import noise as noise_mod
from dpfa.kernels.noise import fill_noise
from dpfa.mechanisms import discrete_gaussian as dg
from dpfa.mechanisms import device_samplers as ds
from dpfa.mechanisms import get

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = 200_000
SEED = 20261125
P_MIN = 1e-3  # a law test passes when its p-value is above this; all seeds are fixed

SAMPLERS = {
    "gaussian": ds.gaussian_sampler,
    "laplace": ds.laplace_sampler,
    "discrete_gaussian": ds.discrete_gaussian_sampler,
}


def _noise(sampler, scale, seed=SEED, n=N, dtype=torch.float32):
    return fill_noise(sampler, seed, n, scale, device=DEVICE, dtype=dtype).cpu().double().numpy()


_chi2_vs_pmf = chi2_vs_discrete_gaussian


# ------------------------------------------------------------------------------- laws


def test_gaussian_law_ks_and_moments():
    scale = 1.3
    x = _noise(ds.gaussian_sampler, scale)
    assert stats.kstest(x, stats.norm(scale=scale).cdf).pvalue > P_MIN
    assert abs(x.mean()) < 5 * scale / math.sqrt(N)
    # std within 5 standard errors (SE of the sample std ~ sigma / sqrt(2N) = 0.16%)
    assert abs(x.std() / scale - 1) < 5 / math.sqrt(2 * N)


def test_laplace_law_ks_moments_and_tails():
    b = 2.5
    x = _noise(ds.laplace_sampler, b)
    assert stats.kstest(x, stats.laplace(scale=b).cdf).pvalue > P_MIN
    assert abs(x.mean()) < 5 * math.sqrt(2) * b / math.sqrt(N)
    # Var = 2 b^2; the sample variance of a Laplace has SE sqrt((24 - 4) b^4 / N)
    assert abs(x.var() - 2 * b * b) < 5 * math.sqrt(20 / N) * b * b
    # tails: P(|X| > 5b) = e^-5 and P(|X| > 8b) = e^-8, binomial two-sided tests
    for k in (5.0, 8.0):
        count = int(np.sum(np.abs(x) > k * b))
        assert stats.binomtest(count, N, math.exp(-k)).pvalue > P_MIN
    assert np.all(np.isfinite(x))
    assert np.abs(x).max() <= 64 * math.log(2) * b * (1 + 1e-6)


@pytest.mark.parametrize("sigma", [0.5, 1.3, 4.0, 20.0])
def test_discrete_gaussian_law_chi_square(sigma):
    x = _noise(ds.discrete_gaussian_sampler, sigma)
    assert np.all(x == np.round(x)), "the discrete Gaussian must give integers"
    p = _chi2_vs_pmf(x, sigma)
    assert p > P_MIN, f"chi-square p={p:.3g} for sigma={sigma}"
    var_exact = dg.variance(sigma)
    # SE of the sample variance ~ var sqrt(2 / N) for near-Gaussian laws (sigma >= 1.3);
    # for sigma = 0.5 use the exact fourth moment.
    k = np.arange(-200, 201)
    m4 = float(np.sum(dg.pmf(k, sigma) * k.astype(float) ** 4))
    se = math.sqrt((m4 - var_exact**2) / N)
    assert abs(x.var() - var_exact) < 5 * se
    assert abs(x.mean()) < 5 * math.sqrt(var_exact / N)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_scale_off_by_ten_percent_is_detected(name):
    """The law tests above have power: the same samples reject a scale 10% too large or too small."""
    scale = 4.0
    x = _noise(SAMPLERS[name], scale, seed=SEED + 7)
    if name == "discrete_gaussian":
        assert _chi2_vs_pmf(x, scale) > P_MIN
        assert _chi2_vs_pmf(x, 1.1 * scale) < 1e-12
        assert _chi2_vs_pmf(x, scale / 1.1) < 1e-12
        return
    law = stats.norm if name == "gaussian" else stats.laplace
    assert stats.kstest(x, law(scale=scale).cdf).pvalue > P_MIN
    assert stats.kstest(x, law(scale=1.1 * scale).cdf).pvalue < 1e-12
    assert stats.kstest(x, law(scale=scale / 1.1).cdf).pvalue < 1e-12


def test_mechanisms_point_at_these_samplers():
    assert get("gaussian").triton_sampler is ds.gaussian_sampler
    assert get("laplace").triton_sampler is ds.laplace_sampler
    assert get("discrete_gaussian").triton_sampler is ds.discrete_gaussian_sampler


# ------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_same_seed_same_noise_different_seed_different_noise(name):
    f = SAMPLERS[name]
    a = _noise(f, 1.7, seed=11, n=5000)
    b = _noise(f, 1.7, seed=11, n=5000)
    c = _noise(f, 1.7, seed=12, n=5000)
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.5
    assert abs(np.corrcoef(a, c)[0, 1]) < 0.06  # 4 SE for 5000 independent pairs
    # a large seed (above 2^32: both key words of Philox are used)
    d = _noise(f, 1.7, seed=2**40 + 11, n=5000)
    assert np.mean(a != d) > 0.5


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_scale_zero_gives_zeros(name):
    x = _noise(SAMPLERS[name], 0.0, n=3000)
    assert np.all(x == 0)


@triton.jit
def _tile_kernel(out_ptr, seed, scale, SAMPLER: tl.constexpr, M: tl.constexpr, N: tl.constexpr):
    """A 2-D tile of offsets, as a fused attention epilogue sees them."""
    offs = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    tl.store(out_ptr + offs, SAMPLER(seed, offs, scale))


@triton.jit
def _offset_base_kernel(out_ptr, seed, base, scale, SAMPLER: tl.constexpr, BLOCK: tl.constexpr):
    """Noise at int64 offsets base + i (base may exceed 2^32)."""
    i = tl.arange(0, BLOCK)
    offs = base + i.to(tl.int64)
    tl.store(out_ptr + i, SAMPLER(seed, offs, scale))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_noise_depends_only_on_seed_and_offset(name):
    """Same values on a 2-D tile, with other block sizes, and with int64 offsets."""
    f = SAMPLERS[name]
    ref = fill_noise(f, 99, 64 * 32, 3.0, device=DEVICE)
    tile = torch.empty(64 * 32, device=DEVICE)
    _tile_kernel[(1,)](tile, 99, 3.0, SAMPLER=f, M=64, N=32)
    torch.testing.assert_close(tile, ref, rtol=0, atol=0)
    small_blocks = torch.empty(64 * 32, device=DEVICE)
    noise_mod._fill_noise_kernel[(16,)](small_blocks, 99, 64 * 32, 3.0, SAMPLER=f, BLOCK=128, LARGE=False)
    torch.testing.assert_close(small_blocks, ref, rtol=0, atol=0)
    wide = torch.empty(64 * 32, device=DEVICE)
    noise_mod._fill_noise_kernel[(2,)](wide, 99, 64 * 32, 3.0, SAMPLER=f, BLOCK=1024, LARGE=True)
    torch.testing.assert_close(wide, ref, rtol=0, atol=0)
    # offsets 2^32 + i must not wrap onto offsets i
    far = torch.empty(1024, device=DEVICE)
    _offset_base_kernel[(1,)](far, 99, 2**32, 3.0, SAMPLER=f, BLOCK=1024)
    near = torch.empty(1024, device=DEVICE)
    _offset_base_kernel[(1,)](near, 99, 0, 3.0, SAMPLER=f, BLOCK=1024)
    torch.testing.assert_close(near, ref[:1024], rtol=0, atol=0)
    assert (far != near).float().mean().item() > 0.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_fill_noise_dtypes(dtype):
    ref = fill_noise(ds.discrete_gaussian_sampler, 5, 4000, 6.0, device=DEVICE)
    x = fill_noise(ds.discrete_gaussian_sampler, 5, 4000, 6.0, device=DEVICE, dtype=dtype)
    assert x.dtype == dtype and x.shape == (4000,)
    torch.testing.assert_close(x.float(), ref, rtol=0, atol=0)  # |noise| < 256: exact in every dtype
    g = fill_noise(ds.gaussian_sampler, 5, 4000, 1.0, device=DEVICE, dtype=dtype)
    assert g.dtype == dtype and torch.isfinite(g).all()


# --------------------------------------------------------- the rejection loop's failure


@triton.jit
def _rounds_kernel(out_ptr, seed, scale, ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, ds.discrete_gaussian_rounds(seed, offs, scale, ROUNDS))


def _rounds(out, seed, sigma, rounds, block=1024):
    """Fill ``out`` with ``discrete_gaussian_rounds`` at offsets 0..n-1 (blocks of 1024: one
    block of 65536 float64 lanes does not compile in reasonable time on a GPU)."""
    _rounds_kernel[(out.numel() // block,)](out, seed, sigma, ROUNDS=rounds, BLOCK=block)


def _acceptance(sigma):
    """p(sigma): probability that one rejection round accepts."""
    q = math.exp(-1.0 / sigma)
    return (1 - q) / (1 + q) * math.exp(-0.5) * math.exp(dg._log_normaliser(sigma))


def test_acceptance_probability_lower_bound():
    """The failure bound in the docstring: p(sigma) >= 0.5578 everywhere, so 0.4422^128 < 2^-150."""
    grid = np.geomspace(1e-4, 1e5, 4000)
    p = np.array([_acceptance(s) for s in grid])
    assert p.min() >= 0.5578
    res = optimize.minimize_scalar(_acceptance, bounds=(0.2, 0.6), method="bounded", options={"xatol": 1e-9})
    assert res.fun >= 0.5578
    assert abs(_acceptance(1e-3) - math.exp(-0.5)) < 1e-9
    assert abs(_acceptance(1e5) - math.sqrt(math.pi / 2) * math.exp(-0.5)) < 1e-4
    assert ds.DISCRETE_GAUSSIAN_MAX_ROUNDS * math.log2(1 - 0.5578) < -150


def test_what_happens_when_rounds_run_out():
    """With few rounds, unaccepted elements are 0: P(0) = (1-p)^R + (1-(1-p)^R) pmf(0)."""
    sigma, n = 4.0, 65536
    out = torch.empty(n, device=DEVICE)
    _rounds(out, 3, sigma, 0)
    assert torch.all(out == 0)
    p = _acceptance(sigma)
    for rounds in (1, 2):
        _rounds(out, 3, sigma, rounds)
        x = out.cpu().numpy()
        fail = (1 - p) ** rounds
        p0 = fail + (1 - fail) * dg.pmf(0, sigma)
        assert stats.binomtest(int(np.sum(x == 0)), n, p0).pvalue > P_MIN
        # away from 0 the law is (1 - fail) * pmf
        for k in (1, 3, -5):
            assert stats.binomtest(int(np.sum(x == k)), n, (1 - fail) * dg.pmf(k, sigma)).pvalue > P_MIN
    # with the full 128 rounds nothing fails: the value is the first accepted round's
    _rounds(out, 3, sigma, 128)
    full = fill_noise(ds.discrete_gaussian_sampler, 3, n, sigma, device=DEVICE)
    torch.testing.assert_close(out, full, rtol=0, atol=0)


# ------------------------------------------------------------------------ bad input


def test_fill_noise_bad_inputs(monkeypatch):
    f = ds.gaussian_sampler
    with pytest.raises(PrivacyParameterError, match="-1"):
        fill_noise(f, 1, 10, -1.0, device=DEVICE)
    with pytest.raises(PrivacyParameterError, match="NaN"):
        fill_noise(f, 1, 10, float("nan"), device=DEVICE)
    with pytest.raises(PrivacyParameterError, match="seed"):
        fill_noise(f, -3, 10, 1.0, device=DEVICE)
    with pytest.raises(PrivacyParameterError, match="seed"):
        fill_noise(f, 2**64, 10, 1.0, device=DEVICE)
    with pytest.raises(ShapeError, match="int32"):
        fill_noise(f, 1, 10, 1.0, device=DEVICE, dtype=torch.int32)
    with pytest.raises(TypeError, match="triton.jit"):
        fill_noise(lambda s, o, c: o, 1, 10, 1.0, device=DEVICE)
    assert fill_noise(f, 1, 0, 1.0, device=DEVICE).shape == (0,)
    monkeypatch.setattr(noise_mod, "interpreted", lambda: False)
    with pytest.raises(ShapeError, match="TRITON_INTERPRET=1"):
        fill_noise(f, 1, 10, 1.0, device="cpu")


def test_scale_is_rounded_up_to_float32():
    s = 1.0 + 2.0**-30  # not a float32: the kernel must get the next float32 up, never 1.0
    assert noise_mod._scale_arg(s) >= s
    assert noise_mod._scale_arg(s) == float(np.nextafter(np.float32(1.0), np.float32(2.0)))
    assert noise_mod._scale_arg(0.5) == 0.5


# ------------------------------------------------------- laws at every scale (issue 12)

SCALES = [0.5, 1.0, 3.0, 100.0, 1e4]
N_SCALE = 40_000  # experiments/sampler_laws.py runs the same criteria at 10^7 samples on a GPU


def _moments_within(x, mean, var, m4):
    """Sample mean and variance within 4.42 standard errors of the law's (4th central moment m4)."""
    n = len(x)
    se_mean = math.sqrt(var / n)
    se_var = math.sqrt(max(m4 - var**2, 1e-300) / n)
    return abs(x.mean() - mean) <= 4.42 * se_mean and abs(x.var() - var) <= 4.42 * se_var


def _dg_moments(sigma):
    k = np.arange(-int(40 * sigma) - 2, int(40 * sigma) + 3)
    p = dg.pmf(k, sigma)
    return float((p * k**2).sum()), float((p * k**4).sum())


def _law_ok(name, x, scale):
    if name == "gaussian":
        return stats.kstest(x / scale, "norm").pvalue > P_MIN and _moments_within(x, 0, scale**2, 3 * scale**4)
    if name == "laplace":
        return stats.kstest(x / scale, "laplace").pvalue > P_MIN and _moments_within(x, 0, 2 * scale**2,
                                                                                    24 * scale**4)
    var, m4 = _dg_moments(scale)
    if not np.all(x == np.round(x)):
        return False
    if scale <= 100:
        return _chi2_vs_pmf(x, scale) > P_MIN and _moments_within(x, 0, var, m4)
    # at 1e4 the pmf is the Gaussian density at integers to within e^{-2 pi^2 sigma^2}: bin the values
    edges = scale * np.array([-np.inf, -2, -1, -0.5, 0, 0.5, 1, 2, np.inf])
    obs = np.histogram(x, bins=edges)[0]
    cdf = stats.norm.cdf(edges / scale)
    return stats.chisquare(obs, len(x) * np.diff(cdf)).pvalue > P_MIN and _moments_within(x, 0, var, m4)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_law_at_every_scale(name, scale):
    x = _noise(SAMPLERS[name], scale, n=N_SCALE, seed=SEED + int(scale))
    assert _law_ok(name, x, scale)


@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_law_tests_reject_a_scale_off_by_ten_percent(name, scale):
    x = _noise(SAMPLERS[name], 0.9 * scale, n=N_SCALE, seed=SEED + 1)
    assert not _law_ok(name, x, scale)


def test_law_test_rejects_laplace_in_place_of_gaussian():
    x = _noise(ds.laplace_sampler, 3.0 / math.sqrt(2), n=N_SCALE, seed=SEED + 2)  # same variance as N(0, 9)
    assert not _law_ok("gaussian", x, 3.0)


def test_streams_are_uncorrelated_across_offsets_and_seeds():
    """No (seed, counter) reuse: disjoint offset ranges and different seeds give uncorrelated noise."""
    n = 50_000
    a = _noise(ds.gaussian_sampler, 1.0, seed=7, n=2 * n)
    b = _noise(ds.gaussian_sampler, 1.0, seed=8, n=n)
    limit = 5 / math.sqrt(n)
    assert abs(np.corrcoef(a[:n], a[n:])[0, 1]) < limit  # neighbouring counter ranges
    assert abs(np.corrcoef(a[:n], b)[0, 1]) < limit  # same counters, another seed
    assert abs(np.corrcoef(a[:n - 1], a[1:n])[0, 1]) < limit  # consecutive counters


@triton.jit
def _box_muller_kernel(w_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < n
    w0 = tl.load(w_ptr + 3 * i, mask=m, other=0).to(tl.uint32)
    w1 = tl.load(w_ptr + 3 * i + 1, mask=m, other=0).to(tl.uint32)
    w2 = tl.load(w_ptr + 3 * i + 2, mask=m, other=0).to(tl.uint32)
    a, b = ds._box_muller(w0, w1, w2, 1.0)
    tl.store(out_ptr + 2 * i, a, mask=m)
    tl.store(out_ptr + 2 * i + 1, b, mask=m)


def test_gaussian_tail_is_not_cut_at_5_68():
    """tl.randn clamps its uniform at 1e-7, so |z| <= 5.68: a truncated Gaussian, not the
    mechanism that is accounted. The dpfa sampler's radius reaches sqrt(2 * 64 log 2) = 9.42 at
    the smallest uniform and follows P(r > x) = e^{-x^2/2} on crafted Philox words."""
    top = 2**32 - 1
    words = [(0, 0, 0), (0, top, 0), (1, 0, 2**30), (2**28, 0, 0)]  # u = 2^-64, 2^-32, ~2^-32, 2^-4
    w = torch.tensor([x for t in words for x in t], dtype=torch.int64, device=DEVICE)
    out = torch.empty(2 * len(words), dtype=torch.float32, device=DEVICE)
    _box_muller_kernel[(1,)](w, out, len(words), BLOCK=4)
    r = out.view(-1, 2).double().norm(dim=1).cpu().numpy()
    u = np.array([2.0**-64, 2.0**-32, 2.0**-32 + 2.0**-64, 2.0**-4])
    assert np.allclose(r, np.sqrt(-2 * np.log(u)), rtol=1e-5)
    assert r[0] > 9.4 and r[1] > 6.6  # beyond tl.randn's 5.68
    assert abs(out[4].item()) < 1e-5 and out[5].item() > 0  # angle pi/2 at w2 = 2^30: (0, r)


def test_gaussian_pair_form_gives_the_elementwise_values():
    """Kernels that make two normals a call (the attention epilogue) and the element-wise
    sampler (fill_noise) give the same noise: element i is lane i % 2 of counter i // 2."""
    assert ds.pair_form(ds.gaussian_sampler) is ds.gaussian_pair_sampler
    assert ds.pair_form(ds.laplace_sampler) is None
    x = _noise(ds.gaussian_sampler, 1.0, seed=11, n=1000)
    pairs = torch.empty(1000, dtype=torch.float32, device=DEVICE)
    _pair_kernel[(1,)](pairs, 11, BLOCK=512)
    assert np.array_equal(pairs.cpu().double().numpy(), x)


@triton.jit
def _pair_kernel(out_ptr, seed, BLOCK: tl.constexpr):
    c = tl.arange(0, BLOCK)
    a, b = ds.gaussian_pair_sampler(seed, c, 1.0)
    m = c < 500
    tl.store(out_ptr + 2 * c, a, mask=m)
    tl.store(out_ptr + 2 * c + 1, b, mask=m)
