"""The loss-threshold membership-inference attack (Yeom et al. 2018): synthetic losses with a known law, and a
tiny MLP that memorises 64 digits."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn import metrics

from dpfa.attacks import Split, loss_threshold_attack
from dpfa.attacks.membership import per_example_losses, tpr_at_fpr
from dpfa.errors import PrivacyParameterError, ShapeError


def test_gaussian_losses_match_the_closed_forms():
    """Members' losses ~ N(0, 1), non-members' ~ N(mu, 1):
    AUC = Phi(mu / sqrt 2) and TPR at FPR f = Phi(mu + Phi^-1(f))."""
    rng = np.random.default_rng(0)
    mu, n = 1.0, 40_000
    res = loss_threshold_attack(rng.normal(0.0, 1.0, n), rng.normal(mu, 1.0, n))
    assert res.auc == pytest.approx(stats.norm.cdf(mu / math.sqrt(2)), abs=0.005)  # 0.7602
    assert res.tpr_at_fpr[0.01] == pytest.approx(stats.norm.cdf(mu + stats.norm.ppf(0.01)), abs=0.01)  # 0.0924
    assert res.tpr_at_fpr[0.001] == pytest.approx(stats.norm.cdf(mu + stats.norm.ppf(0.001)), abs=0.01)  # 0.0183
    assert res.n_members == res.n_nonmembers == n and res.confidence == 0.95


def test_epsilon_bound_on_laplace_losses_is_below_and_near_the_truth():
    """Laplace losses shifted by 1 with scale b: every threshold test has TPR <= e^(1/b) FPR, so epsilon = 1/b."""
    rng = np.random.default_rng(1)
    b, n = 1.0, 50_000
    res = loss_threshold_attack(rng.laplace(0.0, b, n), rng.laplace(1.0, b, n))
    assert 0.7 / b < res.epsilon_lower_bound <= 1.0 / b
    fpr, tpr = res.best_point
    assert res.bound.direction == "high" and 0 < fpr < tpr  # the attack's own direction: low loss = member
    # the bound is log(tpr_lo / fpr_hi) at the best point's conservative ends
    ends = res.bound.bound
    assert res.epsilon_lower_bound == pytest.approx(math.log(ends.tpr_interval[0] / ends.fpr_interval[1]))


def test_no_separation_gives_nothing():
    rng = np.random.default_rng(2)
    res = loss_threshold_attack(rng.exponential(1.0, 20_000), rng.exponential(1.0, 20_000))
    assert res.auc == pytest.approx(0.5, abs=0.01)
    assert res.epsilon_lower_bound == 0.0
    assert res.tpr_at_fpr[0.01] == pytest.approx(0.01, abs=0.005)


def test_perfect_separation_hand_case():
    res = loss_threshold_attack([0.1, 0.2], [1.0, 2.0, 3.0])
    assert res.auc == 1.0 and res.tpr_at_fpr == {0.001: 1.0, 0.01: 1.0}
    # 2 of 2 members, 0 of 3 non-members: Bonferroni ends at alpha / 5 = 0.01:
    # tpr_lo = 0.01^(1/2) = 0.1, fpr_hi = 1 - 0.01^(1/3) = 0.78456; log(0.1 / 0.78456) < 0, so the bound is 0.
    ends = res.bound.bound
    assert ends.tpr_interval[0] == pytest.approx(0.1) and ends.fpr_interval[1] == pytest.approx(1 - 0.01 ** (1 / 3))
    assert res.epsilon_lower_bound == 0.0


def test_roc_is_sklearns_on_minus_loss():
    rng = np.random.default_rng(3)
    m, nm = rng.gamma(1.0, 1.0, 500), rng.gamma(2.0, 1.0, 700)
    res = loss_threshold_attack(m, nm)
    fpr, tpr, thr = metrics.roc_curve(np.r_[np.ones(500), np.zeros(700)], -np.r_[m, nm], drop_intermediate=False)
    np.testing.assert_array_equal(res.fpr, fpr)
    np.testing.assert_array_equal(res.tpr, tpr)
    np.testing.assert_array_equal(res.loss_thresholds, -thr)
    assert res.auc == pytest.approx(metrics.roc_auc_score(np.r_[np.ones(500), np.zeros(700)], -np.r_[m, nm]))
    # TPR at FPR f is the best ROC point with FPR <= f: flag every member with loss below the f-quantile of
    # non-members' losses (exclusive), counted by hand
    for f in (0.01, 0.1):
        k = int(np.floor(f * 700))
        cut = np.sort(nm)[k]  # flagging loss < cut flags at most k non-members
        assert res.tpr_at_fpr.get(f, tpr_at_fpr(res.fpr, res.tpr, f)) == pytest.approx(np.mean(m < cut))


def test_split_strategy_and_serialisation():
    rng = np.random.default_rng(4)
    res = loss_threshold_attack(rng.normal(0, 1, 4000), rng.normal(1.5, 1, 4000), strategy=Split(seed=0),
                                delta=1e-5, fprs=(0.05,))
    assert res.bound.strategy == "split(0.5)" and res.bound.bound.positives == 2000
    assert set(res.tpr_at_fpr) == {0.05} and res.delta == 1e-5
    d = json.loads(json.dumps(res.to_dict()))
    assert d["auc"] == pytest.approx(res.auc) and d["tpr_at_fpr"]["0.05"] == res.tpr_at_fpr[0.05]
    assert d["roc"]["loss_thresholds"][0] == "-inf" and len(d["roc"]["fpr"]) == res.fpr.size
    assert "roc" not in res.to_dict(roc=False)
    assert "AUC" in str(res) and "epsilon >=" in str(res)


@pytest.mark.parametrize("call, error, needle", [
    (lambda: loss_threshold_attack([0.1, float("nan")], [1.0]), ShapeError, "member_losses[1]=nan"),
    (lambda: loss_threshold_attack([0.1], [1.0, float("inf")]), ShapeError, "nonmember_losses[1]=inf"),
    (lambda: loss_threshold_attack([], [1.0]), ShapeError, "member_losses"),
    (lambda: loss_threshold_attack(np.zeros((2, 2)), [1.0]), ShapeError, "shape (2, 2)"),
    (lambda: loss_threshold_attack([0.1], [1.0], fprs=(0.0,)), PrivacyParameterError, "0.0"),
    (lambda: loss_threshold_attack([0.1], [1.0], confidence=1.0), PrivacyParameterError, "confidence=1.0"),
    (lambda: loss_threshold_attack([0.1], [1.0], delta=-0.1), PrivacyParameterError, "delta=-0.1"),
])
def test_bad_input_names_the_value(call, error, needle):
    with pytest.raises(error) as e:
        call()
    assert needle in str(e.value)


# --------------------------------------------------------------- a model that memorises
def _digits_split():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, held_out = perm[:64], perm[64:64 + 1000]
    return x[train], y[train], x[held_out], y[held_out]


def test_overfit_mlp_on_digits_is_attackable():
    """64 training digits, memorised by a small MLP (no privacy), against 1000 held-out digits.

    The loss threshold separates members from the held-out digits the model gets wrong or is unsure of (AUC
    0.75 here, 0.5 for a random guess). It does NOT reach a high TPR at 1% FPR: the held-out digits the model
    classifies confidently have losses as small as the members' (Carlini et al. 2022's point, which LiRA's
    per-example calibration addresses)."""
    torch.manual_seed(0)
    xtr, ytr, xte, yte = _digits_split()
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    member = per_example_losses(model, xtr, ytr)
    nonmember = per_example_losses(model, xte, yte)
    assert member.max() < 1e-2  # memorised
    res = loss_threshold_attack(member, nonmember)
    assert res.auc > 0.7
    assert nonmember.mean() > 10 * member.mean()
    assert model.training  # per_example_losses restored the mode


def test_per_example_losses_are_the_unreduced_losses():
    model = torch.nn.Linear(3, 4)
    x, y = torch.randn(10, 3, generator=torch.Generator().manual_seed(1)), torch.arange(10) % 4
    got = per_example_losses(model.eval(), x, y, batch_size=3)
    want = torch.nn.functional.cross_entropy(model(x), y, reduction="none").detach().double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not model.training
    with pytest.raises(ShapeError, match="10 examples but targets has 9"):
        per_example_losses(model, x, y[:9])


def test_confident_examples_keep_distinct_losses():
    """The usual cross-entropy rounds confident examples to exactly 0 (ties where the attack
    looks); per_example_losses keeps them positive and ordered, and equals it elsewhere."""
    from dpfa.attacks.membership import per_example_losses, stable_cross_entropy

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.mul_(30.0)
    x = torch.randn(200, 2)
    y = model(x).argmax(1)
    naive = torch.nn.functional.cross_entropy(model(x), y, reduction="none").detach()
    assert (naive == 0).sum() > 20  # the trap is real at these margins
    losses = per_example_losses(model, x, y)
    assert (losses > 0).all() and len(np.unique(losses)) == len(losses)
    z, t = torch.randn(64, 7, dtype=torch.float64), torch.randint(0, 7, (64,))
    torch.testing.assert_close(stable_cross_entropy(z, t), torch.nn.functional.cross_entropy(z, t, reduction="none"))
