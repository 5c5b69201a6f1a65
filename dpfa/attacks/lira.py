"""The likelihood-ratio attack, LiRA (Carlini, Chien, Nasr, Song, Terzis & Tramer 2022).

"Membership Inference Attacks From First Principles" (IEEE S&P 2022). A global
threshold on the loss fails at low FPR because examples differ: some are hard (a
non-member's loss is large), some easy (a non-member's loss is already tiny). LiRA
calibrates per example. For an example (x, y) and a model f let

    phi(f, x, y) = log( p / (1 - p) ),   p = softmax(f(x))_y,

the logit-scaled confidence in the true label, which is close to Gaussian over the
randomness of training (:func:`logit_scaled_confidence` computes it from the logits as
z_y - logsumexp_{j != y} z_j, without forming p). Train N shadow models, each on a
random half of the data, so that each example is IN (trained on) for some shadows and
OUT for the others; fit for each example Gaussians to its phi over the IN shadows,
N(mu_in, s_in^2), and over the OUT shadows, N(mu_out, s_out^2). For the target model's
phi_t on the example:

- **online** LiRA (the paper's Algorithm 1) scores the likelihood ratio of the two
  hypotheses,

      score = log N(phi_t; mu_in, s_in^2) - log N(phi_t; mu_out, s_out^2);

- **offline** LiRA (needs only OUT shadows, so the shadows can be trained before the
  target's training set is known) is the one-sided test of "phi_t comes from the OUT
  Gaussian" against larger values: its p-value is 1 - Phi((phi_t - mu_out) / s_out), and
  the score is the standardised statistic (phi_t - mu_out) / s_out (the same ranking as
  the p-value, without the loss of resolution of Phi's tail).

With few shadow models the per-example variances are poor estimates; the paper then
uses one *global* variance for all examples (its "fixed variance" variant, recommended
below 64 shadow models). Here the global variance is the pooled within-example variance,
sum_i sum_{j in IN_i} (phi_ij - mu_in_i)^2 / sum_i (|IN_i| - 1) (the same for OUT), and
``global_variance=None`` picks it when there are fewer than :data:`GLOBAL_VARIANCE_BELOW`
shadow models. Several queries per example (the paper queries augmentations of x, e.g.
its mirror image): pass phi with a trailing dimension of Q queries; the Gaussians are
fitted per query and the score is the mean over queries (as in the paper's code).

The evaluation of the paper (:func:`lira_leave_one_out`): N models on random halves in
which every example is IN exactly N/2 times (:func:`lira_inclusion`); each model in turn
is the target and the other N - 1 are its shadows; the ROC pools all N x n decisions.
Results come as :class:`~dpfa.attacks.shadow.ScoreAttackResult` (a
:class:`~dpfa.attacks.membership.MembershipAttackResult`): ROC, AUC, TPR at 0.1% and 1%
FPR and the epsilon lower bound with Clopper-Pearson ends. The same caveat as for the
loss attack holds: the examples of one model are not independent runs of the training
algorithm, so the bound is an empirical estimate (the one-run audit of
:mod:`dpfa.attacks.one_run` is the certificate).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from dpfa import _validate
from dpfa.attacks.membership import DEFAULT_FPRS
from dpfa.attacks.shadow import (ScoreAttackResult, _as_array, _inclusion, membership_result_from_scores,
                                 train_shadow_models)
from dpfa.errors import PrivacyParameterError, ShapeError

__all__ = ["GLOBAL_VARIANCE_BELOW", "LiraRun", "logit_scaled_confidence", "lira_scores", "lira_attack",
           "lira_inclusion", "lira_leave_one_out", "run_lira"]

GLOBAL_VARIANCE_BELOW = 64
"""With fewer shadow models than this, ``global_variance=None`` uses one variance for all examples."""


def logit_scaled_confidence(logits, labels) -> np.ndarray:
    """phi = log(p_y / (1 - p_y)) with p = softmax(logits), as z_y - logsumexp_{j != y} z_j (float64, stable).

    ``logits``: (..., n, C) (torch or numpy), ``labels``: (n,) integer classes. Returns
    (..., n). For probabilities instead of logits pass their logarithm (log p is a valid
    logit vector of p). Finite even when p_y rounds to 0 or 1 in floating point.
    """
    z = torch.as_tensor(_as_array(logits), dtype=torch.float64)
    y = torch.as_tensor(_as_array(labels))
    if z.ndim < 2 or z.shape[-1] < 2:
        raise ShapeError(f"Expected logits of shape (..., n, C) with C >= 2, got shape {tuple(z.shape)}.")
    if y.ndim != 1 or y.shape[0] != z.shape[-2] or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ShapeError(f"Expected labels to be {z.shape[-2]} integer classes, got dtype {y.dtype}, shape "
                         f"{tuple(y.shape)}.")
    y = y.to(torch.int64)
    if ((y < 0) | (y >= z.shape[-1])).any():
        i = int(torch.nonzero((y < 0) | (y >= z.shape[-1]))[0, 0])
        raise ShapeError(f"labels[{i}]={int(y[i])} is not a class in [0, {z.shape[-1]}).")
    if not torch.isfinite(z).all():
        raise ShapeError("logits contain non-finite values.")
    idx = y.expand(*z.shape[:-1]).unsqueeze(-1)
    zy = z.gather(-1, idx).squeeze(-1)
    others = z.scatter(-1, idx, -math.inf)
    return (zy - torch.logsumexp(others, dim=-1)).numpy()


# ------------------------------------------------------------------ scores
def _phi(x, name: str, ndim: Sequence[int]) -> np.ndarray:
    arr = np.asarray(_as_array(x), dtype=np.float64)
    if arr.ndim not in ndim or arr.size == 0:
        raise ShapeError(f"Expected {name} to have {' or '.join(map(str, ndim))} dimensions, got shape {arr.shape}.")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = tuple(int(k) for k in np.unravel_index(int(np.flatnonzero(bad)[0]), arr.shape))
        raise ShapeError(f"{name} has {int(bad.sum())} non-finite values (first: {name}{list(i)}="
                         f"{float(arr[i])!r}).")
    return arr


def _gaussian_fit(phi: np.ndarray, mask: np.ndarray, global_variance: bool, min_std: float, which: str):
    """Per-example means (n, Q) and standard deviations ((n, Q), or (1, Q) when global) of phi over ``mask``."""
    counts = mask.sum(0)  # (n,)
    need = 1 if global_variance else 2
    short = counts < need
    if short.any():
        i = int(np.flatnonzero(short)[0])
        how = "with global_variance=True" if global_variance else "with per-example variances"
        raise ShapeError(f"Example {i} is {which} in {int(counts[i])} shadow models; LiRA {how} needs at least "
                         f"{need} per example ({int(short.sum())} examples have fewer). Train more shadow models "
                         f"(lira_inclusion balances IN and OUT).")
    w = mask[:, :, None].astype(np.float64)  # (N, n, 1)
    mu = (phi * w).sum(0) / counts[:, None]  # (n, Q)
    sq = (((phi - mu[None]) ** 2) * w).sum(0)  # (n, Q)
    if global_variance:
        dof = int((counts - 1).sum())
        if dof < 1:
            raise ShapeError(f"Cannot estimate the global {which} variance: every example is {which} in exactly one "
                             f"shadow model. Train more shadow models.")
        var = sq.sum(0, keepdims=True) / dof  # (1, Q)
    else:
        var = sq / (counts[:, None] - 1)
    return mu, np.maximum(np.sqrt(var), min_std)


def _log_normal_pdf(x, mu, sd):
    return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd) - 0.5 * math.log(2 * math.pi)


def lira_scores(target_phi, shadow_phi, shadow_in, *, online: bool = True, global_variance: Optional[bool] = None,
                min_std: float = 1e-6) -> np.ndarray:
    """LiRA's membership score of each example (higher = more likely a member; see the module docstring).

    ``target_phi``: (n,) or (n, Q) the target model's logit-scaled confidences;
    ``shadow_phi``: (N, n) or (N, n, Q) the shadow models'; ``shadow_in``: (N, n) bool,
    whether example i was in shadow model j's training set. ``online``: the likelihood
    ratio of the IN and OUT Gaussians; else the offline one-sided test against OUT only
    (the IN shadows are then not used). ``global_variance``: one pooled variance for all
    examples (None: when N < :data:`GLOBAL_VARIANCE_BELOW`). Standard deviations are
    floored at ``min_std``. Needs every example IN (online) and OUT in at least 1 shadow
    model (2 with per-example variances).
    """
    t = _phi(target_phi, "target_phi", (1, 2))
    s = _phi(shadow_phi, "shadow_phi", (2, 3))
    inc = _inclusion(shadow_in, "shadow_in")
    if s.ndim != t.ndim + 1 or s.shape[1:] != t.shape:
        raise ShapeError(f"shadow_phi has shape {s.shape}; with target_phi of shape {t.shape} it must be "
                         f"(n_shadow, {', '.join(map(str, t.shape))}).")
    if inc.shape != s.shape[:2]:
        raise ShapeError(f"Expected shadow_in to have shape {s.shape[:2]} (n_shadow, n_examples), got {inc.shape}.")
    min_std = _validate.positive(min_std, "min_std")
    if t.ndim == 1:
        t, s = t[:, None], s[:, :, None]
    if global_variance is None:
        global_variance = s.shape[0] < GLOBAL_VARIANCE_BELOW
    global_variance = bool(global_variance)
    mu_out, sd_out = _gaussian_fit(s, ~inc, global_variance, min_std, "OUT")
    if not online:
        return ((t - mu_out) / sd_out).mean(1)
    mu_in, sd_in = _gaussian_fit(s, inc, global_variance, min_std, "IN")
    return (_log_normal_pdf(t, mu_in, sd_in) - _log_normal_pdf(t, mu_out, sd_out)).mean(1)


def _name(online: bool) -> str:
    return "LiRA (online)" if online else "LiRA (offline)"


def lira_attack(target_phi, target_membership, shadow_phi, shadow_in, *, online: bool = True,
                global_variance: Optional[bool] = None, min_std: float = 1e-6, delta: float = 0.0,
                confidence: float = 0.95, fprs: Sequence[float] = DEFAULT_FPRS, strategy=None) -> ScoreAttackResult:
    """LiRA against one target model whose true membership ``target_membership`` (n,) is known (to evaluate).

    Scores with :func:`lira_scores` and reports ROC, AUC, TPR at ``fprs`` and the epsilon
    lower bound at ``confidence`` (:func:`~dpfa.attacks.shadow.membership_result_from_scores`).
    """
    scores = lira_scores(target_phi, shadow_phi, shadow_in, online=online, global_variance=global_variance,
                         min_std=min_std)
    m = _inclusion(target_membership, "target_membership")
    if m.shape != scores.shape:
        raise ShapeError(f"Expected target_membership to have shape {scores.shape}, got {m.shape}.")
    if m.all() or not m.any():
        raise ShapeError(f"target_membership must contain both members and non-members, got {int(m.sum())} of "
                         f"{m.size}.")
    return membership_result_from_scores(scores[m], scores[~m], attack=_name(online), delta=delta,
                                         confidence=confidence, fprs=fprs, strategy=strategy)


# ---------------------------------------------------------- the evaluation
def lira_inclusion(n_models: int, n_examples: int, seed: int = 0) -> np.ndarray:
    """(n_models, n_examples) masks in which every example is IN exactly floor(n_models / 2) models.

    As in the paper's code: rank uniform noise over the models for each example and keep
    the lowest half; each model then trains on about half of the examples.
    """
    n_models = _validate.count(n_models, "n_models", minimum=2)
    n = _validate.count(n_examples, "n_examples")
    rng = np.random.default_rng(_validate.count(seed, "seed", minimum=0))
    return rng.random((n_models, n)).argsort(0) < n_models // 2


def lira_leave_one_out(phi, inclusion, *, online: bool = True, global_variance: Optional[bool] = None,
                       targets: Optional[Sequence[int]] = None, min_std: float = 1e-6, delta: float = 0.0,
                       confidence: float = 0.95, fprs: Sequence[float] = DEFAULT_FPRS,
                       strategy=None) -> ScoreAttackResult:
    """The paper's evaluation: each model in turn is the target, the others its shadows; one pooled ROC.

    ``phi``: (N, n) or (N, n, Q) logit-scaled confidences of N models on n examples;
    ``inclusion``: (N, n) bool training-set masks. ``targets``: the models used as
    targets (default all). ``global_variance=None`` decides on the N - 1 shadows.
    """
    p = _phi(phi, "phi", (2, 3))
    inc = _inclusion(inclusion, "inclusion")
    if inc.shape != p.shape[:2]:
        raise ShapeError(f"Expected inclusion to have shape {p.shape[:2]} (n_models, n_examples), got {inc.shape}.")
    n_models = p.shape[0]
    if n_models < 3:
        raise PrivacyParameterError(f"Leave-one-out LiRA needs at least 3 models (a target and 2 shadows), got "
                                    f"{n_models}.")
    ts = range(n_models) if targets is None else targets
    members, nonmembers = [], []
    for t in ts:
        t = _validate.count(t, "targets", minimum=0)
        if t >= n_models:
            raise PrivacyParameterError(f"targets contains {t}, not a model index in [0, {n_models}).")
        others = np.arange(n_models) != t
        sc = lira_scores(p[t], p[others], inc[others], online=online, global_variance=global_variance,
                         min_std=min_std)
        members.append(sc[inc[t]])
        nonmembers.append(sc[~inc[t]])
    if not members:
        raise PrivacyParameterError("targets is empty.")
    return membership_result_from_scores(np.concatenate(members), np.concatenate(nonmembers), attack=_name(online),
                                         delta=delta, confidence=confidence, fprs=fprs, strategy=strategy)


@dataclasses.dataclass(frozen=True)
class LiraRun:
    """What :func:`run_lira` trained and found: ``phi`` (N, n[, Q]), ``inclusion`` (N, n), both attacks' results."""

    phi: np.ndarray
    inclusion: np.ndarray
    online: ScoreAttackResult
    offline: ScoreAttackResult

    def to_dict(self, roc: bool = False) -> dict:
        return {"n_models": int(self.inclusion.shape[0]), "n_examples": int(self.inclusion.shape[1]),
                "online": self.online.to_dict(roc=roc), "offline": self.offline.to_dict(roc=roc)}

    def __str__(self) -> str:
        return f"{self.online}\n{self.offline}"


