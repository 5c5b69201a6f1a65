"""Shadow models and the shadow-model membership-inference attack (Shokri et al. 2017).

Shokri, Stronati, Song & Shmatikov ("Membership Inference Attacks Against Machine
Learning Models", IEEE S&P 2017) attack a target model f trained on a set S without
access to S: the attacker trains k *shadow* models f_1..f_k, each on a part of its own
data drawn from the same distribution, so that for every shadow model it knows which
examples were members. Shadow j is trained on D_j^in and evaluated on D_j^in and on
D_j^out (disjoint, same size; the parts of different shadows are disjoint too). Its
outputs label an attack training set

    { (features(f_j(x), y), 1) : (x, y) in D_j^in } u { (features(f_j(x), y), 0) : (x, y) in D_j^out },

on which an *attack classifier* h (any scikit-learn classifier) learns to tell members
from non-members. Applied to the target model's outputs, h(features(f(x), y)) in [0, 1]
is the attack's membership score. Two feature maps:

- ``"per_class"`` (Shokri et al.): the output vector f(x) as it is, and one attack
  classifier per true label y (the output of a model on its members differs by class);
- ``"sorted"`` (Salem et al. 2019, "ML-Leaks"): the output vector sorted in decreasing
  order, optionally its ``top_k`` largest entries, one classifier for all labels. It
  needs no label and transfers between classes with few examples.

The score is turned into a ROC curve, AUC, TPR at low FPR and an epsilon lower bound
by :func:`dpfa.attacks.membership.loss_threshold_attack`'s machinery (on the negated
score), so every membership attack of dpfa reports the same numbers
(:class:`ScoreAttackResult`, a :class:`~dpfa.attacks.membership.MembershipAttackResult`).

The shadow models are trained by :func:`train_shadow_models`, which :mod:`dpfa.attacks.lira`
uses too: any ``train_fn(indices) -> model`` and ``score_fn(model, data) -> per-example
outputs``, one model per row of an inclusion mask, in parallel processes if asked.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import random
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dpfa import _validate
from dpfa.attacks.bounds import _confidence
from dpfa.attacks.membership import DEFAULT_FPRS, MembershipAttackResult, _losses, loss_threshold_attack
from dpfa.errors import PrivacyParameterError, ShapeError

__all__ = ["ScoreAttackResult", "membership_result_from_scores", "train_shadow_models", "model_seeds",
           "disjoint_shadow_splits", "attack_features", "shadow_attack", "shadow_model_attack", "FEATURES"]

FEATURES = ("sorted", "per_class")


# ------------------------------------------------------------------ results
@dataclasses.dataclass(frozen=True)
class ScoreAttackResult(MembershipAttackResult):
    """A :class:`~dpfa.attacks.membership.MembershipAttackResult` of an attack that scores examples.

    The attack flags "member" iff its score is >= a threshold (higher = more likely a
    member). The fields are those of the loss-threshold attack run on loss = -score, so
    ``loss_thresholds`` are the negated score thresholds (:attr:`score_thresholds` gives
    them the right way round). ``attack`` names the attack ("lira (online)", "shadow
    models (sorted)", ...).
    """

    attack: str = "score"

    @property
    def score_thresholds(self) -> np.ndarray:
        """Point i of the ROC flags "member" iff score >= score_thresholds[i] (the first is +inf)."""
        return -self.loss_thresholds

    def to_dict(self, roc: bool = True) -> dict:
        return {"attack": self.attack, **super().to_dict(roc=roc)}

    def __str__(self) -> str:
        text, prefix = super().__str__(), "loss-threshold attack"
        return self.attack + text[len(prefix):] if text.startswith(prefix) else f"{self.attack}: {text}"


def _finite_scores(x, name: str) -> np.ndarray:
    return _losses(x, name, "attack scores")


def membership_result_from_scores(member_scores, nonmember_scores, *, attack: str = "score", delta: float = 0.0,
                                  confidence: float = 0.95, fprs: Sequence[float] = DEFAULT_FPRS,
                                  strategy=None) -> ScoreAttackResult:
    """ROC, AUC, TPR at each FPR in ``fprs`` and the epsilon lower bound of a membership score.

    ``member_scores`` (of examples in the training set) and ``nonmember_scores``: higher
    means "more likely a member". The numbers are those of
    :func:`~dpfa.attacks.membership.loss_threshold_attack` on loss = -score (sklearn's ROC,
    TPR at FPR f = the best ROC point with FPR <= f, Clopper-Pearson ends at
    ``confidence``, by default Bonferroni over every threshold).
    """
    members = _finite_scores(member_scores, "member_scores")
    nonmembers = _finite_scores(nonmember_scores, "nonmember_scores")
    res = loss_threshold_attack(-members, -nonmembers, delta=delta, confidence=confidence, fprs=fprs,
                                strategy=strategy)
    fields = {f.name: getattr(res, f.name) for f in dataclasses.fields(MembershipAttackResult)}
    return ScoreAttackResult(**fields, attack=str(attack))


# ------------------------------------------------------------ shadow training
def model_seeds(seed: int, n_models: int) -> np.ndarray:
    """One 62-bit seed per model, from ``numpy.random.SeedSequence(seed).spawn(n_models)``.

    Model i's seed depends only on (seed, i), so the models are the same whether they are
    trained one after the other or in parallel, and in any order.
    """
    seed = _validate.count(seed, "seed", minimum=0)
    n_models = _validate.count(n_models, "n_models")
    return np.array([int(s.generate_state(1, dtype=np.uint64)[0] >> np.uint64(2))
                     for s in np.random.SeedSequence(seed).spawn(n_models)], dtype=np.int64)


@contextlib.contextmanager
def _seeded_global_rngs(seed: int):
    """Seed the global generators of torch, numpy and ``random`` in the block; restore them after it."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _as_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _train_and_score(train_fn: Callable, score_fn: Callable, data: Any, indices: np.ndarray, seed: int):
    """Train one model on ``indices`` with the global generators seeded by ``seed``; its outputs on ``data``."""
    with _seeded_global_rngs(int(seed)):
        model = train_fn(indices)
        return _as_array(score_fn(model, data))


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _inclusion(mask, name: str = "inclusion") -> np.ndarray:
    arr = _as_array(mask)
    if arr.dtype != np.bool_:
        if arr.dtype.kind not in "iu" or not np.isin(arr, (0, 1)).all():
            raise ShapeError(f"Expected {name} to be a boolean mask (or of 0s and 1s), got dtype {arr.dtype}.")
        arr = arr.astype(bool)
    return arr


def train_shadow_models(train_fn: Callable, score_fn: Callable, data: Any, inclusion, *, seed: int = 0,
                        n_jobs: int = 1, progress: bool = True, desc: str = "shadow models",
                        mp_context: Optional[str] = "spawn") -> np.ndarray:
    """Train one model per row of ``inclusion`` and stack its per-example outputs: shape (n_models, n_examples, ...).

    Model i is ``train_fn(np.flatnonzero(inclusion[i]))`` (the indices of its training
    examples in ``data``), run with the global generators of torch, numpy and ``random``
    seeded by :func:`model_seeds` ``(seed, n_models)[i]`` (and restored afterwards), so
    the result does not depend on ``n_jobs``. Its row of the result is
    ``score_fn(model, data)``: one output per example of ``data`` (``inclusion.shape[1]``
    of them; a torch tensor or anything numpy can read), e.g. the logit-scaled confidence
    of :func:`dpfa.attacks.lira.logit_scaled_confidence` or a probability vector.

    ``n_jobs > 1`` trains in that many processes (``concurrent.futures.ProcessPoolExecutor``,
    start method ``mp_context``, each with ``os.cpu_count() // n_jobs`` torch threads):
    ``train_fn``, ``score_fn`` and ``data`` must then be picklable, i.e. functions defined
    at the top level of an importable module, not lambdas or closures. A tqdm bar counts
    the trained models (``progress=False`` hides it).
    """
    inc = _inclusion(inclusion)
    if inc.ndim != 2 or inc.shape[0] < 1 or inc.shape[1] < 1:
        raise ShapeError(f"Expected inclusion to have shape (n_models, n_examples), got shape {inc.shape}.")
    n_jobs = _validate.count(n_jobs, "n_jobs")
    if not callable(train_fn) or not callable(score_fn):
        raise PrivacyParameterError(f"Expected callables train_fn and score_fn, got {train_fn!r} and {score_fn!r}.")
    n_models, n = inc.shape
    seeds = model_seeds(seed, n_models)
    jobs = [(np.flatnonzero(inc[i]), int(seeds[i])) for i in range(n_models)]
    outputs: list = [None] * n_models
    with tqdm(total=n_models, desc=desc, unit="model", disable=not progress, leave=False) as bar:
        if n_jobs == 1:
            for i, (idx, s) in enumerate(jobs):
                outputs[i] = _train_and_score(train_fn, score_fn, data, idx, s)
                bar.update(1)
        else:
            ctx = multiprocessing.get_context(mp_context) if mp_context else None
            threads = max(1, (os.cpu_count() or 1) // n_jobs)
            with concurrent.futures.ProcessPoolExecutor(max_workers=min(n_jobs, n_models), mp_context=ctx,
                                                        initializer=_init_worker, initargs=(threads,)) as pool:
                futures = {pool.submit(_train_and_score, train_fn, score_fn, data, idx, s): i
                           for i, (idx, s) in enumerate(jobs)}
                for fut in concurrent.futures.as_completed(futures):
                    outputs[futures[fut]] = fut.result()
                    bar.update(1)
    for i, out in enumerate(outputs):
        if out.ndim < 1 or out.shape[0] != n:
            raise ShapeError(f"score_fn returned shape {out.shape} for model {i}; expected one output per example "
                             f"of data (leading dimension {n}).")
        if out.shape != outputs[0].shape:
            raise ShapeError(f"score_fn returned shape {out.shape} for model {i} but {outputs[0].shape} for model 0.")
    return np.stack(outputs).astype(np.float64)


def disjoint_shadow_splits(n_examples: int, n_shadow: int, seed: int = 0):
    """Shokri et al.'s data split: ``n_shadow`` disjoint parts of a random permutation, each halved into in/out.

    Returns boolean masks ``(members, nonmembers)`` of shape (n_shadow, n_examples):
    shadow j trains on ``members[j]`` and is evaluated on ``members[j]`` and
    ``nonmembers[j]``; the parts of different shadows are disjoint, each has
    ``n_examples // n_shadow`` examples (the remainder is unused) split ``ceil``/``floor``
    between in and out.
    """
    n = _validate.count(n_examples, "n_examples", minimum=2)
    k = _validate.count(n_shadow, "n_shadow")
    if n // k < 2:
        raise PrivacyParameterError(f"n_examples={n} is too few for n_shadow={k} disjoint parts of at least 2 "
                                    f"examples (one in, one out).")
    perm = np.random.default_rng(_validate.count(seed, "seed", minimum=0)).permutation(n)
    size = n // k
    members = np.zeros((k, n), dtype=bool)
    nonmembers = np.zeros((k, n), dtype=bool)
    for j in range(k):
        part = perm[j * size:(j + 1) * size]
        half = (size + 1) // 2
        members[j, part[:half]] = True
        nonmembers[j, part[half:]] = True
    return members, nonmembers


# --------------------------------------------------------------- the attack
def _outputs(x, name: str) -> np.ndarray:
    arr = np.asarray(_as_array(x), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] < 2:
        raise ShapeError(f"Expected {name} to have shape (n_examples, n_classes) with n_classes >= 2, got shape "
                         f"{arr.shape}.")
    if not np.isfinite(arr).all():
        i = int(np.flatnonzero(~np.isfinite(arr).all(1))[0])
        raise ShapeError(f"{name} has non-finite outputs (first in row {i}).")
    return arr


def _labels(y, n: int, n_classes: int, name: str) -> np.ndarray:
    arr = _as_array(y)
    if arr.shape != (n,) or arr.dtype.kind not in "iu":
        raise ShapeError(f"Expected {name} to be {n} integer class labels, got dtype {arr.dtype}, shape {arr.shape}.")
    bad = (arr < 0) | (arr >= n_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ShapeError(f"{name}[{i}]={int(arr[i])} is not a class in [0, {n_classes}).")
    return arr.astype(np.int64)


def _membership(m, n: int, name: str) -> np.ndarray:
    arr = _inclusion(m, name)
    if arr.shape != (n,):
        raise ShapeError(f"Expected {name} to have shape ({n},), got {arr.shape}.")
    if arr.all() or not arr.any():
        raise ShapeError(f"{name} must contain both members and non-members, got {int(arr.sum())} members of {n}.")
    return arr


def attack_features(outputs, features: str = "sorted", top_k: Optional[int] = None) -> np.ndarray:
    """The attack classifier's input for each row of ``outputs`` (n_examples, n_classes).

    ``"sorted"``: the row sorted in decreasing order, its first ``top_k`` entries (None:
    all); ``"per_class"``: the row unchanged (the classifier is chosen by the label).
    """
    out = _outputs(outputs, "outputs")
    _validate.choice(features, "features", FEATURES)
    if features == "per_class":
        return out
    s = -np.sort(-out, axis=1)
    if top_k is not None:
        top_k = _validate.count(top_k, "top_k")
        if top_k > s.shape[1]:
            raise PrivacyParameterError(f"top_k={top_k} exceeds the number of classes ({s.shape[1]}).")
        s = s[:, :top_k]
    return s


def _default_classifier(seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=seed)


def shadow_attack(shadow_outputs, shadow_labels, shadow_membership, target_outputs, target_labels,
                  target_membership, *, features: str = "sorted", top_k: Optional[int] = None, classifier=None,
                  seed: int = 0, delta: float = 0.0, confidence: float = 0.95,
                  fprs: Sequence[float] = DEFAULT_FPRS, strategy=None) -> ScoreAttackResult:
    """Shokri et al.'s attack on outputs already computed (see the module docstring).

    ``shadow_outputs`` (N, C): the shadow models' output vectors (e.g. softmax
    probabilities) on their own in and out examples, stacked; ``shadow_labels`` (N,) the
    true labels; ``shadow_membership`` (N,) whether the example was in its shadow model's
    training set. The attack classifier (``classifier``: an unfitted scikit-learn
    classifier, cloned per class for ``features="per_class"``; default a
    HistGradientBoostingClassifier) is fitted on :func:`attack_features` of those rows,
    then scores the target model's outputs ``target_outputs`` (M, C) with the probability
    of "member". ``target_membership`` (M,) is the truth, used only to evaluate: ROC, AUC,
    TPR at ``fprs``, epsilon lower bound at ``confidence`` (:func:`membership_result_from_scores`).
    """
    from sklearn.base import clone

    s_out = _outputs(shadow_outputs, "shadow_outputs")
    t_out = _outputs(target_outputs, "target_outputs")
    if s_out.shape[1] != t_out.shape[1]:
        raise ShapeError(f"shadow_outputs has {s_out.shape[1]} classes but target_outputs has {t_out.shape[1]}.")
    n_classes = s_out.shape[1]
    s_y = _labels(shadow_labels, s_out.shape[0], n_classes, "shadow_labels")
    t_y = _labels(target_labels, t_out.shape[0], n_classes, "target_labels")
    s_m = _membership(shadow_membership, s_out.shape[0], "shadow_membership")
    t_m = _membership(target_membership, t_out.shape[0], "target_membership")
    _validate.choice(features, "features", FEATURES)
    seed = _validate.count(seed, "seed", minimum=0)
    _confidence(confidence)
    base = _default_classifier(seed) if classifier is None else classifier
    if not (hasattr(base, "fit") and hasattr(base, "predict_proba")):
        raise PrivacyParameterError(f"Expected a scikit-learn classifier with fit and predict_proba, got {base!r}.")
    s_x = attack_features(s_out, features, top_k)
    t_x = attack_features(t_out, features, top_k)

    def fit_score(rows, target_rows, what):
        y = s_m[rows].astype(np.int64)
        if y.min() == y.max():
            raise ShapeError(f"The shadow data of {what} has only {'members' if y[0] else 'non-members'} "
                             f"({y.size} examples); the attack classifier needs both.")
        h = clone(base).fit(s_x[rows], y)
        col = int(np.flatnonzero(np.asarray(h.classes_) == 1)[0])
        return h.predict_proba(t_x[target_rows])[:, col]

    scores = np.empty(t_out.shape[0])
    if features == "sorted":
        scores[:] = fit_score(np.arange(s_out.shape[0]), np.arange(t_out.shape[0]), "all classes")
        name = "shadow models (sorted" + (f", top {top_k})" if top_k else ")")
    else:
        for c in np.unique(t_y):
            rows = np.flatnonzero(s_y == c)
            if rows.size == 0:
                raise ShapeError(f"No shadow example has label {int(c)}, which the target examples have; "
                                 f"per-class attack models need shadow data of every class (or use features='sorted').")
            target_rows = np.flatnonzero(t_y == c)
            scores[target_rows] = fit_score(rows, target_rows, f"class {int(c)}")
        name = "shadow models (per class)"
    return membership_result_from_scores(scores[t_m], scores[~t_m], attack=name, delta=delta, confidence=confidence,
                                         fprs=fprs, strategy=strategy)


def shadow_model_attack(train_fn: Callable, output_fn: Callable, data: Any, labels, target_outputs, target_labels,
                        target_membership, *, n_shadow: int = 4, seed: int = 0, n_jobs: int = 1,
                        progress: bool = True, features: str = "sorted", top_k: Optional[int] = None,
                        classifier=None, delta: float = 0.0, confidence: float = 0.95,
                        fprs: Sequence[float] = DEFAULT_FPRS, strategy=None) -> ScoreAttackResult:
    """The whole attack: train ``n_shadow`` shadow models on disjoint splits of ``data``, then attack the target.

    ``data``: the attacker's own examples (same distribution as the target's, disjoint
    from them); ``labels`` (len(data),) their classes. :func:`disjoint_shadow_splits`
    gives each shadow a disjoint part, half in, half out; :func:`train_shadow_models`
    trains them (``train_fn(indices) -> model``, ``output_fn(model, data) -> (len(data),
    C)`` output vectors; ``n_jobs`` processes, a progress bar); :func:`shadow_attack`
    fits the attack classifier and scores ``target_outputs`` (the target model's output
    vectors on examples with labels ``target_labels`` and membership ``target_membership``).
    """
    seed = _validate.count(seed, "seed", minimum=0)
    y = _as_array(labels)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ShapeError(f"Expected labels to be a 1-D array of integer classes, got dtype {y.dtype}, shape {y.shape}.")
    members, nonmembers = disjoint_shadow_splits(y.shape[0], n_shadow, seed)
    outputs = train_shadow_models(train_fn, output_fn, data, members, seed=seed, n_jobs=n_jobs, progress=progress,
                                  desc="shadow models")
    if outputs.ndim != 3:
        raise ShapeError(f"output_fn must return (n_examples, n_classes) output vectors, got per-model shape "
                         f"{outputs.shape[1:]}.")
    rows_out, rows_y, rows_m = [], [], []
    for j in range(members.shape[0]):
        for mask, is_member in ((members[j], True), (nonmembers[j], False)):
            idx = np.flatnonzero(mask)
            rows_out.append(outputs[j, idx])
            rows_y.append(y[idx])
            rows_m.append(np.full(idx.size, is_member))
    return shadow_attack(np.concatenate(rows_out), np.concatenate(rows_y), np.concatenate(rows_m), target_outputs,
                         target_labels, target_membership, features=features, top_k=top_k, classifier=classifier,
                         seed=seed, delta=delta, confidence=confidence, fprs=fprs, strategy=strategy)
