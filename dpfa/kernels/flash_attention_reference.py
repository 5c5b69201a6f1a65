"""Plain-torch attention: the reference that the Triton kernels are tested against.

It computes exactly what the kernels compute, hooks included, in the flash-attn
layout (batch, seqlen, heads, head_dim), and is what :func:`dpfa.flash_attn_func`
runs on a machine with neither a GPU nor ``TRITON_INTERPRET=1``.

Semantics shared with the kernels (and tested):

- ``causal`` aligns the mask to the bottom-right corner, as flash-attn does: query
  row ``i`` sees key ``j`` iff ``j <= i + seqlen_k - seqlen_q``.
- ``key_padding_mask`` is a (batch, seqlen_k) boolean tensor, ``True`` = the key
  takes part (torch SDPA's convention for boolean masks; the OPPOSITE of
  ``nn.MultiheadAttention``'s ``key_padding_mask``).
- A query row that sees no key at all returns zeros, and its log-sum-exp is ``-inf``.
- Grouped-query attention: query head ``h`` reads key/value head
  ``h // (heads_q // heads_k)``.
- Score cap (``score_cap=b``): the scaled score ``s = q.k * softmax_scale`` becomes
  ``clamp(s, -b, b)`` (``score_cap_mode="clamp"``) or ``b * tanh(s / b)`` (``"tanh"``).
- Value clipping (``value_clip=C``): each value row becomes ``v * min(1, C / ||v||)``,
  in L2 (``value_clip_norm="l2"``) or L1 (``"l1"``, for the Laplace mechanism).
"""

from __future__ import annotations

import math

import torch

SCORE_CAP_MODES = ("clamp", "tanh")
VALUE_CLIP_NORMS = ("l2", "l1")


def cap_scores(s: torch.Tensor, score_cap: float | None, mode: str = "clamp") -> torch.Tensor:
    """The score cap applied to scaled scores ``s``: ``|result| <= score_cap``."""
    if score_cap is None:
        return s
    if mode == "clamp":
        return s.clamp(-score_cap, score_cap)
    if mode == "tanh":
        return score_cap * torch.tanh(s / score_cap)
    raise ValueError(f"Unknown score_cap_mode={mode!r}; expected one of {SCORE_CAP_MODES}.")


def clip_value_rows(v: torch.Tensor, value_clip: float | None, norm_type: str = "l2") -> torch.Tensor:
    """Scale each row (last dim) of ``v`` so that its L2 (or L1) norm is at most ``value_clip``.

    Computed in float32 (float64 for float64 input) and cast back, as the kernel does.
    """
    if value_clip is None:
        return v
    if norm_type not in VALUE_CLIP_NORMS:
        raise ValueError(f"Unknown value_clip_norm={norm_type!r}; expected one of {VALUE_CLIP_NORMS}.")
    work = v.double() if v.dtype == torch.float64 else v.float()
    norm = work.norm(p=1 if norm_type == "l1" else 2, dim=-1, keepdim=True)
    factor = torch.clamp(value_clip / norm, max=1.0)  # norm 0 -> inf -> 1
    return (work * factor).to(v.dtype)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    score_cap: float | None = None,
    score_cap_mode: str = "clamp",
    value_clip: float | None = None,
    value_clip_norm: str = "l2",
    return_lse: bool = False,
    upcast: bool = True,
):
    """Attention in plain torch, differentiable, in the flash-attn layout.

    q: (B, Nq, H, D); k, v: (B, Nk, Hk, D) with H a multiple of Hk.
    Computes in float32 for 16-bit inputs when ``upcast`` (float64 stays float64) and
    returns the output in q's dtype; with ``return_lse`` also the natural-log
    log-sum-exp of the (capped, masked) scores, shape (B, H, Nq), float32 (float64
    for float64 input).
    """
    B, Nq, H, D = q.shape
    Nk, Hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    work = q.dtype
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        work = torch.float32
    v = clip_value_rows(v, value_clip, value_clip_norm)
    qf, kf, vf = (t.to(work).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, D)
    if Hk != H:
        kf = kf.repeat_interleave(H // Hk, dim=1)
        vf = vf.repeat_interleave(H // Hk, dim=1)
    s = cap_scores(torch.matmul(qf, kf.transpose(-1, -2)) * scale, score_cap, score_cap_mode)
    visible = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(Nq, device=q.device)[:, None]
        j = torch.arange(Nk, device=q.device)[None, :]
        visible = j <= i + (Nk - Nq)
    visible = visible[None, None].expand(B, 1, Nq, Nk)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.to(torch.bool)[:, None, None, :]
    s = s.masked_fill(~visible, -math.inf)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()  # rows that see nothing
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, vf) / torch.where(denom == 0, torch.ones_like(denom), denom)
    out = out.transpose(1, 2).to(q.dtype)
    if not return_lse:
        return out
    lse = (m + torch.log(denom)).squeeze(-1)
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse
