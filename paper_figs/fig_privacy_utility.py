"""Privacy-utility curves: test perplexity (language_model) and test accuracy (image_classification)
against epsilon, mean ± sd over seeds, for dpfa's DP-SGD and the textbook baseline at the same wall clock,
with the non-private and clipping-only runs as horizontal bands.

    python paper_figs/fig_privacy_utility.py [RESULTS_DIR] [OUT_DIR]
"""

from __future__ import annotations

import sys

from _common import COLORS, MissingResults, device_note, load, plt, save

PANELS = (("language_model", "test perplexity (lower is better)"),
          ("image_classification", "test accuracy (higher is better)"))


def _panel(ax, results: dict, ylabel: str) -> None:
    rows = results["summary"]["rows"]
    for method, label in (("dpfa", "dpfa DP-SGD"), ("textbook", "textbook DP-SGD (vmap), same wall clock")):
        pts = sorted((float(r["epsilon"]), r["mean"], r["std"]) for r in rows if r["method"] == method)
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o" if method == "dpfa" else "s", ms=4, capsize=3, lw=1.5,
                        color=COLORS[method], label=label, ls="-" if method == "dpfa" else "--")
    for method, label in (("non_private", "non-private (no clipping)"), ("clip_only", "clipping, no noise")):
        for r in rows:
            if r["method"] == method:
                ax.axhline(r["mean"], color=COLORS[method], lw=1.2, ls=":" if method == "clip_only" else "-",
                           label=f"{label}: {r['mean']:.3g}")
                ax.axhspan(r["mean"] - r["std"], r["mean"] + r["std"], color=COLORS[method], alpha=0.12, lw=0)
    ax.set_xscale("log")
    eps = sorted({float(r["epsilon"]) for r in rows if r["epsilon"] != "inf"})
    ax.set_xticks(eps)
    ax.set_xticklabels([f"{e:g}" for e in eps])
    ax.minorticks_off()
    ax.set_xlabel("epsilon (delta = %g)" % results["config"]["train"]["delta"])
    ax.set_ylabel(ylabel)
    n = max(r["n_seeds"] for r in rows)
    ax.set_title(f"{results['experiment'].replace('_', ' ')} (mean ± sd over {n} seed{'s' if n > 1 else ''}, "
                 f"{device_note(results)})", fontsize=9)
    ax.legend(fontsize=7, loc="best")


def main(results_dir="experiments/results", out_dir="paper_figs/out", log=print) -> list:
    found = []
    for name, ylabel in PANELS:
        try:
            found.append((load(results_dir, name, f"dpfa run experiments/configs/{name}.toml", log), ylabel))
        except MissingResults as e:
            log(str(e))
    if not found:
        raise MissingResults("no privacy-utility results (language_model.json, image_classification.json)")
    fig, axes = plt.subplots(1, len(found), figsize=(5.2 * len(found), 3.8), squeeze=False)
    for ax, (results, ylabel) in zip(axes[0], found):
        _panel(ax, results, ylabel)
    fig.tight_layout()
    return save(fig, out_dir, "privacy_utility")


if __name__ == "__main__":
    print(*main(*sys.argv[1:3]), sep="\n")
