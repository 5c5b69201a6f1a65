"""Speed of dpfa.flash_attn_func against torch SDPA (flash, cuDNN, memory-efficient), issue 4.

    python experiments/bench_flash_attention.py --config experiments/configs/flash_attention.toml \
        --out-dir experiments/results

For each shape of the config: forward time and forward+backward time of every
implementation (median of CUDA-event timings, triton.testing.do_bench), TFLOP/s, the
ratios dpfa / SDPA back end (> 1: dpfa is slower), dpfa's error against SDPA-flash,
and the block config the autotuner picked. All numbers come from one run on one GPU;
the JSON names the device and the torch, Triton and CUDA versions. Writes
``flash_attention.json`` and ``flash_attention.md`` into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import sys
import time
import tomllib

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import importlib  # noqa: E402
fa = importlib.import_module("dpfa.kernels.flash_attention")
from dpfa.kernels import flash_attn_func  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TARGETS = {"fwd_vs_flash": 1.0, "fwd_vs_cudnn": 1.15, "fwd_bwd_vs_cudnn": 1.25}


def _backend(name):
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def _sdpa(name, causal):
    from torch.nn.attention import sdpa_kernel
    backend = _backend(name)

    def run(q, k, v):
        # SDPA takes (batch, heads, seqlen, head_dim): transposed views of the same memory
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=causal)
        return out.transpose(1, 2)
    return run


def _flops(b, h, n, d, causal):
    fwd = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0)
    return fwd, 3.5 * fwd  # backward = 2.5 forward (5 matmuls against 2)


def _time(fn, q, k, v, do, backward, warmup, rep):
    if backward:
        def step():
            fn(q, k, v).backward(do)
        return do_bench(step, warmup=warmup, rep=rep, grad_to_none=[q, k, v], return_mode="median")
    with torch.no_grad():
        return do_bench(lambda: fn(q, k, v), warmup=warmup, rep=rep, return_mode="median")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_shape(spec, dtype, backends, warmup, rep, hooks):
    b, h, n, d, causal = spec["batch"], spec["heads"], spec["seqlen"], spec["head_dim"], spec["causal"]
    g = torch.Generator(device="cuda").manual_seed(int(time.time()))
    q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    impls = {"dpfa": lambda q_, k_, v_: flash_attn_func(q_, k_, v_, causal=causal)}
    for name in backends:
        impls[name] = _sdpa(name, causal)
    row = {"name": spec["name"], "batch": b, "heads": h, "seqlen": n, "head_dim": d, "causal": causal,
           "times_ms": {}, "tflops": {}, "errors": {}}
    fwd_flops, fb_flops = _flops(b, h, n, d, causal)

    # correctness of the autotuned kernels on this shape, against SDPA-flash (or math)
    t0 = time.perf_counter()
    out = flash_attn_func(q, k, v, causal=causal)
    out.backward(do)
    torch.cuda.synchronize()
    row["first_call_s"] = time.perf_counter() - t0  # includes autotuning
    got = [out.detach()] + [t.grad.detach().clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref_name = "flash" if "flash" in backends else "math"
    try:
        ref = impls.get(ref_name, _sdpa(ref_name, causal))(q, k, v)
        ref.backward(do)
        want = [ref.detach()] + [t.grad for t in (q, k, v)]
        row["errors"] = {f"{w}_vs_{ref_name}": _rel(a, c) for w, a, c in zip(("out", "dq", "dk", "dv"), got, want)}
    except RuntimeError as e:
        row["errors"] = {"reference_failed": str(e)[:200]}
    for t in (q, k, v):
        t.grad = None

    for name, fn in impls.items():
        for mode, backward, flops in (("fwd", False, fwd_flops), ("fwd_bwd", True, fb_flops)):
            try:
                ms = _time(fn, q, k, v, do, backward, warmup, rep)
                row["times_ms"].setdefault(name, {})[mode] = ms
                row["tflops"].setdefault(name, {})[mode] = flops / ms / 1e9
            except RuntimeError as e:  # a back end that refuses this shape
                row["times_ms"].setdefault(name, {})[mode] = None
                row.setdefault("unavailable", {})[f"{name}_{mode}"] = str(e).splitlines()[0][:200]
    if hooks:  # cost of the DP release hooks: clamp cap + value clip, then + fused Gaussian noise
        from dpfa.mechanisms.device_samplers import gaussian_sampler
        sigma = torch.ones(b, h, n, device="cuda")
        variants = {
            "dpfa_cap_clip": dict(score_cap=8.0, score_cap_mode="clamp", value_clip=4.0),
            "dpfa_cap_clip_noise": dict(score_cap=8.0, score_cap_mode="clamp", value_clip=4.0,
                                        noise=fa.EpilogueNoise(sigma=sigma, sampler=gaussian_sampler, seed=1)),
        }
        for name, kw in variants.items():
            fn = (lambda kw_: lambda q_, k_, v_: fa.flash_attn_with_hooks(q_, k_, v_, causal=causal, **kw_))(kw)
            ms = _time(fn, q, k, v, do, False, warmup, rep)
            row["times_ms"][name] = {"fwd": ms}
            row["tflops"][name] = {"fwd": fwd_flops / ms / 1e9}
    t = row["times_ms"]

    def ratio(mode, other):
        a, c = t["dpfa"].get(mode), t.get(other, {}).get(mode)
        return None if a is None or c is None else a / c
    row["ratios"] = {f"{mode}_vs_{o}": ratio(mode, o) for mode in ("fwd", "fwd_bwd") for o in backends}
    row["autotuned"] = {name: str(getattr(tuner, "best_config", None))
                        for name, tuner in (("fwd", fa._fwd_tuned), ("dkdv", fa._dkdv_tuned), ("dq", fa._dq_tuned))}
    return row


def bench_dp(spec, dtype, warmup, rep):
    """Issue 13: the DP release forward against its baselines, one shape, forward only.

    - ``dpfa_clean``: dpfa with the cap and the value clip, no noise (epsilon = inf);
    - ``dpfa_dp_fused``: ``dp_flash_attn_func`` (Gaussian, noise from the device sampler in the epilogue);
    - ``dpfa_dp_tensor``: the same release with the noise read from a tensor made by ``torch.randn``
      just before (the path of mechanisms without a device sampler; generation included);
    - ``sdpa_{flash,cudnn}_posthoc``: SDPA, then a separate pass adding ``sigma * randn`` (no cap, no clip);
    - ``flex_pipeline``: what a PyTorch user can build with the same guarantee: value rows clipped in
      torch, FlexAttention (compiled) with a tanh score cap, then a noise pass.
    """
    import dpfa
    from dpfa.kernels.flash_attention import EpilogueNoise, flash_attn_with_hooks
    from torch.nn.attention import sdpa_kernel

    b, h, n, d, causal = spec["batch"], spec["heads"], spec["seqlen"], spec["head_dim"], spec["causal"]
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype) for _ in range(3))
    cap, clip = 2.0, 1.0
    opts = dict(causal=causal, epsilon=1.0, delta=1e-5, score_cap=cap, value_clip=clip)
    sigma = torch.full((b, h, n), 0.05, device="cuda")
    t = {}
    with torch.no_grad():
        t["dpfa_clean"] = do_bench(lambda: dpfa.dp_flash_attn_func(q, k, v, **{**opts, "epsilon": math.inf}),
                                   warmup=warmup, rep=rep, return_mode="median")
        t["dpfa_dp_fused"] = do_bench(lambda: dpfa.dp_flash_attn_func(q, k, v, seed=1, **opts),
                                      warmup=warmup, rep=rep, return_mode="median")

        def tensor_path():
            z = torch.randn(q.shape, device="cuda", dtype=torch.float32)
            return flash_attn_with_hooks(q, k, v, causal=causal, score_cap=cap, value_clip=clip,
                                         noise=EpilogueNoise(sigma=sigma, tensor=z))
        t["dpfa_dp_tensor"] = do_bench(tensor_path, warmup=warmup, rep=rep, return_mode="median")
        for name in ("flash", "cudnn"):
            backend = _backend(name)

            def posthoc(backend=backend):
                with sdpa_kernel(backend):
                    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       is_causal=causal)
                return o + 0.05 * torch.randn_like(o)
            try:
                t[f"sdpa_{name}_posthoc"] = do_bench(posthoc, warmup=warmup, rep=rep, return_mode="median")
            except RuntimeError:
                t[f"sdpa_{name}_posthoc"] = None
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = torch.compile(flex_attention)
            mask = None
            if causal:
                mask = create_block_mask(lambda bb, hh, qi, ki: qi >= ki, None, None, n, n, device="cuda")

            def softcap(score, bb, hh, qi, ki):
                return cap * torch.tanh(score / cap)

            def pipeline():
                vv = v.transpose(1, 2)
                vv = vv * torch.clamp(clip / vv.float().norm(dim=-1, keepdim=True), max=1.0).to(vv.dtype)
                o = flex(q.transpose(1, 2), k.transpose(1, 2), vv, score_mod=softcap, block_mask=mask)
                return o + 0.05 * torch.randn_like(o)
            t["flex_pipeline"] = do_bench(pipeline, warmup=warmup, rep=rep, return_mode="median")
        except Exception as e:  # FlexAttention missing or failing on this build
            t["flex_pipeline"] = None
            t["flex_error"] = f"{type(e).__name__}: {e}"[:200]
    base = t["dpfa_dp_fused"]
    ratios = {f"dp_fused_vs_{name}": (base / ms if isinstance(ms, float) else None)
              for name, ms in t.items() if name != "dpfa_dp_fused" and not name.endswith("error")}
    return {"name": spec["name"], "times_ms": t, "ratios": ratios}


def _fmt(x, spec="{:.3f}"):
    return "n/a" if x is None else spec.format(x)


def markdown(result):
    lines = [f"# dpfa flash attention vs torch SDPA ({result['dtype']})", "",
             f"Device: {result['device']}; torch {result['torch']}, Triton {result['triton']}, "
             f"CUDA {result['cuda']}; {result['date']}. Median times in ms (TFLOP/s); ratio = dpfa time / "
             "back-end time (< 1: dpfa faster). Targets: fwd <= 1.0x flash and <= 1.15x cuDNN; "
             "fwd+bwd <= 1.25x cuDNN.", "",
             "| shape | pass | dpfa | SDPA flash | SDPA cuDNN | SDPA mem-eff | dpfa/flash | dpfa/cuDNN |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["shapes"]:
        if "failed" in r:
            lines.append(f"| {r['name']} | failed: {r['failed'][:80]} | | | | | | |")
            continue
        for mode, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
            cells = []
            for name in ("dpfa", "flash", "cudnn", "efficient"):
                ms = r["times_ms"].get(name, {}).get(mode)
                tf = r["tflops"].get(name, {}).get(mode)
                cells.append("n/a" if ms is None else f"{ms:.3f} ({tf:.0f})")
            lines.append(f"| {r['name']} (B{r['batch']} H{r['heads']} N{r['seqlen']} d{r['head_dim']}"
                         f"{' causal' if r['causal'] else ''}) | {label} | " + " | ".join(cells)
                         + f" | {_fmt(r['ratios'].get(mode + '_vs_flash'), '{:.2f}x')}"
                         f" | {_fmt(r['ratios'].get(mode + '_vs_cudnn'), '{:.2f}x')} |")
    hooks = [r for r in result["shapes"] if "dpfa_cap_clip" in r.get("times_ms", {})]
    if hooks:
        lines += ["", "DP release hooks (forward, ms): clamp score cap + value clip, then + fused Gaussian noise", "",
                  "| shape | dpfa | + cap + clip | + cap + clip + noise |", "|---|---|---|---|"]
        for r in hooks:
            t = r["times_ms"]
            base = t["dpfa"]["fwd"]
            lines.append(f"| {r['name']} | {base:.3f} | {t['dpfa_cap_clip']['fwd']:.3f} "
                         f"({t['dpfa_cap_clip']['fwd'] / base:.2f}x) | {t['dpfa_cap_clip_noise']['fwd']:.3f} "
                         f"({t['dpfa_cap_clip_noise']['fwd'] / base:.2f}x) |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "experiments/configs/flash_attention.toml"))
    p.add_argument("--out-dir", default=str(ROOT / "experiments/results"))
    p.add_argument("--only", nargs="*", help="names of the shapes to run (default: all)")
    p.add_argument("--hooks", action="store_true", help="also time the DP release hooks (forward)")
    p.add_argument("--dp", action="store_true",
                   help="time the DP release (issue 13) against its baselines instead; writes dp_attention.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_flash_attention.py needs a CUDA GPU: the timings are GPU timings.")
    cfg = tomllib.loads(pathlib.Path(args.config).read_text())
    dtype = DTYPES[cfg.get("dtype", "bfloat16")]
    backends = cfg.get("backends", ["flash", "cudnn", "efficient"])
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "dtype": cfg.get("dtype", "bfloat16"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timing": "triton.testing.do_bench median, warmup %d ms, rep %d ms" % (cfg["warmup_ms"], cfg["rep_ms"]),
        "targets": TARGETS, "shapes": [],
    }
    if args.dp:
        result["dp_shapes"] = []
        out = pathlib.Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for spec in cfg["shape"]:
            if args.only and spec["name"] not in args.only:
                continue
            try:
                row = bench_dp(spec, dtype, cfg["warmup_ms"], cfg["rep_ms"])
            except Exception as e:  # keep the other shapes
                row = {"name": spec["name"], "failed": f"{type(e).__name__}: {e}"[:500]}
            result["dp_shapes"].append(row)
            print(json.dumps(row), flush=True)
            (out / "dp_attention.json").write_text(json.dumps(result, indent=2) + "\n")
        return
    for spec in cfg["shape"]:
        if args.only and spec["name"] not in args.only:
            continue
        try:
            row = bench_shape(spec, dtype, backends, cfg["warmup_ms"], cfg["rep_ms"], args.hooks)
        except Exception as e:  # keep the other shapes
            row = {"name": spec["name"], "failed": f"{type(e).__name__}: {e}"[:500]}
        result["shapes"].append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
        # written after every shape, so that a run cut short keeps what it measured
        out = pathlib.Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "flash_attention.json").write_text(json.dumps(result, indent=2) + "\n")
        md = markdown(result)
        (out / "flash_attention.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
