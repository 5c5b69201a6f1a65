"""Layers whose weight gradient autograd does not compute: DP-SGD computes it once, clipped.

In DP-SGD the released weight gradient is the clipped sum ``A^T diag(c) G`` (book-keeping,
Bu et al. 2023, "Differentially private optimization on large model at small cost"), which
the optimizer computes from the collected factors after the clip factors are known. The
non-private weight gradient ``A^T G`` that autograd would also compute is never used (the
optimizer overwrites ``p.grad``), yet it is a third of a step's matmul FLOPs.

:func:`defer_weight_gradients` gives the supported modules (``nn.Linear``, transformers'
``Conv1D``, ``nn.Embedding`` without ``max_norm``, ``nn.LayerNorm``, each with its stock
``forward``) an instance ``forward`` that runs the same function through an autograd.Function
whose backward returns only the input gradient. The weight and bias still enter the function, so its
output requires a gradient and the collector's output hook still receives ``g`` (also for a
first layer whose input needs none); their ``.grad`` stays ``None``. Under autocast the
forward casts as autocast would and the backward multiplies in the output's dtype.

Not used under a DDP or FSDP wrapper: their gradient hooks wait for every parameter's grad.
"""

from __future__ import annotations

import types
from typing import Callable, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn


def _autocast_dtype(device_type: str):
    """The dtype autocast would run a matmul in on ``device_type``, or None outside autocast."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _LinearInputGradOnly(torch.autograd.Function):
    """y = x W^T + b; backward: dL/dx = g W only (no dL/dW, no dL/db)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        dtype = _autocast_dtype(x.device.type)
        if dtype is not None:  # autocast's casts, made here so that the backward can keep the cast weight
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)  # operands already in autocast's dtype: it casts nothing

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        gx = g.matmul(w.to(g.dtype)) if ctx.needs_input_grad[0] else None
        return gx, None, None


class _LayerNormInputGradOnly(torch.autograd.Function):
    """y = LayerNorm(x) * w + b; backward: dL/dx only (aten's layer-norm backward with its weight and
    bias outputs masked off). Under CUDA autocast it runs in float32, as autocast runs layer_norm."""

    @staticmethod
    def forward(ctx, x, weight, bias, shape, eps):
        if torch.is_autocast_enabled(x.device.type):  # only CUDA autocast reaches here (see _layer_norm_forward)
            x = x.float()
            weight = None if weight is None else weight.float()
            bias = None if bias is None else bias.float()
        y, mean, rstd = torch.ops.aten.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.shape = shape
        return y

    @staticmethod
    def backward(ctx, g):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        gx = torch.ops.aten.native_layer_norm_backward(g.to(x.dtype), x, ctx.shape, mean, rstd, weight, bias,
                                                       [True, False, False])[0]
        return gx, None, None, None, None


class _EmbeddingNoGrad(torch.autograd.Function):
    """y = W[idx]; backward delivers nothing (indices have no gradient, W's is deferred)."""

    @staticmethod
    def forward(ctx, idx, weight, padding_idx):
        return F.embedding(idx, weight, padding_idx)

    @staticmethod
    def backward(ctx, g):
        return None, None, None


def _transforms_active() -> bool:
    """Inside torch.func (vmap, grad, ...): the module must behave as its class does (a textbook
    per-example gradient taken of it needs the weight gradient)."""
    return torch._C._are_functorch_transforms_active()


def _linear_forward(self: nn.Linear, x):
    if _transforms_active():
        return type(self).forward(self, x)
    return _LinearInputGradOnly.apply(x, self.weight, self.bias)


def _conv1d_forward(self: nn.Module, x):
    """transformers' Conv1D: y = x W + b with W stored (in, out)."""
    if _transforms_active():
        return type(self).forward(self, x)
    return _LinearInputGradOnly.apply(x, self.weight.t(), self.bias)


def _layer_norm_forward(self: nn.LayerNorm, x):
    # CPU autocast keeps layer_norm in the input's dtype, CUDA autocast runs it in float32: the deferred
    # form reproduces the latter and no autocast; CPU autocast takes the module's own forward
    if _transforms_active() or (x.device.type != "cuda" and torch.is_autocast_enabled(x.device.type)):
        return type(self).forward(self, x)
    return _LayerNormInputGradOnly.apply(x, self.weight, self.bias, list(self.normalized_shape), self.eps)


def _embedding_forward(self: nn.Embedding, idx):
    if _transforms_active():
        return type(self).forward(self, idx)
    return _EmbeddingNoGrad.apply(idx, self.weight, self.padding_idx)


def deferred_forward(module: nn.Module) -> Optional[Callable]:
    """The forward of ``module`` without its parameter gradients, bound to it (so that ``copy.deepcopy``
    binds the copy's to the copy), or None where dpfa cannot stand in for the module's forward."""
    cls = type(module)
    fn = None
    if isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward:
        fn = _linear_forward
    elif isinstance(module, nn.LayerNorm) and cls.forward is nn.LayerNorm.forward:
        fn = _layer_norm_forward
    elif isinstance(module, nn.Embedding) and cls.forward is nn.Embedding.forward:
        if module.max_norm is None and not module.scale_grad_by_freq and not module.sparse:
            fn = _embedding_forward
    elif (cls.__name__ == "Conv1D" and "forward" in cls.__dict__ and getattr(module, "weight", None) is not None
          and module.weight.dim() == 2 and getattr(module, "nf", None) == module.weight.shape[1]):
        fn = _conv1d_forward
    if fn is None or "forward" in module.__dict__:  # a user's own instance forward: leave it
        return None
    return types.MethodType(fn, module)


def defer_weight_gradients(modules: Iterable[nn.Module]) -> Callable[[], None]:
    """Give each supported module of ``modules`` its deferred forward; returns the function that undoes it."""
    patched: List[nn.Module] = []
    for sub in modules:
        forward = deferred_forward(sub)
        if forward is not None:
            sub.forward = forward
            patched.append(sub)

    def undo() -> None:
        for sub in patched:
            sub.__dict__.pop("forward", None)
        patched.clear()

    return undo
