"""Speed bar chart: dpfa's flash attention against torch SDPA's back ends, time relative to SDPA flash
(< 1: faster), forward and forward + backward, per shape (experiments/results/flash_attention.json).

    python paper_figs/fig_speed.py [RESULTS_DIR] [OUT_DIR]
"""

from __future__ import annotations

import sys

import numpy as np

from _common import COLORS, load, plt, save

IMPLS = (("dpfa", "dpfa"), ("flash", "SDPA flash"), ("cudnn", "SDPA cuDNN"), ("efficient", "SDPA mem-efficient"))


def main(results_dir="experiments/results", out_dir="paper_figs/out", log=print) -> list:
    r = load(results_dir, "flash_attention", "dpfa run experiments/configs/speed.toml --device cuda (or "
             "python experiments/bench_flash_attention.py --hooks) on a GPU", log)
    shapes = [s for s in r["shapes"] if "failed" not in s]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    width = 0.8 / len(IMPLS)
    x = np.arange(len(shapes))
    for ax, (mode, title) in zip(axes, (("fwd", "forward"), ("fwd_bwd", "forward + backward"))):
        for i, (impl, label) in enumerate(IMPLS):
            vals = []
            for s in shapes:
                t, ref = s["times_ms"].get(impl, {}).get(mode), s["times_ms"]["flash"].get(mode)
                vals.append(t / ref if t and ref else np.nan)
            bars = ax.bar(x + (i - (len(IMPLS) - 1) / 2) * width, vals, width, label=label,
                          color=COLORS["dpfa"] if impl == "dpfa" else COLORS[impl])
            if impl == "dpfa":
                for b, v in zip(bars, vals):
                    ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{s['name']}\nB{s['batch']} H{s['heads']}\nN{s['seqlen']} d{s['head_dim']}"
                            f"{chr(10) + 'causal' if s['causal'] else ''}" for s in shapes], fontsize=7)
        ax.set_title(f"{title} ({r['dtype']})", fontsize=9)
        ax.grid(axis="x", visible=False)
    axes[0].set_ylabel("time / SDPA flash time (lower is faster)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(f"{r['device']}, torch {r['torch']}, Triton {r['triton']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=len(IMPLS), fontsize=8)
    return save(fig, out_dir, "speed")


if __name__ == "__main__":
    print(*main(*sys.argv[1:3]), sep="\n")
