"""Membership-inference ROC curves on log axes (experiments/results/audit.json): LiRA online, LiRA
offline and the loss-threshold attack, one curve per claimed epsilon, against the chance diagonal.

    python paper_figs/fig_audit_roc.py [RESULTS_DIR] [OUT_DIR]
"""

from __future__ import annotations

import sys

import numpy as np

from _common import load, num, plt, save


def _order(keys):
    return sorted(keys, key=lambda k: -np.inf if k == "inf" else -float(k))


def main(results_dir="experiments/results", out_dir="paper_figs/out", log=print) -> list:
    r = load(results_dir, "audit", "dpfa audit (or dpfa run experiments/configs/audit.toml)", log)
    keys = _order(r["cells"])
    cmap = plt.get_cmap("viridis")
    colors = {k: cmap(i / max(len(keys) - 1, 1)) for i, k in enumerate(keys)}
    panels = (("LiRA online", lambda c: c["lira"]["online"]), ("LiRA offline", lambda c: c["lira"]["offline"]),
              ("loss-threshold attack", lambda c: c["loss_attack"]))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.9), sharey=True)
    for ax, (title, get) in zip(axes, panels):
        lo = 1.0
        for k in keys:
            a = get(r["cells"][k])
            fpr = np.array([num(v) for v in a["roc"]["fpr"]])
            tpr = np.array([num(v) for v in a["roc"]["tpr"]])
            ok = (fpr > 0) & (tpr > 0)
            lo = min(lo, fpr[ok].min())
            label = ("no DP" if k == "inf" else f"epsilon {k}") + f": AUC {num(a['auc']):.3f}"
            ax.plot(fpr[ok], tpr[ok], color=colors[k], lw=1.6, label=label)
        grid = np.logspace(np.log10(lo), 0, 50)
        ax.plot(grid, grid, color="k", lw=0.8, ls="--", label="chance")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, 1)
        ax.set_ylim(lo, 1.05)
        ax.set_xlabel("false positive rate")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("true positive rate")
    li = r["config"]["lira"]
    fig.suptitle(f"Membership inference against DP-SGD MLPs on digits ({li['num_shadow_models']} models, each trained "
                 f"on a random half of {li['n_examples']} digits; each digit is in half of the models)", fontsize=9)
    fig.tight_layout()
    return save(fig, out_dir, "audit_roc")


if __name__ == "__main__":
    print(*main(*sys.argv[1:3]), sep="\n")
