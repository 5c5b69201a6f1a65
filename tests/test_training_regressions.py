"""Regression tests for DP-SGD bugs that other engines shipped (issue 12, item 7), each against the textbook
step (per-example gradients by torch.func.vmap(grad), clipped, summed, divided by the expected batch size).

Each test also shows that it can fail: the wrong variant (the bug) is checked to be far from the reference."""

import copy
import math
import warnings

import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dp_reference import clipped_mean, per_example_grads, private_grads, rel_err
from dpfa.errors import DPFAError
from dpfa.finetune import DPLoRA
from dpfa.models import GPT, GPTConfig
from dpfa.training import PrivacyEngine, token_cross_entropy

V, T = 13, 8


def small_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=16))


def tokens(n, gen):
    return torch.randint(0, V, (n, T), generator=gen), torch.randint(0, V, (n, T), generator=gen)


def lm_loss(logits, y):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def mse_loss(out, y):
    return (out - y).pow(2).flatten(1).sum(1).mean()


# ------------------------------------------------------------------ token-level loss with ignore_index padding


def padded_batch(n, gen):
    x, y = tokens(n, gen)
    lengths = torch.tensor([1, 2, 3, 5, 8, 6][:n])  # kept tokens per example: very different
    y[torch.arange(T)[None, :] >= lengths[:, None]] = -100
    return x, y


@pytest.mark.parametrize("C", [0.02, 1e3])
def test_ignore_index_padding_is_a_mean_over_each_examples_kept_tokens(C, gen):
    model = small_gpt()
    x, y = padded_batch(6, gen)
    expected = clipped_mean(per_example_grads(copy.deepcopy(model), token_cross_entropy, x, y), C, 6)
    got, _, _ = private_grads(model, token_cross_entropy, x, y, C)
    assert rel_err(got, expected) < 1e-5


def test_flattened_ignore_index_mean_is_not_the_per_example_mean(gen):
    """The trap token_cross_entropy avoids: cross_entropy(ignore_index) over the flattened batch divides by the
    batch's kept tokens, so the engine's per-example gradients (and the step) are not the examples' own."""
    model = small_gpt()
    x, y = padded_batch(6, gen)
    expected = clipped_mean(per_example_grads(copy.deepcopy(model), token_cross_entropy, x, y), 1e3, 6)
    flat = lambda logits, t: nn.functional.cross_entropy(logits.reshape(-1, V), t.reshape(-1))  # noqa: E731
    got, _, _ = private_grads(model, flat, x, y, 1e3)
    assert rel_err(got, expected) > 0.1
    # without padding both are the same loss
    x, y = tokens(4, gen)
    assert torch.allclose(token_cross_entropy(model(x), y), lm_loss(model(x), y), rtol=1e-6)


# ------------------------------------------------------------------------------------------ bf16 autocast


def test_bf16_autocast_step_matches_fp32_textbook(gen):
    """Forward and backward under CPU bf16 autocast: the clipped mean equals the fp32 textbook step to bf16
    tolerance (here 3e-2 relative; bf16 has an 8-bit significand), while skipping the clipping is 10x off."""
    model = small_gpt(1)
    x, y = tokens(6, gen)
    grads = per_example_grads(copy.deepcopy(model), lm_loss, x, y)
    expected = clipped_mean(grads, 0.05, 6)
    unclipped = clipped_mean(grads, 1e9, 6)
    assert rel_err(unclipped, expected) > 0.3

    def bf16_loss(logits, t):
        return lm_loss(logits.float(), t)

    class Autocast(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, idx):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.m(idx)

    got, _, _ = private_grads(Autocast(model), bf16_loss, x, y, 0.05)
    got = {n.removeprefix("m."): g for n, g in got.items()}
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in got.values())
    err = rel_err(got, expected)
    assert err < 3e-2, err


# --------------------------------------------------------------- gradient accumulation and virtual steps


def _engine_run(model, x, y, C, physical, mode):
    """One logical batch of all of x (fixed size): "big" one step, "virtual" step() after every physical batch,
    "accumulate" backward on every physical batch and one step() at the end. Returns the gradient stepped."""
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine(accountant="rdp", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, loader = engine.make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=len(x)),
                                                 noise_multiplier=0.0, target_delta=1e-5, max_grad_norm=C,
                                                 poisson_sampling=False,
                                                 max_physical_batch_size=None if mode == "big" else physical)
    sizes = []
    opt.zero_grad()
    for xb, yb in loader:
        sizes.append(len(xb))
        if mode == "virtual":
            opt.zero_grad()
        lm_loss(model(xb), yb).backward()  # a mean over the physical batch: the engine rescales by its size
        if mode != "accumulate" or engine.batch_info.end_of_logical_batch:
            stepped = opt.pre_step()
            if stepped:
                break
    assert engine.steps == 0 and stepped  # pre_step only: nothing accounted, the gradient is in p.grad
    return sizes, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["big", "virtual", "accumulate"])
