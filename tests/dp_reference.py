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
