"""The privacy-utility experiments' shared machinery: one cell per (method, epsilon, seed).

Methods (see :mod:`dpfa.experiments.dpsgd`): ``non_private`` at epsilon = inf (no
per-example clipping, no noise), ``clip_only`` at epsilon = inf (dpfa's per-example
clipping, no noise), ``dpfa`` at each finite epsilon, and the post-hoc ``textbook``
baseline (materialised per-example gradients) at the baseline's epsilons, given the
wall-clock time of dpfa's run: ``train.steps`` x (dpfa's seconds per step / the
baseline's), both measured in turns on a synthetic batch just before the baseline's run
(:func:`dpfa.experiments.dpsgd.step_times`; a ratio measured in one interval is robust to
the load of a shared machine, a stopwatch budget is not). A speed difference thus shows
up as a difference in steps and hence in model quality.

A task (``language_model``, ``image_classification``) supplies the data, the model, the
loss and the metric; the table reports the metric's mean and sample standard deviation
over seeds, and two checks: the non-private run is the best, and the metric is monotone
in epsilon within noise (a pair of neighbouring epsilons counts as out of order only when
the worse-looking mean is off by more than the two standard errors combined, times two).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from dpfa.errors import ConfigError
from dpfa.experiments.common import epsilon_key, mean_std, parse_epsilons, progress_bar
from dpfa.experiments.dpsgd import train

METHOD_LABELS = {
    "non_private": "non-private (no per-example clipping, no noise)",
    "clip_only": "dpfa, per-example clipping, no noise",
    "dpfa": "dpfa DP-SGD (per-example norms in one backward pass)",
    "textbook": "textbook DP-SGD (torch.func.vmap per-example gradients), same wall clock as dpfa",
}


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """The post-hoc baseline, run at each of ``epsilons`` (empty: every finite epsilon of the experiment)."""

    enabled: bool = True
    method: str = "textbook"
    epsilons: Tuple = ()

    def __post_init__(self):
        if self.method != "textbook":
            raise ConfigError(f"Unknown baseline.method={self.method!r}; expected 'textbook' (torch.func per-example "
                              "gradients; Opacus is not a dependency of dpfa).")
        if self.epsilons:
            eps = parse_epsilons(self.epsilons, "baseline.epsilons")
            if any(math.isinf(e) for e in eps):
                raise ConfigError("baseline.epsilons must be finite: the baseline is a private method.")
            object.__setattr__(self, "epsilons", eps)


def check_common(cfg) -> None:
    """Validate the fields every privacy-utility config has (seeds, epsilons, clip_only, train, baseline)."""
    if not cfg.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in cfg.seeds):
        raise ConfigError(f"Expected seeds to be a non-empty list of integers >= 0, got {list(cfg.seeds)!r}.")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds lists a seed twice: {list(cfg.seeds)!r}.")
    object.__setattr__(cfg, "epsilons", parse_epsilons(cfg.epsilons))
    for e in cfg.baseline.epsilons:
        if e not in cfg.epsilons:
            raise ConfigError(f"baseline.epsilons has {epsilon_key(e)}, which is not in epsilons "
                              f"({', '.join(map(epsilon_key, cfg.epsilons))}): the baseline's time budget is dpfa's "
                              "run at the same epsilon.")


def plan(cfg) -> List[Tuple[str, str, float, int]]:
    """(key, method, epsilon, seed) of every cell, seed by seed (so a partial run has whole seeds)."""
    base_eps = cfg.baseline.epsilons or tuple(e for e in cfg.epsilons if math.isfinite(e))
    cells = []
    for seed in cfg.seeds:
        for eps in cfg.epsilons:
            if math.isinf(eps):
                cells.append((f"non_private/eps=inf/seed={seed}", "non_private", eps, seed))
                if cfg.clip_only:
                    cells.append((f"clip_only/eps=inf/seed={seed}", "clip_only", eps, seed))
            else:
                cells.append((f"dpfa/eps={epsilon_key(eps)}/seed={seed}", "dpfa", eps, seed))
        if cfg.baseline.enabled:
            for eps in base_eps:
                cells.append((f"textbook/eps={epsilon_key(eps)}/seed={seed}", "textbook", eps, seed))
    return cells


@dataclasses.dataclass
class Task:
    """What a privacy-utility experiment trains and measures."""

    name: str
    metric: str                      # key of the metric in each cell, e.g. "test_perplexity"
    metric_label: str                # the table's column, e.g. "test perplexity"
    higher_is_better: bool
    load: Callable                   # cfg -> (train dataset, test dataset, meta dict)
    build_model: Callable            # (cfg, meta) -> nn.Module (the caller seeds torch first)
    loss_fn: Callable                # (outputs, targets) -> mean loss of the batch
    evaluate: Callable               # (model, test dataset, device, cfg) -> metric
    synthetic_batch: Callable        # (cfg, meta) -> (n -> (inputs, targets)) random data for the timing probe
    describe: Callable               # cfg -> one markdown line about the model and data
    fmt: str = "{:.2f}"


def run(task: Task, cfg, store, *, device: str, progress: bool, log) -> None:
    """Compute every planned cell not already in ``store`` (torch on ``cfg.threads`` threads; 0: torch's default)."""
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        _run(task, cfg, store, device=device, progress=progress, log=log)
    finally:
        torch.set_num_threads(old_threads)


def _run(task: Task, cfg, store, *, device: str, progress: bool, log) -> None:
    from dpfa.experiments.dpsgd import step_times

    cells = plan(cfg)
    store.plan = [k for k, *_ in cells]
    data = None
    bar = progress_bar(len(cells), f"{task.name} cells", enabled=progress)
    for key, method, eps, seed in cells:
        cell_cfg = {"method": method, "epsilon": epsilon_key(eps), "seed": seed, "model": dataclasses.asdict(cfg.model),
                    "data": dataclasses.asdict(cfg.data), "train": dataclasses.asdict(cfg.train)}
        if store.load(key, cell_cfg) is not None:
            log(f"{key}: cached, not recomputed")
            bar.update(1)
            continue
        if data is None:
            data = task.load(cfg)
        train_ds, test_ds, meta = data
        steps, extra = None, {}
        if method == "textbook":  # the same wall clock as dpfa's run: steps scaled by the measured speed ratio
            times = step_times(lambda: task.build_model(cfg, meta), task.loss_fn,
                               task.synthetic_batch(cfg, meta)(cfg.train.batch_size), cfg.train, device,
                               methods=("dpfa", "textbook"))
            steps = max(1, round(cfg.train.steps * times["dpfa"] / times["textbook"]))
            extra = {"wall_clock_match": {"dpfa_seconds_per_step": times["dpfa"],
                                          "textbook_seconds_per_step": times["textbook"],
                                          "dpfa_steps": cfg.train.steps, "textbook_steps": steps,
                                          "budget_seconds": cfg.train.steps * times["dpfa"]}}
        torch.manual_seed(seed)
        model = task.build_model(cfg, meta)
        model, info = train(model, train_ds, task.loss_fn, cfg.train, mode=method, epsilon=eps, seed=seed,
                            device=device, steps=steps, progress=progress, desc=key)
        value = task.evaluate(model, test_ds, device, cfg)
        store.put(key, cell_cfg, {"method": method, "epsilon": epsilon_key(eps), "seed": seed, task.metric: value,
                                  "train": info, **extra})
        log(f"{key}: {task.metric_label} {task.fmt.format(value)}, {info['steps']} steps in {info['seconds']:.0f} s, "
            f"epsilon spent {info['epsilon_spent']:.3g}")
        bar.update(1)
    bar.close()


def _rows(task: Task, results: dict, keys: Sequence[str]) -> List[dict]:
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for k in keys:
        c = results["cells"][k]
        groups.setdefault((c["method"], c["epsilon"]), []).append(c)
    order = {"non_private": 0, "clip_only": 1, "dpfa": 2, "textbook": 3}
    rows = []
    for (method, eps), cs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], -math.inf if kv[0][1] == "inf"
                                                                      else -float(kv[0][1]))):
        m, s = mean_std([c[task.metric] for c in cs])
        spent = [c["train"]["epsilon_spent"] for c in cs]
        rows.append({"method": method, "epsilon": eps, "n_seeds": len(cs), "seeds": [c["seed"] for c in cs],
                     "mean": m, "std": s, "values": [c[task.metric] for c in cs],
                     "steps": mean_std([c["train"]["steps"] for c in cs])[0],
                     "seconds": mean_std([c["train"]["seconds"] for c in cs])[0],
                     "noise_multiplier": cs[0]["train"]["noise_multiplier"],
                     "epsilon_spent_max": max(float(e) for e in spent)})
    return rows


