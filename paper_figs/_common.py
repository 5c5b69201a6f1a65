"""Shared helpers of the figure scripts: read results JSON (never train), save PNG + PDF, one style."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"dpfa": "#1f77b4", "textbook": "#d62728", "non_private": "#2ca02c", "clip_only": "#9467bd",
          "rdp": "#ff7f0e", "prv": "#1f77b4", "pld": "#2ca02c", "flash": "#7f7f7f", "cudnn": "#bcbd22",
          "efficient": "#17becf"}

plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
                     "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False})


class MissingResults(Exception):
    """A results file the figure needs is not there; the message names the command that makes it."""


def load(results_dir, name: str, command: str, log=print) -> dict:
    """``NAME.json`` from ``results_dir``; else ``NAME_quick.json`` (with a note); else MissingResults."""
    d = Path(results_dir)
    for stem in (name, f"{name}_quick"):
        p = d / f"{stem}.json"
        if p.is_file():
            if stem != name:
                log(f"{name}.json is missing; using the reduced run {p.name}")
            return json.loads(p.read_text())
    raise MissingResults(f"{d / (name + '.json')} is missing; make it with: {command}")


def num(x) -> float:
    """A JSON number, or the strings "inf" / "-inf" / "nan" that dpfa's results use for non-finite floats."""
    return float(x) if isinstance(x, str) else x


def save(fig, out_dir, name: str) -> list:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        p = out / f"{name}.{ext}"
        fig.savefig(p, bbox_inches="tight")
        paths.append(p)
    plt.close(fig)
    return paths


def device_note(results: dict) -> str:
    env = results.get("environment", {})
    if env.get("gpu"):
        return env["gpu"]
    return f"CPU: {env['cpu']}" if env.get("cpu") else results.get("device", "")


def is_inf(key) -> bool:
    return isinstance(key, str) and key == "inf" or (isinstance(key, float) and math.isinf(key))
