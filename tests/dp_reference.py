"""The textbook DP-SGD step, for exactness tests: materialise per-example gradients with
torch.func.vmap(grad), clip each, sum, divide by the expected batch size."""

import torch
from torch.func import functional_call, grad, vmap


def per_example_grads(model, loss_fn, inputs, targets):
    """{name: (B, *shape)} per-example gradients of loss_fn(model(x_i), y_i)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}

    def loss_one(ps, x, y):
        out = functional_call(model, {**ps, **frozen, **buffers}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="same")(params, inputs, targets)


def clipped_mean(grads, max_grad_norm, expected_batch_size, clipping="flat", thresholds=None):
    """{name: update} = sum_i c_i g_i / E[B] with c_i = min(1, C / (||g_i|| + 1e-6))."""
    names = list(grads)
    if clipping == "flat":
        norms = torch.sqrt(sum(grads[n].flatten(1).double().pow(2).sum(1) for n in names))
        factors = {n: torch.clamp(max_grad_norm / (norms + 1e-6), max=1.0) for n in names}
    else:
        factors = {}
        for n in names:
            norm = grads[n].flatten(1).double().pow(2).sum(1).sqrt()
            factors[n] = torch.clamp(thresholds[n] / (norm + 1e-6), max=1.0)
    return {n: torch.einsum("b,b...->...", factors[n].to(grads[n].dtype), grads[n]) / expected_batch_size
            for n in names}


def private_grads(model, loss_fn, x, y, C, *, expected_batch_size=None, engine=None, **make_private):
    """One private step's gradient (noise 0 unless given): ({name: p.grad}, engine, model) after pre_step().

    Uses SGD and poisson_sampling=False unless overridden; the loader only sets the sampling rate.
    """
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from dpfa.training import PrivacyEngine

    B = expected_batch_size or len(x)
    engine = engine or PrivacyEngine(accountant="rdp", seed=0)
    kwargs = dict(noise_multiplier=0.0, target_delta=1e-5, max_grad_norm=C, poisson_sampling=False) | make_private
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="noise_multiplier=0")
        model, opt, _ = engine.make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=B), **kwargs)
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    assert opt.pre_step()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, engine, model


def rel_err(actual, expected):
    """||actual - expected|| / ||expected|| over a dict of tensors (all parameters together)."""
    num = sum((actual[n].double() - expected[n].double()).pow(2).sum() for n in expected)
    den = sum(expected[n].double().pow(2).sum() for n in expected)
    return float((num / den).sqrt())
