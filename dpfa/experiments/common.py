"""What every experiment shares: typed TOML configs, provenance, the resumable results file, progress.

Provenance (git state, JSON encoding, atomic writes, TOML reading) is :mod:`dpfa._results`,
shared with the audit runner (:mod:`dpfa.attacks.runner`, which also gives the CPU environment): ``dpfa audit`` and
``dpfa run`` write the same fields. This module adds the device (a GPU's name and the
CUDA version) and a generic resumable store of cells.

A results file ``OUT_DIR/NAME.json`` holds ``config`` (the whole experiment config),
``environment`` (with ``device``), ``git``, ``seeds``, ``runs`` (every invocation: command,
cells computed and cached, wall time) and ``cells``: one dict per unit of work (one
training run, one accountant curve), each with the ``config`` it depends on. A cell
already in the file with the same config is not recomputed; one with another config is
dropped. The file is rewritten after every cell, so an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import numbers
import time
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from dpfa._results import git_state, jsonable, read_toml, write_atomic  # noqa: F401  (re-exported)
from dpfa.attacks.runner import environment as _cpu_environment
from dpfa.attacks.runner import epsilon_key, parse_epsilons  # noqa: F401
from dpfa.errors import ConfigError, DPFAError

__all__ = ["git_state", "jsonable", "write_atomic", "environment", "epsilon_key", "parse_epsilons", "read_toml",
           "resolve_device", "from_mapping", "merge_quick", "ResultStore", "progress_bar", "mean_std", "utc_now"]


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------- device
def resolve_device(device: Optional[str]) -> str:
    """"cuda" or "cpu"; None picks cuda when a GPU is visible. Asking for cuda without one is an error."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"Expected --device cuda or cpu, got {device!r}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise DPFAError("--device cuda was asked for, but torch sees no CUDA GPU here (torch "
                        f"{torch.__version__}); run on a GPU machine or use --device cpu.")
    return device


def environment(device: str) -> dict:
    """The audit runner's environment (CPU, versions) plus the device that ran the numbers."""
    try:
        env = _cpu_environment()
    except ImportError:  # a GPU image without scipy / scikit-learn: the versions that matter here
        import platform

        import dpfa

        env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
               "dpfa": dpfa.__version__, "cpu": platform.processor() or platform.machine()}
    env["device"] = device
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:  # pragma: no cover - triton is a dependency
            pass
    env["torch_threads"] = torch.get_num_threads()
    return env


# --------------------------------------------------------------------- configs
def _coerce(value, default, key: str):
    """``value`` checked against the type of the field's ``default`` (int, float, bool, str, lists of those)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"Expected {key} to be true or false, got {value!r}.")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"Expected {key} to be an integer, got {value!r}.")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise ConfigError(f"Expected {key} to be a number, got {value!r}.")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"Expected {key} to be a string, got {value!r}.")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"Expected {key} to be a list, got {value!r}.")
        return tuple(value)
    return value


def from_mapping(cls, data: Mapping, where: str = ""):
    """A dataclass ``cls`` from a TOML table: unknown keys, wrong types and nested tables checked, messages
    naming ``where.key``. Fields that are dataclasses take sub-tables; the rest keep their defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"Expected [{where or 'top level'}] to be a table, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    defaults = cls()
    kwargs: Dict[str, Any] = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"Unknown key {name!r}; {'[' + where + ']' if where else 'the config'} takes "
                              f"{', '.join(fields)}.")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_mapping(hint, value, name)
        else:
            kwargs[key] = _coerce(value, getattr(defaults, key), name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"[{where or 'top level'}]: {e}") from None


def merge_quick(data: Mapping, quick: bool) -> dict:
    """The config table with its ``[quick]`` overrides merged in (one level of sub-tables) when ``quick``."""
    data = dict(data)
    over = data.pop("quick", {})
    if not isinstance(over, Mapping):
        raise ConfigError(f"Expected [quick] to be a table of overrides, got {over!r}.")
    if not quick:
        return data
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(data.get(k), Mapping):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return data


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    v = [float(x) for x in values]
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s


