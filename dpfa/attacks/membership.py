"""The loss-threshold membership-inference attack (Yeom, Giacomelli, Fredrikson & Jha 2018).

A model f trained on a set S is queried on an example z = (x, y); the attack guesses
"member" (z in S) iff the loss is small:

    A_tau(z) = 1[ loss(f(x), y) <= tau ].

Yeom et al. ("Privacy Risk in Machine Learning: Analyzing the Connection to
Overfitting", CSF 2018) take tau = the mean training loss; sweeping tau over all values
gives the attack's ROC curve (TPR = fraction of members flagged, FPR = fraction of
non-members flagged), its AUC, and its TPR at a low FPR, the number that Carlini et al.
("Membership Inference Attacks From First Principles", S&P 2022) argue matters (an
attack that is confident on a few examples). Here the ROC comes from
``sklearn.metrics.roc_curve`` on the score -loss, and TPR at FPR f is the largest TPR of
a ROC point with FPR <= f (no interpolation, so it is never optimistic).

Epsilon lower bound. If the training algorithm is (epsilon, delta)-DP with respect to
one example, every test of membership satisfies TPR <= e^epsilon FPR + delta (and the
complementary inequality; Kairouz, Oh & Viswanath 2015; Yeom et al. Thm 1 for the
advantage), so a point (FPR, TPR) of the ROC proves

    epsilon >= log((TPR - delta) / FPR).

:func:`loss_threshold_attack` computes it at the best ROC point with one-sided
Clopper-Pearson ends (:mod:`dpfa.attacks.bounds`) at 95% by default. The best point is
chosen on the same losses, so each end is taken at significance alpha / (n_members +
n_nonmembers), which covers every threshold at once (the :class:`~dpfa.attacks.thresholds.
Bonferroni` strategy; pass ``strategy=Split(...)`` to choose on one half and bound on the
other). Caveat: the binomial model treats the examples as independent trials of the
membership game; the examples of ONE training run are not independent runs of the
mechanism, so for one model this bound is an empirical estimate, not a certificate (the
one-run audit of Steinke, Nasr & Jagielski 2023 is the rigorous version).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Sequence

import numpy as np
import torch

from dpfa import _validate
from dpfa.attacks.bounds import _confidence
from dpfa.attacks.thresholds import Bonferroni, ScoreBound, epsilon_lower_bound_from_scores
from dpfa.errors import PrivacyParameterError, ShapeError

__all__ = ["MembershipAttackResult", "loss_threshold_attack", "tpr_at_fpr", "per_example_losses"]

DEFAULT_FPRS = (0.001, 0.01)


@dataclasses.dataclass(frozen=True)
class MembershipAttackResult:
    """ROC of the loss-threshold attack and what it proves.

    ``fpr``, ``tpr``: the ROC curve (increasing FPR); ``loss_thresholds[i]``: the attack
    flags "member" iff loss <= loss_thresholds[i] at that point (the first is -inf: flag
    nothing). ``auc``: area under the ROC. ``tpr_at_fpr``: {f: largest TPR with FPR <= f}.
    ``epsilon_lower_bound``: log((tpr_lo - delta) / fpr_hi) at the best point (0 if none
    proves anything), valid with probability ``confidence`` under the trial model of the
    module docstring; ``bound`` carries that point's counts, rates and intervals.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    loss_thresholds: np.ndarray
    auc: float
    tpr_at_fpr: Dict[float, float]
    epsilon_lower_bound: float
    confidence: float
    delta: float
    bound: ScoreBound
    n_members: int
    n_nonmembers: int

    @property
    def best_point(self) -> tuple:
        """(FPR, TPR) of the region that gives the epsilon bound."""
        return self.bound.bound.fpr, self.bound.bound.tpr

    def to_dict(self, roc: bool = True) -> dict:
        out = {
            "auc": self.auc,
            "tpr_at_fpr": {str(k): v for k, v in self.tpr_at_fpr.items()},
            "epsilon_lower_bound": self.epsilon_lower_bound, "confidence": self.confidence, "delta": self.delta,
            "best_point": {"fpr": self.best_point[0], "tpr": self.best_point[1],
                           "loss_threshold": -self.bound.threshold, **self.bound.to_dict()},
            "n_members": self.n_members, "n_nonmembers": self.n_nonmembers,
        }
        if roc:
            out["roc"] = {"fpr": self.fpr.tolist(), "tpr": self.tpr.tolist(),
                          "loss_thresholds": [float(t) if math.isfinite(t) else str(t) for t in self.loss_thresholds]}
        return out

    def __str__(self) -> str:
        lows = ", ".join(f"TPR {v:.3%} at FPR {k:.1%}" for k, v in self.tpr_at_fpr.items())
        return (f"loss-threshold attack ({self.n_members} members, {self.n_nonmembers} non-members): AUC "
                f"{self.auc:.4f}; {lows}; epsilon >= {self.epsilon_lower_bound:.4g} at {self.confidence:.0%} "
                f"(delta {self.delta:g}, best point FPR {self.best_point[0]:.4g}, TPR {self.best_point[1]:.4g})")


