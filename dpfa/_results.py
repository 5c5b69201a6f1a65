"""Results files: reading configs, recording provenance, writing atomically.

Shared by every runner that writes ``experiments/results/*.json`` (``dpfa audit``,
``dpfa run``): the config is TOML, the provenance is the git commit and the modified
files, numbers are made JSON-safe (``inf`` as a string) and files are replaced atomically.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import numpy as np

from dpfa.errors import ConfigError


def read_toml(path) -> dict:
    """Parse a TOML file (tomllib; tomli on Python 3.10), every failure a :class:`ConfigError` naming the file."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError("Reading a TOML config needs Python >= 3.11 (tomllib) or, on 3.10, the tomli package: "
                              "pip install tomli.") from None
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"Config file {p} does not exist.") from None
    except OSError as e:
        raise ConfigError(f"Cannot read config file {p}: {e}.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p} is not valid TOML: {e}.") from None


def git_state() -> dict:
    """{'commit': HEAD or None, 'modified_files': tracked files changed in the work tree}."""
    root = Path(__file__).resolve().parents[2]

    def git(*args):
        try:
            r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.rstrip("\n") if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    commit = commit.strip() if commit else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "modified_files": [] if not status else [ln[3:] for ln in status.splitlines()]}


def jsonable(x):
    """Non-finite floats as strings ("inf"), tuples as lists, numpy scalars as Python numbers."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a crash leaves the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
