"""The membership-inference audit of DP-SGD: ``dpfa audit`` and ``experiments/configs/audit.toml`` (issue 7 item 5).

For each claimed epsilon (``inf`` = no noise and no clipping: the non-private model),
dpfa's DP-SGD (:class:`dpfa.PrivacyEngine`, Poisson sampling, flat clipping, Gaussian
noise calibrated by the accountant) trains small MLPs on scikit-learn's handwritten
digits (``sklearn.datasets.load_digits``: 1797 8x8 images that ship inside the wheel, no
download), and three instruments try to break the claim:

- **LiRA** (:mod:`dpfa.attacks.lira`): N models, each on a random half of ``lira.n_examples``
  digits (every digit IN exactly N/2 models, :func:`~dpfa.attacks.lira.lira_inclusion`);
  each model in turn is the target and the other N - 1 its shadows (online and offline,
  :func:`~dpfa.attacks.lira.lira_leave_one_out`); AUC, TPR at 0.1% and 1% FPR and the
  epsilon estimate of the best ROC point (Clopper-Pearson, Bonferroni over thresholds) on
  the pooled N x n decisions. Those decisions are not independent training runs, so the
  epsilon is an estimate, not a certificate.
- **the loss-threshold attack** (:func:`~dpfa.attacks.membership.loss_threshold_attack`) on
  the same N x n decisions: a global threshold on the cross-entropy.
- **a one-run audit** (:func:`~dpfa.attacks.one_run.one_run_audit`, Steinke, Nasr &
  Jagielski 2023): ``one_run.canaries`` digits with a wrong label (the true label plus a
  uniform shift in 1..9, mod 10), each put into the training set by a fair coin, next to
  ``one_run.clean_examples`` correctly labelled digits that are always in; one training
  run; the canaries scored by their logit-scaled confidence (the ranking of minus their
  loss); a lower bound on epsilon that holds with probability ``confidence`` over the
  coins. This is the certificate.

Every model of one epsilon uses the same noise multiplier, calibrated (``train.accountant``)
for the largest sampling rate among them (the smallest training set), so each run spends
at most the claimed epsilon at ``train.delta``; what each spent is recorded. Models are
trained in ``jobs`` processes (:func:`~dpfa.attacks.shadow.train_shadow_models`); model i
is seeded from (seed, i), so the numbers do not depend on ``jobs``.

Results: ``OUT_DIR/NAME.json`` (the config, the environment, the git commit, the device,
the seeds, every number of every cell) and ``OUT_DIR/NAME.md`` (the table). A cell (one
epsilon) that is already in the JSON with the same configuration is not recomputed, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import numbers
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from dpfa._results import git_state as _git, jsonable as _jsonable, read_toml, write_atomic as _write  # noqa: F401
from dpfa.errors import ConfigError, DPFAError

__all__ = ["ModelConfig", "TrainConfig", "LiraConfig", "OneRunConfig", "AuditConfig", "QUICK", "load_config",
           "config_from_dict", "parse_epsilons", "epsilon_key", "run_audit", "run_cell", "AuditRun",
           "markdown_table", "train_model", "build_mlp", "load_digits_tensors", "read_toml", "ROC_FPR_GRID",
           "OPTIMIZERS"]

OPTIMIZERS = ("adam", "sgd")
DIGITS = 1797  # examples in sklearn's load_digits
N_CLASSES = 10
N_FEATURES = 64
ROC_FPR_GRID = tuple(float(f) for f in np.logspace(-4, 0, 41))
"""FPRs at which the JSON keeps each ROC curve (log-spaced, for figures on log axes)."""


# ----------------------------------------------------------------- validation
def _int(value, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"Expected {key} to be an integer >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ConfigError(f"Expected {key}={value!r} to be an integer >= {minimum}.")
    return int(value)


def _float(value, key: str, low: float, high: float, *, low_open: bool = True, high_open: bool = True) -> float:
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"Expected {key} to be a number in {interval}, got {value!r}.")
    v = float(value)
    ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if math.isnan(v) or not ok:
        raise ConfigError(f"Expected {key}={value!r} in {interval}.")
    return v


def _choice(value, key: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ConfigError(f"Unknown {key}={value!r}; expected one of {', '.join(map(repr, allowed))}.")
    return value


def parse_epsilons(value, key: str = "epsilons") -> Tuple[float, ...]:
    """Claimed epsilons: numbers > 0 or inf (also the string "inf"), no repeats; a string is split at commas."""
    items = [p.strip() for p in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ConfigError(f"Expected {key} to be a non-empty list of epsilons (numbers > 0 or inf), got {value!r}.")
    out: List[float] = []
    for item in items:
        eps = item
        if isinstance(item, str):
            try:
                eps = float(item)
            except ValueError:
                eps = None
        ok = (isinstance(eps, numbers.Real) and not isinstance(eps, bool) and not math.isnan(eps) and eps > 0)
        if not ok:
            raise ConfigError(f"Expected every epsilon in {key} to be a number > 0 or inf, got {item!r}.")
        eps = float(eps)
        if eps in out:
            raise ConfigError(f"{key} lists epsilon={epsilon_key(eps)} twice.")
        out.append(eps)
    return tuple(out)


def epsilon_key(epsilon: float) -> str:
    """The name of an epsilon's cell in the JSON: "inf", "8", "0.5"."""
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


