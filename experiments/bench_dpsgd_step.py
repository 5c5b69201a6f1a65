"""Training-step time and peak memory of private against non-private GPT training (issue 6).

    python experiments/bench_dpsgd_step.py --out-dir experiments/results          # GPU, ~5 min on an H100
    python experiments/bench_dpsgd_step.py --tiny --out-dir /tmp/bench_smoke      # CPU smoke test

Model: dpfa.models.gpt GPT (d 768, 12 layers, 12 heads, vocab 8192, tied head) at
(B 16, T 512), (B 8, T 2048), (B 64, T 128), bf16 autocast, AdamW. Modes:

- ``non_private``: plain loss.backward(); optimizer.step();
- ``dpfa_flat_torch``: PrivacyEngine, flat clipping, contributions.KERNELS = "off";
- ``dpfa_flat_kernels``: flat clipping with the Triton kernels (ghost/direct norms chosen per
  layer by measured cost, book-keeping clipped sum, fused noise), autograd's weight gradients
  skipped (dpfa.training.deferred_weight_grad);
- ``dpfa_flat_kernels_autograd_wgrad``: the same with autograd's weight gradients computed (and
  discarded), as before the deferral: the deferral's effect;
- ``dpfa_per_layer_kernels``: per-layer clipping with the kernels;
- ``opacus_hooks`` / ``opacus_ghost_untied``: Opacus, if importable (else recorded "not installed");
  Opacus's ghost clipping refuses tied weights, so it runs on the same GPT with an untied head
  (6.3M more parameters, the same FLOPs).

Each (shape, mode): fresh model, ``--warmup`` steps (Triton compiles, the kernel choice is
measured), then ``--steps`` timed steps (CUDA events per step; the median is reported) and
the peak allocated memory over them. Ratios are against ``non_private`` of the same shape in
the same run. Writes ``dpsgd_step.json`` (device, versions, every number) and
``dpsgd_step.md`` into ``--out-dir`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

FULL = dict(vocab_size=8192, n_layer=12, n_head=12, n_embd=768, shapes=[(16, 512), (8, 2048), (64, 128)])
TINY = dict(vocab_size=128, n_layer=2, n_head=2, n_embd=32, shapes=[(4, 32), (2, 64)])
MODES = ["non_private", "dpfa_flat_torch", "dpfa_flat_kernels_autograd_wgrad", "dpfa_flat_kernels",
         "dpfa_per_layer_kernels", "opacus_hooks", "opacus_ghost_untied"]
TARGETS = "issue 6: flat <= 1.10 at T 128, <= 1.30 at T 512/2048; per-layer <= 1.10; peak memory <= 1.25x"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(cfg, T, device, tie_weights=True):
    from dpfa.models.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=cfg["vocab_size"], block_size=T, n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                         n_embd=cfg["n_embd"], tie_weights=tie_weights)).to(device)


def _loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def _make_step(mode, cfg, B, T, device):
    """(step function, model) for one mode; raises ImportError for a missing Opacus."""
    from dpfa.training import PrivacyEngine, collector, contributions

    model = _build(cfg, T, device, tie_weights=not mode.endswith("_untied"))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg["vocab_size"], (B, T), generator=g).to(device)
    y = torch.randint(0, cfg["vocab_size"], (B, T), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=B)
    kernels = "on" if "_kernels" in mode else "off"
    if mode == "non_private":
        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = _loss(model(x), y)
            loss.backward()
            opt.step()
        return step, model, kernels
    if mode.startswith("dpfa"):
        engine = PrivacyEngine(accountant="rdp", seed=0)
        clipping = "per_layer" if "per_layer" in mode else "flat"
        defer, collector.DEFER_WEIGHT_GRADIENTS = collector.DEFER_WEIGHT_GRADIENTS, not mode.endswith("_wgrad")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, opt, _ = engine.make_private(model, opt, loader, noise_multiplier=1.0, target_delta=1e-5,
                                                    max_grad_norm=1.0, clipping=clipping, poisson_sampling=False)
        finally:
            collector.DEFER_WEIGHT_GRADIENTS = defer

        def step():  # the switch holds for the backward too: the collector's hooks run there
            with contributions.use_kernels(kernels):
                opt.zero_grad(set_to_none=True)
                with autocast:
                    loss = _loss(model(x), y)
                loss.backward()
                opt.step()
        return step, model, kernels
    from opacus import PrivacyEngine as OpacusEngine  # ImportError: recorded as not installed
    engine = OpacusEngine()
    mode_name = "ghost" if mode.startswith("opacus_ghost") else "hooks"
    criterion = torch.nn.CrossEntropyLoss()
    if mode_name == "ghost":
        model, opt, criterion, _ = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                                       criterion=criterion, noise_multiplier=1.0, max_grad_norm=1.0,
                                                       grad_sample_mode="ghost", poisson_sampling=False)
    else:
        model, opt, _ = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                            max_grad_norm=1.0, grad_sample_mode="hooks", poisson_sampling=False)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(x)
        flat = (logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        # ghost clipping needs the (B, T, vocab) shape to turn token losses into per-sequence ones
        loss = criterion(*flat, shape=logits.shape) if mode_name == "ghost" else criterion(*flat)
        loss.backward()
        opt.step()
    return step, model, "n/a"


def _measure(mode, cfg, B, T, device, warmup, steps):
    try:
        step, model, kernels = _make_step(mode, cfg, B, T, device)
    except ImportError:
        return {"status": "not installed"}
    except Exception as e:  # a baseline that cannot wrap this model is recorded, not fatal
        return {"status": f"error: {type(e).__name__}: {str(e)[:300]}"}
    try:
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        _sync(device)
        warm_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps):
            if device.type == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                step()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
            else:
                t = time.perf_counter()
                step()
                times.append(1e3 * (time.perf_counter() - t))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        n_params = sum(p.numel() for p in model.parameters())
        return {"status": "ok", "step_ms": statistics.median(times), "step_ms_min": min(times), "step_ms_all": times,
                "peak_gib": peak,
                "warmup_s": warm_s, "params": n_params, "kernels": kernels}
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM"}
    except Exception as exc:  # a failing mode is recorded, the others still run
        return {"status": f"error: {type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        del step, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _table(rows):
    head = ("| B | T | mode | step ms (median) | x non-private | fastest step ms | peak GiB | x non-private |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['B']} | {r['T']} | {r['mode']} | {r['status']} | | | | |")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        pr = "-" if r.get("peak_ratio") is None else f"{r['peak_ratio']:.2f}"
        lines.append(f"| {r['B']} | {r['T']} | {r['mode']} | {r['step_ms']:.1f} | {r['ratio']:.2f} | "
                     f"{r['step_ms_min']:.1f} | {peak} | {pr} |")
    return "\n".join(lines)


def _contributions():
    from dpfa.training import contributions
    return contributions


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer GPT on CPU (kernels under TRITON_INTERPRET=1)")
    ap.add_argument("--out-dir", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args(argv)
    if args.tiny and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before dpfa defines its kernels
    cfg = TINY if args.tiny else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        sys.exit("bench_dpsgd_step.py needs a CUDA GPU (use --tiny for a CPU smoke test).")
    steps = args.steps or (2 if args.tiny else 20)
    warmup = args.warmup or (1 if args.tiny else 3)
    import triton
    rows = []
    for B, T in cfg["shapes"]:
        base = None
        for mode in args.modes.split(","):
            r = {"B": B, "T": T, "mode": mode, **_measure(mode, cfg, B, T, device, warmup, steps)}
            if r["status"] == "ok":
                if mode == "non_private":
                    base = r
                r["ratio"] = r["step_ms"] / base["step_ms"] if base else float("nan")
                r["peak_ratio"] = (r["peak_gib"] / base["peak_gib"]) if base and r["peak_gib"] else None
            rows.append(r)
            print(f"B {B:3d} T {T:5d} {mode:24s} {r['status']:>6s} "
                  + (f"{r['step_ms']:8.1f} ms  x{r['ratio']:.2f}" if r["status"] == "ok" else ""), flush=True)
    result = {
        "what": "DP-SGD training-step time and peak memory, GPT with bf16 autocast (issue 6)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "model": {k: v for k, v in cfg.items() if k != "shapes"} | {"tie_weights": "True (opacus_ghost_untied: False)"},
        "optimizer": "AdamW", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "autocast": "bfloat16",
        "steps": steps, "warmup": warmup, "targets": TARGETS, "tiny": args.tiny, "results": rows,
        # per (T, out, in, dtypes, batch): True = the ghost norm measured faster than the direct one;
        # ("sum", ...): True = the Triton clipped sum measured faster than cuBLAS on the scaled factor
        "kernel_choices": {str(k): v for k, v in _contributions()._MEASURED.items()},
    }
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dpsgd_step.json").write_text(json.dumps(result, indent=1))
    table = _table(rows)
    (out / "dpsgd_step.md").write_text(f"# DP-SGD step, {result['device']}\n\n{result['what']}; torch "
                                       f"{torch.__version__}, Triton {triton.__version__}; median and fastest of {steps} steps "
                                       f"after {warmup} warm-up.\n\n{table}\n\nTargets: {TARGETS}\n")
    print(f"\n{result['device']}\n{table}")
    return result


if __name__ == "__main__":
    main()
