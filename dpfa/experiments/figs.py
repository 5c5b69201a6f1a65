"""``dpfa figs``: run every ``paper_figs/fig_*.py`` script into one output folder (PNG and PDF).

Each script reads only results JSON (``experiments/results/*.json``) and never trains; it
exposes ``main(results_dir, out_dir, log) -> [paths]``. A figure whose results file is
missing is skipped with a message naming the command that makes it (a script may fall
back to the reduced ``NAME_quick.json`` and say so); any other failure is an error.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from dpfa.errors import DPFAError


def figures_dir() -> Path:
    """paper_figs/ of the checkout dpfa runs from (an editable install), else of the working directory."""
    for d in (Path(__file__).resolve().parents[2] / "paper_figs", Path.cwd() / "paper_figs"):
        if d.is_dir() and any(d.glob("fig_*.py")):
            return d
    raise DPFAError("dpfa figs needs the figure scripts of a checkout of the repository (paper_figs/fig_*.py); "
                    "run it from the repository root.")


def build_figures(results_dir="experiments/results", out_dir="paper_figs/out", *, only: Optional[Sequence[str]] = None,
                  log: Callable[[str], None] = print) -> List[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        raise DPFAError("dpfa figs needs matplotlib: pip install matplotlib.") from None
    if not Path(results_dir).is_dir():
        raise DPFAError(f"The results directory {results_dir} does not exist; run the experiments first "
                        "(dpfa run experiments/configs/NAME.toml).")
    d = figures_dir()
    scripts = sorted(d.glob("fig_*.py"))
    names = [p.stem[len("fig_"):] for p in scripts]
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise DPFAError(f"Unknown figure {', '.join(unknown)}; the figures are {', '.join(names)}.")
        scripts = [p for p, n in zip(scripts, names) if n in only]
    sys.path.insert(0, str(d))  # the scripts import their shared _common module
    written: List[Path] = []
    try:
        missing = importlib.import_module("_common").MissingResults
        for path in scripts:
            spec = importlib.util.spec_from_file_location(f"paper_figs_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            try:
                out = module.main(results_dir, out_dir, log=log)
            except missing as e:
                log(f"{path.name}: skipped: {e}")
                continue
            written += [Path(p) for p in out]
    finally:
        sys.path.remove(str(d))
    return written
