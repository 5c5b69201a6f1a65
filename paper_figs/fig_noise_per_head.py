"""Noise per attention head of one DP release (dpfa.dp_flash_attn_func) under a uniform split of the
budget and under strategy="importance" (experiments/results/accountants.json, cell attention_heads:
the calibration's own numbers, computed from shapes and parameters only).

    python paper_figs/fig_noise_per_head.py [RESULTS_DIR] [OUT_DIR]
"""

from __future__ import annotations

import sys

import numpy as np

from _common import load, plt, save


def main(results_dir="experiments/results", out_dir="paper_figs/out", log=print) -> list:
    r = load(results_dir, "accountants", "dpfa run experiments/configs/accountants.toml", log)
    h = r["cells"].get("attention_heads")
    if h is None:
        from _common import MissingResults

        raise MissingResults("accountants.json has no attention_heads cell; enable [attention_heads] in the config")
    c = h["config"]
    x = np.arange(h["heads"])
    delta = h["max_sensitivity"]
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    ax.bar(x - 0.2, np.array(h["uniform"]) / delta, 0.4, label="uniform split", color="#7f7f7f")
    ax.bar(x + 0.2, np.array(h["importance"]) / delta, 0.4, label="importance split", color="#1f77b4")
    ax.set_xticks(x)
    ax.set_xticklabels([f"head {i}\nw = {w:g}" for i, w in enumerate(h["weights"])], fontsize=7)
    ax.set_ylabel("noise std / row sensitivity (sigma / Delta)")
    ax.set_title(f"One release, epsilon = {c['epsilon']:g}, delta = {c['delta']:g} in total: {h['heads']} heads, "
                 f"{c['seqlen']} query rows, head dim {c['head_dim']}", fontsize=9)
    ax.grid(axis="x", visible=False)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, out_dir, "noise_per_head")


if __name__ == "__main__":
    print(*main(*sys.argv[1:3]), sep="\n")
