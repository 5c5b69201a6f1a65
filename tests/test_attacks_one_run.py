"""The one-run audit (Steinke, Nasr & Jagielski 2023): the p-value and the bound against hand cases, an mpmath
oracle and the paper's example; monotonicity; validity and tightness on randomised response and Laplace canaries;
the delta term; a memorising model against one trained with dpfa's DP-SGD."""

import json
import math
import warnings

import mpmath
import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from dpfa import PrivacyEngine
from dpfa.attacks.membership import per_example_losses
from dpfa.attacks.one_run import (BISECTION_STEPS, OneRunAuditResult, canary_inclusion, default_guess_counts,
                                  one_run_audit, one_run_epsilon_lower_bound, one_run_guesses, one_run_p_value)
from dpfa.errors import PrivacyParameterError, ShapeError


def _q(eps):
    return math.exp(eps) / (1 + math.exp(eps))


# ------------------------------------------------------------------- by hand
def test_p_value_hand_cases():
    # one canary, one correct guess: randomised response's accuracy e^eps / (1 + e^eps)
    assert one_run_p_value(1, 1, 1, math.log(3)) == pytest.approx(0.75)
    assert one_run_p_value(5, 3, 0, 2.0) == 1.0  # v = 0: P[W >= 0] = 1
    # m = r = v = 2, eps = log 3 (q = 3/4), delta = 0.01: f(2) = q^2 = 0.5625;
    # (f(1) - f(2)) / 1 = 2 q (1 - q) = 0.375, (f(0) - f(2)) / 2 = (1 - q^2) / 2 = 0.21875; + 2 m delta 0.375
    assert one_run_p_value(2, 2, 2, math.log(3), 0.01) == pytest.approx(0.5625 + 4 * 0.01 * 0.375)
    assert one_run_p_value(2, 2, 2, math.log(3), 0.6) == 1.0  # capped


def test_bound_hand_cases():
    # delta = 0, r = v: P[W >= r] = q^r = beta at q = beta^(1/r): eps = log(q / (1 - q)); 10 of 10 at 95%: 1.0519
    q = 0.05 ** (1 / 10)
    assert one_run_epsilon_lower_bound(10, 10, 10) == pytest.approx(math.log(q / (1 - q)), abs=2 ** -BISECTION_STEPS)
    assert one_run_epsilon_lower_bound(10, 10, 10) == pytest.approx(1.0519, abs=1e-4)
    assert one_run_epsilon_lower_bound(10, 10, 10) <= math.log(q / (1 - q))  # the low end of the bisection
    # no better than a coin: nothing is rejected
    assert one_run_epsilon_lower_bound(1000, 100, 50) == 0.0
    assert one_run_epsilon_lower_bound(1000, 0, 0) == 0.0
    # the example of the paper's Appendix D: 1000 canaries, 100 guesses, 75 correct, delta 1e-4, 95%: 0.673
    assert one_run_epsilon_lower_bound(1000, 100, 75, 1e-4, 0.95) == pytest.approx(0.673, abs=5e-4)


def _oracle_p_value(m, r, v, eps, delta):
    """The theorem's right-hand side in 50-digit arithmetic, with the max over every i = 1..m (not stopped at v)."""
    with mpmath.workdps(50):
        q = mpmath.e ** eps / (1 + mpmath.e ** eps)

        def f(k):  # P[Binomial(r, q) >= k]
            return mpmath.fsum(mpmath.binomial(r, j) * q ** j * (1 - q) ** (r - j) for j in range(max(k, 0), r + 1))

        fv = f(v)
        alpha = max(((f(v - i) - fv) / i for i in range(1, m + 1)), default=0)
        return float(min(fv + 2 * m * delta * alpha, 1))


