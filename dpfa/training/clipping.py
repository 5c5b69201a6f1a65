"""Per-example clipping: norms from contributions, clip factors, clipped sums.

Flat clipping (Abadi et al. 2016): with n_i the norm of example i's whole gradient,
c_i = min(1, C / (n_i + 1e-6)), so every clipped per-example gradient has norm <= C and
a sum changes by at most C when one example is added or removed (2C when replaced).

Per-layer clipping (McMahan et al. 2018): parameter l is clipped to C_l on its own with
sum_l C_l^2 = C^2, which gives the same total bound C.

The L1 norm (for the Laplace mechanism) is clipped the same way with n_i the L1 norm.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from dpfa.errors import DPFAError, PrivacyParameterError
from dpfa.training.contributions import Contribution, PerExample, squared_norms

CLIPPING_MODES = ("flat", "per_layer")
EPS = 1e-6


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, C / (n + 1e-6)) elementwise."""
    return torch.clamp(max_norm / (norms + EPS), max=1.0)


def per_layer_thresholds(params: Sequence[nn.Parameter], max_grad_norm: float,
                         thresholds: Optional[Sequence[float]] = None) -> List[float]:
    """C_l for each parameter: equal split C / sqrt(L) by default; given ones must satisfy sum C_l^2 = C^2."""
    if thresholds is None:
        return [max_grad_norm / math.sqrt(len(params))] * len(params)
    thresholds = [float(t) for t in thresholds]
    if len(thresholds) != len(params) or any(not (t > 0) for t in thresholds):
        raise PrivacyParameterError(
            f"Expected {len(params)} positive per-layer thresholds, got {thresholds!r}."
        )
    total = math.sqrt(sum(t * t for t in thresholds))
    if total > max_grad_norm * (1 + 1e-9):
        raise PrivacyParameterError(
            f"Per-layer thresholds have sqrt(sum C_l^2) = {total:g} > max_grad_norm = {max_grad_norm:g}; the "
            "sensitivity would exceed the one the noise is calibrated for."
        )
    return thresholds


def _l1_norms(contributions: Sequence[Contribution]) -> torch.Tensor:
    """Per-example L1 norm of the summed gradient (materialised one example at a time)."""
    B = contributions[0].batch_size
    out = []
    for i in range(B):
        total = None
        for c in contributions:
            if isinstance(c, PerExample):
                part = c.grad[i]
            else:
                part = c.dense_left()[i].t() @ c.right[i]
            total = part if total is None else total + part
        out.append(total.abs().sum())
    if out:
        return torch.stack(out).float()
    first = contributions[0]  # an empty batch (a rank's share of a distributed batch can be empty)
    return (first.grad if isinstance(first, PerExample) else first.right).new_zeros(0, dtype=torch.float32)


_SEGMENTS: Dict[tuple, torch.Tensor] = {}


def _segments(sizes: List[int], device: torch.device) -> torch.Tensor:
    """The parameter index of each column of the small buffer (cached: building it on the host and
    copying it to the GPU every step would wait for the GPU)."""
    key = (tuple(sizes), str(device))
    if key not in _SEGMENTS:
        _SEGMENTS[key] = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)
    return _SEGMENTS[key]


def _flat_small(contributions: Dict[nn.Parameter, List[Contribution]]):
    """The materialised (PerExample) parameters side by side: (their list, a (B, total size) buffer, sizes).

    Biases and normalisation scales are many small tensors; one buffer turns their norms and clipped sums
    into a few launches instead of several per parameter. float32 (float64 if any part is)."""
    params = [p for p, cs in contributions.items() if all(isinstance(c, PerExample) for c in cs)]
    if not params:
        return [], None, []
    parts = []
    for p in params:
        cs = contributions[p]
        g = cs[0].grad
        for c in cs[1:]:
            g = g + c.grad
        parts.append(g.reshape(g.shape[0], math.prod(g.shape[1:])))  # explicit: B may be 0
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in parts) else torch.float32
    buf = (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]).to(dtype)  # cat promotes mixed dtypes
    return params, buf, [t.shape[1] for t in parts]


def _squared_norms_l2(contributions: Dict[nn.Parameter, List[Contribution]], method: str, per_parameter: bool):
    """(per-example squared norms: {parameter: (B,)} if ``per_parameter`` else their sum (B,), the small buffer)."""
    params, buf, sizes = _flat_small(contributions)
    out: Dict[nn.Parameter, torch.Tensor] = {}
    total = None
    if buf is not None:
        sq = buf * buf
        if per_parameter:  # one segment sum: column j of (B, n_small) is parameter j's
            seg = sq.new_zeros(buf.shape[0], len(params)).index_add_(1, _segments(sizes, buf.device), sq)
            out.update(zip(params, seg.unbind(1)))
        else:
            total = sq.sum(1)
    small = set(params)
    large = [squared_norms(cs, method) for p, cs in contributions.items() if p not in small]
    if per_parameter:
        out.update(zip([p for p in contributions if p not in small], large))
        return out, (params, buf, sizes)
    parts = ([] if total is None else [total]) + large
    return torch.stack(parts).to(torch.float64).sum(0), (params, buf, sizes)


