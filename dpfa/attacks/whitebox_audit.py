"""White-box audit of the DP-SGD engine with a gradient canary (Nasr et al. 2023).

Nasr, Hayes, Steinke, Balle, Tramer, Jagielski, Carlini & Terzis (USENIX Security 2023),
"Tight auditing of differentially private machine learning": an adversary who sees every
intermediate model and may choose the canary's *gradient* makes DP-SGD's privacy claim
tight. The canary's gradient is a Dirac on one coordinate j, of norm C (so clipping keeps
it whole), and every other example's gradient is 0 on j. With full batches (q = 1) the
update of coordinate j at step t, times the expected batch size, is then

    o_t = C [canary in] + sigma C N_t,          N_t ~ N(0, 1) i.i.d.,

and the T observations' sufficient statistic S = sum_t o_t is N(T C, T sigma^2 C^2) with
the canary and N(0, T sigma^2 C^2) without: exactly the Gaussian trade-off of
mu = sqrt(T) / sigma (Dong, Roth & Su 2022), which is also the accountant's claim for T
full-batch Gaussian steps (its RDP alpha T / (2 sigma^2) is the mu-GDP curve). So the
audit estimates mu from many trials, mu_hat = (mean S_in - mean S_out) / pooled std, and
compares it to the mu of the engine's own ledger: an engine that adds less noise than it
accounts (a noise multiplier halved in the optimizer, say) shows mu_hat well above the
claim.

Vectorised: a weight of ``trials`` + 1 coordinates; in the "in" world the batch holds
``trials`` canaries, canary j a Dirac on coordinate j (its input is C e_j for a linear
layer whose loss is the sum of its outputs), plus one other example on the last coordinate
(0 on every canary coordinate); the "out" world holds that other example alone. The noise
is independent across coordinates, so coordinate j is one trial of the one-canary audit,
and ``trials`` trials cost one real step of dpfa's PrivacyEngine / DPOptimizer per step
(forward, backward, per-example clipping, noise, the wrapped SGD step).

Confidence interval: the standard error of Cohen's d,
sqrt(1/n_in + 1/n_out + mu^2 / (2 (n_in + n_out))) (Hedges & Olkin 1985), at a normal
quantile; S is exactly Gaussian here, so the approximation is only in the variance
estimate. A violation is a lower confidence bound above the claimed mu.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from scipy import stats

from dpfa import _validate
from dpfa.errors import PrivacyParameterError, UnsupportedEventError

__all__ = ["WhiteBoxAuditResult", "audit_dpsgd_whitebox", "empirical_mu", "accountant_mu"]

_GAUSSIAN_CURVES = ("gaussian", "discrete_gaussian")


@dataclasses.dataclass(frozen=True)
class WhiteBoxAuditResult:
    """The empirical GDP mu of the canary's updates against the accountant's mu."""

    mu_hat: float
    ci_low: float
    ci_high: float
    mu_claimed: float
    steps: int
    trials: int
    confidence: float
    details: Dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def ratio(self) -> float:
        """mu_hat / mu_claimed: about 1 for a tight, correct engine."""
        return self.mu_hat / self.mu_claimed if self.mu_claimed > 0 else math.inf

    @property
    def violation(self) -> bool:
        """The lower confidence bound on mu is above the claim: the engine leaks more than it accounts."""
        return self.ci_low > self.mu_claimed

    def within(self, rel_tol: float) -> bool:
        """|mu_hat / mu_claimed - 1| <= rel_tol."""
        return abs(self.ratio - 1.0) <= rel_tol


def empirical_mu(scores_in, scores_out, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mu_hat, low, high): mean difference over the pooled std, with a normal-approximation interval."""
    a = np.asarray(scores_in, dtype=np.float64).ravel()
    b = np.asarray(scores_out, dtype=np.float64).ravel()
    if a.size < 2 or b.size < 2:
        raise PrivacyParameterError(f"Expected at least 2 scores per world, got {a.size} and {b.size}.")
    if not (0.0 < confidence < 1.0):
        raise PrivacyParameterError(f"Expected confidence={confidence!r} in (0, 1).")
    pooled = math.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2))
    mu = float((a.mean() - b.mean()) / pooled)
    se = math.sqrt(1.0 / a.size + 1.0 / b.size + mu * mu / (2.0 * (a.size + b.size)))
    z = float(stats.norm.ppf(0.5 + confidence / 2.0))
    return mu, mu - z * se, mu + z * se


def accountant_mu(accountant) -> float:
    """mu of a ledger of full-batch Gaussian-curve releases: sqrt(sum_e count_e (Delta_e / z_e)^2).

    Delta = 1 (add/remove) or 2 (replace-one), in units of C. Only sample_rate = 1 events of
    the Gaussian or discrete Gaussian (whose RDP curve is the Gaussian's) are mu-GDP as such;
    anything else raises UnsupportedEventError.
    """
    total = 0.0
    for e in accountant.history:
        if e.mechanism not in _GAUSSIAN_CURVES or e.sample_rate != 1.0:
            raise UnsupportedEventError(
                f"accountant_mu needs full-batch (sample_rate=1) Gaussian or discrete Gaussian events, got {e!r}.")
        if e.noise_multiplier == 0:
            return math.inf
        sens = 2.0 if e.neighboring == "replace_one" else 1.0
        total += e.count * (sens / e.noise_multiplier) ** 2
    return math.sqrt(total)