def _losses(x, name: str, what: str = "losses") -> np.ndarray:
    """``x`` as a non-empty 1-D float64 array of finite per-example ``what``, or a ShapeError."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to(torch.float64).cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ShapeError(f"Expected {name} to be a non-empty 1-D array of per-example {what}, got shape {arr.shape}.")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ShapeError(f"{name} has {int(bad.sum())} non-finite {what} (first: {name}[{i}]={float(arr[i])!r}).")
    return arr


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Largest TPR among ROC points with FPR <= ``target`` (0 if there is none)."""
    ok = fpr <= target
    return float(tpr[ok].max()) if ok.any() else 0.0


def loss_threshold_attack(member_losses, nonmember_losses, *, delta: float = 0.0, confidence: float = 0.95,
                          fprs: Sequence[float] = DEFAULT_FPRS, strategy=None) -> MembershipAttackResult:
    """The loss-threshold attack of Yeom et al. 2018 on per-example losses (see the module docstring).

    ``member_losses``: losses of the training examples; ``nonmember_losses``: of held-out
    examples from the same distribution. Returns the ROC (sklearn's ``roc_curve`` on
    -loss), the AUC, the TPR at each FPR in ``fprs`` (default 0.1% and 1%), and the
    epsilon lower bound from the best (FPR, TPR) point with Clopper-Pearson ends at
    ``confidence`` (``strategy`` default: :class:`Bonferroni` over every threshold).
    """
    members = _losses(member_losses, "member_losses")
    nonmembers = _losses(nonmember_losses, "nonmember_losses")
    conf = _confidence(confidence)
    delta = _validate.delta(delta, allow_zero=True)
    targets = []
    for f in fprs:
        v = _validate._real("fprs", f, "(0, 1)")
        if not 0.0 < v < 1.0:
            raise PrivacyParameterError(f"Expected every FPR in fprs to lie in (0, 1), got {f!r}.")
        targets.append(v)

    from sklearn import metrics  # imported here: sklearn takes most of a second to import

    labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    scores = -np.concatenate([members, nonmembers])  # higher score = more likely a member
    fpr, tpr, thr = metrics.roc_curve(labels, scores, drop_intermediate=False)
    auc = float(metrics.auc(fpr, tpr))
    bound = epsilon_lower_bound_from_scores(-members, -nonmembers, delta, conf,
                                            Bonferroni(max_thresholds=None) if strategy is None else strategy,
                                            two_sided=False)
    return MembershipAttackResult(
        fpr=fpr, tpr=tpr, loss_thresholds=-thr, auc=auc,
        tpr_at_fpr={f: tpr_at_fpr(fpr, tpr, f) for f in targets},
        epsilon_lower_bound=bound.epsilon, confidence=conf, delta=delta, bound=bound,
        n_members=int(members.size), n_nonmembers=int(nonmembers.size),
    )


@torch.no_grad()
def _float64(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


def stable_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """-log softmax(z)_y = softplus(logsumexp_{j != y} z_j - z_y), per example, in float64.

    The usual logsumexp(z) - z_y rounds to exactly 0 once the other classes' mass is below
    the float's epsilon (gaps of ~17 in float32, ~37 in float64); this form stays positive
    down to e^-745, so confident examples keep distinct losses.
    """
    z = logits.double()
    z_y = z.gather(1, targets.long().view(-1, 1))
    others = z.scatter(1, targets.long().view(-1, 1), float("-inf"))
    loss = torch.nn.functional.softplus(torch.logsumexp(others, dim=1, keepdim=True) - z_y).squeeze(1)
    return loss if reduction == "none" else getattr(loss, reduction)()


def per_example_losses(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                       loss_fn=stable_cross_entropy, batch_size: int = 1024) -> np.ndarray:
    """loss_fn(model(x_i), y_i) for every example, in eval mode, as a float64 array.

    ``loss_fn`` must accept ``reduction="none"`` (every torch.nn.functional loss does).
    The model's train/eval mode is restored afterwards. Floating-point outputs are upcast to
    float64, and the default loss is :func:`stable_cross_entropy`: the usual cross-entropy of
    a confident example rounds to exactly 0, and such ties sit where a membership attack looks.
    """
    batch_size = _validate.count(batch_size, "batch_size")
    if inputs.shape[0] != targets.shape[0]:
        raise ShapeError(f"inputs has {inputs.shape[0]} examples but targets has {targets.shape[0]}.")
    was_training = model.training
    model.eval()
    try:
        out = [loss_fn(_float64(model(inputs[s:s + batch_size])), targets[s:s + batch_size], reduction="none")
               for s in range(0, inputs.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out).to(torch.float64).cpu().numpy() if out else np.zeros(0)