def checks(task: Task, rows: List[dict]) -> dict:
    """Is the non-private run the best, and is dpfa's metric monotone in epsilon within noise?"""
    better = (lambda a, b: a >= b) if task.higher_is_better else (lambda a, b: a <= b)
    notes: List[str] = []
    by = {(r["method"], r["epsilon"]): r for r in rows}
    np_row = by.get(("non_private", "inf"))
    best = None
    if np_row is not None:
        others = [r for r in rows if r is not np_row]
        losers = [r for r in others if not better(np_row["mean"], r["mean"])]
        best = not losers
        for r in losers:
            notes.append(f"{r['method']} at epsilon {r['epsilon']} ({task.fmt.format(r['mean'])}) beats the "
                         f"non-private "
                         f"run ({task.fmt.format(np_row['mean'])})")
    chain = [r for r in rows if r["method"] in ("clip_only", "dpfa")]
    chain.sort(key=lambda r: -math.inf if r["epsilon"] == "inf" else -float(r["epsilon"]))
    monotone = True
    for a, b in zip(chain, chain[1:]):  # a: the larger epsilon, should be at least as good
        if better(a["mean"], b["mean"]):
            continue
        se = math.sqrt(a["std"] ** 2 / a["n_seeds"] + b["std"] ** 2 / b["n_seeds"])
        gap = abs(a["mean"] - b["mean"])
        if gap > 2 * se:
            monotone = False
            notes.append(f"epsilon {b['epsilon']} ({task.fmt.format(b['mean'])}) beats epsilon {a['epsilon']} "
                         f"({task.fmt.format(a['mean'])}) by {gap:.3g} > 2 standard errors ({2 * se:.3g})")
        else:
            notes.append(f"epsilon {b['epsilon']} is ahead of epsilon {a['epsilon']} by {gap:.3g}, within 2 standard "
                         f"errors ({2 * se:.3g}): noise")
    return {"non_private_best": best, "monotone_within_noise": monotone, "notes": notes}


