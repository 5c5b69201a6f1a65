"""Fused DP-SGD noise kernel (dpfa.kernels.dpsgd_noise): values, law, scale and counters.

Element for element against fill_noise at the flat offsets; the law of the noise (KS against
the normal and the Laplace); its std is sigma C / E[B] with a test whose tolerance rejects a
scale 20% off (checked on deliberately mis-scaled noise, Opacus test_noise_level); disjoint
Philox counters across parameters and fresh seeds across steps, also through the engine.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpfa.errors import PrivacyParameterError
from dpfa.kernels.dpsgd_noise import noisy_average, noisy_average_reference
from dpfa.kernels.noise import fill_noise
from dpfa.mechanisms.device_samplers import gaussian_sampler, laplace_sampler
from dpfa.training import PrivacyEngine, contributions

SHAPES = [torch.Size((7, 5)), torch.Size((3,)), torch.Size((11, 13)), torch.Size((1,))]


def std_matches(samples: torch.Tensor, expected: float) -> bool:
    """Sample std within 5 standard errors (1/sqrt(2n) relative for a normal) of ``expected``."""
    n = samples.numel()
    return abs(samples.double().std().item() / expected - 1) < 5 / math.sqrt(2 * n)


@pytest.mark.parametrize("sampler", [gaussian_sampler, laplace_sampler], ids=["gaussian", "laplace"])
def test_values_equal_reference_at_flat_offsets(sampler, gen):
    sums = [torch.randn(s, generator=gen) for s in SHAPES]
    sums[1] = None  # a parameter without a clipped sum gets noise alone
    got = noisy_average(sums, SHAPES, sampler, 2**62 + 12345, 0.7, 4.5)
    ref = noisy_average_reference(sums, SHAPES, sampler, 2**62 + 12345, 0.7, 4.5)
    for g, r, s in zip(got, ref, SHAPES):
        assert g.shape == s and g.dtype == torch.float32
        assert torch.equal(g, r)


def test_counters_are_disjoint_across_parameters(gen):
    """Parameter k's noise is fill_noise(seed)[off_k : off_k + n_k]: the flat ranges do not overlap."""
    shapes = [torch.Size((64, 33)), torch.Size((33,)), torch.Size((64, 33))]
    zeros = [torch.zeros(s) for s in shapes]
    noise = noisy_average(zeros, shapes, gaussian_sampler, 77, 1.0, 1.0)
    flat = fill_noise(gaussian_sampler, 77, sum(s.numel() for s in shapes), 1.0)
    assert torch.equal(torch.cat([z.flatten() for z in noise]), flat)
    a, b = noise[0].flatten().double(), noise[2].flatten().double()  # two parameters of one shape
    assert not torch.equal(a, b)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(a.numel())
    other_seed = noisy_average(zeros, shapes, gaussian_sampler, 78, 1.0, 1.0)
    assert abs(torch.corrcoef(torch.stack([a, other_seed[0].flatten().double()]))[0, 1].item()) < 5 / math.sqrt(
        a.numel())


@pytest.mark.parametrize("sampler,law", [(gaussian_sampler, stats.norm), (laplace_sampler, stats.laplace)],
                         ids=["gaussian", "laplace"])
def test_law_and_scale(sampler, law):
    """(0 + z) / E[B] for n = 200k elements: KS against the law at scale sigma C / E[B]."""
    sigma, C, batch, n = 1.3, 0.8, 16.0, 200_003
    z = noisy_average([torch.zeros(n)], [torch.Size((n,))], sampler, 424242, sigma * C, batch)[0]
    scale = sigma * C / batch
    assert stats.kstest(z.double().numpy() / scale, law.cdf).pvalue > 1e-3
    if sampler is gaussian_sampler:
        assert std_matches(z, scale)
        assert abs(z.double().mean().item()) < 5 * scale / math.sqrt(n)


@pytest.mark.parametrize("factor", [0.8, 1.2])
def test_scale_check_rejects_20_percent_error(factor):
    """The std check above has the power to see a scale 20% off (and the KS test too)."""
    sigma, C, batch, n = 1.3, 0.8, 16.0, 200_003
    z = noisy_average([torch.zeros(n)], [torch.Size((n,))], gaussian_sampler, 99, factor * sigma * C, batch)[0]
    scale = sigma * C / batch
    assert not std_matches(z, scale)
    assert stats.kstest(z.double().numpy() / scale, stats.norm.cdf).pvalue < 1e-6


def test_bad_arguments():
    with pytest.raises(PrivacyParameterError, match="seed"):
        noisy_average([torch.zeros(3)], [torch.Size((3,))], gaussian_sampler, -1, 1.0, 1.0)
    with pytest.raises(PrivacyParameterError, match="expected_batch_size"):
        noisy_average([torch.zeros(3)], [torch.Size((3,))], gaussian_sampler, 1, 1.0, 0.0)
    with pytest.raises(TypeError, match="triton.jit sampler"):
        noisy_average([torch.zeros(3)], [torch.Size((3,))], lambda s, o, c: o, 1, 1.0, 1.0)


def _noise_steps(steps, sigma=1.7, C=0.9, B=8):
    """Zero data gradient (x = 0, bias 0, y = 0): each step's gradient is pure noise."""
    torch.manual_seed(3)
    model = nn.Linear(200, 50)
    x, y = torch.zeros(B, 200), torch.zeros(B, 50)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine(accountant="rdp", seed=5)
    model, opt, _ = engine.make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=B),
                                        noise_multiplier=sigma, target_delta=1e-5, max_grad_norm=C,
                                        poisson_sampling=False)
    with torch.no_grad():
        model.bias.zero_()
    out = []
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).pow(2).sum(1).mean().backward()
        opt.step()
        out.append(torch.cat([model.weight.grad.flatten(), model.bias.grad.flatten()]).clone())
    return out, sigma * C / B, engine


def test_engine_noise_through_the_kernel(monkeypatch):
    """The optimizer's noise step with kernels on: std sigma C / E[B], normal law, fresh noise every step."""
    calls = []
    real = noisy_average

    def spy(*a, **k):
        calls.append(a[3])  # the seed
        return real(*a, **k)
    import dpfa.kernels.dpsgd_noise as mod
    monkeypatch.setattr(mod, "noisy_average", spy)
    with contributions.use_kernels("on"):
        (g1, g2), expected, engine = _noise_steps(2)
    assert len(calls) == 2 and calls[0] != calls[1]  # one launch per step, a new seed each step
    for g in (g1, g2):
        assert std_matches(g, expected)
        assert stats.kstest(g.double().numpy() / expected, stats.norm.cdf).pvalue > 1e-3
    corr = np.corrcoef(g1.numpy(), g2.numpy())[0, 1]
    assert abs(corr) < 5 / math.sqrt(g1.numel())
    assert engine.steps == 2
