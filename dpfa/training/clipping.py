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


def per_example_norms(contributions: Dict[nn.Parameter, List[Contribution]], norm: str = "l2",
                      method: str = "auto") -> Dict[nn.Parameter, torch.Tensor]:
    """Per-parameter, per-example gradient norms in ``norm`` ("l2" or "l1")."""
    if norm == "l2":
        return {p: squared_norms(cs, method).clamp_min(0).sqrt() for p, cs in contributions.items()}
    if norm == "l1":
        return {p: _l1_norms(cs) for p, cs in contributions.items()}
    raise DPFAError(f"Unsupported clipping norm {norm!r}; expected 'l2' or 'l1'.")


def clipped_grads(contributions: Dict[nn.Parameter, List[Contribution]], max_grad_norm: float,
                  mode: str = "flat", norm: str = "l2", thresholds: Optional[Dict[nn.Parameter, float]] = None,
                  method: str = "auto", norms_out: Optional[list] = None) -> Dict[nn.Parameter, torch.Tensor]:
    """sum_i c_i grad_i for every parameter with contributions.

    ``norms_out`` (flat clipping): the per-example total norms are appended to it (private; adaptive
    clipping releases only a noisy count of them)."""
    from dpfa.training.contributions import clipped_sum

    if not contributions:
        return {}
    norms = per_example_norms(contributions, norm, method)
    if mode == "flat":
        if norm == "l2":
            total = torch.sqrt(sum(n.double().pow(2) for n in norms.values()))
        else:
            total = sum(n.double() for n in norms.values())
        factors = clip_factors(total, max_grad_norm)
        per_param = {p: factors for p in contributions}
        if norms_out is not None:
            norms_out.append(total)
    elif mode == "per_layer":
        if thresholds is None:
            raise DPFAError("per_layer clipping needs thresholds.")
        per_param = {p: clip_factors(norms[p].double(), thresholds[p]) for p in contributions}
    else:
        raise PrivacyParameterError(f"Unknown clipping={mode!r}; expected one of {CLIPPING_MODES}.")
    return {p: clipped_sum(cs, per_param[p], p.shape) for p, cs in contributions.items()}