# --------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The target and shadow models: an MLP on a digit's 64 pixels (scaled to [0, 1]), ReLUs, 10 logits."""

    hidden: Tuple[int, ...] = (512,)  # one wide hidden layer: enough capacity to memorise mislabeled digits

    def __post_init__(self):
        h = self.hidden
        if not isinstance(h, (list, tuple)) or not h:
            raise ConfigError(f"Expected model.hidden to be a non-empty list of layer widths, got {h!r}.")
        object.__setattr__(self, "hidden", tuple(_int(w, "a width in model.hidden", 1) for w in h))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run, private or not: the same optimizer, steps and Poisson batches for every epsilon."""

    steps: int = 800  # ~110 epochs of the ~900 digits of a LiRA model: the non-private model overfits
    batch_size: int = 128  # expected (Poisson) batch size; sampling rate batch_size / training-set size
    optimizer: str = "adam"  # or "sgd" (momentum 0.9)
    lr: float = 3e-3
    max_grad_norm: float = 1.0  # per-example clipping norm C (not used at epsilon = inf: no clipping)
    delta: float = 1e-5  # below 1 / (training-set size) for every run
    accountant: str = "prv"  # the tight accountant: a loose one would make the claim easy to meet

    def __post_init__(self):
        from dpfa import accountants

        object.__setattr__(self, "steps", _int(self.steps, "train.steps", 1))
        object.__setattr__(self, "batch_size", _int(self.batch_size, "train.batch_size", 1))
        _choice(self.optimizer, "train.optimizer", OPTIMIZERS)
        object.__setattr__(self, "lr", _float(self.lr, "train.lr", 0.0, math.inf))
        object.__setattr__(self, "max_grad_norm", _float(self.max_grad_norm, "train.max_grad_norm", 0.0, math.inf))
        object.__setattr__(self, "delta", _float(self.delta, "train.delta", 0.0, 1.0))
        _choice(self.accountant, "train.accountant", tuple(accountants.names()))


@dataclasses.dataclass(frozen=True)
class LiraConfig:
    """LiRA's models: ``num_shadow_models`` on random halves of ``n_examples`` digits."""

    num_shadow_models: int = 32  # below 64 LiRA fits one global variance (Carlini et al.'s advice)
    n_examples: int = DIGITS

    def __post_init__(self):
        object.__setattr__(self, "num_shadow_models", _int(self.num_shadow_models, "lira.num_shadow_models", 4))
        n = _int(self.n_examples, "lira.n_examples", 8)
        if n > DIGITS:
            raise ConfigError(f"Expected lira.n_examples={n} to be at most the {DIGITS} digits of load_digits.")
        object.__setattr__(self, "n_examples", n)


