"""The ``dpfa`` command: a privacy calculator on top of dpfa's accountants.

    dpfa epsilon      epsilon spent by a DP-SGD-style run (noise, sampling rate, steps)
    dpfa noise        the noise multiplier that meets a target epsilon
    dpfa accountants  every accountant on one configuration, side by side
    dpfa check        empirical privacy audits of every mechanism and of the DP-SGD noise
                      (exit status 1 when a lower bound exceeds its claim)
    dpfa audit        membership-inference audit of DP-SGD at several epsilons (LiRA, loss
                      attack, one-run audit); writes JSON and a markdown table
    dpfa run          run an experiment config (experiments/configs/NAME.toml); resumable JSON
                      and a markdown table in experiments/results/
    dpfa figs         the paper's figures (paper_figs/) from the results JSON, as PNG and PDF
    dpfa bench        the seed's benchmarks: `speed` (GPU timing) and `memory` (analytic estimate)
    dpfa verify       a mechanism's empirical audit plus the accountants' cross-check

Bad input never gives a traceback: the message names the value and what is allowed,
and the exit status is 2.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
import warnings
from typing import Optional, Sequence

from dpfa import _validate
from dpfa.errors import DPFAError

EXIT_USAGE = 2
EXIT_CHECK_FAILED = 1


def _sampling_rate(args) -> float:
    """The sampling rate from --sample-rate, or from --batch-size / --dataset-size."""
    if args.sample_rate is not None and args.batch_size is not None:
        raise DPFAError("Give either --sample-rate or --batch-size (with --dataset-size), not both.")
    if args.sample_rate is not None:
        return _validate.sample_rate(args.sample_rate, "--sample-rate")
    if args.batch_size is not None:
        if args.dataset_size is None:
            raise DPFAError("--batch-size needs --dataset-size to give the sampling rate batch/dataset.")
        b = _validate.count(args.batch_size, "--batch-size")
        n = _validate.count(args.dataset_size, "--dataset-size")
        return _validate.sample_rate(b / n, "--batch-size / --dataset-size")
    raise DPFAError("Missing the sampling rate: give --sample-rate Q in (0, 1] or --batch-size B --dataset-size N.")


def _check_common(args) -> dict:
    """Validate the options shared by every sub-command; returns the run's inputs."""
    from dpfa import accountants, mechanisms
    from dpfa.accountants.events import normalize_sampling

    mechanisms.get(args.mechanism)
    if getattr(args, "accountant", None) is not None:
        accountants.get(args.accountant)
    inputs = {
        "mechanism": args.mechanism,
        "sample_rate": _sampling_rate(args),
        "steps": _validate.count(args.steps, "--steps"),
        "delta": _validate.delta(args.delta, "--delta"),
        "sampling": normalize_sampling(args.sampling),
        "dataset_size": None if args.dataset_size is None else _validate.count(args.dataset_size, "--dataset-size"),
    }
    if inputs["dataset_size"] is not None and inputs["delta"] > 1.0 / inputs["dataset_size"]:
        warnings.warn(
            f"delta={inputs['delta']:g} is larger than 1/dataset-size={1.0 / inputs['dataset_size']:g}: a "
            "mechanism that publishes one random example outright meets such a delta. Use delta << 1/N.",
            stacklevel=2,
        )
    return inputs


def _epsilon(inputs: dict, noise_multiplier: float, accountant: str) -> float:
    from dpfa.accountants import epsilon_for

    return epsilon_for(noise_multiplier, inputs["delta"], inputs["sample_rate"], inputs["steps"], accountant,
                       inputs["mechanism"], inputs["sampling"], inputs["dataset_size"])


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.4f}"


def cmd_epsilon(args) -> int:
    inputs = _check_common(args)
    z = _validate.noise_multiplier(args.noise_multiplier, "--noise-multiplier")
    eps = _epsilon(inputs, z, args.accountant)
    out = {"epsilon": eps, "noise_multiplier": z, "accountant": args.accountant, **inputs}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"epsilon = {_fmt(eps)}  at delta = {inputs['delta']:g}  ({args.accountant} accountant, "
              f"{inputs['mechanism']}, z = {z:g}, q = {inputs['sample_rate']:g}, {inputs['steps']} steps, "
              f"{inputs['sampling']} sampling)")
    return 0


