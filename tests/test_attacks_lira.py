"""LiRA (Carlini et al. 2022): phi, the Gaussian fits and their scores by hand, the optimal test on Gaussian phis,
the global variance with few shadows, and 16 MLPs that overfit 250 digits each."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dpfa.attacks.lira import (GLOBAL_VARIANCE_BELOW, LiraRun, lira_attack, lira_inclusion, lira_leave_one_out,
                               lira_scores, logit_scaled_confidence, run_lira)
from dpfa.attacks.membership import MembershipAttackResult
from dpfa.attacks.shadow import membership_result_from_scores
from dpfa.errors import PrivacyParameterError, ShapeError


@pytest.fixture(autouse=True)
def one_thread():
    """Small models train fastest on one thread (and do not fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- phi
def test_logit_scaled_confidence_is_log_odds_of_the_true_label():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 5, generator=g, dtype=torch.float64) * 3
    labels = torch.arange(7) % 5
    p = torch.softmax(logits, -1).gather(-1, labels.expand(3, 7)[..., None])[..., 0]
    want = torch.log(p / (1 - p)).numpy()
    np.testing.assert_allclose(logit_scaled_confidence(logits, labels), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(logit_scaled_confidence(logits.numpy(), labels.numpy()), want, rtol=1e-10, atol=1e-12)
    # log-probabilities work as logits
    np.testing.assert_allclose(logit_scaled_confidence(torch.log_softmax(logits, -1), labels), want, rtol=1e-9)
    # where p_y rounds to 1 (or 0) in float64 the formula stays exact: z_y - log(C - 1) for logits (50, 0, 0, 0)
    z = torch.tensor([[50.0, 0.0, 0.0, 0.0], [-50.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(logit_scaled_confidence(z, torch.tensor([0, 0])), [50 - math.log(3), -50 - math.log(3)])


# --------------------------------------------------------------------- by hand
def _hand_case():
    # 4 shadows, 2 examples; example 0 IN for shadows 0, 1; example 1 IN for shadows 1, 2 (OUT for the others)
    shadow_phi = np.array([[3.0, 0.0], [5.0, 2.0], [1.0, 4.0], [0.0, -1.0]])
    shadow_in = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=bool)
    target = np.array([4.0, -1.0])
    return target, shadow_phi, shadow_in


def test_scores_by_hand_with_per_example_variances():
    target, phi, inc = _hand_case()
    # example 0: IN {3, 5}: mean 4, var 2; OUT {1, 0}: mean 0.5, var 0.5.
    # example 1: IN {2, 4}: mean 3, var 2; OUT {0, -1}: mean -0.5, var 0.5.
    lp = stats.norm.logpdf
    want_on = [lp(4, 4, math.sqrt(2)) - lp(4, 0.5, math.sqrt(0.5)),
               lp(-1, 3, math.sqrt(2)) - lp(-1, -0.5, math.sqrt(0.5))]
    got = lira_scores(target, phi, inc, online=True, global_variance=False)
    np.testing.assert_allclose(got, want_on, rtol=1e-12)
    want_off = [(4 - 0.5) / math.sqrt(0.5), (-1 + 0.5) / math.sqrt(0.5)]  # (phi - mu_out) / sd_out
    np.testing.assert_allclose(lira_scores(target, phi, inc, online=False, global_variance=False), want_off)
    # the one-sided p-value is 1 - Phi(score); the scores rank the examples as the p-values do
    assert got[0] > 0 > got[1]


def test_scores_by_hand_with_the_global_variance():
    target, phi, inc = _hand_case()
    # pooled IN residuals: (1 + 1) + (1 + 1) over (2 - 1) + (2 - 1) dof: var 2; OUT: (0.25 * 2) * 2 / 2 = 0.5
    lp = stats.norm.logpdf
    want = [lp(4, 4, math.sqrt(2)) - lp(4, 0.5, math.sqrt(0.5)),
            lp(-1, 3, math.sqrt(2)) - lp(-1, -0.5, math.sqrt(0.5))]
    np.testing.assert_allclose(lira_scores(target, phi, inc, global_variance=True), want, rtol=1e-12)
    # 4 < GLOBAL_VARIANCE_BELOW shadows: None picks the global variance. Make the examples' variances differ to see it
    phi2 = phi.copy()
    phi2[:, 1] *= 3.0
    target2 = target * np.array([1.0, 3.0])
    auto = lira_scores(target2, phi2, inc)
    np.testing.assert_allclose(auto, lira_scores(target2, phi2, inc, global_variance=True))
    assert not np.allclose(auto, lira_scores(target2, phi2, inc, global_variance=False))
    assert GLOBAL_VARIANCE_BELOW == 64


def test_queries_are_fitted_separately_and_averaged():
    target, phi, inc = _hand_case()
    q2 = np.stack([phi, 2 * phi + 1], -1)  # (4, 2, 2): a second query with another scale
    t2 = np.stack([target, 2 * target + 1], -1)
    for online in (True, False):
        one = lira_scores(target, phi, inc, online=online, global_variance=False)
        two = lira_scores(2 * target + 1, 2 * phi + 1, inc, online=online, global_variance=False)
        np.testing.assert_allclose(lira_scores(t2, q2, inc, online=online, global_variance=False), (one + two) / 2)


# -------------------------------------------------------------- Gaussian phis
def _gaussian_world(n_shadow, n, shift, seed):
    """phi of example i ~ N(mu_i, 1) when OUT, N(mu_i + shift, 1) when IN, with mu_i ~ N(0, 3^2) (hard and easy
    examples): the likelihood-ratio test is LiRA's, its ROC is that of N(shift, 1) against N(0, 1)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, 3, n)
    inc = lira_inclusion(n_shadow + 1, n, seed)
    phi = mu + shift * inc + rng.normal(0, 1, inc.shape)
    return phi[0], inc[0], phi[1:], inc[1:]


def test_lira_is_the_optimal_test_on_gaussian_phis():
    shift = 1.0
    target, member, phi, inc = _gaussian_world(64, 20_000, shift, seed=1)
    online = lira_attack(target, member, phi, inc)  # 64 shadows: per-example variances
    offline = lira_attack(target, member, phi, inc, online=False)
    auc = stats.norm.cdf(shift / math.sqrt(2))  # 0.760
    tpr1 = stats.norm.cdf(shift + stats.norm.ppf(0.01))  # 0.0926
    assert isinstance(online, MembershipAttackResult) and online.attack == "LiRA (online)"
    assert offline.attack == "LiRA (offline)"
    for res in (online, offline):  # the fitted means and variances cost a little at low FPR (measured 0.064, 0.082)
        assert res.auc == pytest.approx(auc, abs=0.015)
        assert tpr1 - 0.035 < res.tpr_at_fpr[0.01] < tpr1 + 0.015
    # a global threshold on phi cannot tell a hard member from an easy non-member
    glob = membership_result_from_scores(target[member], target[~member])
    assert glob.auc < auc - 0.15 and glob.tpr_at_fpr[0.01] < tpr1 / 2


def test_global_variance_beats_per_example_variances_with_few_shadows():
    """8 shadows: 4 IN and 4 OUT per example; per-example variances from 4 points are noisy (the paper's reason)."""
    target, member, phi, inc = _gaussian_world(8, 20_000, 2.0, seed=2)
    fixed = lira_attack(target, member, phi, inc, global_variance=True)
    per = lira_attack(target, member, phi, inc, global_variance=False)
    assert fixed.auc > per.auc + 0.01
    assert fixed.tpr_at_fpr[0.01] > per.tpr_at_fpr[0.01]
    assert lira_attack(target, member, phi, inc).auc == fixed.auc  # the default with 8 < 64 shadows


# ---------------------------------------------------- an MLP that overfits
def _digits(n=500, seed=0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))[:n]
    return torch.tensor(x[perm] / 16.0, dtype=torch.float32), torch.tensor(y[perm])


DATA = _digits()


def _train_mlp(indices):
    """A 64-128-10 MLP, full-batch Adam for 100 steps: it fits its ~250 digits perfectly (no privacy)."""
    x, y = DATA
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xi, yi = x[indices], y[indices]
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xi), yi).backward()
        opt.step()
    return model


@torch.no_grad()
def _phi_of(model, data):
    x, y = data
    return logit_scaled_confidence(model(x), y)


@pytest.fixture(scope="module")
def lira_run():
    torch.set_num_threads(1)
    return run_lira(_train_mlp, _phi_of, DATA, len(DATA[1]), n_models=16, seed=0, progress=False)


def test_lira_on_an_overfit_mlp_reaches_high_tpr_at_low_fpr(lira_run):
    """Done-when: 16 MLPs on random halves of 500 digits, each in turn the target (8000 decisions, 4000
    non-members). Measured: online AUC 0.683, TPR 10.1% at 1% FPR and 4.05% at 0.1% FPR, epsilon >= 2.63;
    offline AUC 0.652, TPR 7.25% and 2.6%; phi as a global score: AUC 0.569, TPR 1.0% and 0.225%."""
    run = lira_run
    assert isinstance(run, LiraRun) and run.phi.shape == (16, 500) and run.inclusion.sum(0).tolist() == [8] * 500
    on, off = run.online, run.offline
    assert on.n_members == on.n_nonmembers == 4000
    assert on.tpr_at_fpr[0.01] > 0.05  # five times the 1% of a guess
    assert on.tpr_at_fpr[0.001] > 0.01  # ten times the 0.1% of a guess
    assert on.auc > 0.6
    assert off.tpr_at_fpr[0.01] > 0.03 and off.auc > 0.55
    assert on.epsilon_lower_bound > 1.0
    # the per-example calibration is what gives the low-FPR power: phi itself as a global score is near chance there
    member, non = np.concatenate([p[i] for p, i in zip(run.phi, run.inclusion)]), np.concatenate(
        [p[~i] for p, i in zip(run.phi, run.inclusion)])
    glob = membership_result_from_scores(member, non)
    assert on.tpr_at_fpr[0.01] > 3 * glob.tpr_at_fpr[0.01]
    assert "LiRA (online)" in str(run) and run.to_dict()["online"]["auc"] == on.auc


def test_leave_one_out_pools_the_targets(lira_run):
    run = lira_run
    one = lira_leave_one_out(run.phi, run.inclusion, targets=[3])
    want = lira_attack(run.phi[3], run.inclusion[3], np.delete(run.phi, 3, 0), np.delete(run.inclusion, 3, 0))
    assert one.auc == want.auc and one.n_members == int(run.inclusion[3].sum())
    np.testing.assert_array_equal(one.fpr, want.fpr)
    two = lira_leave_one_out(run.phi, run.inclusion, targets=[3, 5])
    assert two.n_members + two.n_nonmembers == 1000


def test_inclusion_is_balanced():
    inc = lira_inclusion(16, 1000, seed=3)
    assert inc.shape == (16, 1000) and (inc.sum(0) == 8).all()
    assert abs(inc.sum(1) - 500).max() < 60  # each model trains on about half
    np.testing.assert_array_equal(inc, lira_inclusion(16, 1000, seed=3))
    assert (lira_inclusion(5, 10).sum(0) == 2).all()


# --------------------------------------------------------------------- errors
def test_bad_input_names_the_value():
    target, phi, inc = _hand_case()
    bad = inc.copy()
    bad[:, 1] = False  # example 1 is never IN
    with pytest.raises(ShapeError, match="Example 1 is IN in 0 shadow models"):
        lira_scores(target, phi, bad)
    lira_scores(target, phi, bad, online=False)  # offline needs no IN shadows
    with pytest.raises(ShapeError, match="Example 1 is OUT in 1 shadow models.*at least 2"):
        lira_scores(target, phi[1:], inc[1:], online=False, global_variance=False)
    nan = phi.copy()
    nan[2, 1] = np.nan
    with pytest.raises(ShapeError, match=r"shadow_phi\[2, 1\]=nan"):
        lira_scores(target, nan, inc)
    with pytest.raises(ShapeError, match="shadow_in to have shape"):
        lira_scores(target, phi, inc[:, :1])
    with pytest.raises(ShapeError, match="n_shadow, 3"):
        lira_scores(np.zeros(3), phi, inc)
    with pytest.raises(ShapeError, match="both members and non-members"):
        lira_attack(target, [True, True], phi, inc)
    with pytest.raises(PrivacyParameterError, match="at least 3 models"):
        lira_leave_one_out(phi[:2], inc[:2])
    with pytest.raises(PrivacyParameterError, match="targets contains 7"):
        lira_leave_one_out(phi, inc, targets=[7])
    with pytest.raises(PrivacyParameterError, match="min_std=0"):
        lira_scores(target, phi, inc, min_std=0)
    with pytest.raises(ShapeError, match=r"labels\[1\]=5 is not a class in \[0, 3\)"):
        logit_scaled_confidence(np.zeros((2, 3)), np.array([0, 5]))
    with pytest.raises(PrivacyParameterError, match="n_models=1"):
        lira_inclusion(1, 10)