@dataclasses.dataclass(frozen=True)
class OneRunConfig:
    """The one-run audit's data: ``canaries`` mislabeled digits (each in w.p. 1/2) and ``clean_examples`` others."""

    canaries: int = 1000
    clean_examples: int = 797  # the rest of the 1797 digits, always in the training set

    def __post_init__(self):
        m = _int(self.canaries, "one_run.canaries", 2)
        c = _int(self.clean_examples, "one_run.clean_examples", 1)
        if m + c > DIGITS:
            raise ConfigError(f"one_run.canaries + one_run.clean_examples = {m} + {c} = {m + c} exceeds the {DIGITS} "
                              f"digits of load_digits (canaries and clean digits are disjoint).")
        object.__setattr__(self, "canaries", m)
        object.__setattr__(self, "clean_examples", c)


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """The whole audit. ``jobs``: training processes (0: one per CPU core); it does not change any number."""

    epsilons: Tuple[float, ...] = (math.inf, 8.0, 3.0, 1.0)
    seed: int = 0
    confidence: float = 0.95
    jobs: int = 0
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    lira: LiraConfig = LiraConfig()
    one_run: OneRunConfig = OneRunConfig()

    def __post_init__(self):
        object.__setattr__(self, "epsilons", parse_epsilons(self.epsilons))
        object.__setattr__(self, "seed", _int(self.seed, "seed", 0))
        object.__setattr__(self, "confidence", _float(self.confidence, "confidence", 0.0, 1.0))
        object.__setattr__(self, "jobs", _int(self.jobs, "jobs", 0))
        smallest = min(self.lira.n_examples // 2, self.one_run.clean_examples)
        if self.train.batch_size > smallest:
            raise ConfigError(
                f"train.batch_size={self.train.batch_size} is larger than the smallest training set (about "
                f"{smallest}: half of lira.n_examples, or one_run.clean_examples); the sampling rate batch_size / "
                f"size must stay below 1.")

    @property
    def n_jobs(self) -> int:
        return self.jobs or (os.cpu_count() or 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["epsilons"] = [epsilon_key(e) if math.isinf(e) else e for e in self.epsilons]
        d["model"]["hidden"] = list(self.model.hidden)
        return d

    def cell_key(self) -> dict:
        """What a cell's numbers depend on (everything but the list of epsilons and ``jobs``), JSON-normalised."""
        d = self.to_dict()
        del d["epsilons"], d["jobs"]
        return json.loads(json.dumps(d))


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "lira": LiraConfig, "one_run": OneRunConfig}
TOP_KEYS = ("epsilons", "seed", "confidence", "jobs")

QUICK: Dict[str, Any] = {
    "epsilons": [math.inf, 2.0],
    "model": {"hidden": [32]},
    "train": {"steps": 30, "batch_size": 32, "lr": 0.01, "accountant": "rdp"},
    "lira": {"num_shadow_models": 4, "n_examples": 160},
    "one_run": {"canaries": 100, "clean_examples": 100},
}
"""``--quick``, when the config file has no ``[quick]`` table: a few seconds, for smoke tests (RDP: the fast
accountant; its claims hold but are looser)."""


def _merge(base: dict, over: Mapping, where: str) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping):
            if k not in SECTIONS:
                raise ConfigError(f"Unknown table [{where}{k}]; expected one of "
                                  f"{', '.join(f'[{where}{s}]' for s in SECTIONS)}.")
            cur = out.get(k, {})
            if not isinstance(cur, Mapping):
                raise ConfigError(f"Expected {k} to be a table, got {cur!r}.")
            out[k] = {**cur, **v}
        else:
            out[k] = v
    return out


def config_from_dict(data: Mapping, source: str = "config", quick: bool = False) -> AuditConfig:
    """An :class:`AuditConfig` from parsed TOML; ``quick`` applies its ``[quick]`` table (else :data:`QUICK`).

    Unknown keys and tables, wrong types and out-of-range values raise :class:`ConfigError`
    naming ``source``, the key and the value. A bad ``[quick]`` table is an error even
    without ``quick``.
    """
    try:
        return _config_from_dict(data, quick)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _config_from_dict(data: Mapping, quick: bool) -> AuditConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"Expected a table of settings, got {data!r}.")
    data = dict(data)
    quick_table = data.pop("quick", None)
    if quick_table is not None and not isinstance(quick_table, Mapping):
        raise ConfigError(f"Expected [quick] to be a table of overrides, got {quick_table!r}.")
    if quick:
        data = _merge(data, QUICK if quick_table is None else quick_table, "quick.")
    elif quick_table is not None:
        _config_from_dict(_merge(data, quick_table, "quick."), False)  # a bad [quick] table fails now, not later
    kwargs: Dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            cls = SECTIONS[key]
            if not isinstance(value, Mapping):
                raise ConfigError(f"Expected [{key}] to be a table, got {key}={value!r}.")
            names = [f.name for f in dataclasses.fields(cls)]
            for k in value:
                if k not in names:
                    raise ConfigError(f"Unknown key {key}.{k}; [{key}] takes {', '.join(names)}.")
            kwargs[key] = cls(**value)
        elif key in TOP_KEYS:
            kwargs[key] = value
        else:
            raise ConfigError(f"Unknown key {key!r}; expected one of "
                              f"{', '.join(TOP_KEYS + tuple(f'[{s}]' for s in SECTIONS) + ('[quick]',))}.")
    return AuditConfig(**kwargs)


