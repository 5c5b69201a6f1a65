"""Audit of the DP-SGD noise: the optimizer's own noise path, run on two neighbouring datasets.

One DP-SGD step on a dataset of one example, with Poisson sampling at rate q = 1 (a
batch of size 1 out of 1), releases

    g = (clip_C(grad(x)) + Z) / E[B],    Z ~ mechanism(scale = z C),

and on the neighbouring empty dataset g = Z / E[B] (add/remove neighbours: the example is
removed). The engine calibrates z for (epsilon, delta) through its accountant, so the
claim is the epsilon its accountant reports after that one step. This module builds
exactly that: a :class:`~dpfa.PrivacyEngine` with ``target_epsilon``, a one-example
dataset whose gradient is 10 C along one coordinate (so clipping must cut it to C), one
real forward/backward and clipping through the optimizer, which gives the norm v of the
clipped sum in the mechanism's norm (the sensitivity the code actually enforces). Then
many calls of the optimizer's noise step (``DPOptimizer._add_noise``, the function that
adds noise to the clipped sum in training) with the clipped sum set to 0 (D0: the
optimizer's own empty sum) or to v (D1) on every coordinate of a weight of ``chunk``
coordinates: each coordinate is one release of the one-coordinate test (the noise is
i.i.d. across coordinates; the audit assumes that as a black box, as
:func:`~dpfa.attacks.mechanism_audit.audit_mechanism` does).

The outputs go to the same Split / Clopper-Pearson statistics as the mechanism audits
(Jagielski, Ullman & Oprea 2020; Nasr et al. 2021): a noise multiplier that is used at
half its accounted value, a clipping that lets more than C through, or an accountant
that under-reports the step, all raise the lower bound above the claim.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from dpfa import _validate
from dpfa.attacks.mechanism_audit import AuditResult, audit_samples
from dpfa.attacks.thresholds import Split
from dpfa.errors import PrivacyParameterError

__all__ = ["audit_dpsgd_noise", "GRADIENT_FACTOR"]

#: the example's gradient is GRADIENT_FACTOR * C along one coordinate: clipping must cut it to C
GRADIENT_FACTOR = 10.0


def audit_dpsgd_noise(mechanism: str = "gaussian", epsilon: float = 1.0, delta: float = 1e-5,
                      max_grad_norm: float = 1.0, *, accountant: str = "prv", n_samples: int = 500_000,
                      seed: Optional[int] = 0, confidence: float = 0.95, chunk: int = 1 << 17,
                      strategy=None, name: Optional[str] = None) -> AuditResult:
    """Audit one DP-SGD step of the engine (see the module docstring) at a target (epsilon, delta).

    ``mechanism``: an engine mechanism ("gaussian", L2 clipping, or "laplace", L1
    clipping). ``n_samples`` releases per dataset, drawn ``chunk`` coordinates per call of
    the optimizer's noise step. Returns an :class:`~dpfa.attacks.mechanism_audit.AuditResult`
    whose ``claimed_epsilon`` is the engine's epsilon after the step and whose ``scale``
    is z C; ``details`` has the noise multiplier, the clipped value and the accountant.
    """
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from dpfa.training import PrivacyEngine

    epsilon = _validate.epsilon(epsilon)
    delta = _validate.delta(delta)
    max_grad_norm = _validate.positive(max_grad_norm, "max_grad_norm")
    n = _validate.count(n_samples, "n_samples", minimum=4)
    chunk = _validate.count(chunk, "chunk", minimum=1)
    if seed is not None:
        seed = _validate.count(seed, "seed", minimum=0)
    engine_seed = int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint64)[0] >> np.uint64(2))
    m = min(chunk, n)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(engine_seed)  # the module's initial weights (irrelevant to the release, but repeatable)
        module = nn.Linear(m, 1, bias=False)
    x = torch.zeros(1, m)
    x[0, 0] = GRADIENT_FACTOR * max_grad_norm  # d(sum of outputs)/d weight = x: norm 10 C in L1 and L2
    loader = DataLoader(TensorDataset(x), batch_size=1)
    engine = PrivacyEngine(accountant=accountant, mechanism=mechanism, seed=engine_seed)
    module, opt, _ = engine.make_private(module, torch.optim.SGD(module.parameters(), lr=0.0), loader,
                                         target_epsilon=epsilon, target_delta=delta, epochs=1,
                                         max_grad_norm=max_grad_norm)
    if engine.sample_rate != 1.0:
        raise PrivacyParameterError(f"Expected sampling rate 1 for the one-example audit, got {engine.sample_rate}.")
    (weight,) = opt.params

    # One real step's clipping: the clipped sum of the one example, as the optimizer computes it.
    module(x).sum().backward()
    opt._accumulate()
    clipped = opt.summed[weight].detach().clone()
    opt.summed = {}
    opt.zero_grad()
    # The distance between the two neighbouring sums, in the mechanism's norm (L2, or L1 for the Laplace),
    # is the sensitivity the code actually enforces; D1 puts it along one axis, the worst case for an
    # isotropic Gaussian (every direction is the same) and for the Laplace (all of the L1 norm in one axis).
    value = float(clipped.abs().sum() if opt.norm == "l1" else clipped.norm())
    opt.after_step()  # the engine accounts the step, as after a real optimizer.step()
    claimed = engine.get_epsilon(delta)

    def releases(summed_value: Optional[float]) -> np.ndarray:
        out = np.empty(n, dtype=np.float64)
        for s in range(0, n, m):
            k = min(m, n - s)
            opt.summed = {} if summed_value is None else {weight: torch.full_like(weight, summed_value)}
            opt._add_noise()  # the optimizer's noise step: grad = (clipped sum + noise) / E[B]
            out[s:s + k] = weight.grad.detach().flatten()[:k].to(torch.float64).numpy()
        return out

    y0 = releases(None)  # the empty dataset: the optimizer's own zero sum
    y1 = releases(value)
    opt.summed = {}
    weight.grad = None
    label = name or f"dpsgd[{engine.mechanism.name}]"
    strategy = Split(seed=seed) if strategy is None else strategy
    res = audit_samples(y1, y0, claimed, delta, confidence=confidence, strategy=strategy, name=label,
                        scale=opt.noise_multiplier * max_grad_norm)
    res.details.update({"path": "DPOptimizer._add_noise", "noise_multiplier": opt.noise_multiplier,
                        "max_grad_norm": max_grad_norm, "clipped_value": value,
                        "clipped_first_coordinate": float(clipped.flatten()[0]),
                        "accountant": engine.accountant.name, "target_epsilon": epsilon,
                        "expected_batch_size": opt.expected_batch_size, "seed": seed})
    if not math.isfinite(claimed):
        res.details["note"] = "the engine claims epsilon = inf (no noise)"
    return res
