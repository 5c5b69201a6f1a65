"""The Triton noise samplers' laws at 10^7 samples (issue 12 item 4): run once on a GPU.

    python experiments/sampler_laws.py --n 10000000 --out-dir experiments/results

For the Gaussian, Laplace and discrete Gaussian device samplers at scales {0.5, 1, 3, 100,
1e4}: the KS p-value (continuous laws), the chi-square p-value against the exact pmf
(discrete Gaussian), the sample mean and variance as z-scores against the law's, and the
verdict of the test suite's own criterion (``tests/test_device_samplers.py::_law_ok``: p >
1e-3, moments within 4.42 standard errors). Then the power checks: a scale off by 10% and
Laplace in place of Gaussian must be rejected. Writes ``sampler_laws.json`` with the device.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch
from scipy import stats

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from dpfa.kernels.noise import fill_noise  # noqa: E402
from law_tests import chi2_vs_discrete_gaussian  # noqa: E402
from test_device_samplers import SAMPLERS, SCALES, _dg_moments, _law_ok  # noqa: E402


def sample(name, scale, n, seed):
    return fill_noise(SAMPLERS[name], seed, n, scale, device="cuda" if torch.cuda.is_available() else "cpu",
                      dtype=torch.float32).cpu().double().numpy()


def describe(name, x, scale) -> dict:
    n = len(x)
    if name == "gaussian":
        var, m4 = scale**2, 3 * scale**4
        p = stats.kstest(x / scale, "norm").pvalue
    elif name == "laplace":
        var, m4 = 2 * scale**2, 24 * scale**4
        p = stats.kstest(x / scale, "laplace").pvalue
    else:
        var, m4 = _dg_moments(scale)
        p = chi2_vs_discrete_gaussian(x, scale) if scale <= 100 else None
    return {"n": n, "p_value": p, "mean_z": float(x.mean() / math.sqrt(var / n)),
            "var_z": float((x.var() - var) / math.sqrt((m4 - var**2) / n)), "criterion_passes": bool(_law_ok(name, x, scale))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000_000, help="samples per law and scale (default 10^7)")
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--out-dir", default=str(ROOT / "experiments" / "results"))
    args = ap.parse_args(argv)
    rows, t0 = [], time.time()
    for name in SAMPLERS:
        for i, scale in enumerate(SCALES):
            row = {"sampler": name, "scale": scale, **describe(name, sample(name, scale, args.n, args.seed + i), scale)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    power = []
    for name in SAMPLERS:
        for scale in (1.0, 100.0):
            x = sample(name, 0.9 * scale, args.n, args.seed + 99)
            power.append({"case": f"{name} at 0.9 x {scale} tested as {scale}", "rejected": not _law_ok(name, x, scale)})
    x = sample("laplace", 3.0 / math.sqrt(2), args.n, args.seed + 98)
    power.append({"case": "laplace (variance 9) tested as gaussian 3", "rejected": not _law_ok("gaussian", x, 3.0)})
    for p in power:
        print(json.dumps(p), flush=True)
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "n": args.n, "seconds": time.time() - t0, "laws": rows, "power": power}
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampler_laws.json").write_text(json.dumps(result, indent=2) + "\n")
    ok = all(r["criterion_passes"] for r in rows) and all(p["rejected"] for p in power)
    print("ALL LAWS PASS, ALL BROKEN VARIANTS REJECTED" if ok else "SOMETHING FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