def _run_world(with_canaries: bool, trials: int, steps: int, noise_multiplier: float, max_grad_norm: float,
               engine_kwargs: Dict[str, Any], tamper: Optional[Callable]):
    """``steps`` real DP-SGD steps; returns (steps, trials) observations o_t and the engine."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from dpfa.training import PrivacyEngine

    n_canaries = trials if with_canaries else 0
    x = torch.zeros(n_canaries + 1, trials + 1)
    idx = torch.arange(n_canaries)
    x[idx, idx] = max_grad_norm  # canary j: gradient C e_j (the loss is the sum of the outputs)
    x[-1, trials] = max_grad_norm  # another example, 0 on every canary coordinate
    module = nn.Linear(trials + 1, 1, bias=False)
    with torch.no_grad():
        module.weight.zero_()
    loader = DataLoader(TensorDataset(x), batch_size=x.shape[0])  # q = 1: the full batch at every step
    engine = PrivacyEngine(**engine_kwargs)
    module, opt, loader = engine.make_private(module, torch.optim.SGD(module.parameters(), lr=1.0), loader,
                                              noise_multiplier=noise_multiplier, target_delta=1e-5,
                                              max_grad_norm=max_grad_norm, loss_reduction="sum")
    if engine.sample_rate != 1.0:
        raise PrivacyParameterError(f"Expected sampling rate 1, got {engine.sample_rate}.")
    if tamper is not None:
        tamper(engine, opt)
    (weight,) = opt.params
    obs = np.empty((steps, trials), dtype=np.float64)
    t = 0
    while t < steps:
        for (batch,) in loader:
            if t == steps:
                break
            before = weight.detach().to(torch.float64).clone()
            opt.zero_grad()
            module(batch).sum().backward()
            opt.step()
            update = before - weight.detach().to(torch.float64)  # lr = 1: the released gradient
            obs[t] = (update[0, :trials] * opt.expected_batch_size).numpy()
            t += 1
    return obs, engine


def audit_dpsgd_whitebox(noise_multiplier: float = 2.5, steps: int = 25, trials: int = 2000,
                         max_grad_norm: float = 1.0, *, engine_kwargs: Optional[Dict[str, Any]] = None,
                         tamper: Optional[Callable[[Any, Any], None]] = None, confidence: float = 0.95,
                         seed: Optional[int] = 0) -> WhiteBoxAuditResult:
    """Audit ``steps`` full-batch DP-SGD steps of :class:`~dpfa.PrivacyEngine` with gradient canaries.

    ``engine_kwargs`` go to ``PrivacyEngine(...)`` (e.g. ``{"secure_mode": True}``); without
    ``secure_mode`` and ``seed`` the engines get seeds derived from ``seed`` (repeatable;
    ``seed=None``: the OS CSPRNG). ``tamper(engine, optimizer)`` runs after ``make_private``
    in both worlds: fault injection for tests (halve ``optimizer.noise_multiplier`` and the
    audit must report a violation). The claim is :func:`accountant_mu` of the canary world's
    ledger after the steps. Returns a :class:`WhiteBoxAuditResult`.
    """
    noise_multiplier = _validate.positive(noise_multiplier, "noise_multiplier")
    max_grad_norm = _validate.positive(max_grad_norm, "max_grad_norm")
    steps = _validate.count(steps, "steps")
    trials = _validate.count(trials, "trials", minimum=2)
    kwargs = dict(engine_kwargs or {})
    seeds = [None, None]
    if seed is not None and not kwargs.get("secure_mode", False) and "seed" not in kwargs:
        seeds = [int(s >> 2) for s in np.random.SeedSequence(_validate.count(seed, "seed", minimum=0))
                 .generate_state(2, dtype=np.uint64)]
    obs_in, engine = _run_world(True, trials, steps, noise_multiplier, max_grad_norm,
                                {**kwargs, **({"seed": seeds[0]} if seeds[0] is not None else {})}, tamper)
    obs_out, _ = _run_world(False, trials, steps, noise_multiplier, max_grad_norm,
                            {**kwargs, **({"seed": seeds[1]} if seeds[1] is not None else {})}, tamper)
    mu, lo, hi = empirical_mu(obs_in.sum(axis=0), obs_out.sum(axis=0), confidence)
    claimed = accountant_mu(engine.accountant)
    details = {"noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm,
               "accountant": engine.accountant.name, "mechanism": engine.mechanism.name,
               "mean_update_in": float(obs_in.mean()), "std_update_out": float(obs_out.std()),
               "epsilon_claimed_1e-5": engine.get_epsilon(1e-5), "engine_kwargs": kwargs}
    return WhiteBoxAuditResult(mu_hat=mu, ci_low=lo, ci_high=hi, mu_claimed=claimed, steps=steps, trials=trials,
                               confidence=confidence, details=details)
