"""The deferred forward: same values and input gradients as the module's own, no weight gradient."""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from dpfa.models.gpt import GPT, GPTConfig
from dpfa.training import PrivacyEngine, collector as collector_module
from dpfa.training.deferred_weight_grad import deferred_forward, defer_weight_gradients


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
                                   torch.ops.aten.matmul, torch.ops.aten.embedding_dense_backward):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _fresh(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(11, 6, padding_idx=2), nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))


@pytest.mark.parametrize("autocast", [False, True])
def test_outputs_and_input_gradients_equal_the_modules_own(autocast):
    ref, fast = _fresh(), _fresh()
    defer_weight_gradients(fast.modules())
    idx = torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(3))
    outs, grads = [], []
    for model in (ref, fast):
        emb = model[0](idx).detach().requires_grad_(True)  # the input gradient of the Linear layers
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model[3](model[2](model[1](emb)))
        (y.float() * torch.arange(3.0)).sum().backward()
        outs.append(y)
        grads.append(emb.grad)
    assert outs[0].dtype == outs[1].dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_no_weight_gradient_is_computed():
    """One matmul in the backward of a Linear (dL/dx), none for an Embedding; the stock backward has two and one."""
    for deferred in (False, True):
        model = _fresh()
        if deferred:
            defer_weight_gradients(model.modules())
        idx = torch.randint(0, 11, (4, 7))
        y = model(idx)
        with _CountMatmuls() as counter:
            y.sum().backward()
        linear_weights = [model[1].weight, model[3].weight, model[0].weight]
        if deferred:
            assert counter.count == 2  # dL/dx of each Linear (the embedding's hook needs its output gradient)
            assert all(w.grad is None for w in linear_weights)
        else:
            assert counter.count == 5  # dL/dx and dL/dW of each Linear, the embedding's dense gradient
            assert all(w.grad is not None for w in linear_weights)


def test_the_output_still_requires_grad_with_a_constant_input():
    lin = nn.Linear(3, 2)
    defer_weight_gradients([lin])
    y = lin(torch.randn(4, 3))
    assert y.requires_grad
    y.sum().backward()
    assert lin.weight.grad is None and lin.bias.grad is None


def test_undo_deepcopy_and_torch_func():
    model = _fresh()
    undo = defer_weight_gradients(model.modules())
    assert "forward" in model[1].__dict__
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[3].weight.mul_(2)
    x = torch.randn(2, 5)
    # the copy's forward is bound to the copy: its own (doubled) weights, not the original's
    torch.testing.assert_close(twin[3](x) - twin[3].bias, 2 * (model[3](x) - model[3].bias))
    # under torch.func the module behaves as its class does: per-example weight gradients exist
    params = {k: v.detach() for k, v in model[3].named_parameters()}
    g = torch.func.vmap(torch.func.grad(lambda p, xi: torch.func.functional_call(model[3], p, (xi,)).sum()),
                        in_dims=(None, 0))(params, x)
    torch.testing.assert_close(g["weight"], torch.ones(2, 3, 1) * x[:, None, :])
    undo()
    assert "forward" not in model[1].__dict__


def test_unsupported_forms_keep_their_forward():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert deferred_forward(MyLinear(2, 2)) is None
    assert deferred_forward(nn.Embedding(4, 2, max_norm=1.0)) is None
    assert deferred_forward(nn.BatchNorm1d(3)) is None
    assert deferred_forward(nn.Linear(2, 2)) is not None


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_engine_step_is_the_same_with_and_without_deferral(clipping, monkeypatch):
    """The released gradients (noise off) do not depend on whether autograd computed the weight gradients."""
    cfg = GPTConfig(vocab_size=17, block_size=9, n_layer=2, n_head=2, n_embd=8)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 17, (6, 9), generator=g)
    y = torch.randint(0, 17, (6, 9), generator=g)
    released = []
    for defer in (False, True):
        monkeypatch.setattr(collector_module, "DEFER_WEIGHT_GRADIENTS", defer)
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        engine = PrivacyEngine(accountant="rdp", seed=0)
        with pytest.warns(UserWarning, match="NOT private"):
            model, opt, _ = engine.make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=6),
                                                noise_multiplier=0.0, target_delta=1e-5, max_grad_norm=0.3,
                                                clipping=clipping, poisson_sampling=False)
        logits = model(x)
        nn.functional.cross_entropy(logits.reshape(-1, 17), y.reshape(-1)).backward()
        tok = model.tok.weight
        assert (tok.grad is None) == defer  # the tied embedding/head gets no autograd gradient when deferred
        opt.step()
        released.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in released[0]:
        torch.testing.assert_close(released[1][name], released[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_layer_norm_input_gradient_without_its_weight_gradients():
    torch.manual_seed(1)
    ref, fast = nn.LayerNorm(6), nn.LayerNorm(6)
    with torch.no_grad():
        for m in (ref, fast):
            m.weight.copy_(torch.linspace(0.5, 1.5, 6))
            m.bias.copy_(torch.linspace(-1, 1, 6))
    defer_weight_gradients([fast])
    x = torch.randn(3, 4, 6)
    outs, grads = [], []
    for m in (ref, fast):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * torch.arange(6.0)).sum().backward()
        outs.append(y)
        grads.append(xi.grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    assert ref.weight.grad is not None and fast.weight.grad is None and fast.bias.grad is None
    # CPU autocast keeps layer_norm in the input's dtype: the module's own forward runs there
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x.bfloat16().requires_grad_(True))
    y.float().sum().backward()
    assert fast.weight.grad is not None