# --------------------------------------------------------------------- progress
def progress_bar(total: int, desc: str, enabled: bool = True, leave: bool = True):
    """tqdm when it is installed (a declared dependency), else a one-line text bar on stderr."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return _TextBar(total, desc, enabled)
    return tqdm(total=total, desc=desc, unit="cell" if leave else "step", disable=not enabled, leave=leave)


class _TextBar:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.n, self.t0 = total, desc, enabled, 0, time.perf_counter()

    def update(self, k: int = 1) -> None:
        import sys

        self.n += k
        if self.enabled:
            width = 30
            done = int(width * self.n / max(self.total, 1))
            sys.stderr.write(f"\r{self.desc}: [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} "
                             f"{time.perf_counter() - self.t0:.0f}s")
            sys.stderr.flush()

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        if self.enabled:
            import sys

            sys.stderr.write("\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------- results
class ResultStore:
    """``OUT_DIR/NAME.json`` (and ``NAME.md``): resumable cells and their provenance.

    ``render(results, plan) -> (summary dict, markdown text)`` is called at every save, so
    the table always matches the finished cells; ``plan`` is the list of cell keys of this
    invocation (cells of other invocations, e.g. more seeds, stay in the file but not in
    the table).
    """

    def __init__(self, out_dir, name: str, *, experiment: str, config: dict, device: str, seeds: Sequence[int],
                 command: Optional[str], render: Callable[[dict], Tuple[dict, str]], log=None):
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"Cannot create the output directory {out}: {e}.") from None
        self.json_path, self.md_path = out / f"{name}.json", out / f"{name}.md"
        self.render = render
        self.say = log or (lambda msg: None)
        self.computed: List[str] = []
        self.cached: List[str] = []
        self.wall = time.perf_counter()
        old: dict = {}
        cells: Dict[str, dict] = {}
        self.dropped: List[str] = []
        if self.json_path.exists():
            try:
                old = json.loads(self.json_path.read_text())
                if not isinstance(old.get("cells"), dict) or old.get("experiment") != experiment:
                    raise TypeError(f"experiment {old.get('experiment')!r}, not {experiment!r}")
            except (json.JSONDecodeError, TypeError, AttributeError) as e:
                raise ConfigError(f"{self.json_path} exists but is not a {experiment} results file ({e}); move it "
                                  "away or pick another --out-dir.") from None
            cells = old["cells"]
        self.env, self.git = environment(device), git_state()
        self.results = {
            "name": name, "experiment": experiment, "command": old.get("command", command) if cells else command,
            "config": config, "device": device, "environment": self.env, "git": self.git, "seeds": list(seeds),
            "runs": list(old.get("runs", [])), "cells": cells,
        }
        self.command = command
        self.plan: List[str] = []

    def load(self, key: str, cell_config: dict) -> Optional[dict]:
        """The finished cell ``key`` if it was computed with ``cell_config``; a stale one is dropped."""
        cells = self.results["cells"]
        cell = cells.get(key)
        if cell is None:
            return None
        if cell.get("config") == json.loads(json.dumps(jsonable(cell_config))):
            if key not in self.cached:
                self.cached.append(key)
            return cell
        del cells[key]
        self.dropped.append(key)
        self.say(f"{key}: computed with another configuration; recomputing")
        return None

    def put(self, key: str, cell_config: dict, numbers: dict) -> dict:
        cell = jsonable({**numbers, "config": cell_config, "device": self.env["device"], "git": self.git,
                         "finished": utc_now()})
        self.results["cells"][key] = cell
        self.results["command"] = self.command
        self.computed.append(key)
        self.save()
        return cell

    def save(self) -> None:
        planned = [k for k in self.plan if k in self.results["cells"]]
        summary, md = self.render(self.results, planned)
        self.results["summary"] = summary
        self.results["plan"] = list(self.plan)  # the cells of the table (others in "cells" came from other runs)
        cmd = self.results.get("command")
        if cmd:
            md += f"\nCommand: `{cmd}`\n"
        env = self.env
        where = env.get("gpu") or env.get("cpu")
        md += f"Device: {env['device']} ({where}); torch {env['torch']}; git {str(self.git.get('commit'))[:12]}" + \
              (" (with local changes)" if self.git.get("modified_files") else "") + "\n"
        write_atomic(self.json_path, json.dumps(jsonable(self.results), indent=1, allow_nan=False) + "\n")
        write_atomic(self.md_path, md)

    def finish(self) -> dict:
        self.results["runs"].append({"command": self.command, "computed": self.computed, "cached": self.cached,
                                     "wall_seconds": time.perf_counter() - self.wall,
                                     "git_commit": self.git["commit"], "finished": utc_now()})
        self.save()
        return self.results
