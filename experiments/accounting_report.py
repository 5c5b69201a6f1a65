"""Accounting report: epsilon against steps for every accountant on one DP-SGD configuration.

    python experiments/accounting_report.py [--quick] [--noise-multiplier 1.0] [--sample-rate 0.01]

Writes experiments/results/accounting_report.{json,md,png}. The RDP curve must lie above
the PRV and PLD curves (it is an upper bound); PRV and PLD must agree to within their
stated errors. Runs on the CPU in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import dpfa
from dpfa import accountants

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--sample-rate", type=float, default=0.01)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--max-steps", type=int, default=10_000)
    p.add_argument("--mechanism", default="gaussian")
    p.add_argument("--quick", action="store_true", help="fewer points (for the demo and CI)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    steps = np.unique(np.geomspace(10, args.max_steps, 6 if args.quick else 16).astype(int)).tolist()
    names = accountants.names()
    curves = {n: [] for n in names}
    seconds = {n: 0.0 for n in names}
    for n in tqdm([(n, t) for n in names for t in steps], desc="accounting", unit="point"):
        name, t = n
        t0 = time.perf_counter()
        acc = accountants.get(name)().compose(args.mechanism, args.noise_multiplier, args.sample_rate, t)
        curves[name].append(acc.get_epsilon(args.delta))
        seconds[name] += time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "experiment": "accounting_report",
        "device": "cpu",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "dpfa": dpfa.__version__,
        "config": {"mechanism": args.mechanism, "noise_multiplier": args.noise_multiplier,
                   "sample_rate": args.sample_rate, "delta": args.delta, "sampling": "poisson"},
        "steps": steps,
        "epsilon": curves,
        "seconds": seconds,
    }
    (args.out / "accounting_report.json").write_text(json.dumps(result, indent=2) + "\n")

    lines = [f"# Accounting report: {args.mechanism}, z = {args.noise_multiplier}, q = {args.sample_rate}, "
             f"delta = {args.delta}", "", "| steps | " + " | ".join(names) + " |",
             "|---:|" + "---:|" * len(names)]
    for i, t in enumerate(steps):
        lines.append(f"| {t} | " + " | ".join(f"{curves[n][i]:.4f}" for n in names) + " |")
    (args.out / "accounting_report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for n in names:
        ax.plot(steps, curves[n], marker="o", label=n)
    ax.set_xscale("log")
    ax.set_xlabel("steps")
    ax.set_ylabel(f"epsilon at delta = {args.delta:g}")
    ax.set_title(f"{args.mechanism}, z = {args.noise_multiplier}, q = {args.sample_rate}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "accounting_report.png", dpi=120)
    print(f"wrote {args.out / 'accounting_report.json'}, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