@pytest.mark.parametrize("m, r, v, eps, delta", [
    (30, 20, 15, 0.5, 1e-3), (30, 20, 20, 2.0, 1e-2), (50, 40, 21, 0.1, 1e-4), (12, 12, 9, 1.0, 0.0),
    (40, 10, 3, 1.5, 5e-3), (200, 60, 50, 1.2, 1e-5),
])
def test_p_value_against_an_mpmath_oracle(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(_oracle_p_value(m, r, v, eps, delta), rel=1e-9)


# -------------------------------------------------------------- monotonicity
def test_monotone_in_every_argument():
    eps = np.linspace(0, 8, 161)
    for m, r, v, d in [(1000, 100, 75, 1e-4), (1000, 1000, 700, 1e-5), (100, 50, 40, 1e-3), (1000, 100, 100, 1e-4)]:
        p = [one_run_p_value(m, r, v, e, d) for e in eps]
        assert np.all(np.diff(p) >= -1e-12), (m, r, v, d)  # the bisection relies on it
    by_v = [one_run_epsilon_lower_bound(1000, 200, v, 1e-5) for v in range(90, 201, 5)]
    assert np.all(np.diff(by_v) >= 0) and by_v[0] == 0.0 and by_v[-1] > 2.5  # more correct guesses: larger bound
    by_r = [one_run_epsilon_lower_bound(1000, r, 150, 1e-5) for r in range(150, 301, 10)]
    assert np.all(np.diff(by_r) <= 0) and by_r[0] > by_r[-1]  # the same correct guesses among more: smaller
    by_delta = [one_run_epsilon_lower_bound(1000, 200, 180, d) for d in (0.0, 1e-6, 1e-5, 1e-4, 1e-3)]
    assert np.all(np.diff(by_delta) < 0) and by_delta[-1] < by_delta[0] - 0.5  # measured 1.799 -> 1.134
    by_conf = [one_run_epsilon_lower_bound(1000, 200, 180, 1e-5, c) for c in (0.5, 0.9, 0.95, 0.99, 0.999)]
    assert np.all(np.diff(by_conf) < 0)
    by_m = [one_run_epsilon_lower_bound(m, 200, 180, 1e-5) for m in (200, 1000, 10_000)]
    assert np.all(np.diff(by_m) < 0)  # the delta term grows with m


# ------------------------------------------------------ randomised response
def test_exact_level_for_randomised_response():
    """1000 canaries through epsilon-DP randomised response, every one guessed: v ~ Binomial(1000, q) exactly, and
    the theorem's test is exact, so P[bound > epsilon] is at most 5% and close to it (the binomial is discrete)."""
    m, eps = 1000, 1.0
    q = _q(eps)
    vs = np.arange(int(q * m) - 40, int(q * m) + 60)
    bounds = np.array([one_run_epsilon_lower_bound(m, m, int(v)) for v in vs])
    assert np.all(np.diff(bounds) >= 0)
    exceed = stats.binom.pmf(vs[bounds > eps], m, q).sum() + stats.binom.sf(vs[-1], m, q)
    assert 0.04 < exceed <= 0.05  # measured 0.0463
    # and the median run's bound is close to the truth
    med = one_run_epsilon_lower_bound(m, m, int(stats.binom.median(m, q)))
    assert 0.85 < med < eps  # measured 0.899


def test_monte_carlo_audit_of_laplace_canaries_is_valid_and_tight():
    """Canary i releases S_i + Lap(2 / eps) with S_i = +-1: an eps-DP mechanism per canary. The audit guesses on
    the 1000 highest and 1000 lowest of 10^4 outputs and abstains on the rest. Over 800 seeded runs the bound
    exceeds eps in at most 5% of them (measured 4.5%) and its median is close to eps (measured 1.89 for eps = 2):
    in Laplace's tails the likelihood ratio is exactly e^eps, so abstention loses nothing."""
    eps, m, runs = 2.0, 10_000, 800
    rng = np.random.default_rng(0)
    bounds = np.empty(runs)
    for k in range(runs):
        s = rng.random(m) < 0.5
        y = np.where(s, 1.0, -1.0) + rng.laplace(0.0, 2.0 / eps, m)
        bounds[k] = one_run_audit(y, s, guesses=(1000, 1000), seed=k).epsilon_lower_bound
    exceed = np.mean(bounds > eps)
    assert exceed <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs)  # 0.073
    assert exceed > 0.02  # tight: a bound that never comes near eps would be a bug too
    assert 1.75 < np.median(bounds) < eps