def load_config(path=None, *, quick: bool = False, epsilons=None, num_shadow_models: Optional[int] = None,
                jobs: Optional[int] = None) -> AuditConfig:
    """Read a TOML config (None: the defaults of :class:`AuditConfig`), then apply the command line's overrides."""
    data = {} if path is None else read_toml(path)
    source = "defaults" if path is None else str(Path(path))
    cfg = config_from_dict(data, source, quick=quick)
    changes: Dict[str, Any] = {}
    if epsilons is not None:
        changes["epsilons"] = parse_epsilons(epsilons, "--epsilons")
    if jobs is not None:
        changes["jobs"] = _int(jobs, "--jobs", 0)
    if num_shadow_models is not None:
        changes["lira"] = dataclasses.replace(cfg.lira, num_shadow_models=_int(num_shadow_models,
                                                                              "--num-shadow-models", 4))
    return dataclasses.replace(cfg, **changes) if changes else cfg


# ----------------------------------------------------------------- training
def load_digits_tensors() -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits as (x float32 in [0, 1], shape (1797, 64); y int64 in 0..9)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DPFAError("The audit needs scikit-learn (its load_digits data ships inside the wheel): "
                        "pip install scikit-learn.") from None
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


def build_mlp(hidden: Sequence[int], in_features: int = N_FEATURES, n_classes: int = N_CLASSES) -> torch.nn.Module:
    layers: List[torch.nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    layers.append(torch.nn.Linear(width, n_classes))
    return torch.nn.Sequential(*layers)


def _optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)


def train_model(x: torch.Tensor, y: torch.Tensor, model_cfg: ModelConfig, cfg: TrainConfig,
                noise_multiplier: Optional[float], *, progress: bool = False, desc: str = "training"):
    """Train an MLP on (x, y) for ``cfg.steps`` steps of Poisson batches; returns (model, engine or None).

    ``noise_multiplier=None``: non-private (no clipping, no noise; the mean loss of each
    batch, the same optimizer and batches). Otherwise dpfa's DP-SGD with that noise
    multiplier, flat clipping at ``cfg.max_grad_norm``, ``cfg.accountant`` recording the
    steps. Randomness (initialisation, batches, noise) comes from torch's global
    generator, which the caller seeds.
    """
    from dpfa.training import PrivacyEngine
    from dpfa.training.data_loader import PoissonBatchSampler

    n = int(y.shape[0])
    if cfg.batch_size > n:
        raise ConfigError(f"train.batch_size={cfg.batch_size} is larger than a training set of {n} examples.")
    model = build_mlp(model_cfg.hidden, x.shape[1])
    opt = _optimizer(model.parameters(), cfg)
    seed = int(torch.randint(0, 2**62, ()).item())  # the run's sampling and noise seed, from the seeded global RNG
    loss_fn = torch.nn.functional.cross_entropy
    bar = tqdm(total=cfg.steps, desc=desc, unit="step", disable=not progress, leave=False)
    if noise_multiplier is None:
        g = torch.Generator().manual_seed(seed)
        for idx in PoissonBatchSampler(n, cfg.batch_size / n, g, steps=cfg.steps):
            opt.zero_grad()
            if idx:
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()  # an empty batch carries no gradient: nothing to step on
            bar.update(1)
        bar.close()
        return model, None
    engine = PrivacyEngine(accountant=cfg.accountant, seed=seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=cfg.batch_size)
    model, opt, loader = engine.make_private(model, opt, loader, noise_multiplier=noise_multiplier,
                                             target_delta=cfg.delta, max_grad_norm=cfg.max_grad_norm)
    while engine.steps < cfg.steps:
        for bx, by in loader:
            opt.zero_grad()
            if len(bx):
                loss_fn(model(bx), by).backward()
            opt.step()  # also on an empty batch: its noise is part of the guarantee
            bar.update(1)
            if engine.steps >= cfg.steps:
                break
    bar.close()
    return model, engine


