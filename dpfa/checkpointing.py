"""DPCheckpointedAttention: the DP attention release with activation checkpointing.

Activation checkpointing (``torch.utils.checkpoint``, non-reentrant) keeps only a segment's
inputs for backward and recomputes its forward (projections, capped and clipped attention,
noise, output projection) during backward. Two things must hold for that to be sound:

- **the recomputed forward must release the same value.** Each segment's noise is a function
  of a seed fixed before the segment first runs, so the recomputation reproduces it (the
  gradients of ``out_proj`` depend on the released value). ``secure_mode`` draws its noise
  from the OS CSPRNG, which cannot be replayed: it is refused here.
- **the recomputed forward must not be accounted again.** The privacy of the call is
  recorded once, from the stats of the first forward; the recomputation's stats are dropped.

Segments split the *batch*: every batch element is its own key/value store (DESIGN.md 1.2),
so a record lives in one segment, and by parallel composition the call costs what one
unsegmented call costs (the segments' events are the same: same shapes, same R). With a
``key_padding_mask`` the segments could see different R, so the call is then checkpointed as
one segment. Under the DP-SGD engine, checkpointing of any model works the same way: the
collector recognises forwards that run inside backward (``dpfa.training.collector``).
"""

from __future__ import annotations

import secrets
import torch
from torch.utils.checkpoint import checkpoint

from dpfa import _validate
from dpfa.attention import DPFlashAttention
from dpfa.errors import PrivacyParameterError

__all__ = ["DPCheckpointedAttention"]


class DPCheckpointedAttention(DPFlashAttention):
    """:class:`~dpfa.DPFlashAttention` whose forward is checkpointed in ``segments`` batch segments.

    Same constructor (``embed_dim, num_heads, ...``, keyword-only ``epsilon``, ``delta``, ...)
    plus ``checkpoint_gradients`` (False: an ordinary DPFlashAttention) and ``segments`` (>= 1).
    Privacy: identical to DPFlashAttention (one record of each batch element's store).
    """

    def __init__(self, *args, checkpoint_gradients: bool = True, segments: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint_gradients = bool(checkpoint_gradients)
        self.segments = _validate.count(segments, "segments")
        if self.checkpoint_gradients and self.privacy["secure_mode"]:
            raise PrivacyParameterError(
                "checkpoint_gradients=True recomputes the forward in backward, which must reproduce the released "
                "noise; secure_mode draws it from the OS CSPRNG, which cannot be replayed. Use one of them.")

    def _attend(self, query, key, value, key_padding_mask, is_causal, seed):
        if not (self.checkpoint_gradients and torch.is_grad_enabled()):
            return super()._attend(query, key, value, key_padding_mask, is_causal, seed)
        if seed is None:
            seed = secrets.randbits(62)  # fixed now, so that the recomputation releases the same noise
        bdim = 0 if self.batch_first else 1
        B = query.shape[bdim]
        n = 1 if key_padding_mask is not None else min(self.segments, max(B, 1))
        chunks = [torch.tensor_split(x, n, dim=bdim) for x in (query, key, value)]
        masks = [key_padding_mask] if n == 1 else [None] * n
        first_stats: list = []
        outs = []
        for i in range(n):
            seg_seed = (seed + i) % (2**63)

            def run(q, k, v, _mask=masks[i], _seed=seg_seed, _box=[]):  # noqa: B006 (one box per segment)
                out, stats = DPFlashAttention._attend(self, q, k, v, _mask, is_causal, _seed)
                if not _box:  # the first forward; a recomputation in backward is not accounted
                    _box.append(stats)
                    first_stats.append(stats)
                return out

            outs.append(checkpoint(run, chunks[0][i], chunks[1][i], chunks[2][i], use_reentrant=False))
        stats = _merge(first_stats)
        return torch.cat(outs, dim=bdim), stats


def _merge(stats_list):
    """The stats of a segmented call: the segments hold disjoint stores (parallel composition), so the
    call costs what its costliest segment costs; without a padding mask they are all the same."""
    first = stats_list[0]
    for s in stats_list[1:]:
        if s.events != first.events or s.epsilon_spent != first.epsilon_spent:
            raise PrivacyParameterError("Internal: checkpoint segments released different events.")
    return first
