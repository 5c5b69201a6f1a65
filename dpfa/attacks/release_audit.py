"""Audit of the DP attention release: ``dp_flash_attn_func`` run on two neighbouring stores.

The worst case of the bound of DESIGN.md 1.2 is easy to build, so the audit can be tight.
One query row q = 10 e1, one head, softmax scale 1 and score cap b; the store has
``n_keys`` records. In D0 every record has key -10 e1 (score clamped to -b) and value
-3C e2 (clipped to -C e2), so O = -C e2. D1 replaces record 0 by key +10 e1 (score +b) and
value +3C e2 (clipped to +C e2), so record 0 has weight w_max = e^b / (e^b + (n-1) e^-b)
and O = -C e2 + 2 C w_max e2: the release moves by exactly its sensitivity 2 C w_max, along
one coordinate. Each batch element is its own store with its own noise, so one call with
B batch elements gives B independent releases; the statistic of a release is its e2
coordinate (a sufficient statistic: the two output laws differ only there).

The call's claim is (epsilon, delta) of its PrivacyStats (for the Laplace, pure DP). The
outputs go to the Split / Clopper-Pearson statistics of the mechanism audits (Jagielski,
Ullman & Oprea 2020): a wrong sensitivity (a cap or a clip not enforced, a w_max too
small), a wrong calibration or noise made at the wrong scale raises the lower bound
above the claim. On a GPU this audits the kernel's epilogue noise; on a CPU the torch
path of the same function (also under ``TRITON_INTERPRET=1``, where 10^5 kernel programs
would take half an hour; the kernel's noise law is tested against the same contract).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from dpfa import _validate
from dpfa.attacks.mechanism_audit import AuditResult, audit_samples
from dpfa.mechanisms import registry as mechanism_registry

__all__ = ["audit_attention_release"]


def _stores(batch: int, n_keys: int, head_dim: int, value_clip: float, device):
    """(q, (k0, v0), (k1, v1)): the neighbouring stores of the module docstring, ``batch`` copies."""
    e1 = torch.zeros(head_dim, device=device)
    e1[0] = 1.0
    e2 = torch.zeros(head_dim, device=device)
    e2[1] = 1.0
    q = (10.0 * e1).expand(batch, 1, 1, head_dim).contiguous()
    k0 = (-10.0 * e1).expand(batch, n_keys, 1, head_dim).contiguous()
    v0 = (-3.0 * value_clip * e2).expand(batch, n_keys, 1, head_dim).contiguous()
    k1, v1 = k0.clone(), v0.clone()
    k1[:, 0, 0] = 10.0 * e1
    v1[:, 0, 0] = 3.0 * value_clip * e2
    return q, (k0, v0), (k1, v1)


def audit_attention_release(mechanism="gaussian", epsilon: float = 1.0, delta: float = 1e-5, *,
                            n_samples: int = 400_000, seed: Optional[int] = 0, confidence: float = 0.95,
                            score_cap: float = 1.0, value_clip: float = 1.0, n_keys: int = 4, head_dim: int = 16,
                            chunk: int = 50_000, device="cpu", strategy=None,
                            name: Optional[str] = None) -> AuditResult:
    """Audit ``dpfa.dp_flash_attn_func`` at (epsilon, delta) on the worst-case pair (module docstring).

    ``n_samples`` releases per store, ``chunk`` batch elements per call. Returns an
    :class:`~dpfa.attacks.mechanism_audit.AuditResult`; ``scale`` is the noise scale of the
    release and ``details`` has the sensitivity and the shift actually measured without noise.
    """
    from dpfa.attention import dp_flash_attn_func
    from dpfa.kernels.flash_attention import reference_path

    mech = mechanism_registry.resolve(mechanism)
    n = _validate.count(n_samples, "n_samples", minimum=4)
    chunk = _validate.count(chunk, "chunk")
    n_keys = _validate.count(n_keys, "n_keys", minimum=2)
    opts = dict(delta=delta, mechanism=mech, value_clip=value_clip, score_cap=score_cap, softmax_scale=1.0)
    seeds = np.random.SeedSequence(seed).generate_state(2 * (-(-n // chunk)), dtype=np.uint64) >> np.uint64(1)
    seeds = iter(int(s) for s in seeds)

    def releases(neighbour: int):
        out, stats = [], None
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            q, *pair = _stores(m, n_keys, head_dim, value_clip, device)
            k, v = pair[neighbour]
            with torch.no_grad():
                o, stats = dp_flash_attn_func(q, k, v, epsilon=epsilon, seed=next(seeds), return_privacy_stats=True,
                                              **opts)
            out.append(o[:, 0, 0, 1].double().cpu().numpy())
        return np.concatenate(out), stats

    q, (k0, v0), (k1, v1) = _stores(1, n_keys, head_dim, value_clip, device)
    with reference_path(), torch.no_grad():  # on a CPU: the torch path, also under TRITON_INTERPRET=1
        x1, stats = releases(1)
        x0, _ = releases(0)
        clean = [dp_flash_attn_func(q, k, v, epsilon=float("inf"), **opts)[0, 0, 0, 1].item()
                 for k, v in ((k0, v0), (k1, v1))]
    res = audit_samples(x1, x0, stats.epsilon_spent, stats.delta_spent, confidence=confidence, strategy=strategy,
                        name=name or f"release[{mech.name}]", scale=stats.noise_scale_per_head[0])
    res.details.update({"sensitivity": stats.max_sensitivity, "measured_shift": clean[1] - clean[0],
                        "score_cap": score_cap, "value_clip": value_clip, "n_keys": n_keys})
    return res
