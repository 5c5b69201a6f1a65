"""Where a private training step spends its time (issue 6): torch.profiler over a few steps.

    python experiments/profile_dpsgd_step.py --out-dir experiments/results          # GPU
    python experiments/profile_dpsgd_step.py --tiny --out-dir /tmp/profile_smoke    # CPU smoke test

The model and modes are bench_dpsgd_step.py's. For each (shape, mode) it profiles ``--steps``
steps after ``--warmup`` and records: the step's wall time, the GPU's busy time (sum of kernel
durations; wall minus busy is time the GPU waited for the host), the number of kernel launches,
and the kernels' time by group (matmuls, flash attention, the Triton ghost/direct/clipped-sum/noise
kernels, elementwise and reductions, copies) with the top kernels by name. Writes
``dpsgd_profile.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import torch  # noqa: E402

GROUPS = [  # (group, substrings of a kernel name); the first match wins
    ("ghost_norm", ("_ghost_norm",)), ("direct_norm", ("_direct_norm",)), ("clipped_sum", ("_clipped_sum",)),
    ("dp_noise", ("_noisy_average", "dpsgd_noise", "_noise")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "sm90_xmma", "cutlass", "cublas", "nvjet", "matmul", "_mm")),
    ("copy_cast", ("copy", "cast", "to_copy", "Memcpy", "Memset")),
    ("reduce", ("reduce", "sum", "norm")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise")),
]


def _group(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k.lower() in low for k in keys):
            return group
    return "other"


def profile(mode, cfg, B, T, device, warmup, steps):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    import bench_dpsgd_step as bench

    step, model, _ = bench._make_step(mode, cfg, B, T, device)
    for _ in range(warmup):
        step()
    bench._sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        bench._sync(device)
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    by_name = collections.Counter()
    calls = collections.Counter()
    for ev in prof.events():
        if device.type == "cuda" and ev.device_type.name != "CUDA":
            continue
        if device.type != "cuda" and ev.cpu_parent is not None:
            continue
        dur = (ev.device_time if device.type == "cuda" else ev.cpu_time) / 1e3  # ms
        by_name[ev.name] += dur / steps
        calls[ev.name] += 1
    groups = collections.Counter()
    for name, ms in by_name.items():
        groups[_group(name)] += ms
    busy = sum(by_name.values())
    del step, model
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return {"B": B, "T": T, "mode": mode, "wall_ms": wall_ms, "gpu_busy_ms": busy,
            "launches_per_step": sum(calls.values()) / steps,
            "groups_ms": dict(groups.most_common()),
            "top_kernels": [{"name": n[:160], "ms": ms, "calls": calls[n] / steps} for n, ms in by_name.most_common(25)]}


def host_profile(mode, cfg, B, T, device, warmup, steps, top=35):
    """cProfile of ``steps`` steps: where the host (Python) time goes. Returns the top functions by own time."""
    import cProfile
    import pstats

    import bench_dpsgd_step as bench

    step, model, _ = bench._make_step(mode, cfg, B, T, device)
    for _ in range(warmup):
        step()
    bench._sync(device)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        step()
    bench._sync(device)
    prof.disable()
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in stats.stats.items():
        rows.append({"function": f"{pathlib.Path(file).name}:{line}:{fn}", "calls": nc / steps,
                     "own_ms": 1e3 * tt / steps, "cum_ms": 1e3 * ct / steps})
    del step, model
    return {"B": B, "T": T, "mode": mode, "wall_ms_under_cprofile": wall_ms,
            "by_own_time": sorted(rows, key=lambda r: -r["own_ms"])[:top],
            "by_cum_time": sorted(rows, key=lambda r: -r["cum_ms"])[:top]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer GPT on CPU (kernels under TRITON_INTERPRET=1)")
    ap.add_argument("--out-dir", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="non_private,dpfa_flat_kernels,dpfa_per_layer_kernels")
    ap.add_argument("--shapes", default=None, help="B:T pairs, comma-separated (default: the benchmark's)")
    ap.add_argument("--host", action="store_true", help="profile the host (cProfile) instead of the GPU kernels")
    args = ap.parse_args(argv)
    if args.tiny and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import bench_dpsgd_step as bench

    cfg = bench.TINY if args.tiny else bench.FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        sys.exit("profile_dpsgd_step.py needs a CUDA GPU (use --tiny for a CPU smoke test).")
    shapes = cfg["shapes"] if args.shapes is None else [tuple(int(v) for v in s.split(":"))
                                                        for s in args.shapes.split(",")]
    rows = []
    if args.host:
        for B, T in shapes:
            for mode in args.modes.split(","):
                r = host_profile(mode, cfg, B, T, device, args.warmup, args.steps)
                rows.append(r)
                print(f"B {B:3d} T {T:5d} {mode:24s} wall under cProfile {r['wall_ms_under_cprofile']:7.1f} ms")
                for key in ("by_own_time", "by_cum_time"):
                    print(f"   {key}:")
                    for f in r[key][:25]:
                        print(f"     own {f['own_ms']:7.2f}  cum {f['cum_ms']:7.2f} ms  x{f['calls']:6.0f}  "
                              f"{f['function'][:90]}")
        out = pathlib.Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dpsgd_host_profile.json").write_text(json.dumps({"device": str(device), "results": rows}, indent=1))
        return rows
    for B, T in shapes:
        for mode in args.modes.split(","):
            r = profile(mode, cfg, B, T, device, args.warmup, args.steps)
            rows.append(r)
            groups = "  ".join(f"{g} {ms:.1f}" for g, ms in r["groups_ms"].items())
            print(f"B {B:3d} T {T:5d} {mode:24s} wall {r['wall_ms']:7.1f} ms  busy {r['gpu_busy_ms']:7.1f} ms  "
                  f"launches {r['launches_per_step']:6.0f}  | {groups}", flush=True)
            for k in r["top_kernels"][:8]:
                print(f"      {k['ms']:7.2f} ms  x{k['calls']:5.1f}  {k['name'][:110]}")
    result = {"what": "profile of DP-SGD training steps (issue 6)",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "steps": args.steps, "warmup": args.warmup, "results": rows}
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dpsgd_profile.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