def run_lira(train_fn: Callable, score_fn: Callable, data: Any, n_examples: int, *, n_models: int = 16,
             seed: int = 0, n_jobs: int = 1, progress: bool = True, global_variance: Optional[bool] = None,
             min_std: float = 1e-6, delta: float = 0.0, confidence: float = 0.95,
             fprs: Sequence[float] = DEFAULT_FPRS, strategy=None) -> LiraRun:
    """Train ``n_models`` models on random halves of ``n_examples`` examples and run online and offline LiRA.

    ``train_fn(indices) -> model`` trains on the examples ``indices`` of ``data``;
    ``score_fn(model, data) -> (n_examples,)`` or ``(n_examples, Q)`` logit-scaled
    confidences (:func:`logit_scaled_confidence`). Masks from :func:`lira_inclusion`
    (``seed``), training by :func:`~dpfa.attacks.shadow.train_shadow_models` (``n_jobs``
    processes, a progress bar, model i seeded from (seed, i)), evaluation by
    :func:`lira_leave_one_out`.
    """
    inc = lira_inclusion(n_models, n_examples, seed)
    phi = train_shadow_models(train_fn, score_fn, data, inc, seed=seed, n_jobs=n_jobs, progress=progress,
                              desc="LiRA models")
    if phi.ndim not in (2, 3):
        raise ShapeError(f"score_fn must return (n_examples,) or (n_examples, Q) confidences, got per-model shape "
                         f"{phi.shape[1:]}.")
    kw = dict(global_variance=global_variance, min_std=min_std, delta=delta, confidence=confidence, fprs=fprs,
              strategy=strategy)
    return LiraRun(phi=phi, inclusion=inc, online=lira_leave_one_out(phi, inc, online=True, **kw),
                   offline=lira_leave_one_out(phi, inc, online=False, **kw))
