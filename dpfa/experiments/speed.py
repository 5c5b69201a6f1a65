"""``speed``: GPU timings from one run on one GPU, as ratios.

- ``attention``: experiments/bench_flash_attention.py (the attention table: dpfa's flash
  attention against torch SDPA's flash, cuDNN and memory-efficient back ends, forward and
  forward + backward, and the DP release hooks), run as a subprocess on the config's
  ``bench_config``; its ``flash_attention.json`` is read back whole into the cell (and,
  for a full run, left in the results directory, where paper_figs/fig_speed.py reads it).
- ``dp_release``: the same script with ``--dp`` (the DP release against post-hoc noise).
- ``train_step``: one training step of a GPT (:class:`dpfa.models.GPT`) on random tokens:
  non-private, dpfa's DP-SGD (per-example norms in the one backward pass) and the textbook
  DP-SGD (torch.func.vmap per-example gradients), median seconds per step over
  ``repeats`` after ``warmup``, and the ratios to the non-private step.

Speed needs a GPU: on a CPU the runner refuses with a message (the numbers would say
nothing about the kernels). :func:`train_step_times` itself runs anywhere, which is how
the tests check it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Tuple

import torch

from dpfa.errors import DPFAError
from dpfa.experiments.common import progress_bar


@dataclasses.dataclass(frozen=True)
class TrainStepSpec:
    enabled: bool = True
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    block_size: int = 256
    vocab_size: int = 256
    batch_size: int = 32
    warmup: int = 3
    repeats: int = 10


@dataclasses.dataclass(frozen=True)
class Config:
    bench_config: str = "experiments/configs/flash_attention.toml"  # relative to the repository root
    only: Tuple = ()          # shape names of the bench config to run (empty: all)
    hooks: bool = True        # also time the DP release hooks (cap + clip, + fused noise)
    dp_release: bool = True   # also run the bench's --dp table
    timeout_s: int = 900      # per bench subprocess
    train_step: TrainStepSpec = TrainStepSpec()


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _bench(cfg: Config, out_dir: Path, dp: bool, log) -> dict:
    root = repo_root()
    script = root / "experiments" / "bench_flash_attention.py"
    if not script.is_file():
        raise DPFAError(f"The speed config runs {script}, which is not there: run it from a checkout of the "
                        "repository.")
    bench_cfg = Path(cfg.bench_config)
    bench_cfg = bench_cfg if bench_cfg.is_absolute() else root / bench_cfg
    cmd = [sys.executable, str(script), "--config", str(bench_cfg), "--out-dir", str(out_dir)]
    cmd += ["--dp"] if dp else (["--hooks"] if cfg.hooks else [])
    if cfg.only:
        cmd += ["--only", *cfg.only]
    log("running " + " ".join(cmd))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout_s, cwd=root)
    except subprocess.TimeoutExpired:
        raise DPFAError(f"{script.name} ran past timeout_s={cfg.timeout_s}; raise it in the speed config.") from None
    name = "dp_attention.json" if dp else "flash_attention.json"
    if r.returncode != 0 or not (out_dir / name).is_file():
        raise DPFAError(f"{script.name} failed (exit status {r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads((out_dir / name).read_text())


def train_step_times(spec: TrainStepSpec, device: str) -> dict:
    """Median seconds of one optimizer step: non-private, dpfa DP-SGD, textbook DP-SGD (random tokens)."""
    import warnings

    import torch.nn.functional as F

    from dpfa.experiments.dpsgd import TrainSpec, _TextbookStep
    from dpfa.models import GPT, GPTConfig
    from dpfa.training import PrivacyEngine

    cfg = GPTConfig(vocab_size=spec.vocab_size, block_size=spec.block_size, n_layer=spec.n_layer, n_head=spec.n_head,
                    n_embd=spec.n_embd)
    B, T = spec.batch_size, spec.block_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(spec.vocab_size, (B, T), generator=g)
    y = torch.randint(spec.vocab_size, (B, T), generator=g)
    xd, yd = x.to(device), y.to(device)

    def loss_fn(logits, t):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1))

    def timed(step) -> float:
        for _ in range(spec.warmup):
            step()
        out = []
        for _ in range(spec.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def plain():
        opt.zero_grad()
        loss_fn(model(xd), yd).backward()
        opt.step()
    times = {"non_private": timed(plain)}

    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    engine = PrivacyEngine(accountant="rdp", seed=0)
    dataset = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=B)
    model, opt, _ = engine.make_private(model, opt, loader, noise_multiplier=1.0, target_delta=1e-5,
                                        max_grad_norm=1.0)

    def dpfa_step():
        opt.zero_grad()
        loss_fn(model(xd), yd).backward()
        opt.step()
    times["dpfa"] = timed(dpfa_step)

    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    tb = _TextbookStep(model, loss_fn, TrainSpec(batch_size=B), device, 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times["textbook"] = timed(lambda: tb(opt, list(range(B)), dataset, 1.0))
    except torch.OutOfMemoryError as e:  # materialised per-example gradients: B copies of the model
        times["textbook"] = None
        times["textbook_error"] = str(e).splitlines()[0][:200]
    base = times["non_private"]
    ratios = {k: (v / base if isinstance(v, float) else None) for k, v in times.items() if not k.endswith("error")}
    return {"seconds_per_step": times, "ratio_to_non_private": ratios,
            "dpfa_speedup_over_textbook": (times["textbook"] / times["dpfa"]) if times.get("textbook") else None,
            "model": dataclasses.asdict(cfg), "batch_size": B}


def require_gpu(device: str) -> None:
    if device != "cuda":
        raise DPFAError("The speed config times the Triton kernels and the DP-SGD step on a GPU; it needs a CUDA "
                        "device and this run is on the CPU (no GPU visible, or --device cpu). Run it on a GPU "
                        "machine: dpfa run experiments/configs/speed.toml --device cuda. The committed GPU numbers "
                        "are in experiments/results/flash_attention.json.")


def run(cfg: Config, store, *, device: str, progress: bool, log, out_dir: Path, quick: bool) -> None:
    if quick and device != "cuda":
        # --quick on a CPU: the training-step table alone (the attention tables time Triton kernels on a GPU)
        log("speed --quick on the CPU: only the training-step table; the attention and DP-release tables need a "
            "CUDA device.")
        plan = ["train_step"]
    else:
        require_gpu(device)
        plan = ["attention"] + (["dp_release"] if cfg.dp_release else []) + (["train_step"] if cfg.train_step.enabled
                                                                              else [])
    store.plan = plan
    bar = progress_bar(len(plan), "speed cells", enabled=progress)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    for key in plan:
        cell_cfg = {"cell": key, "gpu": gpu, **({"train_step": dataclasses.asdict(cfg.train_step)}
                                                if key == "train_step" else
                                                {"bench_config": cfg.bench_config, "only": list(cfg.only),
                                                 "hooks": cfg.hooks})}
        if store.load(key, cell_cfg) is None:
            t0 = time.perf_counter()
            if key == "train_step":
                numbers = train_step_times(cfg.train_step, device)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    numbers = _bench(cfg, Path(tmp) if quick else out_dir, key == "dp_release", log)
            store.put(key, cell_cfg, {"result": numbers, "seconds": time.perf_counter() - t0})
        bar.update(1)
    bar.close()


def _f(x, spec="{:.2f}x"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else spec.format(x)


def render(results: dict, keys) -> Tuple[dict, str]:
    cells = results["cells"]
    lines = []
    if "attention" in keys:
        r = cells["attention"]["result"]
        lines += [f"**Attention** ({r['device']}, {r['dtype']}; ratio = dpfa time / back-end time, < 1: dpfa faster)",
                  "", "| shape | fwd / flash | fwd / cuDNN | fwd+bwd / flash | fwd+bwd / cuDNN |",
                  "|---|---|---|---|---|"]
        for s in r["shapes"]:
            if "failed" in s:
                lines.append(f"| {s['name']} | failed | | | |")
                continue
            ra = s["ratios"]
            lines.append(f"| {s['name']} | {_f(ra.get('fwd_vs_flash'))} | {_f(ra.get('fwd_vs_cudnn'))} | "
                         f"{_f(ra.get('fwd_bwd_vs_flash'))} | {_f(ra.get('fwd_bwd_vs_cudnn'))} |")
        lines.append("")
    if "dp_release" in keys:
        r = cells["dp_release"]["result"]
        lines += ["**DP release** (forward; ratio = dp_flash_attn_func time / alternative)", ""]
        for s in r.get("dp_shapes", []):
            if "ratios" in s:
                lines.append(f"- {s['name']}: " + ", ".join(f"{k} {_f(v)}" for k, v in s["ratios"].items()))
        lines.append("")
    if "train_step" in keys:
        r = cells["train_step"]["result"]
        m = r["model"]
        t = r["seconds_per_step"]
        lines += [f"**Training step** (GPT {m['n_layer']} layers, width {m['n_embd']}, {m['block_size']} tokens, "
                  f"batch {r['batch_size']}; median seconds per step)", "",
                  "| step | seconds | / non-private |", "|---|---|---|"]
        for k in ("non_private", "dpfa", "textbook"):
            lines.append(f"| {k} | {_f(t.get(k), '{:.4f}')} | {_f(r['ratio_to_non_private'].get(k))} |")
        lines.append("")
    return {}, "\n".join(lines) + "\n"