def cmd_noise(args) -> int:
    from dpfa.accountants import noise_multiplier_for

    inputs = _check_common(args)
    target = _validate.epsilon(args.target_epsilon, "--target-epsilon")
    z = noise_multiplier_for(target, inputs["delta"], inputs["sample_rate"], inputs["steps"],
                             accountant=args.accountant, mechanism=inputs["mechanism"],
                             sampling=inputs["sampling"], dataset_size=inputs["dataset_size"])
    eps = _epsilon(inputs, z, args.accountant)
    out = {"noise_multiplier": z, "epsilon": eps, "target_epsilon": target, "accountant": args.accountant, **inputs}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"noise multiplier = {z:.4f}  (epsilon = {_fmt(eps)} <= {target:g} at delta = {inputs['delta']:g}; "
              f"{args.accountant} accountant, {inputs['mechanism']}, q = {inputs['sample_rate']:g}, "
              f"{inputs['steps']} steps)")
    return 0


def cmd_accountants(args) -> int:
    from dpfa import accountants

    inputs = _check_common(args)
    z = _validate.noise_multiplier(args.noise_multiplier, "--noise-multiplier")
    rows = []
    for name in accountants.names():
        t0 = time.perf_counter()
        try:
            eps, note = _epsilon(inputs, z, name), ""
        except DPFAError as e:  # an accountant that cannot account this event says why
            eps, note = None, str(e)
        rows.append({"accountant": name, "epsilon": eps, "seconds": time.perf_counter() - t0, "note": note})
    if args.json:
        print(json.dumps({"noise_multiplier": z, **inputs, "results": rows}))
        return 0
    print(f"{inputs['mechanism']}, z = {z:g}, q = {inputs['sample_rate']:g}, {inputs['steps']} steps, "
          f"{inputs['sampling']} sampling, delta = {inputs['delta']:g}")
    print(f"{'accountant':<11} {'epsilon':>10} {'time (s)':>9}  note")
    for r in rows:
        eps = "-" if r["epsilon"] is None else _fmt(r["epsilon"])
        print(f"{r['accountant']:<11} {eps:>10} {r['seconds']:>9.2f}  {r['note']}")
    return 0


def cmd_check(args) -> int:
    from dpfa.attacks.privacy_check import privacy_check

    report = privacy_check(
        epsilon=_validate.epsilon(args.epsilon, "--epsilon"), delta=_validate.delta(args.delta, "--delta"),
        n_samples=_validate.count(args.samples, "--samples", minimum=4),
        seed=None if args.seed is None else _validate.count(args.seed, "--seed", minimum=0),
        confidence=args.confidence, accountant=args.accountant,
    )
    print(json.dumps(report.to_dict()) if args.json else str(report))
    return 0 if report.passed else EXIT_CHECK_FAILED


DEFAULT_AUDIT_CONFIG = "experiments/configs/audit.toml"


