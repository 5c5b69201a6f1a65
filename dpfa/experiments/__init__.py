"""Config-driven experiments: ``dpfa run experiments/configs/NAME.toml`` (issue 9).

A config is a TOML file; its experiment is its optional ``experiment = "..."`` key, else
the file name (``speed``, ``language_model``, ``image_classification``, ``audit``,
``accountants``). Its ``[quick]`` table overrides settings for ``--quick`` (a reduced run
on a CPU in minutes), which writes ``NAME_quick.json`` / ``.md`` instead of ``NAME.json``.

Every experiment writes ``OUT_DIR/NAME.json`` (config, environment, device, git commit,
seeds, every number of every cell, each invocation) and ``OUT_DIR/NAME.md`` (the table),
shows a progress bar, and does not recompute a finished cell
(:class:`dpfa.experiments.common.ResultStore`; ``audit`` is :mod:`dpfa.attacks.runner`,
which works the same way). ``paper_figs/`` reads only these files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

from dpfa.errors import ConfigError

EXPERIMENTS = ("speed", "language_model", "image_classification", "audit", "accountants")

__all__ = ["EXPERIMENTS", "ExperimentRun", "run_config"]


@dataclasses.dataclass(frozen=True)
class ExperimentRun:
    experiment: str
    results: dict
    json_path: Path
    markdown_path: Path
    computed: tuple
    cached: tuple


def _load(path, quick: bool):
    from dpfa.experiments.common import merge_quick, read_toml

    data = read_toml(path)
    experiment = data.pop("experiment", Path(path).stem)
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"{path}: unknown experiment {experiment!r} (from its 'experiment' key or its file name); "
                          f"expected one of {', '.join(EXPERIMENTS)}.")
    return experiment, data if experiment == "audit" else merge_quick(data, quick)


def run_config(path, *, quick: bool = False, device: Optional[str] = None, seeds: Optional[int] = None,
               out_dir="experiments/results", progress: bool = True, command: Optional[str] = None,
               log: Optional[Callable[[str], None]] = None) -> ExperimentRun:
    """Run (or resume) the experiment of the TOML config at ``path``; see the module docstring."""
    from dpfa.experiments import common

    say = log or (lambda msg: None)
    experiment, data = _load(path, quick)
    name = Path(path).stem + ("_quick" if quick else "")
    out = Path(out_dir)
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ConfigError(f"Expected --seeds to be an integer >= 1, got {seeds!r}.")

    if experiment == "audit":
        return _audit(path, quick, device, seeds, out, name, progress, command, say)
    if experiment == "speed":  # refuses on a CPU before it reads anything else (--quick: the training step only)
        from dpfa.experiments import speed as mod

        dev = common.resolve_device(device)
        if not quick:
            mod.require_gpu(dev)
        cfg = common.from_mapping(mod.Config, data)
        runner = lambda store: mod.run(cfg, store, device=dev, progress=progress, log=say, out_dir=out,  # noqa: E731
                                       quick=quick)
        render, seed_list = mod.render, []
    elif experiment == "accountants":
        from dpfa.experiments import accountants as mod

        if "settings" in data:
            raise ConfigError(f"{path}: write the settings as [[setting]] tables, not a 'settings' key.")
        cfg = mod.config_from_dict(data)
        dev = "cpu"  # accounting is arithmetic: no device
        runner = lambda store: mod.run(cfg, store, device=dev, progress=progress, log=say)  # noqa: E731
        render, seed_list = mod.render, []
        if seeds is not None:
            say("--seeds does not apply to the accountants config (no randomness); ignored")
    else:
        from dpfa.experiments import privacy_utility as pu

        if experiment == "language_model":
            from dpfa.experiments import language_model as mod
        else:
            from dpfa.experiments import image_classification as mod
        if seeds is not None:
            data = {**data, "seeds": list(range(seeds))}
        try:
            cfg = common.from_mapping(mod.Config, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        dev = common.resolve_device(device)
        task = mod.TASK
        runner = lambda store: pu.run(task, cfg, store, device=dev, progress=progress, log=say)  # noqa: E731
        render = lambda results, keys: pu.render(task, task.describe(cfg), results, keys)  # noqa: E731
        seed_list = list(cfg.seeds)

    store = common.ResultStore(out, name, experiment=experiment, config=_config_dict(cfg), device=dev,
                               seeds=seed_list, command=command, render=render, log=say)
    runner(store)
    results = store.finish()
    return ExperimentRun(experiment, results, store.json_path, store.md_path, tuple(store.computed),
                         tuple(store.cached))


def _config_dict(cfg) -> dict:
    import json

    from dpfa.experiments.common import jsonable

    return json.loads(json.dumps(jsonable(dataclasses.asdict(cfg))))


def _audit(path, quick, device, seeds, out, name, progress, command, say) -> ExperimentRun:
    """``dpfa audit --config PATH``: the same runner, the same files (dpfa.attacks.runner)."""
    from dpfa.attacks import runner

    if seeds is not None:
        say("--seeds does not apply to the audit (its models are seeded from the config's seed; LiRA's "
            "num_shadow_models sets the repetitions); ignored")
    if device == "cuda":
        say("the audit trains its small MLPs on the CPU (in worker processes); --device cuda is ignored")
    config = runner.load_config(path, quick=quick)
    run = runner.run_audit(config, out, name, progress=progress, command=command, log=say)
    return ExperimentRun("audit", run.results, run.json_path, run.markdown_path, run.computed, run.cached)