def render(task: Task, cfg_describe: str, results: dict, keys: Sequence[str]) -> Tuple[dict, str]:
    rows = _rows(task, results, keys)
    chk = checks(task, rows)
    base = {r["epsilon"]: r for r in rows if r["method"] == "textbook"}
    arrow = "higher is better" if task.higher_is_better else "lower is better"
    lines = [f"| epsilon | method | {task.metric_label} (mean ± sd over seeds) | seeds | steps | s / run | "
             f"textbook baseline, same wall clock: {task.metric_label} | its steps |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "textbook":
            continue
        label = {"non_private": "inf (no clipping)", "clip_only": "inf (clipping)"}.get(r["method"], r["epsilon"])
        b = base.get(r["epsilon"]) if r["method"] == "dpfa" else None
        bcell = f"{task.fmt.format(b['mean'])} ± {task.fmt.format(b['std'])}" if b else "-"
        bsteps = f"{b['steps']:.0f}" if b else "-"
        lines.append(f"| {label} | {METHOD_LABELS[r['method']].split(' (')[0]} | {task.fmt.format(r['mean'])} ± "
                     f"{task.fmt.format(r['std'])} | {r['n_seeds']} | {r['steps']:.0f} | {r['seconds']:.1f} | {bcell} "
                     f"| {bsteps} |")
    t = results["config"]["train"]
    notes = ["", f"{task.metric_label}: {arrow}. {cfg_describe}",
             f"Training: Adam (lr {t['lr']:g}), Poisson batches of expected size {t['batch_size']}, "
             f"{t['steps']} steps; "
             f"DP-SGD clips each example's gradient at C = {t['max_grad_norm']:g} and adds Gaussian noise calibrated "
             f"with the {t['accountant']} accountant to spend epsilon at delta = {t['delta']:g} in those steps."
             + (f" The non-private run clips the batch gradient's norm at {t['batch_grad_clip']:g} (as nanoGPT does)."
                if t.get("batch_grad_clip") else ""),
             "Textbook baseline: per-example gradients materialised with torch.func.vmap(grad), clipped and noised "
             "by the same rule, given dpfa's wall clock: its steps = dpfa's steps x (dpfa's seconds per step / its "
             "own), the two timed in turns on a synthetic batch before each baseline run; its noise is calibrated "
             f"for its steps. Timings on {results['environment'].get('gpu') or results['environment']['cpu']}"
             f"; torch threads: {results['cells'][keys[0]]['train'].get('threads') if keys else '?'}.",
             f"Checks: non-private best: {chk['non_private_best']}; monotone in epsilon within noise: "
             f"{chk['monotone_within_noise']}."]
    notes += [f"- {n}" for n in chk["notes"]]
    return {"rows": rows, "checks": chk}, "\n".join(lines + notes) + "\n"