def cmd_audit(args) -> int:
    from pathlib import Path

    from dpfa.attacks import runner

    path = args.config
    if path is None and Path(DEFAULT_AUDIT_CONFIG).is_file():
        path = DEFAULT_AUDIT_CONFIG
    if args.epsilon is not None:  # the seed's --epsilon: one claimed epsilon
        if args.epsilons is not None:
            raise DPFAError("Give --epsilon or --epsilons, not both.")
        args.epsilons = str(args.epsilon)
    config = runner.load_config(path, quick=args.quick, epsilons=args.epsilons,
                                num_shadow_models=args.num_shadow_models, jobs=args.jobs)
    name = (Path(path).stem if path is not None else "audit") + ("_quick" if args.quick else "")
    command = " ".join(["dpfa", *map(shlex.quote, args.argv)])
    run = runner.run_audit(config, args.out_dir, name, progress=True, command=command,
                           log=lambda msg: print(f"dpfa: {msg}", file=sys.stderr))
    failures = [r["epsilon"] for r in run.results["table"] if not r["one_run_passed"]]
    if args.json:
        print(json.dumps({"json": str(run.json_path), "markdown": str(run.markdown_path), "computed": run.computed,
                          "cached": run.cached, "passed": not failures, "table": run.results["table"]}))
    else:
        print(run.markdown_path.read_text(), end="")
        print(f"\nwrote {run.json_path} and {run.markdown_path} (computed: {', '.join(run.computed) or 'none'}; "
              f"cached: {', '.join(run.cached) or 'none'})")
        if failures:
            print(f"FAILED: the one-run lower bound exceeds the claimed epsilon at epsilon {', '.join(failures)}")
    return EXIT_CHECK_FAILED if failures else 0


def cmd_bench(args) -> int:
    from dpfa import bench

    for name, value in (("--batch-size", args.batch_size), ("--seq-length", args.seq_length)):
        _validate.count(value, name)
    if args.what == "speed":
        res = bench.attention_speed(args.model, args.batch_size, args.seq_length,
                                    _validate.epsilon(args.epsilon, "--epsilon"))
        print(json.dumps(res) if args.json else
              f"{res['model']} attention {res['shape']} on {res['device']}: SDPA {res['sdpa_ms']:.3f} ms, dpfa flash "
              f"{res['flash_ms']:.3f} ms, dpfa DP release {res['dp_ms']:.3f} ms (median, one layer)")
        return 0
    rows = bench.attention_memory(args.model, args.batch_size, args.seq_length,
                                  [m.strip() for m in args.compare_with.split(",") if m.strip()])
    if args.json:
        print(json.dumps({"model": args.model, "rows": rows}))
    else:
        print(f"{args.model}, batch {args.batch_size}, sequence {args.seq_length}: attention activations kept for "
              "backward, all layers, bf16 (ANALYTIC ESTIMATE from the config's shapes, not a measurement)")
        for r in rows:
            print(f"  {r['method']:<9} {r['bytes'] / 2**30:10.2f} GiB")
    return 0


RENYI_NAMES = {"renyi_gaussian": "gaussian", "gaussian": "gaussian", "laplace": "laplace"}


def cmd_verify(args) -> int:
    from dpfa import accountants
    from dpfa.attacks import audit_mechanism

    if args.composition != "sequential":
        raise DPFAError(f"--composition {args.composition!r}: only 'sequential' is verified (the accountants compose "
                        "releases on the same data; disjoint data compose by the maximum, nothing to check).")
    if args.mechanism not in RENYI_NAMES:
        raise DPFAError(f"Unknown --mechanism {args.mechanism!r}; known: {', '.join(RENYI_NAMES)}.")
    mech = RENYI_NAMES[args.mechanism]
    eps, delta = _validate.epsilon(args.epsilon, "--epsilon"), _validate.delta(args.delta, "--delta")
    audit = audit_mechanism(mech, eps, delta if mech == "gaussian" else 0.0, n_samples=args.samples, seed=0)
    rows = {}
    for name in ("rdp", "prv", "pld"):
        acc = accountants.create(name).compose(mech, args.noise_multiplier, args.sample_rate, args.steps)
        rows[name] = acc.get_epsilon(delta)
    # every accountant is an upper bound; RDP is the loosest: the numerical ones must be below it and agree
    agree = max(rows["prv"], rows["pld"]) <= rows["rdp"] * 1.01 + 1e-3 and abs(rows["prv"] - rows["pld"]) <= (
        0.02 * rows["pld"] + 1e-2)
    ok = audit.passed and agree
    if args.json:
        print(json.dumps({"audit": audit.to_dict(), "accountants": rows, "accountants_agree": agree, "passed": ok}))
    else:
        print(str(audit))
        print(f"sequential composition of {args.steps} releases (z = {args.noise_multiplier:g}, q = "
              f"{args.sample_rate:g}) at delta {delta:g}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows.items())
              + (" (agree)" if agree else " (DISAGREE)"))
    return 0 if ok else EXIT_CHECK_FAILED


