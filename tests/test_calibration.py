"""Private quantile clipping (Andrew et al. 2021): the chosen norm lands near the true quantile, its cost is
charged, and clipping="adaptive" in the engine moves C and keeps the accounting at noise_multiplier."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpfa import accountants
from dpfa.calibration import AdaptiveClipping, AdaptiveNoiseCalibrator, private_quantile
from dpfa.training import PrivacyEngine


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_private_quantile_lands_near_the_true_quantile(gamma, gen):
    norms = torch.exp(torch.randn(20000, generator=gen) * 0.7 + 1.0)  # lognormal, median e
    C = private_quantile(lambda idx: norms[idx], len(norms), gamma, sample_rate=0.05, rounds=150,
                         count_noise_multiplier=10.0, initial=0.1, lr=0.2, generator=gen)
    covered = float((norms <= C).double().mean())
    assert abs(covered - gamma) < 0.05, (C, covered)


def test_calibration_is_charged_and_the_total_meets_the_target(gen):
    torch.manual_seed(0)
    x, y = torch.randn(512, 8, generator=gen), torch.randint(0, 2, (512,), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    engine = PrivacyEngine(accountant="rdp", seed=0)
    cal = AdaptiveNoiseCalibrator(3.0, 1e-5, quantile=0.5, rounds=10, accountant="rdp", seed=0)
    res = cal.calibrate(model, loader, epochs=1, engine=engine)
    assert res.calibration_epsilon == pytest.approx(0.3, rel=0.02)  # budget_fraction 0.1 of 3
    assert engine.accountant.steps == 10
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, dl = engine.make_private(model, opt, loader, target_epsilon=3.0, target_delta=1e-5, epochs=1,
                                         max_grad_norm=res.max_grad_norm)
    assert engine.noise_multiplier == pytest.approx(res.noise_multiplier, rel=1e-6)
    alone = accountants.noise_multiplier_for(3.0, 1e-5, sample_rate=64 / 512, steps=8, accountant="rdp")
    assert engine.noise_multiplier > alone  # less budget remains for training
    for xb, yb in dl:
        opt.zero_grad()
        if len(xb):
            nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    total = accountants.get("rdp")().compose("gaussian", res.count_noise_multiplier, 64 / 512, 10)
    total.compose("gaussian", engine.noise_multiplier, 64 / 512, engine.steps)
    assert engine.get_epsilon(1e-5) == pytest.approx(total.get_epsilon(1e-5), rel=1e-12)
    assert res.calibration_epsilon < engine.get_epsilon(1e-5) <= 3.0


def test_adaptive_clipping_in_the_engine(gen):
    torch.manual_seed(0)
    x, y = torch.randn(512, 8, generator=gen) * 5, torch.randint(0, 2, (512,), generator=gen)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    engine = PrivacyEngine(accountant="rdp", seed=0)
    from dp_reference import per_example_grads

    g = per_example_grads(model, nn.functional.cross_entropy, x, y)  # for the check only
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # frozen model: the norms stay put
    model, opt, dl = engine.make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=128),
                                         noise_multiplier=1.0, target_delta=1e-5, max_grad_norm=float(norms.median()) / 5,
                                         clipping="adaptive", target_quantile=0.5)
    assert opt.noise_multiplier == pytest.approx((1.0 - (2 * 2.0) ** -2) ** -0.5)
    for _ in range(12):
        for xb, yb in dl:
            opt.zero_grad()
            if len(xb):
                nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    covered = float((norms <= opt.max_grad_norm).double().mean())
    assert 0.3 < covered < 0.7, (opt.max_grad_norm, covered)
    ref = accountants.get("rdp")().compose("gaussian", 1.0, 128 / 512, engine.steps)
    assert engine.get_epsilon(1e-5) == ref.get_epsilon(1e-5)


def test_adaptive_clipping_errors():
    with pytest.raises(Exception, match="1 / \\(2 z\\)"):
        AdaptiveClipping(1.0, 0.5, count_noise_multiplier=0.4)
    with pytest.raises(Exception, match="not both"):
        AdaptiveNoiseCalibrator(1.0, 1e-5, 0.9, quantile=0.9)