def test_accumulation_and_virtual_steps_equal_one_large_step(mode, gen):
    model = small_gpt(2)
    x, y = tokens(12, gen)
    expected = clipped_mean(per_example_grads(copy.deepcopy(model), lm_loss, x, y), 0.05, 12)
    sizes, got = _engine_run(model, x, y, 0.05, 5, mode)
    assert sizes == ([12] if mode == "big" else [5, 5, 2])
    assert rel_err(got, expected) < 1e-5


def test_accumulation_by_hand_keeps_examples_apart(gen):
    """Two backward passes on two halves, then one step: example i of the first half is not example i of the
    second (an engine that concatenated per-example factors by position clipped their sum: 0.46 relative error)."""
    model = small_gpt(3)
    x, y = tokens(8, gen)
    expected = clipped_mean(per_example_grads(copy.deepcopy(model), lm_loss, x, y), 0.05, 8)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, _ = PrivacyEngine(accountant="rdp").make_private(
            model, opt, DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=0.0, target_delta=1e-5,
            max_grad_norm=0.05, poisson_sampling=False)
    opt.zero_grad()
    lm_loss(model(x[:4]), y[:4]).backward()
    lm_loss(model(x[4:]), y[4:]).backward()
    assert opt.pre_step()
    got = {n: p.grad for n, p in model.named_parameters()}
    assert rel_err(got, expected) < 1e-5
    # the merged-by-position variant is far off: clip (g_i + g_{i+4}) together
    grads = per_example_grads(copy.deepcopy(small_gpt(3)), lm_loss, x, y)
    merged = clipped_mean({n: g[:4] + g[4:] for n, g in grads.items()}, 0.05, 8)
    assert rel_err(merged, expected) > 0.1


def test_accumulating_across_logical_batches_is_refused(gen):
    """Gradients of two sampled batches in one step would be accounted as one: refused before any release."""
    model = small_gpt(4)
    x, y = tokens(20, gen)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine(accountant="rdp", seed=0)
    model, opt, loader = engine.make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=5),
                                             noise_multiplier=1.0, target_delta=1e-5, max_grad_norm=1.0,
                                             poisson_sampling=False)
    before = [p.detach().clone() for p in model.parameters()]
    it = iter(loader)
    for _ in range(2):
        xb, yb = next(it)
        lm_loss(model(xb), yb).backward()  # no step after the first logical batch
    with pytest.raises(DPFAError, match=r"logical batches \[1, 2\]"):
        opt.step()
    assert engine.steps == 0 and all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    opt.zero_grad()  # drops both; the run goes on
    xb, yb = next(it)
    lm_loss(model(xb), yb).backward()
    opt.step()
    assert engine.steps == 1


# ---------------------------------------------------------------------------------------------- LoRA


def _lora_step_matches(model, x, y, loss_fn, C=0.05):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    expected = clipped_mean(per_example_grads(copy.deepcopy(model), loss_fn, x, y), C, len(x))
    assert set(expected) == trainable and frozen
    got, _, model = private_grads(model, loss_fn, x, y, C)
    assert set(got) == trainable
    assert rel_err(got, expected) < 1e-5
    params = dict(model.named_parameters())
    assert all(params[n].grad is None and torch.equal(params[n], p) for n, p in frozen.items())


def _move_lora_b(model):
    with torch.no_grad():  # B starts at 0 (then A gets no gradient): move it so both factors are exercised
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(input_ids=x).logits


def tiny_hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_dplora_on_transformers_gpt2_equals_textbook(gen):
    model = DPLoRA(tiny_hf_gpt2(), rank=2, target_modules=["c_attn", "c_fc"])
    _move_lora_b(model)
    x, y = tokens(5, gen)
    _lora_step_matches(Logits(model), x, y, lm_loss)


def test_peft_lora_equals_textbook(gen):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_hf_gpt2(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                                fan_in_fan_out=True, lora_dropout=0.0))
    _move_lora_b(model)
    x, y = tokens(5, gen)
    _lora_step_matches(Logits(model), x, y, lm_loss)


# ------------------------------------------------------------------- max_grad_norm in every clipping mode


def mlp():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 7, bias=False), nn.LayerNorm(7), nn.Linear(7, 2))


MODES = {  # name: (mechanism, clipping, norm of the sensitivity)
    "flat_l2": ("gaussian", "flat", 2),
    "per_layer_l2": ("gaussian", "per_layer", 2),
    "flat_l1": ("laplace", "flat", 1),
}