def cmd_run(args) -> int:
    from dpfa.experiments import run_config

    command = " ".join(["dpfa", *map(shlex.quote, args.argv)])
    run = run_config(args.config, quick=args.quick, device=args.device, seeds=args.seeds, out_dir=args.out_dir,
                     progress=True, command=command, log=lambda msg: print(f"dpfa: {msg}", file=sys.stderr))
    print(run.markdown_path.read_text(), end="")
    print(f"\nwrote {run.json_path} and {run.markdown_path} ({len(run.computed)} cells computed, "
          f"{len(run.cached)} cached)")
    return 0


def cmd_figs(args) -> int:
    from dpfa.experiments.figs import build_figures

    for path in build_figures(args.results, args.out, only=args.only, log=lambda m: print(f"dpfa: {m}",
                                                                                          file=sys.stderr)):
        print(path)
    return 0


def _add_experiment_commands(sub) -> None:
    p = sub.add_parser(
        "run", help="run an experiment config (speed, language_model, image_classification, audit, accountants)",
        description="Run the experiment of a TOML config (its 'experiment' key, else its file name: speed, "
                    "language_model, image_classification, audit, accountants) and write OUT_DIR/NAME.json (config, "
                    "environment, device, git commit, seeds, every number) and OUT_DIR/NAME.md (the table). A cell "
                    "(one training run, one accountant curve) already in the JSON with the same settings is not "
                    "recomputed, so an interrupted run resumes. speed needs a CUDA GPU and refuses on a CPU.",
        epilog="Example: dpfa run experiments/configs/language_model.toml --quick")
    p.add_argument("config", metavar="CONFIG.toml",
                   help="an experiment config, e.g. experiments/configs/accountants.toml")
    p.add_argument("--quick", action="store_true",
                   help="the config's [quick] table: a reduced run, minutes on a CPU; writes NAME_quick.json/.md")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="where models train (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="use seeds 0..N-1 instead of the config's seeds (privacy-utility configs)")
    p.add_argument("--out-dir", default="experiments/results", metavar="DIR",
                   help="where NAME.json and NAME.md go (default: experiments/results)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("figs", help="build the paper's figures from the results JSON",
                       description="Run every paper_figs/fig_*.py script (each reads only results JSON, never "
                                   "trains) and write PNG and PDF files into OUT. Needs matplotlib and a checkout "
                                   "of the repository (paper_figs/).")
    p.add_argument("--results", default="experiments/results", metavar="DIR",
                   help="where the results JSON are (default: experiments/results)")
    p.add_argument("--out", default="paper_figs/out", metavar="DIR", help="where the figures go (default: "
                   "paper_figs/out)")
    p.add_argument("--only", nargs="*", default=None, metavar="NAME",
                   help="figure names to build, e.g. privacy_utility speed (default: all)")
    p.set_defaults(func=cmd_figs)


