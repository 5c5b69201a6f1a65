"""Per-layer rules: from a module's input and output gradient to per-example contributions.

Each rule maps (module, input activation, output gradient) to one contribution per
trainable parameter of the module (see contributions.py): factored for weight matrices,
materialised for small vectors. ``grad_output`` is the gradient of the per-example losses
(the caller has undone a mean reduction). Rules are looked up by module class, or by
class name for classes of packages dpfa does not import (transformers' ``Conv1D``,
``ViTEmbeddings``).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dpfa.errors import DPFAError
from dpfa.training.contributions import Contribution, Factored, PerExample

Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor], Dict[str, Contribution]]

_BY_TYPE: dict[type, Rule] = {}
_BY_NAME: dict[str, Rule] = {}


class UnsupportedLayerError(DPFAError, TypeError):
    """A trainable module has no per-example gradient rule (or uses an unsupported option)."""


def register_rule(*keys):
    """Register a rule for module classes (or class names given as strings)."""

    def deco(fn: Rule) -> Rule:
        for k in keys:
            (_BY_NAME if isinstance(k, str) else _BY_TYPE)[k] = fn
        return fn

    return deco


def rule_for(module: nn.Module) -> Optional[Rule]:
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
        if cls.__name__ in _BY_NAME:
            return _BY_NAME[cls.__name__]
    return None


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) -> (B, T, d) with every middle dimension folded into T (explicit: B may be 0)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])


def _trainable(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, nn.Parameter) and p.requires_grad


@register_rule(nn.Linear)
def linear_rule(module: nn.Linear, x: torch.Tensor, g: torch.Tensor) -> Dict[str, Contribution]:
    """y = x W^T + b: grad_W,i = sum_t g_t x_t^T, grad_b,i = sum_t g_t."""
    out: Dict[str, Contribution] = {}
    g3 = _tokens(g)
    if _trainable(module, "weight"):
        out["weight"] = Factored(left=g3, right=_tokens(x))
    if _trainable(module, "bias"):
        out["bias"] = PerExample(g3.sum(1))
    return out


@register_rule("Conv1D")
def conv1d_transformers_rule(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Dict[str, Contribution]:
    """transformers' Conv1D, y = x W + b with W stored (in, out)."""
    out: Dict[str, Contribution] = {}
    g3 = _tokens(g)
    if _trainable(module, "weight"):
        out["weight"] = Factored(left=g3, right=_tokens(x), transpose=True)
    if _trainable(module, "bias"):
        out["bias"] = PerExample(g3.sum(1))
    return out


@register_rule(nn.Embedding)
def embedding_rule(module: nn.Embedding, idx: torch.Tensor, g: torch.Tensor) -> Dict[str, Contribution]:
    """Row lookup: grad_W,i = sum_t onehot(idx_t) g_t^T (rows at padding_idx get no gradient)."""
    if module.scale_grad_by_freq or module.sparse:
        raise UnsupportedLayerError(
            f"nn.Embedding with scale_grad_by_freq={module.scale_grad_by_freq}, sparse={module.sparse} is not "
            "supported under DP-SGD; use the defaults (False, False)."
        )
    if not _trainable(module, "weight"):
        return {}
    rows = idx.reshape(idx.shape[0], math.prod(idx.shape[1:]))
    g3 = _tokens(g)
    if module.padding_idx is not None:
        g3 = g3 * (rows != module.padding_idx).to(g3.dtype)[..., None]
    return {"weight": Factored(left=rows, right=g3, num_rows=module.num_embeddings)}


def _affine_norm_rule(module: nn.Module, x_hat: torch.Tensor, g: torch.Tensor, n_norm_dims: int
                      ) -> Dict[str, Contribution]:
    """y = x_hat * w + b over the last ``n_norm_dims`` dims: grad_w,i = sum g x_hat, grad_b,i = sum g."""
    reduce = tuple(range(1, g.dim() - n_norm_dims))
    out: Dict[str, Contribution] = {}
    if _trainable(module, "weight"):
        out["weight"] = PerExample((g * x_hat).sum(reduce) if reduce else g * x_hat)
    if _trainable(module, "bias"):
        out["bias"] = PerExample(g.sum(reduce) if reduce else g)
    return out


@register_rule(nn.LayerNorm)
def layer_norm_rule(module: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor) -> Dict[str, Contribution]:
    x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
    return _affine_norm_rule(module, x_hat, g, len(module.normalized_shape))


if hasattr(nn, "RMSNorm"):

    @register_rule(nn.RMSNorm)
    def rms_norm_rule(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Dict[str, Contribution]:
        x_hat = F.rms_norm(x, module.normalized_shape, eps=module.eps)
        return _affine_norm_rule(module, x_hat, g, len(module.normalized_shape))


@register_rule("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "T5LayerNorm")
def hf_rms_norm_rule(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Dict[str, Contribution]:
    """transformers' RMSNorm scale vectors (Zhang & Sennrich 2019): y = w * x_hat over the last dim with
    x_hat = x / sqrt(mean(x^2) + eps) computed in fp32, so grad_w,i = sum_t g_t * x_hat_t."""
    eps = getattr(module, "variance_epsilon", None)
    w = getattr(module, "weight", None)
    if eps is None or w is None or w.dim() != 1:
        raise UnsupportedLayerError(
            f"{type(module).__qualname__} is not an RMSNorm of the form weight * x / sqrt(mean(x^2) + "
            "variance_epsilon) with a 1-D weight; register a rule for it."
        )
    xf = x.float()
    x_hat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return _affine_norm_rule(module, x_hat.to(g.dtype), g, 1)


@register_rule(nn.Conv2d)
def conv2d_rule(module: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> Dict[str, Contribution]:
    """A convolution is a linear map on unfolded patches: grad_W,i = sum_l g_l patch_l^T."""
    if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise UnsupportedLayerError(
            f"nn.Conv2d with groups={module.groups}, padding={module.padding!r}, padding_mode="
            f"{module.padding_mode!r} is not supported; use groups=1, numeric padding, padding_mode='zeros'."
        )
    out: Dict[str, Contribution] = {}
    g3 = g.flatten(2).transpose(1, 2)  # (B, L, out)
    if _trainable(module, "weight"):
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride).transpose(1, 2)  # (B, L, C kh kw)
        out["weight"] = Factored(left=g3, right=patches)
    if _trainable(module, "bias"):
        out["bias"] = PerExample(g3.sum(1))
    return out


@register_rule("ViTEmbeddings")
def vit_embeddings_rule(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Dict[str, Contribution]:
    """transformers' ViTEmbeddings: out = dropout(cat(cls, patches) + pos).

    The patch projection is a Conv2d with its own rule; here only the raw parameters:
    grad_pos,i = g_i and grad_cls,i = g_i[token 0] (dropout must be the identity).
    """
    drop = getattr(module, "dropout", None)
    if drop is not None and module.training and drop.p > 0:
        raise UnsupportedLayerError("ViTEmbeddings with dropout > 0 in training is not supported under DP-SGD.")
    out: Dict[str, Contribution] = {}
    if _trainable(module, "position_embeddings") and g.shape[1] == module.position_embeddings.shape[1]:
        out["position_embeddings"] = PerExample(g[:, None])
    elif _trainable(module, "position_embeddings"):
        raise UnsupportedLayerError("ViTEmbeddings with interpolated position encodings is not supported.")
    if _trainable(module, "cls_token"):
        out["cls_token"] = PerExample(g[:, None, :1])
    return out


#: parameters a module may own that get no gradient in its forward (so need no rule)
UNUSED_PARAMETERS = {"ViTEmbeddings": {"mask_token"}}
