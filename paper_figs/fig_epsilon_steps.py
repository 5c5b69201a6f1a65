"""Epsilon against steps for the RDP, PRV and PLD accountants on standard DP-SGD settings
(experiments/results/accountants.json), one panel per setting, log-log.

    python paper_figs/fig_epsilon_steps.py [RESULTS_DIR] [OUT_DIR]
"""

from __future__ import annotations

import sys

from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from _common import COLORS, load, plt, save


def main(results_dir="experiments/results", out_dir="paper_figs/out", log=print) -> list:
    r = load(results_dir, "accountants", "dpfa run experiments/configs/accountants.toml", log)
    keys = r.get("plan") or list(r["cells"])  # the cells of this run's table
    curves = [r["cells"][k] for k in keys if k != "attention_heads" and k in r["cells"]]
    settings = list(dict.fromkeys(c["setting"] for c in curves))
    fig, axes = plt.subplots(1, len(settings), figsize=(4.6 * len(settings), 3.6), squeeze=False)
    for ax, name in zip(axes[0], settings):
        s = None
        for c in curves:
            if c["setting"] != name:
                continue
            s = c["config"]["setting"]
            a = c["accountant"]
            style = {"rdp": dict(ls="--", lw=1.5, marker="o", ms=3), "prv": dict(ls="-", lw=4, alpha=0.45),
                     "pld": dict(ls="-", lw=1.3, marker="x", ms=4)}.get(a, dict(lw=1.5))
            ax.plot(c["steps"], c["epsilon"], color=COLORS.get(a), zorder=2 if a == "prv" else 3,
                    label=a.upper() + (" (upper bound)" if a == "rdp" else ""), **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("steps")
        ax.set_ylabel(f"epsilon at delta = {s['delta']:g}")
        ax.set_title(f"{name}\n(noise multiplier {s['noise_multiplier']:g}, Poisson rate {s['sample_rate']:.4g})",
                     fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, out_dir, "epsilon_vs_steps")


if __name__ == "__main__":
    print(*main(*sys.argv[1:3]), sep="\n")
