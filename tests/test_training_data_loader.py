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


# ------------------------------------------------------------------------------------------------------
# issue 12, item 8: Poisson sampling as the accountant assumes it


def wilson_interval(k, n, z):
    """Wilson score interval for a binomial proportion k / n at normal quantile z (arrays welcome)."""
    import numpy as np

    k, n = np.asarray(k, dtype=float), float(n)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def inclusion_counts(sampler, n):
    counts = torch.zeros(n, dtype=torch.long)
    sizes = []
    for b in sampler:
        counts[b] += 1
        sizes.append(len(b))
    return counts.numpy(), sizes


def wilson_ok(counts, steps, q, alpha=1e-3):
    """Every example's inclusion rate has q inside its Wilson interval (Bonferroni over the examples), and so
    does the pooled rate."""
    z_each = stats.norm.isf(alpha / (2 * len(counts)))
    lo, hi = wilson_interval(counts, steps, z_each)
    lo_all, hi_all = wilson_interval(counts.sum(), steps * len(counts), stats.norm.isf(alpha / 2))
    return bool(((lo <= q) & (q <= hi)).all() and lo_all <= q <= hi_all)


def binomial_chi2_p(sizes, n, q):
    """Pearson chi-square p-value of batch sizes against Binomial(n, q), cells with expected count >= 5."""
    import numpy as np

    sizes = np.asarray(sizes)
    ks = np.arange(n + 1)
    exp = stats.binom.pmf(ks, n, q) * len(sizes)
    obs = np.bincount(sizes, minlength=n + 1)
    lo, hi = np.argmax(exp >= 5), n - np.argmax(exp[::-1] >= 5)  # first and last well-populated size
    o = np.concatenate([[obs[:lo + 1].sum()], obs[lo + 1:hi], [obs[hi:].sum()]])
    e = np.concatenate([[exp[:lo + 1].sum()], exp[lo + 1:hi], [exp[hi:].sum()]])
    return stats.chisquare(o, e * o.sum() / e.sum()).pvalue


class _DropsLastExample(PoissonBatchSampler):
    """A broken sampler (an off-by-one that real loaders shipped): the last example is never drawn."""

    def __iter__(self):
        for b in super().__iter__():
            yield [i for i in b if i != self.num_samples - 1]


class _FixedSize(PoissonBatchSampler):
    """A broken sampler: a uniform subset of exactly round(q n) examples (not Poisson)."""

    def __iter__(self):
        size = round(self.sample_rate * self.num_samples)
        for _ in range(self.steps):
            yield torch.randperm(self.num_samples, generator=self.generator)[:size].tolist()


def test_inclusion_rates_pass_the_wilson_test_and_broken_samplers_fail(gen):
    n, q, steps = 60, 0.1, 3000
    counts, _ = inclusion_counts(PoissonBatchSampler(n, q, generator=gen, steps=steps), n)
    assert wilson_ok(counts, steps, q)
    counts, _ = inclusion_counts(_DropsLastExample(n, q, generator=gen, steps=steps), n)
    assert not wilson_ok(counts, steps, q)
    counts, _ = inclusion_counts(PoissonBatchSampler(n, 0.85 * q, generator=gen, steps=steps), n)
    assert not wilson_ok(counts, steps, q)  # a rate 15% low


def test_batch_sizes_follow_the_binomial_law_and_broken_samplers_fail(gen):
    n, q, steps = 200, 0.05, 2000
    _, sizes = inclusion_counts(PoissonBatchSampler(n, q, generator=gen, steps=steps), n)
    assert binomial_chi2_p(sizes, n, q) > 1e-3
    _, sizes = inclusion_counts(_FixedSize(n, q, generator=gen, steps=steps), n)
    assert binomial_chi2_p(sizes, n, q) < 1e-6
    _, sizes = inclusion_counts(PoissonBatchSampler(n, 0.85 * q, generator=gen, steps=steps), n)
    assert binomial_chi2_p(sizes, n, q) < 1e-6


def _private(n, batch_size, gen, **kw):
    from torch import nn
    from torch.utils.data import DataLoader

    from dpfa.training import PrivacyEngine

    ds = TensorDataset(torch.randn(n, 3, generator=gen), torch.randn(n, 1, generator=gen))
    model = nn.Linear(3, 1)
    engine = PrivacyEngine(accountant="rdp", seed=5)
    model, opt, loader = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                             DataLoader(ds, batch_size=batch_size, **kw), noise_multiplier=1.0,
                                             target_delta=1e-5, max_grad_norm=1.0)
    return engine, model, opt, loader


def test_empty_batches_count_as_steps(gen):
    """q = 1/50 over 50 examples: about a third of the batches are empty; each is a step (noise, accounting)."""
    from dpfa import accountants

    engine, model, opt, loader = _private(50, 1, gen)
    sizes = []
    for xb, yb in loader:
        sizes.append(len(xb))
        before = model.weight.detach().clone()
        opt.zero_grad()
        if len(xb):
            ((model(xb) - yb) ** 2).mean().backward()
        opt.step()
        assert not torch.equal(before, model.weight)  # noise even on an empty batch
    assert sizes.count(0) >= 5 and len(sizes) == 50
    assert engine.steps == engine.accountant.steps == 50
    same = accountants.create("rdp").compose("gaussian", 1.0, 1 / 50, 50).get_epsilon(1e-5)
    assert engine.get_epsilon(1e-5) == pytest.approx(same)


@pytest.mark.parametrize("kw", [{}, {"drop_last": True}, {"shuffle": True}])
def test_sample_rate_comes_from_the_real_dataset_size(kw, gen):
    """q = batch_size / len(dataset), whatever the DataLoader's own options (drop_last would make len(loader) 7,
    so 1 / len(loader) = 0.143 instead of 0.133); the loader's empirical rate and the accountant use that q."""
    engine, model, opt, loader = _private(45, 6, gen, **kw)
    assert engine.sample_rate == 6 / 45 == loader.sample_rate
    assert len(loader) == round(45 / 6)
    sampler = loader.batch_sampler  # the engine's own sampler, run for longer
    sampler.steps = 3000
    counts, _ = inclusion_counts(sampler, 45)
    assert wilson_ok(counts, 3000, 6 / 45)
    sampler.steps = round(45 / 6)
    xb, yb = next(iter(loader))
    opt.zero_grad()
    if len(xb):
        ((model(xb) - yb) ** 2).mean().backward()
    opt.step()
    (event,) = engine.accountant.history
    assert event.sample_rate == 6 / 45 and event.sampling == "poisson" and event.neighboring == "add_remove"