@dataclasses.dataclass(frozen=True)
class _Trainer:
    """``train_fn`` of :func:`~dpfa.attacks.shadow.train_shadow_models`: picklable, so it runs in worker processes."""

    x: torch.Tensor
    y: torch.Tensor
    model: ModelConfig
    train: TrainConfig
    noise_multiplier: Optional[float]

    def __call__(self, indices) -> torch.nn.Module:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return train_model(self.x[idx], self.y[idx], self.model, self.train, self.noise_multiplier)[0]


@torch.no_grad()
def _logits(model: torch.nn.Module, data) -> np.ndarray:
    """``score_fn``: the model's logits on every example of ``data`` = (x, y), float64 (n, classes)."""
    model.eval()
    return model(data[0]).to(torch.float64).numpy()


def _cross_entropy(phi: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy -log p_y from the logit-scaled confidence phi = log(p_y / (1 - p_y)).

    -log p_y = log(1 + e^-phi) = softplus(-phi), exact in float64 down to losses of 1e-300.
    A loss computed in the model's float32 (or as logsumexp(z) - z_y) rounds to exactly 0 once
    the margin passes ~17 (float32) and ties the most confident examples, which is where a
    membership attack looks; the ranking by this loss is the ranking by phi.
    """
    return np.logaddexp(0.0, -phi)


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------- one cell
def _seeds(seed: int) -> dict:
    """The seed of every random choice of a cell; the same in every cell (only the noise differs between them)."""
    return {"data_split": seed, "canary_labels": seed + 1, "canary_coins": seed + 2, "one_run_model": seed + 3,
            "lira_inclusion": seed + 4, "lira_models": seed + 5, "guess_ties": seed + 6}


def _attack_dict(res) -> dict:
    from dpfa.attacks.membership import tpr_at_fpr

    out = res.to_dict(roc=False)
    out["roc"] = {"fpr": list(ROC_FPR_GRID), "tpr": [tpr_at_fpr(res.fpr, res.tpr, f) for f in ROC_FPR_GRID]}
    return out


def run_cell(config: AuditConfig, epsilon: float, *, data=None, progress: bool = True) -> dict:
    """Train and attack the models of one claimed ``epsilon`` (inf: non-private); every number as a dict.

    Warnings raised in this process (e.g. an accountant that fell back to a looser bound)
    are kept in the cell's ``"warnings"``.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cell = _run_cell(config, epsilon, data, progress)
    cell["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    return cell


def _run_cell(config: AuditConfig, epsilon: float, data, progress: bool) -> dict:
    from dpfa.accountants import epsilon_for, noise_multiplier_for
    from dpfa.attacks.lira import lira_inclusion, lira_leave_one_out, logit_scaled_confidence
    from dpfa.attacks.membership import loss_threshold_attack
    from dpfa.attacks.one_run import canary_inclusion, one_run_audit
    from dpfa.attacks.shadow import _seeded_global_rngs, train_shadow_models

    t0 = time.perf_counter()
    seeds = _seeds(config.seed)
    x, y = load_digits_tensors() if data is None else data
    tr = config.train
    perm = torch.from_numpy(np.random.default_rng(seeds["data_split"]).permutation(len(y)))
    key = epsilon_key(epsilon)
    private = math.isfinite(epsilon)

    # LiRA's models: random halves of n_examples digits
    lx, ly = x[perm[:config.lira.n_examples]], y[perm[:config.lira.n_examples]]
    inc = lira_inclusion(config.lira.num_shadow_models, config.lira.n_examples, seeds["lira_inclusion"])
    sizes = inc.sum(1)

    # the one-run audit's data: clean digits always in, canaries (a wrong label) each in by a fair coin
    m, n_clean = config.one_run.canaries, config.one_run.clean_examples
    cidx = perm[n_clean:n_clean + m]
    shift = torch.from_numpy(np.random.default_rng(seeds["canary_labels"]).integers(1, N_CLASSES, m))
    cx, cy = x[cidx], (y[cidx] + shift) % N_CLASSES
    coins = canary_inclusion(m, seed=seeds["canary_coins"])
    keep = torch.from_numpy(coins)
    ox = torch.cat([x[perm[:n_clean]], cx[keep]])
    oy = torch.cat([y[perm[:n_clean]], cy[keep]])

    # the noise multipliers: LiRA's models share one, calibrated at their largest sampling rate (the smallest
    # training set), so that each spends at most epsilon; the one-run model spends epsilon exactly
    q_lira = tr.batch_size / int(sizes.min())
    q_one = tr.batch_size / len(oy)
    z_lira = z_one = None
    if private:
        z_lira = noise_multiplier_for(epsilon, tr.delta, q_lira, tr.steps, accountant=tr.accountant)
        z_one = noise_multiplier_for(epsilon, tr.delta, q_one, tr.steps, accountant=tr.accountant)

    trainer = _Trainer(lx, ly, config.model, tr, z_lira)
    with _torch_threads(1):  # small models train fastest on one thread (workers: cores // jobs threads each)
        logits = train_shadow_models(trainer, _logits, (lx, ly), inc, seed=seeds["lira_models"],
                                     n_jobs=config.n_jobs, progress=progress, desc=f"LiRA models, epsilon {key}")
    yl = ly.numpy()
    phi = logit_scaled_confidence(logits, yl)
    losses = _cross_entropy(phi)
    correct = logits.argmax(-1) == yl[None]
    kw = dict(delta=tr.delta, confidence=config.confidence)
    online = lira_leave_one_out(phi, inc, online=True, **kw)
    offline = lira_leave_one_out(phi, inc, online=False, **kw)
    loss_attack = loss_threshold_attack(losses[inc], losses[~inc], **kw)

    with _seeded_global_rngs(seeds["one_run_model"]), _torch_threads(1):
        model, engine = train_model(ox, oy, config.model, tr, z_one, progress=progress,
                                    desc=f"one-run model, epsilon {key}")
    with torch.no_grad():
        model.eval()
        scores = logit_scaled_confidence(model(cx), cy)  # = -loss as a ranking, without float32 ties at loss 0
    one = one_run_audit(scores, coins, delta=tr.delta, confidence=config.confidence,
                        claimed_epsilon=epsilon if private else None, seed=seeds["guess_ties"])
    with torch.no_grad():
        model.eval()
        clean_acc = float((model(x[perm[:n_clean]]).argmax(-1) == y[perm[:n_clean]]).float().mean())
        canary_fit = float((model(cx).argmax(-1) == cy).float().mean())
        canary_fit_in = float((model(cx[keep]).argmax(-1) == cy[keep]).float().mean()) if keep.any() else 0.0
        canary_fit_out = float((model(cx[~keep]).argmax(-1) == cy[~keep]).float().mean()) if (~keep).any() else 0.0

    spent_lira = epsilon_for(z_lira, tr.delta, q_lira, tr.steps, tr.accountant) if private else math.inf
    spent_one = engine.get_epsilon(tr.delta) if private else math.inf
    return {
        "epsilon": key,
        "private": private,
        "config": config.cell_key(),
        "noise_multiplier": {"lira": z_lira, "one_run": z_one},
        "clipping": private,
        "max_grad_norm": tr.max_grad_norm if private else None,
        "sample_rate": {"lira_max": q_lira, "one_run": q_one},
        "epsilon_spent": {"lira_max": spent_lira, "one_run": spent_one, "delta": tr.delta,
                          "accountant": tr.accountant},
        "seeds": seeds,
        "lira": {
            "n_models": int(inc.shape[0]), "n_examples": int(inc.shape[1]),
            "train_set_sizes": [int(s) for s in sizes],
            "train_accuracy": float(correct[inc].mean()), "heldout_accuracy": float(correct[~inc].mean()),
            "online": _attack_dict(online), "offline": _attack_dict(offline),
        },
        "loss_attack": _attack_dict(loss_attack),
        "one_run": {**one.to_dict(), "train_set_size": int(len(oy)), "clean_accuracy": clean_acc,
                    "canaries_fitting_wrong_label": {"all": canary_fit, "included": canary_fit_in,
                                                     "excluded": canary_fit_out}},
        "seconds": time.perf_counter() - t0,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------- the run
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import scipy
    import sklearn

    import dpfa

    return {"device": "cpu", "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "scikit-learn": sklearn.__version__, "dpfa": dpfa.__version__}


def _order(keys: Iterable[str]) -> List[str]:
    return sorted(keys, key=lambda k: -math.inf if k == "inf" else -float(k))


def table_rows(results: Mapping) -> List[dict]:
    """One row per cell, inf first, then decreasing epsilon: the numbers of the markdown table."""
    rows = []
    for key in _order(results["cells"]):
        c = results["cells"][key]
        on, off, loss = c["lira"]["online"], c["lira"]["offline"], c["loss_attack"]
        claim = math.inf if key == "inf" else float(key)
        one_run = c["one_run"]["epsilon_lower_bound"]
        rows.append({
            "epsilon": key, "one_run_lower_bound": one_run, "one_run_passed": one_run <= claim,
            "lira_estimates_below_claim": max(on["epsilon_lower_bound"], off["epsilon_lower_bound"]) <= claim,
            "lira_auc": {"online": on["auc"], "offline": off["auc"]},
            "lira_tpr_at_0.1%_fpr": {"online": on["tpr_at_fpr"]["0.001"], "offline": off["tpr_at_fpr"]["0.001"]},
            "lira_tpr_at_1%_fpr": {"online": on["tpr_at_fpr"]["0.01"], "offline": off["tpr_at_fpr"]["0.01"]},
            "lira_epsilon_estimate": {"online": on["epsilon_lower_bound"], "offline": off["epsilon_lower_bound"]},
            "loss_attack_auc": loss["auc"],
        })
    return rows


def markdown_table(results: Mapping) -> str:
    """The results as one markdown table (LiRA cells: online / offline), with what produced them."""
    cfg = results["config"]
    lines = ["| epsilon claimed | one-run lower bound | LiRA AUC | TPR@0.1% | TPR@1% | LiRA eps estimate | "
             "loss-attack AUC |", "|---|---|---|---|---|---|---|"]
    for r in table_rows(results):
        claimed = "inf (no noise, no clipping)" if r["epsilon"] == "inf" else r["epsilon"]
        pair = lambda d, f: f"{f(d['online'])} / {f(d['offline'])}"  # noqa: E731
        lines.append(
            f"| {claimed} | {r['one_run_lower_bound']:.2f} | {pair(r['lira_auc'], lambda v: f'{v:.3f}')} | "
            f"{pair(r['lira_tpr_at_0.1%_fpr'], lambda v: f'{v:.2%}')} | "
            f"{pair(r['lira_tpr_at_1%_fpr'], lambda v: f'{v:.2%}')} | "
            f"{pair(r['lira_epsilon_estimate'], lambda v: f'{v:.2f}')} | {r['loss_attack_auc']:.3f} |")
    t, li, o = cfg["train"], cfg["lira"], cfg["one_run"]
    conf = f"{cfg['confidence']:.0%}"
    notes = [
        "",
        f"LiRA cells: online / offline, leave-one-out over {li['num_shadow_models']} models, each trained on a random "
        f"half of {li['n_examples']} digits ({li['num_shadow_models'] * li['n_examples']} pooled decisions). "
        f"Epsilon bounds at {conf} (Clopper-Pearson) and delta = {t['delta']:g}; the LiRA and loss-attack decisions "
        f"are not independent runs, so their epsilon is an estimate, the one-run bound ({o['canaries']} mislabeled "
        f"canaries, each in w.p. 1/2, next to {o['clean_examples']} clean digits) is a certificate.",
        f"Model: MLP 64-{'-'.join(map(str, cfg['model']['hidden']))}-10; {t['steps']} steps of {t['optimizer']} "
        f"(lr {t['lr']:g}), Poisson batches of expected size {t['batch_size']}; DP-SGD clips at "
        f"C = {t['max_grad_norm']:g} and adds Gaussian noise calibrated with the {t['accountant']} accountant.",
    ]
    if results.get("command"):
        notes.append(f"Command: `{results['command']}`")
    return "\n".join(lines + notes) + "\n"


@dataclasses.dataclass(frozen=True)
class AuditRun:
    """What :func:`run_audit` did: the results (the JSON's content), where they went, which cells it computed."""

    results: dict
    json_path: Path
    markdown_path: Path
    computed: Tuple[str, ...]
    cached: Tuple[str, ...]
    dropped: Tuple[str, ...]


def run_audit(config: AuditConfig, out_dir, name: str = "audit", *, progress: bool = True,
              command: Optional[str] = None, log=None) -> AuditRun:
    """Run (or resume) the audit: every epsilon of ``config`` not yet in ``OUT_DIR/NAME.json`` with this config.

    The JSON is rewritten after each cell (so an interrupted run keeps its finished cells);
    cells in it that were computed with another configuration are dropped. Each cell keeps
    the git state and environment it was computed in; ``runs`` logs every invocation
    (command, cells computed and cached, wall time); ``command`` is the last one that
    computed a cell. ``log``: a function that receives one line per cell (default: nothing).
    """
    say = log or (lambda msg: None)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"Cannot create the output directory {out}: {e}.") from None
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    key = config.cell_key()
    cells: Dict[str, dict] = {}
    dropped: List[str] = []
    old: dict = {}
    if json_path.exists():
        try:
            old = json.loads(json_path.read_text())
            old_cells = old["cells"]
            if not isinstance(old_cells, dict):
                raise TypeError(f"cells is {type(old_cells).__name__}")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{json_path} exists but is not an audit results file ({e}); move it away or pick "
                              f"another --out-dir.") from None
        for k, c in old_cells.items():
            if isinstance(c, dict) and c.get("config") == key:
                cells[k] = c
            else:
                dropped.append(k)
        if dropped:
            say(f"{json_path}: dropping cells {', '.join(_order(dropped))} (computed with another configuration)")
    wall = time.perf_counter()
    env, git = environment(), _git()
    results = {
        "name": name, "command": old.get("command", command) if cells else command, "config": config.to_dict(),
        "environment": env, "git": git, "seeds": {"seed": config.seed, **_seeds(config.seed)},
        "runs": list(old.get("runs", [])), "cells": cells,
    }

    def save():
        results["table"] = table_rows(results)
        _write(json_path, json.dumps(_jsonable(results), indent=1, allow_nan=False) + "\n")
        _write(md_path, markdown_table(results))

    computed: List[str] = []
    todo = [e for e in config.epsilons if epsilon_key(e) not in cells]
    cached = [epsilon_key(e) for e in config.epsilons if epsilon_key(e) in cells]
    for k in cached:
        say(f"epsilon {k}: cached in {json_path}, not recomputed")
    data = load_digits_tensors() if todo else None
    for eps in tqdm(todo, desc="audit cells", unit="cell", disable=not progress or not todo):
        k = epsilon_key(eps)
        cells[k] = _jsonable({**run_cell(config, eps, data=data, progress=progress), "git": git,
                              "environment": env})
        computed.append(k)
        results["command"] = command
        c = cells[k]
        say(f"epsilon {k}: one-run >= {c['one_run']['epsilon_lower_bound']:.3f}, LiRA AUC "
            f"{c['lira']['online']['auc']:.3f}, {c['seconds']:.0f} s")
        for w in c["warnings"]:
            say(f"epsilon {k}: warning: {w}")
        save()
    results["runs"].append({"command": command, "computed": computed, "cached": cached, "jobs": config.n_jobs,
                            "wall_seconds": time.perf_counter() - wall, "git_commit": git["commit"],
                            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    results["wall_seconds_cells"] = sum(c["seconds"] for c in cells.values())
    save()
    return AuditRun(results=json.loads(json_path.read_text()), json_path=json_path, markdown_path=md_path,
                    computed=tuple(computed), cached=tuple(cached), dropped=tuple(_order(dropped)))
