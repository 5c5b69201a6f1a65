"""DPMultiheadAttention: nn.MultiheadAttention rebuilt from nn.Linear projections.

nn.MultiheadAttention uses its projection weights inside one functional call, so no
hook sees their inputs. This module computes the same function with four nn.Linear
layers (q, k, v, out), whose per-example rules are exact, and is swapped in by the
engine with the original weights copied (as Opacus' DPMultiheadAttention does).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dpfa.training.layer_rules import UnsupportedLayerError


class DPMultiheadAttention(nn.Module):
    """Same arguments and outputs as nn.MultiheadAttention (no add_bias_kv / add_zero_attn)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, batch_first: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}.")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "DPMultiheadAttention":
        if mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedLayerError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported.")
        w = mha.in_proj_weight if mha._qkv_same_embed_dim else None
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None, kdim=mha.kdim,
                  vdim=mha.vdim, batch_first=mha.batch_first, device=mha.out_proj.weight.device,
                  dtype=mha.out_proj.weight.dtype)
        E = mha.embed_dim
        with torch.no_grad():
            if w is not None:
                new.q_proj.weight.copy_(w[:E]), new.k_proj.weight.copy_(w[E:2 * E]), new.v_proj.weight.copy_(w[2 * E:])
            else:
                new.q_proj.weight.copy_(mha.q_proj_weight), new.k_proj.weight.copy_(mha.k_proj_weight)
                new.v_proj.weight.copy_(mha.v_proj_weight)
            if mha.in_proj_bias is not None:
                b = mha.in_proj_bias
                new.q_proj.bias.copy_(b[:E]), new.k_proj.bias.copy_(b[E:2 * E]), new.v_proj.bias.copy_(b[2 * E:])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.requires_grad_(any(p.requires_grad for p in mha.parameters()))
        new.train(mha.training)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self.batch_first:  # (L, N, E) -> (N, L, E): dpfa's rules need the batch first
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        B, Lq, _ = query.shape
        Lk = key.shape[1]
        H, D = self.num_heads, self.head_dim
        q = self.q_proj(query).view(B, Lq, H, D).transpose(1, 2)
        k = self.k_proj(key).view(B, Lk, H, D).transpose(1, 2)
        v = self.v_proj(value).view(B, Lk, H, D).transpose(1, 2)

        bias = torch.zeros(B, 1, Lq, Lk, dtype=q.dtype, device=q.device)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            m = attn_mask if attn_mask.dim() == 2 else attn_mask.view(B, H, Lq, Lk)
            bias = bias + (m.float().masked_fill(m, float("-inf")) if m.dtype == torch.bool else m)
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(B, 1, 1, Lk)
            bias = bias + (kpm.float().masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else kpm)
        scores = q @ k.transpose(-2, -1) / D**0.5 + bias
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        out = (weights @ v).transpose(1, 2).reshape(B, Lq, self.embed_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights


def _parameter_map(old: nn.MultiheadAttention, new: DPMultiheadAttention) -> dict:
    """id(old parameter) -> the new parameters that replace it."""
    pairs = {
        "in_proj_weight": [new.q_proj.weight, new.k_proj.weight, new.v_proj.weight],
        "q_proj_weight": [new.q_proj.weight], "k_proj_weight": [new.k_proj.weight],
        "v_proj_weight": [new.v_proj.weight],
        "in_proj_bias": [new.q_proj.bias, new.k_proj.bias, new.v_proj.bias],
    }
    out = {id(getattr(old, k)): v for k, v in pairs.items() if getattr(old, k, None) is not None}
    out[id(old.out_proj.weight)] = [new.out_proj.weight]
    if old.out_proj.bias is not None:
        out[id(old.out_proj.bias)] = [new.out_proj.bias]
    return out


def convert_multihead_attention(module: nn.Module, mapping: Optional[dict] = None):
    """Replace every nn.MultiheadAttention inside ``module`` by DPMultiheadAttention.

    Returns (module, mapping) with mapping id(old parameter) -> list of new parameters, so
    that an optimizer built on the old parameters can be pointed at the new ones.
    """
    mapping = {} if mapping is None else mapping
    if isinstance(module, nn.MultiheadAttention):
        new = DPMultiheadAttention.from_torch(module)
        mapping.update(_parameter_map(module, new))
        return new, mapping
    for name, child in list(module.named_children()):
        new, _ = convert_multihead_attention(child, mapping)
        if new is not child:
            setattr(module, name, new)
    return module, mapping


def remap_optimizer(optimizer, mapping: dict) -> None:
    """Point ``optimizer``'s param groups at the replacement parameters (before any step)."""
    if not mapping:
        return
    for group in optimizer.param_groups:
        new_params = []
        for p in group["params"]:
            if id(p) in mapping:
                if optimizer.state.get(p):
                    raise UnsupportedLayerError("Convert nn.MultiheadAttention before the optimizer takes a step.")
                new_params.extend(mapping[id(p)])
            else:
                new_params.append(p)
        group["params"] = new_params
