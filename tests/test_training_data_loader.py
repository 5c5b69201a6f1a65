"""Samplers follow the law the accountant assumes; loaders report logical-batch ends; empty batches keep shape."""

import math

import pytest
import torch
from scipy import stats
from torch.utils.data import TensorDataset

from dpfa.errors import PrivacyParameterError
from dpfa.training.data_loader import BatchInfo, DPDataLoader, PoissonBatchSampler, WithoutReplacementBatchSampler


def test_poisson_sampler_law(gen):
    """Inclusions are independent Bernoulli(q): per-example counts and batch sizes are binomial."""
    n, q, steps = 400, 0.05, 400
    s = PoissonBatchSampler(n, q, generator=gen, steps=steps)
    counts = torch.zeros(n)
    sizes = []
    for b in s:
        assert len(set(b)) == len(b)
        counts[b] += 1
        sizes.append(len(b))
    # batch sizes ~ Binomial(n, q): mean and variance within 5 standard errors
    sizes = torch.tensor(sizes, dtype=torch.float64)
    assert abs(sizes.mean().item() - n * q) < 5 * math.sqrt(n * q * (1 - q) / steps)
    assert stats.chisquare(*_binned(sizes.numpy(), n, q)).pvalue > 1e-3
    # each example's count ~ Binomial(steps, q)
    assert abs(counts.mean().item() - steps * q) < 5 * math.sqrt(steps * q * (1 - q) / n)


def _binned(sizes, n, q):
    import numpy as np

    edges = [0, 14, 17, 19, 21, 23, 26, n + 1]
    obs = np.histogram(sizes, bins=edges)[0]
    cdf = stats.binom.cdf(np.array(edges) - 1, n, q)
    exp = np.diff(cdf) * len(sizes)
    return obs, exp * obs.sum() / exp.sum()


def test_without_replacement_sampler(gen):
    s = WithoutReplacementBatchSampler(50, 7, generator=gen, steps=2000)
    counts = torch.zeros(50)
    for b in s:
        assert len(b) == 7 and len(set(b)) == 7
        counts[b] += 1
    # each example in a batch with probability 7/50
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    with pytest.raises(PrivacyParameterError, match="batch_size=60"):
        WithoutReplacementBatchSampler(50, 60)


def test_loader_virtual_steps_and_empty_batches(gen):
    ds = TensorDataset(torch.arange(30.0)[:, None], torch.arange(30))

    class Fixed:
        def __iter__(self):
            yield [0, 1, 2, 3, 4]
            yield []
            yield [5, 6]

        def __len__(self):
            return 3

    info = BatchInfo()
    loader = DPDataLoader(ds, Fixed(), max_physical_batch_size=2, info=info)
    seen = []
    for x, y in loader:
        seen.append((x.shape[0], info.end_of_logical_batch, info.last_batch_size))
        assert x.shape[1:] == (1,)
    assert seen == [(2, False, 2), (2, False, 2), (1, True, 1), (0, True, 0), (2, True, 2)]