def _clipped_sum(x, y, C, mechanism, clipping):
    """sum_i c_i g_i as the engine computes it (noise 0), flattened over all parameters, and per parameter."""
    engine = PrivacyEngine(accountant="rdp", mechanism=mechanism)
    got, _, _ = private_grads(mlp(), mse_loss, x, y, C, engine=engine, clipping=clipping)
    return torch.cat([g.flatten() for g in got.values()]) * len(x), {n: g * len(x) for n, g in got.items()}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_max_grad_norm_bounds_each_examples_contribution(mode, gen):
    """Sensitivity, measured: removing one example changes the clipped sum by at most C (in the mechanism's
    norm; per-layer: at most C_l on each parameter), and by exactly C when the example's gradient is large."""
    mechanism, clipping, order = MODES[mode]
    x = torch.randn(6, 6, generator=gen) * 10
    y = torch.randn(6, 2, generator=gen) * 100  # every gradient far above C
    C = 0.3
    full, full_per = _clipped_sum(x, y, C, mechanism, clipping)
    L = len(full_per)
    for j in range(len(x)):
        keep = [i for i in range(len(x)) if i != j]
        part, part_per = _clipped_sum(x[keep], y[keep], C, mechanism, clipping)
        change = (full - part).norm(p=order).item()
        assert change <= C * (1 + 1e-5)
        if clipping == "flat":
            assert change == pytest.approx(C, rel=1e-4)
        else:  # C_l = C / sqrt(L) on each parameter (reached by the large weight gradients)
            changes = [(full_per[n] - part_per[n]).norm().item() for n in full_per]
            assert max(changes) == pytest.approx(C / math.sqrt(L), rel=1e-4)
            assert all(c <= C / math.sqrt(L) * (1 + 1e-5) for c in changes)


def test_a_clipping_that_lets_norms_through_is_caught(gen, monkeypatch):
    """The same measurement rejects a clip factor 10% too large (the check can fail)."""
    from dpfa.training import clipping

    real = clipping.clip_factors
    monkeypatch.setattr(clipping, "clip_factors", lambda norms, C: real(norms, 1.1 * C))
    x = torch.randn(3, 6, generator=gen) * 10
    y = torch.randn(3, 2, generator=gen) * 100
    full, _ = _clipped_sum(x, y, 0.3, "gaussian", "flat")
    part, _ = _clipped_sum(x[1:], y[1:], 0.3, "gaussian", "flat")
    assert (full - part).norm().item() > 0.3 * 1.05


# ---------------------------------------------------------------- no trainable parameter without noise


class Zoo(nn.Module):
    """Tied embedding/head with a padding row, a LayerNorm, a branch never used, a frozen layer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 16, padding_idx=0)
        self.ln = nn.LayerNorm(16)
        self.frozen = nn.Linear(16, 16).requires_grad_(False)
        self.unused = nn.Linear(16, 16)
        self.head = nn.Linear(16, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.ln(self.frozen(self.emb(idx))))


@pytest.mark.parametrize("empty", [False, True])
def test_every_trainable_parameter_gets_noise_at_the_right_scale(empty, gen):
    """Zero data gradient (or an empty Poisson batch): every coordinate of every trainable parameter moves, by
    noise of std sigma C / E[B] on each parameter; the frozen layer does not move."""
    torch.manual_seed(0)
    model = Zoo()
    x = torch.zeros(16, T, dtype=torch.long)  # padding tokens only: no gradient reaches any weight but LN's
    y = torch.zeros(16, T, V)
    sigma, C, B = 2.0, 0.5, 4
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine = PrivacyEngine(accountant="rdp", seed=3)
    model, opt, loader = engine.make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=B),
                                             noise_multiplier=sigma, target_delta=1e-5, max_grad_norm=C,
                                             poisson_sampling=not empty)
    with torch.no_grad():
        model.ln.weight.zero_()  # LayerNorm output 0: the loss below has zero gradient everywhere
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    if not empty:
        (model(x[:B]) * 0).sum().backward()
    else:
        engine.batch_info.last_batch_size = 0  # what the loader reports for an empty Poisson batch
    opt.step()
    assert engine.steps == 1
    std = sigma * C / B
    for n, p in model.named_parameters():
        moved = (p.detach() - before[n]).flatten()
        if n.startswith("frozen"):
            assert torch.equal(moved, torch.zeros_like(moved)), n
            continue
        assert (moved != 0).all(), n
        t = float(moved.double().pow(2).sum()) / std**2  # sum of squares / std^2 ~ chi2(k)
        k = moved.numel()
        assert 2 * min(stats.chi2.cdf(t, k), stats.chi2.sf(t, k)) > 1e-4, n
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "emb.weight", "ln.weight", "ln.bias", "unused.weight", "unused.bias"}


# ------------------------------------------------------------------ the normaliser is the expected batch size


def test_normaliser_is_the_expected_batch_size_not_the_sampled_one(gen):
    """Poisson sampling: the step is sum_i c_i g_i / (q N) whatever the sampled size (dividing by the sampled
    size would leak it and bias the step)."""
    x, y = tokens(16, gen)
    model = small_gpt(6)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine(accountant="rdp", seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, loader = engine.make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=8),
                                                 noise_multiplier=0.0, target_delta=1e-5, max_grad_norm=0.05)
    for xb, yb in loader:
        if len(xb) not in (0, 8):
            break
    else:
        pytest.fail("no Poisson batch of size other than 0 and 8 in an epoch")
    opt.zero_grad()
    lm_loss(model(xb), yb).backward()
    assert opt.pre_step()
    got = {n: p.grad for n, p in model.named_parameters()}
    grads = per_example_grads(reference, lm_loss, xb, yb)
    assert rel_err(got, clipped_mean(grads, 0.05, 8)) < 1e-5
    assert rel_err(got, clipped_mean(grads, 0.05, len(xb))) > 0.1