def per_example_norms(contributions: Dict[nn.Parameter, List[Contribution]], norm: str = "l2",
                      method: str = "auto") -> Dict[nn.Parameter, torch.Tensor]:
    """Per-parameter, per-example gradient norms in ``norm`` ("l2" or "l1")."""
    if norm == "l2":
        sq, _ = _squared_norms_l2(contributions, method, per_parameter=True)
        return {p: sq[p].clamp_min(0).sqrt() for p in contributions}
    if norm == "l1":
        return {p: _l1_norms(cs) for p, cs in contributions.items()}
    raise DPFAError(f"Unsupported clipping norm {norm!r}; expected 'l2' or 'l1'.")


def clipped_grads(contributions: Dict[nn.Parameter, List[Contribution]], max_grad_norm: float,
                  mode: str = "flat", norm: str = "l2", thresholds: Optional[Dict[nn.Parameter, float]] = None,
                  method: str = "auto", norms_out: Optional[list] = None, scale: float = 1.0
                  ) -> Dict[nn.Parameter, torch.Tensor]:
    """sum_i c_i grad_i for every parameter with contributions.

    ``scale``: the contributions are ``1 / scale`` times the per-example gradients (a mean loss over
    ``scale`` examples; the collector's ``group_scales``). Norms are multiplied by it (B numbers) and
    so are the clip factors applied to the contributions, instead of every output gradient.
    ``norms_out`` (flat clipping): the per-example total norms are appended to it (private; adaptive
    clipping releases only a noisy count of them)."""
    from dpfa.training.contributions import clipped_sum

    if not contributions:
        return {}
    if mode not in CLIPPING_MODES:
        raise PrivacyParameterError(f"Unknown clipping={mode!r}; expected one of {CLIPPING_MODES}.")
    if mode == "per_layer" and thresholds is None:
        raise DPFAError("per_layer clipping needs thresholds.")
    scale = float(scale)
    if norm == "l1":
        norms = per_example_norms(contributions, norm, method)
        if mode == "flat":
            total = scale * sum(n.double() for n in norms.values())
            if norms_out is not None:
                norms_out.append(total)
            factors = scale * clip_factors(total, max_grad_norm)
            return {p: clipped_sum(cs, factors, p.shape) for p, cs in contributions.items()}
        return {p: clipped_sum(cs, scale * clip_factors(scale * norms[p].double(), thresholds[p]), p.shape)
                for p, cs in contributions.items()}
    if norm != "l2":
        raise DPFAError(f"Unsupported clipping norm {norm!r}; expected 'l2' or 'l1'.")
    sq, (small, buf, sizes) = _squared_norms_l2(contributions, method, per_parameter=mode == "per_layer")
    if mode == "flat":
        total = scale * sq.to(torch.float64).clamp_min(0).sqrt()
        if norms_out is not None:
            norms_out.append(total)
        factors = scale * clip_factors(total, max_grad_norm)  # applied to 1/scale-sized contributions
        per_param = {p: factors for p in contributions}
        if buf is not None:  # the small parameters' clipped sums in one product
            summed = factors.to(buf.dtype) @ buf
    else:  # every parameter's factors at once: (B, n_params) norms against a row of thresholds
        params = list(contributions)
        norms = scale * torch.stack([sq[p] for p in params], dim=1).to(torch.float64).clamp_min(0).sqrt()
        limits = torch.tensor([thresholds[p] for p in params], dtype=torch.float64).to(norms.device,
                                                                                         non_blocking=True)
        factors = scale * clip_factors(norms, limits)
        per_param = dict(zip(params, factors.unbind(1)))
        if buf is not None:
            index = {p: j for j, p in enumerate(params)}
            cols = torch.tensor([index[p] for p in small]).to(factors.device, non_blocking=True)
            stacked = factors.index_select(1, cols).to(buf.dtype)  # (B, n_small)
            summed = (stacked[:, _segments(sizes, buf.device)] * buf).sum(0)
    out = {}
    if buf is not None:
        for p, part in zip(small, torch.split(summed, sizes)):
            out[p] = part.reshape(p.shape)
    for p, cs in contributions.items():
        if p not in out:
            out[p] = clipped_sum(cs, per_param[p], p.shape)
    return out
