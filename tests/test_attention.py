"""DP release of attention outputs (issue 13, DESIGN.md 1.2), against an independent statement
of the contract: each expected sensitivity and noise scale here is recomputed from the
formulas (brute-force visible-key counts, the analytic Gaussian mu by bisection on its
delta(epsilon) curve), not read from dpfa.attention. Without a GPU the kernels run under
the Triton interpreter (tests/conftest.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

import dpfa
from dpfa import accountants, mechanisms
from dpfa.attention import GRID_STEPS, DPFlashAttention, dp_flash_attn_func
from dpfa.errors import PrivacyParameterError, ShapeError
from dpfa.mechanisms import DPMechanism

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _visible(B, Nq, Nk, causal, kpm):
    """n[b, i] by brute force over every (row, key) pair."""
    n = torch.zeros(B, Nq, dtype=torch.int64)
    for b in range(B):
        for i in range(Nq):
            for j in range(Nk):
                if causal and j > i + Nk - Nq:
                    continue
                if kpm is not None and not bool(kpm[b, j]):
                    continue
                n[b, i] += 1
    return n


def _delta_row(n, b, C, g=1):
    """2 C w_max(n), DESIGN.md 1.2 (no floating-point slack)."""
    if n == 0:
        return 0.0
    w = g * math.exp(b) / (g * math.exp(b) + max(n - g, 0) * math.exp(-b))
    return 2.0 * C * w


def _analytic_mu(epsilon, delta):
    """mu with Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) = delta (Balle & Wang 2018)."""
    f = lambda mu: stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2) - delta
    return optimize.brentq(f, 1e-3, 50.0, xtol=1e-12)


def _split(out, clean):
    return (out - clean).double().cpu()


# ----------------------------------------------------------------- noise law


@pytest.mark.parametrize("case", [
    # B, Nq, Nk, H, Hk, D, causal, mask
    (2, 24, 40, 4, 4, 32, False, False),
    (2, 30, 20, 4, 2, 32, True, False),   # causal with Nq > Nk: the first rows see nothing; GQA
    (3, 17, 33, 2, 1, 32, False, True),   # MQA, padding
], ids=["plain", "causal-gqa", "mqa-mask"])
def test_noise_has_the_contract_std_per_row(case):
    B, Nq, Nk, H, Hk, D, causal, mask = case
    q, k, v = _rand(B, Nq, H, D), _rand(B, Nk, Hk, D), _rand(B, Nk, Hk, D)
    kpm = None
    if mask:
        kpm = torch.rand(B, Nk, device=DEVICE) > 0.4
        kpm[:, 0] = True
    eps, delta, C, cap = 2.0, 1e-5, 1.5, 1.0
    opts = dict(causal=causal, epsilon=eps, delta=delta, value_clip=C, score_cap=cap, key_padding_mask=kpm)
    clean = dp_flash_attn_func(q, k, v, **{**opts, "epsilon": math.inf})
    out, st = dp_flash_attn_func(q, k, v, seed=11, return_privacy_stats=True, **opts)
    noise = _split(out, clean)  # (B, Nq, H, D)

    n = _visible(B, Nq, Nk, causal, kpm)
    R = int((n > 0).sum(1).max())
    mu = _analytic_mu(eps, delta)
    want = torch.tensor([[_delta_row(int(n[b, i]), cap, C) * math.sqrt(R * H) / mu for i in range(Nq)]
                         for b in range(B)], dtype=torch.float64)  # (B, Nq), same in every head
    assert st.records_visible_rows == R and st.epsilon_spent == eps and st.delta_spent == delta
    seen = want > 0
    assert torch.all(noise[~seen] == 0), "rows that see no key must be released as exact zeros"
    z = (noise / want[:, :, None, None].clamp(min=1e-300))[seen]  # standardised: N(0, 1) if the scale is right
    assert abs(z.mean().item()) < 4 / math.sqrt(z.numel())
    ratio = z.var().item()
    # 20% off in the scale or the sensitivity is a variance ratio of 1.44 or 0.64
    assert abs(ratio - 1) < 5 * math.sqrt(2 / z.numel()) + 0.01, f"noise variance ratio {ratio:.3f}"
    assert stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-4


def test_noise_scale_20_percent_off_is_detected(monkeypatch):
    """The statistic above separates the right scale from one 20% off (planted)."""
    import dpfa.attention as att

    real = att.row_sensitivity
    monkeypatch.setattr(att, "row_sensitivity", lambda *a, **kw: 0.8 * real(*a, **kw))
    B, Nq, Nk, H, D = 2, 24, 40, 4, 32
    q, k, v = _rand(B, Nq, H, D), _rand(B, Nk, H, D), _rand(B, Nk, H, D)
    clean = dp_flash_attn_func(q, k, v, epsilon=math.inf, delta=1e-5, score_cap=1.0)
    out = dp_flash_attn_func(q, k, v, epsilon=2.0, delta=1e-5, score_cap=1.0, seed=5)
    want = _delta_row(Nk, 1.0, 1.0) * math.sqrt(Nq * H) / _analytic_mu(2.0, 1e-5)
    z = _split(out, clean) / want
    assert abs(z.var().item() - 1) > 5 * math.sqrt(2 / z.numel()) + 0.01


# ------------------------------------------------------------------ sensitivity


def _adversarial_pair(Nq, Nk, H, D, C, j):
    """Stores differing in record j that move every row by exactly 2 C w_max (scores at +-b)."""
    e1 = torch.zeros(D, device=DEVICE)
    e1[0] = 1.0
    e2 = torch.zeros(D, device=DEVICE)
    e2[1] = 1.0
    q = (10 * e1).expand(1, Nq, H, D).clone()
    k = (-10 * e1).expand(1, Nk, H, D).clone()
    v = (-3 * C * e2).expand(1, Nk, H, D).clone()  # clipped to -C e2
    k2, v2 = k.clone(), v.clone()
    k2[0, j] = 10 * e1
    v2[0, j] = 3 * C * e2  # clipped to +C e2
    return q, (k, v), (k2, v2)


@pytest.mark.parametrize("record_size", [1, 3])
def test_one_record_moves_each_row_by_at_most_its_sensitivity_and_the_bound_is_attained(record_size):
    Nq, Nk, H, D, C, b = 5, 24, 2, 16, 0.7, 1.5
    q, (k, v), _ = _adversarial_pair(Nq, Nk, H, D, C, 0)
    k2, v2 = k.clone(), v.clone()
    k2[0, :record_size, :, 0] = 10.0
    v2[0, :record_size] = -v2[0, :record_size]
    opts = dict(epsilon=math.inf, delta=1e-5, value_clip=C, score_cap=b, record_size=record_size,
                softmax_scale=1.0)
    o1 = dp_flash_attn_func(q, k, v, **opts).double()
    o2 = dp_flash_attn_func(q, k2, v2, **opts).double()
    moved = (o1 - o2).norm(dim=-1)  # (1, Nq, H)
    bound = _delta_row(Nk, b, C, record_size)
    assert moved.max().item() <= bound * (1 + 1e-5)
    assert moved.min().item() >= 0.999 * bound  # tight: a bound 20% too large would fail the noise test


def test_random_record_changes_stay_within_the_bound_and_are_seen():
    """Random stores, one record replaced by random values: every row moves, none past Delta_i."""
    B, Nq, Nk, H, D, C, b = 2, 9, 13, 2, 32, 1.0, 2.0
    g = torch.Generator(device="cpu").manual_seed(3)
    for trial in range(3):
        q = torch.randn(B, Nq, H, D, generator=g).to(DEVICE) * 3
        k = torch.randn(B, Nk, H, D, generator=g).to(DEVICE) * 3
        v = torch.randn(B, Nk, H, D, generator=g).to(DEVICE) * 3
        k2, v2 = k.clone(), v.clone()
        j = trial * 4
        k2[:, j] = torch.randn(B, H, D, generator=g).to(DEVICE) * 3
        v2[:, j] = torch.randn(B, H, D, generator=g).to(DEVICE) * 3
        opts = dict(epsilon=math.inf, delta=1e-5, value_clip=C, score_cap=b, causal=True)
        moved = (dp_flash_attn_func(q, k, v, **opts) - dp_flash_attn_func(q, k2, v2, **opts)).double().norm(dim=-1)
        n = _visible(B, Nq, Nk, True, None)
        for bb in range(B):
            for i in range(Nq):
                sees = j <= i + Nk - Nq
                bound = _delta_row(int(n[bb, i]), b, C)
                assert moved[bb, i].max().item() <= bound * (1 + 1e-5)
                if sees:
                    assert moved[bb, i].min().item() > 0, "the record is ignored"
                else:
                    assert moved[bb, i].max().item() == 0


def test_low_precision_sensitivity_covers_the_rounding():
    """bf16/fp16: the adversarial pair never moves a row past the sensitivity dpfa uses."""
    from dpfa.attention import row_sensitivity

    Nq, Nk, H, D, C, b = 4, 40, 2, 16, 1.0, 1.0
    q, (k, v), (k2, v2) = _adversarial_pair(Nq, Nk, H, D, C, 7)
    for dtype in (torch.bfloat16, torch.float16):
        opts = dict(epsilon=math.inf, delta=1e-5, value_clip=C, score_cap=b, softmax_scale=1.0)
        o1 = dp_flash_attn_func(q.to(dtype), k.to(dtype), v.to(dtype), **opts).double()
        o2 = dp_flash_attn_func(q.to(dtype), k2.to(dtype), v2.to(dtype), **opts).double()
        used = row_sensitivity(torch.tensor([Nk]), b, C, 1, dtype).item()
        assert (o1 - o2).norm(dim=-1).max().item() <= used
        # the slack: 2C (1+u) (w_max + 2u): 5.3% here for bf16 (u = 2^-8), 0.7% for fp16
        assert used <= {torch.bfloat16: 1.06, torch.float16: 1.01}[dtype] * _delta_row(Nk, b, C)


# ------------------------------------------------------------ seeds and events


def test_reproducible_from_seed_and_fresh_without_one():
    q, k, v = _rand(1, 8, 2, 32), _rand(1, 12, 2, 32), _rand(1, 12, 2, 32)
    a = dp_flash_attn_func(q, k, v, epsilon=1.0, delta=1e-5, seed=42)
    b = dp_flash_attn_func(q, k, v, epsilon=1.0, delta=1e-5, seed=42)
    c = dp_flash_attn_func(q, k, v, epsilon=1.0, delta=1e-5, seed=43)
    assert torch.equal(a, b) and not torch.equal(a, c)
    _, s1 = dp_flash_attn_func(q, k, v, epsilon=1.0, delta=1e-5, return_privacy_stats=True)
    _, s2 = dp_flash_attn_func(q, k, v, epsilon=1.0, delta=1e-5, return_privacy_stats=True)
    assert s1.seed != s2.seed


@pytest.mark.parametrize("name", ["pld", "prv", "rdp"])
def test_events_compose_to_the_calls_epsilon(name):
    q, k, v = _rand(1, 16, 4, 32), _rand(1, 20, 4, 32), _rand(1, 20, 4, 32)
    _, st = dp_flash_attn_func(q, k, v, epsilon=1.0, delta=1e-5, return_privacy_stats=True, seed=1)
    acc = accountants.get(name)()
    for e in st.events:
        acc.compose_event(e)
    eps = acc.get_epsilon(1e-5)
    if name == "rdp":
        assert 1.0 <= eps < 1.4  # an upper bound
    else:
        assert eps == pytest.approx(1.0, rel=0.01)


def test_infinite_epsilon_is_the_clipped_capped_attention_and_says_so():
    q, k, v = _rand(1, 8, 2, 32), _rand(1, 12, 2, 32), _rand(1, 12, 2, 32)
    out, st = dp_flash_attn_func(q, k, v, epsilon=math.inf, delta=1e-5, value_clip=0.5, score_cap=1.0,
                                 return_privacy_stats=True)
    ref = dpfa.kernels.attention_reference(q.double(), k.double(), v.double(), value_clip=0.5, score_cap=1.0)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert math.isinf(st.epsilon_spent) and not st.is_private and st.events == ()


def test_backward_is_that_of_the_noiseless_attention():
    q, k, v = (_rand(1, 9, 2, 32).requires_grad_() for _ in range(3))
    do = _rand(1, 9, 2, 32)
    dp_flash_attn_func(q, k, v, epsilon=1.0, delta=1e-5, seed=2).backward(do)
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    dp_flash_attn_func(q, k, v, epsilon=math.inf, delta=1e-5).backward(do)
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ mechanisms


def test_laplace_clips_in_l1_and_scales_by_rh_over_epsilon():
    B, Nq, Nk, H, D, eps, C, b = 2, 12, 20, 2, 32, 3.0, 1.0, 1.0
    q, k, v = _rand(B, Nq, H, D), _rand(B, Nk, H, D) * 3, _rand(B, Nk, H, D) * 3
    opts = dict(epsilon=eps, delta=1e-5, mechanism="laplace", value_clip=C, score_cap=b)
    clean = dp_flash_attn_func(q, k, v, **{**opts, "epsilon": math.inf})
    assert clean.abs().sum(-1).max().item() <= C * (1 + 1e-5)  # convex combination of L1-clipped rows
    assert clean.norm(dim=-1).max().item() < 0.5 * C  # (L2 clipping to C would allow far more)
    out, st = dp_flash_attn_func(q, k, v, seed=3, return_privacy_stats=True, **opts)
    scale = _delta_row(Nk, b, C) * Nq * H / eps  # pure DP: b_i = Delta_i R H / epsilon
    z = _split(out, clean) / scale
    assert st.delta_spent == 0.0
    assert abs(z.var().item() / 2 - 1) < 0.12  # Var Lap(1) = 2
    assert stats.kstest(z.flatten().numpy(), "laplace").pvalue > 1e-4


def test_discrete_gaussian_releases_integers_on_the_grid():
    B, Nq, Nk, H, D, eps, delta, C, b = 1, 10, 16, 2, 16, 2.0, 1e-5, 1.0, 1.0
    q, k, v = _rand(B, Nq, H, D), _rand(B, Nk, H, D), _rand(B, Nk, H, D)
    out, st = dp_flash_attn_func(q, k, v, epsilon=eps, delta=delta, mechanism="discrete_gaussian",
                                 value_clip=C, score_cap=b, seed=4, return_privacy_stats=True)
    step = _delta_row(Nk, b, C) / (GRID_STEPS * math.sqrt(D))
    units = out.double().cpu() / step
    assert (units - units.round()).abs().max().item() < 1e-3 * units.abs().max().item() + 1e-3
    clean = dp_flash_attn_func(q, k, v, epsilon=math.inf, delta=delta, value_clip=C, score_cap=b)
    z = (units - torch.floor(clean.double().cpu() / step + 0.5)).round()
    # the scale in grid units: (k + 1) sqrt(D R H) of integer sensitivity at (epsilon, delta)
    mech = mechanisms.get("discrete_gaussian")()
    w_max = _delta_row(Nk, b, C) / (2 * C)
    s = mech.calibrate((GRID_STEPS + 1 + 2.0**-19 / w_max) * math.sqrt(D * Nq * H), eps, delta)
    assert abs(z.var().item() / mech.variance(s) - 1) < 0.1
    acc = accountants.get("rdp")()
    for e in st.events:
        acc.compose_event(e)
    assert acc.get_epsilon(delta) <= eps * 1.05


def test_user_mechanism_without_device_sampler_runs_through_the_noise_tensor():
    class TwiceGaussian(DPMechanism):
        name = "twice_gaussian_attention_test"
        sensitivity_norm = "l2"

        def sample(self, shape, scale, generator=None, device="cpu", dtype=torch.float32):
            return 2 * scale * torch.randn(shape, generator=generator, device=device, dtype=dtype)

        def rdp(self, alpha, scale, sensitivity=1.0):
            return alpha * sensitivity**2 / (8 * scale**2)

    mech = TwiceGaussian()
    B, Nq, Nk, H, D = 2, 16, 24, 2, 32
    q, k, v = _rand(B, Nq, H, D), _rand(B, Nk, H, D), _rand(B, Nk, H, D)
    clean = dp_flash_attn_func(q, k, v, epsilon=math.inf, delta=1e-5, score_cap=1.0)
    out, st = dp_flash_attn_func(q, k, v, epsilon=2.0, delta=1e-5, mechanism=mech, score_cap=1.0, seed=8,
                                 return_privacy_stats=True)
    s = mech.calibrate(math.sqrt(Nq * H), 2.0, 1e-5)
    z = _split(out, clean) / (_delta_row(Nk, 1.0, 1.0) * 2 * s)
    assert abs(z.var().item() - 1) < 0.08
    assert st.mechanism == mech.name


# --------------------------------------------------------------------- heads


def test_head_budgets_and_importance_split():
    B, Nq, Nk, H, D = 1, 16, 16, 4, 32
    q, k, v = _rand(B, Nq, H, D), _rand(B, Nk, H, D), _rand(B, Nk, H, D)
    _, st = dp_flash_attn_func(q, k, v, epsilon=1.0, delta=1e-5, head_epsilons=[1.0, 1.0, 2.0, math.inf],
                               return_privacy_stats=True)
    assert math.isinf(st.epsilon_spent) and st.noise_scale_per_head[3] == 0.0
    assert len(st.events) == 3
    _, st = dp_flash_attn_func(q, k, v, epsilon=1.0, delta=1e-5, head_epsilons=[1.0] * 4,
                               return_privacy_stats=True)
    mu_total = 2 * _analytic_mu(1.0, 1e-5)  # four mu-GDP heads compose to 2 mu
    eps_total = optimize.brentq(lambda e: stats.norm.cdf(-e / mu_total + mu_total / 2)
                                - math.exp(e) * stats.norm.cdf(-e / mu_total - mu_total / 2) - 1e-5, 0.01, 50)
    assert st.epsilon_spent == pytest.approx(eps_total, rel=0.01)
    _, uni = dp_flash_attn_func(q, k, v, epsilon=1.0, delta=1e-5, return_privacy_stats=True)
    _, imp = dp_flash_attn_func(q, k, v, epsilon=1.0, delta=1e-5, strategy="importance",
                                head_weights=[4, 1, 1, 2], return_privacy_stats=True)
    s_u, s_i = uni.noise_scale_per_head[0], imp.noise_scale_per_head
    assert imp.epsilon_spent == 1.0
    # sigma_h = sigma_uniform / sqrt(H w_h / W): sum_h 1 / sigma_h^2 is that of the uniform split
    assert sum(1 / s**2 for s in s_i) == pytest.approx(H / s_u**2, rel=1e-9)
    assert s_i[0] < s_i[3] < s_i[1] == s_i[2]


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(epsilon=0.0, delta=1e-5), "epsilon"),
    (dict(epsilon=-1.0, delta=1e-5), "epsilon"),
    (dict(epsilon=float("nan"), delta=1e-5), "epsilon"),
    (dict(epsilon=1.0, delta=0.0), "delta"),
    (dict(epsilon=1.0, delta=1.0), "delta"),
    (dict(epsilon=1.0, delta=1e-5, value_clip=0.0), "value_clip"),
    (dict(epsilon=1.0, delta=1e-5, score_cap=-1.0), "score_cap"),
    (dict(epsilon=1.0, delta=1e-5, score_cap=math.inf), "score_cap"),
    (dict(epsilon=1.0, delta=1e-5, record_size=5), "record_size"),
    (dict(epsilon=1.0, delta=1e-5, head_epsilons=[1.0]), "head_epsilons"),
    (dict(epsilon=1.0, delta=1e-5, head_epsilons=[1.0, -1.0]), "head epsilon"),
    (dict(epsilon=1.0, delta=1e-5, strategy="importance"), "head_weights"),
    (dict(epsilon=1.0, delta=1e-5, strategy="importance", head_weights=[1, 0]), "head weight"),
    (dict(epsilon=1.0, delta=1e-5, strategy="magic"), "strategy"),
    (dict(epsilon=1.0, delta=1e-5, mechanism="nope"), "nope"),
    (dict(epsilon=1.0, delta=1e-5, seed=-3), "seed"),
])
def test_bad_input_is_a_clear_error(kwargs, match):
    q, k, v = _rand(1, 4, 2, 32), _rand(1, 6, 2, 32), _rand(1, 6, 2, 32)
    with pytest.raises((PrivacyParameterError, ShapeError, ValueError), match=match):
        dp_flash_attn_func(q, k, v, **kwargs)


def test_kernel_shape_errors_pass_through():
    q, k = _rand(1, 4, 3, 32), _rand(1, 6, 2, 32)
    with pytest.raises(ShapeError, match="multiple"):
        dp_flash_attn_func(q, k, k, epsilon=1.0, delta=1e-5)
    with pytest.raises(ShapeError, match="key_padding_mask"):
        dp_flash_attn_func(q, q, q, epsilon=1.0, delta=1e-5, key_padding_mask=torch.ones(1, 3, dtype=torch.bool))


# -------------------------------------------------------------------- module


def test_module_follows_multihead_attention_and_accounts_every_call():
    torch.manual_seed(0)
    E, H, L, S, N = 64, 4, 6, 10, 2
    m = DPFlashAttention(E, H, epsilon=1.0, delta=1e-5).to(DEVICE)  # batch_first=False, as nn.MultiheadAttention
    query, mem = _rand(L, N, E), _rand(S, N, E)
    pad = torch.zeros(N, S, dtype=torch.bool, device=DEVICE)
    pad[1, -3:] = True  # True = ignore, nn.MultiheadAttention's convention
    out, st = m(query, mem, mem, key_padding_mask=pad, return_privacy_stats=True, seed=1)
    assert out.shape == (L, N, E) and st.epsilon_spent == 1.0
    out2, none = m(query, mem, mem, key_padding_mask=pad, seed=2)
    assert none is None
    eps, d = m.get_privacy_spent()
    mu2 = math.sqrt(2) * _analytic_mu(1.0, 1e-5)
    eps_two = optimize.brentq(lambda e: stats.norm.cdf(-e / mu2 + mu2 / 2)
                              - math.exp(e) * stats.norm.cdf(-e / mu2 - mu2 / 2) - 1e-5, 0.01, 50)
    assert d == 1e-5 and eps == pytest.approx(eps_two, rel=0.01)
    # the padded keys are not attended: changing them changes nothing (noise off)
    clean = DPFlashAttention(E, H, epsilon=math.inf, delta=1e-5, batch_first=True).to(DEVICE)
    mem_b = mem.transpose(0, 1).contiguous()
    mem2 = mem_b.clone()
    mem2[1, -3:] = 100.0
    a, _ = clean(query.transpose(0, 1), mem_b, mem_b, key_padding_mask=pad)
    b, _ = clean(query.transpose(0, 1), mem2, mem2, key_padding_mask=pad)
    assert torch.equal(a, b)
    assert clean.get_privacy_spent()[0] == math.inf


def test_module_refuses_what_it_cannot_protect():
    m = DPFlashAttention(32, 2, epsilon=1.0, delta=1e-5, batch_first=True)
    x = torch.randn(1, 4, 32)
    with pytest.raises(PrivacyParameterError, match="need_weights"):
        m(x, x, x, need_weights=True)
    with pytest.raises(PrivacyParameterError, match="delta"):
        DPFlashAttention(32, 2, epsilon=1.0, delta=2.0)
    with pytest.raises(PrivacyParameterError, match="head_epsilons"):
        DPFlashAttention(32, 2, epsilon=1.0, delta=1e-5, head_epsilons=[1.0, 1.0, 1.0])
    with pytest.raises(PrivacyParameterError, match="dropout"):
        DPFlashAttention(32, 2, 0.1, epsilon=1.0, delta=1e-5)


def test_release_noise_is_independent_across_rows_heads_batch_and_calls():
    """Each output element has its own Philox counter and each call its own seed: standardised
    noise of different heads, batch elements, neighbouring rows and two unseeded calls is
    uncorrelated (|rho| < 5 / sqrt(n))."""
    B, Nq, Nk, H, D = 2, 32, 32, 2, 64
    q, k, v = _rand(B, Nq, H, D), _rand(B, Nk, H, D), _rand(B, Nk, H, D)
    clean = dp_flash_attn_func(q, k, v, epsilon=math.inf, delta=1e-5)
    z1 = _split(dp_flash_attn_func(q, k, v, epsilon=1.0, delta=1e-5), clean)
    z2 = _split(dp_flash_attn_func(q, k, v, epsilon=1.0, delta=1e-5), clean)
    pairs = [(z1[:, :, 0], z1[:, :, 1]), (z1[0], z1[1]), (z1[:, :-1], z1[:, 1:]), (z1, z2)]
    for a, b in pairs:
        a, b = a.flatten().numpy(), b.flatten().numpy()
        assert abs(float(np.corrcoef(a, b)[0, 1])) < 5 / math.sqrt(len(a))


# ------------------------------------------------------- secure_mode (issue 12, item 6)


def test_secure_mode_releases_on_a_power_of_two_grid_with_the_rounding_in_the_sensitivity():
    """Every value is a multiple of 2^-k (bitwise); the noise is the discrete Gaussian of scale
    s (Delta 2^k + sqrt(D)) grid steps, s calibrated for unit sensitivity per (row, head)."""
    B, Nq, Nk, H, D, eps, delta, C, b = 4, 32, 24, 2, 32, 2.0, 1e-5, 1.0, 1.0
    q, k, v = _rand(B, Nq, H, D), _rand(B, Nk, H, D), _rand(B, Nk, H, D)
    out, st = dp_flash_attn_func(q, k, v, epsilon=eps, delta=delta, value_clip=C, score_cap=b,
                                 secure_mode=True, return_privacy_stats=True)
    assert st.mechanism == "discrete_gaussian" and out.dtype == q.dtype
    bits = -math.log2(st.grid_step)
    assert bits == int(bits)
    units = out.double().cpu() / st.grid_step
    assert torch.equal(units, torch.floor(units))
    delta_row = st.max_sensitivity
    assert math.sqrt(D) * st.grid_step <= delta_row / GRID_STEPS  # the rounding costs at most 1/16
    clean = dp_flash_attn_func(q, k, v, epsilon=math.inf, delta=delta, value_clip=C, score_cap=b)
    mech = mechanisms.get("discrete_gaussian")()
    s = mech.calibrate(math.sqrt(Nq * H), eps, delta)
    sigma_g = s * (delta_row / st.grid_step + math.sqrt(D))
    z = (out.double().cpu() - clean.double().cpu()) / st.grid_step  # noise + rounding error (|.| < 1)
    assert abs(z.var().item() / sigma_g**2 - 1) < 0.1
    assert st.noise_scale_per_head[0] == pytest.approx(sigma_g * st.grid_step, rel=1e-6)
    acc = accountants.get("rdp")()
    for e in st.events:
        acc.compose_event(e)
    assert acc.get_epsilon(delta) <= eps * (1 + 1e-3)  # the order grid vs calibrate's continuous order


def test_secure_mode_causal_rows_and_the_module():
    B, Nq, Nk, H, D = 1, 10, 12, 2, 16
    q, k, v = _rand(B, Nq, H, D), _rand(B, Nk, H, D), _rand(B, Nk, H, D)
    out, st = dp_flash_attn_func(q, k, v, causal=True, epsilon=1.0, delta=1e-5, secure_mode=True,
                                 return_privacy_stats=True)
    units = out.double().cpu() / st.grid_step
    assert torch.equal(units, torch.floor(units))
    m = DPFlashAttention(32, 2, epsilon=1.0, delta=1e-5, batch_first=True, secure_mode=True)
    x = torch.randn(2, 6, 32)
    m(x, x, x)
    assert m._accountant_name == "rdp"
    assert m.get_privacy_spent()[0] == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(PrivacyParameterError, match="seed"):
        m(x, x, x, seed=3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(seed=7), "seed"),
    (dict(mechanism="laplace"), "mechanism"),
    (dict(epsilon=math.inf), "finite budget"),
])
def test_secure_mode_refuses_a_seed_another_mechanism_and_no_noise(kwargs, match):
    q = _rand(1, 4, 1, 16)
    args = dict(epsilon=1.0, delta=1e-5, secure_mode=True)
    args.update(kwargs)
    with pytest.raises(PrivacyParameterError, match=match):
        dp_flash_attn_func(q, q, q, **args)