def _add_common(p: argparse.ArgumentParser, accountant: bool = True) -> None:
    p.add_argument("--mechanism", default="gaussian",
                   help="noise mechanism, a registered name: gaussian (L2), laplace (L1), discrete_gaussian "
                        "(integer grid) (default: gaussian)")
    p.add_argument("--sample-rate", type=float, default=None, metavar="Q",
                   help="probability that an example is in a batch (Poisson), or batch/dataset size (without "
                        "replacement); in (0, 1]")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="alternative to --sample-rate: expected batch size; needs --dataset-size")
    p.add_argument("--steps", type=int, required=True, metavar="T", help="number of noisy steps (>= 1)")
    p.add_argument("--delta", type=float, required=True, help="target delta in (0, 1); use delta << 1/dataset size")
    p.add_argument("--sampling", default="poisson", metavar="{poisson,without-replacement}",
                   help="how batches are drawn: poisson (add/remove neighbours, default) or without-replacement "
                        "(fixed-size batches, replace-one neighbours)")
    p.add_argument("--dataset-size", type=int, default=None, metavar="N",
                   help="number of examples; checks delta < 1/N and, with --batch-size, gives the sampling rate")
    if accountant:
        p.add_argument("--accountant", default="prv",
                       help="rdp (Renyi DP, an upper bound), prv (privacy random variables, Gopi et al. 2021) or "
                            "pld (privacy loss distributions, dp-accounting) (default: prv)")
    p.add_argument("--json", action="store_true", help="print one JSON object (result plus inputs) instead of text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpfa",
        description="Privacy accounting for DP-SGD and DP attention releases (dp-flash-attention).",
        epilog="Example: dpfa epsilon --noise-multiplier 1.0 --sample-rate 0.01 --steps 1000 --delta 1e-5",
    )
    from dpfa import __version__

    parser.add_argument("--version", action="version", version=f"dpfa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("epsilon", help="epsilon spent by a run",
                       description="Print the epsilon at --delta spent by --steps noisy steps of the mechanism "
                                   "with this noise multiplier and sampling rate.")
    p.add_argument("--noise-multiplier", type=float, required=True, metavar="Z",
                   help="noise scale / sensitivity (sigma / C for the Gaussian); >= 0, 0 means no noise (inf)")
    _add_common(p)
    p.set_defaults(func=cmd_epsilon)

    p = sub.add_parser("noise", help="noise multiplier for a target epsilon",
                       description="Print the smallest noise multiplier whose run stays within --target-epsilon.")
    p.add_argument("--target-epsilon", type=float, required=True, metavar="EPS", help="epsilon budget, > 0")
    _add_common(p)
    p.set_defaults(func=cmd_noise)

    p = sub.add_parser("accountants", help="compare rdp, prv and pld on one configuration",
                       description="Print every registered accountant's epsilon for one configuration.")
    p.add_argument("--noise-multiplier", type=float, required=True, metavar="Z",
                   help="noise scale / sensitivity; >= 0")
    _add_common(p, accountant=False)
    p.set_defaults(func=cmd_accountants)

    from dpfa.attacks.privacy_check import DEFAULT_SAMPLES

    p = sub.add_parser("check", help="audit every mechanism and the DP-SGD noise empirically",
                       description="Run each mechanism and the DP-SGD noise step many times on two neighbouring "
                                   "inputs and bound epsilon from below (Clopper-Pearson). Exit status 0 when no "
                                   "lower bound exceeds its claimed epsilon, 1 when one does, 2 on bad input.")
    p.add_argument("--epsilon", type=float, default=1.0, help="epsilon each audit is calibrated for (default: 1)")
    p.add_argument("--delta", type=float, default=1e-5, help="delta each audit is calibrated for (default: 1e-5)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                   help=f"outputs drawn per input and audit (default: {DEFAULT_SAMPLES})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the noise and of the split, for a repeatable report (default: 0)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="confidence of the whole report, shared by the audits (default: 0.95)")
    p.add_argument("--accountant", default="prv", help="the DP-SGD engine's accountant: rdp, prv or pld (default: prv)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the report) instead of the table")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "audit", help="membership-inference audit of DP-SGD at several epsilons (LiRA, loss attack, one-run)",
        description="Train MLPs on scikit-learn's digits with dpfa's DP-SGD (Poisson sampling) at each claimed "
                    "epsilon (inf: no noise, no clipping) and attack them: LiRA online and offline (leave-one-out "
                    "over the shadow models), the loss-threshold attack, and a one-run audit with mislabeled "
                    "canaries. Writes OUT_DIR/NAME.json (every number) and OUT_DIR/NAME.md (the table); an epsilon "
                    "already in the JSON with the same configuration is not recomputed. Exit status 0, 1 when a "
                    "one-run lower bound exceeds its claimed epsilon, 2 on bad input.")
    p.add_argument("--config", default=None, metavar="PATH",
                   help=f"TOML config; NAME is its file name without .toml (default: {DEFAULT_AUDIT_CONFIG} if it "
                        "exists here, else the built-in defaults, which are the same; NAME audit)")
    p.add_argument("--quick", action="store_true",
                   help="the config's [quick] table (tiny models, seconds on a CPU); writes NAME_quick.json/.md")
    p.add_argument("--num-shadow-models", type=int, default=None, metavar="N",
                   help="LiRA models per epsilon, >= 4; each is the target once, the others its shadows "
                        "(default: the config's lira.num_shadow_models)")
    p.add_argument("--epsilons", default=None, metavar="LIST",
                   help="claimed epsilons separated by commas, e.g. inf,8,3,1 (inf: the non-private model) "
                        "(default: the config's epsilons)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="training processes; 0 = one per CPU core; does not change any number (default: the "
                        "config's jobs)")
    p.add_argument("--out-dir", default="experiments/results", metavar="DIR",
                   help="where NAME.json and NAME.md go (default: experiments/results)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (paths, computed and cached cells, the table) instead of the table")
    p.add_argument("--attack", choices=("membership_inference",), default="membership_inference",
                   help="the seed's name for this audit; membership_inference (LiRA, loss attack, one-run) is the "
                        "only one (default)")
    p.add_argument("--epsilon", type=float, default=None, help="one claimed epsilon (the seed's form of --epsilons)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("bench", help="the seed's benchmarks: attention speed (GPU) and memory (analytic estimate)",
                       description="speed: median time of one layer's attention (torch SDPA, dpfa flash, dpfa DP "
                                   "release) at the model's shapes; needs a CUDA GPU (a CPU runs the plain-torch "
                                   "reference, which says nothing about the kernels). memory: an ANALYTIC estimate "
                                   "of the attention activations kept for backward, from the model's configuration "
                                   "(no weights are loaded).")
    p.add_argument("what", choices=("speed", "memory"))
    p.add_argument("--model", required=True, help="a known configuration, e.g. bert-large, gpt2-xl, vit-huge")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="batch size (default: 8)")
    p.add_argument("--seq-length", type=int, default=1024, metavar="N", help="sequence length (default: 1024)")
    p.add_argument("--epsilon", type=float, default=1.0, help="speed: epsilon of the DP release (default: 1)")
    p.add_argument("--compare-with", default="flash,standard,opacus", metavar="LIST",
                   help="memory: methods separated by commas among flash, standard, opacus (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("verify", help="a mechanism's empirical audit plus the accountants' cross-check",
                       description="Audit the mechanism on worst-case neighbouring inputs at (--epsilon, --delta) "
                                   "and compose --steps subsampled releases with the rdp, prv and pld accountants, "
                                   "which must agree. Exit status 0, 1 when the audit or the cross-check fails, 2 on "
                                   "bad input.")
    p.add_argument("--mechanism", default="renyi_gaussian",
                   help="renyi_gaussian (the seed's name: the Gaussian mechanism accounted by RDP), gaussian, laplace")
    p.add_argument("--composition", default="sequential", help="sequential (the only one there is to verify)")
    p.add_argument("--epsilon", type=float, default=1.0, help="epsilon the audited release is calibrated for")
    p.add_argument("--delta", type=float, default=1e-5, help="delta of the audit and of the accountants")
    p.add_argument("--noise-multiplier", type=float, default=1.0, metavar="Z", help="composition: noise (default 1)")
    p.add_argument("--sample-rate", type=float, default=0.01, metavar="Q", help="composition: rate (default 0.01)")
    p.add_argument("--steps", type=int, default=1000, metavar="T", help="composition: releases (default 1000)")
    p.add_argument("--samples", type=int, default=200_000, metavar="N", help="audit: outputs per input")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_verify)
    _add_experiment_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, *a, **k: print(f"dpfa: warning: {msg}", file=sys.stderr)
        try:
            return args.func(args)
        except DPFAError as e:
            print(f"dpfa: error: {e}", file=sys.stderr)
            return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
