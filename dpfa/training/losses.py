"""Losses whose batch reduction is the mean of per-example losses, as DP-SGD needs.

DP-SGD clips the gradient of each example's own loss. With ``loss_reduction="mean"``
the engine reads the batch loss as (1/B) sum_i loss_i. A token-level cross-entropy with
padding (``ignore_index``) reduced over the flattened batch is instead
sum_{i,t} l_{i,t} / N_kept: example i's share is scaled by B n_i / N_kept, which depends
on the other examples of the batch, so the clipped gradient is not the example's own
(a bug other engines shipped). :func:`token_cross_entropy` takes the mean over each
example's kept tokens first, then the mean over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(1/B) sum_i mean_{t kept} CE(logits_{i,t}, targets_{i,t}); logits (B, T, V), targets (B, T).

    An example with no kept token contributes 0 (not NaN) and still counts in B.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"Expected logits (B, T, V) and targets (B, T), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}.")
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=ignore_index, reduction="none")
    kept = (targets != ignore_index).to(per_token.dtype).sum(1)
    return (per_token.sum(1) / kept.clamp_min(1)).mean()