def test_the_delta_term_is_what_keeps_an_approximate_dp_bound_valid():
    """Each canary leaks S_i outright with probability delta (a marked output), else randomised response at eps:
    (eps, delta)-DP per canary. Guessing on the 10 most extreme outputs catches the leaked ones: the pure-DP
    test (delta = 0) then 'proves' an epsilon far above the truth (measured median 1.05 for eps = 0.5), the
    theorem's delta term does not (measured 0 in every run)."""
    eps, delta, m = 0.5, 1e-3, 10_000
    rng = np.random.default_rng(1)
    pure, corrected = [], []
    for k in range(50):
        s = rng.random(m) < 0.5
        sign = np.where(s, 1.0, -1.0)
        flip = rng.random(m) >= _q(eps)
        y = np.where(flip, -sign, sign)  # randomised response
        leak = rng.random(m) < delta
        y = np.where(leak, 2.0 * sign, y) + rng.uniform(-0.01, 0.01, m)  # a leaked canary's output is +-2
        pure.append(one_run_audit(y, s, guesses=(5, 5), delta=0.0).epsilon_lower_bound)
        corrected.append(one_run_audit(y, s, guesses=(5, 5), delta=delta, claimed_epsilon=eps).epsilon_lower_bound)
    assert np.median(pure) > 2 * eps  # wrong: the mechanism is not eps-DP, only (eps, delta)-DP
    assert max(corrected) <= eps


# ---------------------------------------------------------------- the audit
def test_guesses_and_ties():
    s = np.array([0.5, 3.0, -1.0, 2.0, 0.0])
    np.testing.assert_array_equal(one_run_guesses(s, 2, 1), [0, 1, -1, 1, 0])
    np.testing.assert_array_equal(one_run_guesses(s, 0, 0), [0] * 5)
    np.testing.assert_array_equal(one_run_guesses(s, 5, 0), [1] * 5)
    # ties are broken at random, not by position: among 1000 equal scores the first 10 are not always chosen
    flat = np.zeros(1000)
    picks = [np.flatnonzero(one_run_guesses(flat, 10, 0, seed=k) == 1) for k in range(3)]
    assert all(not np.array_equal(p, np.arange(10)) for p in picks) and not np.array_equal(picks[0], picks[1])


def test_audit_counts_and_the_union_bound_over_candidates():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0] * 25)
    included = np.tile([True, True, True, False, True, False, False, False], 25)
    one = one_run_audit(scores, included, guesses=(50, 50))
    # the 50 highest scores are the 25 copies of 5.0 and 25 of 4.0, all included; the 50 lowest all excluded
    assert (one.r, one.v, one.k_plus, one.k_minus, one.m, one.n_included) == (100, 100, 50, 50, 200, 100)
    assert one.epsilon_lower_bound == one_run_epsilon_lower_bound(200, 100, 100)
    many = one_run_audit(scores, included, guesses=[(50, 50), (75, 75), (10, 0)])
    # (75, 75): the scores 5, 4, 3 (all included) and -2, -1, 0 (all excluded): 150 of 150, the best candidate
    assert [(c["r"], c["v"]) for c in many.candidates] == [(100, 100), (150, 150), (10, 10)]
    assert (many.k_plus, many.k_minus, many.r, many.v) == (75, 75, 150, 150)
    # each candidate at significance 0.05 / 3, and the best is reported: less than (75, 75) alone would give
    assert many.epsilon_lower_bound == one_run_epsilon_lower_bound(200, 150, 150, 0.0, 1 - 0.05 / 3)
    assert many.epsilon_lower_bound < one_run_audit(scores, included, guesses=(75, 75)).epsilon_lower_bound
    assert [c["epsilon_lower_bound"] for c in many.candidates][0] == one_run_epsilon_lower_bound(
        200, 100, 100, 0.0, 1 - 0.05 / 3)
    d = json.loads(json.dumps(many.to_dict()))
    assert d["precision"] == 1.0 and d["passed"] is True and len(d["candidates"]) == 3
    assert "150 of 150 guesses correct" in str(many)
    claimed = one_run_audit(scores, included, guesses=(50, 50), claimed_epsilon=1.0)
    assert not claimed.passed and "FAIL" in str(claimed)


def test_default_candidates_and_coins():
    assert default_guess_counts(100) == ((1, 0), (0, 1), (2, 0), (0, 2), (1, 1), (5, 0), (0, 5), (3, 2), (10, 0),
                                         (0, 10), (5, 5), (20, 0), (0, 20), (10, 10), (50, 0), (0, 50), (25, 25),
                                         (100, 0), (0, 100), (50, 50))
    coins = canary_inclusion(10_000, seed=3)
    assert coins.dtype == bool and abs(coins.mean() - 0.5) < 0.02
    np.testing.assert_array_equal(coins, canary_inclusion(10_000, seed=3))


@pytest.mark.parametrize("call, error, needle", [
    (lambda: one_run_p_value(10, 5, 6, 1.0), PrivacyParameterError, "v=6, r=5, m=10"),
    (lambda: one_run_p_value(10, 5, 3, -1.0), PrivacyParameterError, "epsilon=-1.0"),
    (lambda: one_run_epsilon_lower_bound(10, 5, 3, delta=1.5), PrivacyParameterError, "delta=1.5"),
    (lambda: one_run_epsilon_lower_bound(10, 5, 3, confidence=1.0), PrivacyParameterError, "confidence=1.0"),
    (lambda: one_run_epsilon_lower_bound(10, 2.5, 1), PrivacyParameterError, "r to be an integer"),
    (lambda: one_run_audit([1.0, np.nan], [True, False]), ShapeError, "scores[1]"),
    (lambda: one_run_audit([1.0, 2.0], [1, 0]), ShapeError, "boolean"),
    (lambda: one_run_audit([1.0, 2.0], [True]), ShapeError, "one coin per canary"),
    (lambda: one_run_audit([1.0, 2.0], [True, False], guesses=(2, 1)), PrivacyParameterError, "exceed the 2"),
    (lambda: one_run_audit([1.0, 2.0], [True, False], guesses=[]), PrivacyParameterError, "guesses is empty"),
    (lambda: one_run_audit([1.0, 2.0], [True, False], claimed_epsilon=0), PrivacyParameterError,
     "claimed_epsilon=0"),
    (lambda: one_run_guesses([1.0, 2.0], -1, 0), PrivacyParameterError, "k_plus=-1"),
])
def test_bad_input_names_the_value(call, error, needle):
    with pytest.raises(error) as e:
        call()
    assert needle in str(e.value)


# ------------------------------------------ a model that memorises, and DP-SGD
@pytest.fixture(scope="module")
def canary_world():
    """300 clean digits always in the training set, and 1000 canaries: other digits with a wrong label, each in
    with probability 1/2. A model can fit a canary's wrong label only by memorising it."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    x = torch.tensor(x[perm] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[perm])
    cx, cy = x[300:1300], (y[300:1300] + torch.randint(1, 10, (1000,), generator=torch.Generator().manual_seed(1))) % 10
    included = canary_inclusion(1000, seed=2)
    keep = torch.from_numpy(included)
    train = TensorDataset(torch.cat([x[:300], cx[keep]]), torch.cat([y[:300], cy[keep]]))
    return train, cx, cy, included


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def test_one_run_audit_of_a_memorising_model_and_of_dp_sgd(canary_world):
    """Measured: the non-private model gives epsilon >= 3.72 at 95% (497 of 500 guesses correct, k+ = k- = 250,
    the best of 21 candidates); DP-SGD at epsilon 2 (delta 1e-5, dpfa.PrivacyEngine, 24 steps) gives 0.14 (300 of
    500), below its claim, from the same canaries."""
    train, cx, cy, included = canary_world
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        xs, ys = train.tensors
        for _ in range(150):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs), ys).backward()
            opt.step()
        plain = one_run_audit(-per_example_losses(model, cx, cy), included)

        torch.manual_seed(0)
        model = _mlp()
        engine = PrivacyEngine(accountant="prv", seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, opt, loader = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5),
                                                     DataLoader(train, batch_size=256), target_epsilon=2.0,
                                                     target_delta=1e-5, epochs=8, max_grad_norm=1.0)
            for _ in range(8):
                for bx, by in loader:
                    opt.zero_grad()
                    if len(bx):
                        torch.nn.functional.cross_entropy(model(bx), by).backward()
                    opt.step()
        spent = engine.get_epsilon(1e-5)
        private = one_run_audit(-per_example_losses(model, cx, cy), included, delta=1e-5, claimed_epsilon=spent)
    finally:
        torch.set_num_threads(threads)
    assert isinstance(plain, OneRunAuditResult) and plain.m == 1000
    assert plain.epsilon_lower_bound > 2.5
    assert spent == pytest.approx(2.0, rel=0.01)
    assert private.passed and private.epsilon_lower_bound < 1.0
    assert private.epsilon_lower_bound < plain.epsilon_lower_bound - 2
