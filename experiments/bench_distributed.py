"""DP-SGD on 1 and 2 GPUs (issue 11): step time, throughput and scaling, non-private vs dpfa.

    python experiments/bench_distributed.py --out-dir experiments/results          # GPUs, NCCL
    python experiments/bench_distributed.py --device cpu --tiny --out-dir /tmp/d    # a CPU smoke run (gloo)

The driver launches ``torchrun --standalone --nproc-per-node W`` for W = 1 and W = 2 (one
process a GPU); each run times the GPT-style model of the fused DP-SGD issue (d 768, 12
layers, 12 heads, vocab 8192, T 512) for ``--steps`` steps after ``--warmup``:

- W = 1: the plain model, non-private (AdamW) and dpfa (PrivacyEngine, flat clipping,
  Poisson sampling, noise multiplier 1);
- W = 2: the same under DistributedDataParallel and under FSDP2 (``fully_shard`` per block).

Weak scaling: every GPU gets ``--batch-per-gpu`` sequences a step (dpfa: that many in
expectation, the global expected batch is W times it). Throughput counts the tokens the
ranks really processed (Poisson batches vary). Scaling efficiency = throughput(W=2) /
(2 * throughput(W=1)), for each of non-private and dpfa, against the plain 1-GPU run.

Exactness: with W = 2 and the noise off (fp32, TF32 off), the private gradient after one
logical batch equals, to fp32 round-off, the single-process gradient of dpfa's DPOptimizer on
the union of the ranks' batches.

NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends are set for the workers).
Writes ``distributed.json`` (device name, versions, every measurement) and ``distributed.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpfa.mechanisms import gaussian  # noqa: E402
from dpfa.models.gpt import GPT, GPTConfig  # noqa: E402
from dpfa.training import PrivacyEngine  # noqa: E402
from dpfa.training.collector import GradSampleCollector  # noqa: E402
from dpfa.training.optimizer import DPOptimizer  # noqa: E402

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
FULL = dict(vocab_size=8192, n_layer=12, n_head=12, n_embd=768)
TINY = dict(vocab_size=64, n_layer=2, n_head=2, n_embd=32)
NOISE_MULTIPLIER, MAX_GRAD_NORM, DELTA, LR = 1.0, 1.0, 1e-5, 1e-4


# ------------------------------------------------------------------ worker (one rank)
def model_config(args) -> GPTConfig:
    return GPTConfig(block_size=args.seq, **(TINY if args.tiny else FULL))


def build(args, wrapper: str, device: torch.device) -> torch.nn.Module:
    """The same initial weights on every rank, wrapped as asked."""
    torch.manual_seed(0)
    model = GPT(model_config(args)).to(device)
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=None if device.type == "cpu" else [device])
    if wrapper == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model


def dataset(args, world: int) -> TensorDataset:
    """Random token sequences (the speed does not depend on the text) with their indices."""
    n = args.batch_per_gpu * world * args.data_batches
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, model_config(args).vocab_size, (n, args.seq + 1), generator=g)
    return TensorDataset(tokens[:, :-1], tokens[:, 1:], torch.arange(n))


def lm_loss(logits, y):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def loaders(args, private: bool, world: int, rank: int):
    ds = dataset(args, world)
    if private:
        return DataLoader(ds, batch_size=args.batch_per_gpu * world)  # the GLOBAL expected batch (engine's rule)
    from torch.utils.data.distributed import DistributedSampler
    sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=0, drop_last=True)
    return DataLoader(ds, batch_size=args.batch_per_gpu, sampler=sampler, drop_last=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cell(args, wrapper: str, private: bool, world: int, rank: int, device: torch.device) -> dict:
    model = build(args, wrapper, device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    loader = loaders(args, private, world, rank)
    engine = None
    if private:
        engine = PrivacyEngine(accountant="prv")
        model, opt, loader = engine.make_private(model, opt, loader, noise_multiplier=NOISE_MULTIPLIER,
                                                 target_delta=DELTA, max_grad_norm=MAX_GRAD_NORM)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    step_times, tokens = [], 0
    it = iter(loader)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        try:
            x, y, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, y, _ = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if world > 1:
            dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            step_times.append(time.perf_counter() - t0)
            tokens += x.numel()
    times = torch.tensor(step_times, dtype=torch.float64)
    tok = torch.tensor([tokens], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    if world > 1:  # a step ends when the slowest rank ends it: the mean over ranks of the summed time is close
        tt = times.to(tok.device)
        dist.all_reduce(tt, op=dist.ReduceOp.MAX)
        times = tt.cpu()
        dist.all_reduce(tok, op=dist.ReduceOp.SUM)
    total = float(times.sum())
    out = {"wrapper": wrapper, "private": private, "world_size": world,
           "step_ms_median": 1e3 * float(times.median()), "step_ms_mean": 1e3 * total / len(times),
           "tokens_per_s": float(tok.item()) / total,
           "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None}
    if engine is not None:
        out["epsilon_after"] = engine.get_epsilon(DELTA)
    del model, opt, loader
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def gradient_check(args, wrapper: str, world: int, rank: int, device: torch.device) -> dict:
    """Noise off: one logical batch on W ranks against one process on the union of their batches."""
    model = build(args, wrapper, device)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine(accountant="rdp")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0 warns that it is not private: that is the point
        model, opt, loader = engine.make_private(model, opt, loaders(args, True, world, rank), noise_multiplier=0.0,
                                                 target_delta=DELTA, max_grad_norm=MAX_GRAD_NORM)
    x, y, idx = next(iter(loader))
    loss = lm_loss(model(x.to(device)), y.to(device))
    loss.backward()
    assert opt.pre_step(), "one physical batch is one logical batch here"
    inner = model.module if hasattr(model, "module") else model
    got = {n: _full(p.grad).detach().double().cpu() for n, p in inner.named_parameters()}
    indices = [None] * world
    dist.all_gather_object(indices, idx.tolist())
    union = sorted(i for part in indices for i in part)
    result = {"wrapper": wrapper, "batch_sizes": [len(p) for p in indices]}
    if rank == 0:
        ds = dataset(args, world)
        torch.manual_seed(0)
        ref = GPT(model_config(args)).to(device)
        collector = GradSampleCollector(ref)
        ref_opt = DPOptimizer(torch.optim.SGD(ref.parameters(), lr=1.0), collector, noise_multiplier=0.0,
                              max_grad_norm=MAX_GRAD_NORM, expected_batch_size=args.batch_per_gpu * world,
                              mechanism=gaussian.GaussianMechanism())
        xs, ys = ds.tensors[0][union].to(device), ds.tensors[1][union].to(device)
        lm_loss(ref(xs), ys).backward()
        ref_opt.pre_step()
        worst, scale = 0.0, 0.0
        for n, p in ref.named_parameters():
            r = p.grad.detach().double().cpu()
            worst = max(worst, float((got[n] - r).abs().max()))
            scale = max(scale, float(r.abs().max()))
        result.update(max_abs_diff=worst, max_abs_grad=scale, rel=worst / scale, ok=worst <= 1e-4 * scale)
    del model, opt
    return result


def worker(args) -> None:
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    wrappers = ["plain"] if world == 1 else ["ddp", "fsdp"]
    rows, checks = [], []
    for wrapper in wrappers:
        for private in (False, True):
            try:
                rows.append(time_cell(args, wrapper, private, world, rank, device))
            except Exception as e:  # one broken cell must not hide the others; the error is reported
                rows.append({"wrapper": wrapper, "private": private, "world_size": world,
                             "error": f"{type(e).__name__}: {e}"})
            if rank == 0:
                print(json.dumps(rows[-1]), flush=True)
    if world > 1 and not args.skip_check:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        for wrapper in wrappers:
            try:
                checks.append(gradient_check(args, wrapper, world, rank, device))
            except Exception as e:
                checks.append({"wrapper": wrapper, "error": f"{type(e).__name__}: {e}"})
            if rank == 0:
                print(json.dumps(checks[-1]), flush=True)
    if rank == 0:
        pathlib.Path(args.worker_out).write_text(json.dumps({"rows": rows, "checks": checks}))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------ driver
def environment(args) -> dict:
    env = {"torch": torch.__version__, "python": sys.version.split()[0], "device_type": args.device,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if args.device == "cuda":
        env["device"] = torch.cuda.get_device_name(0)
        env["gpus"] = torch.cuda.device_count()
        env["cuda"] = torch.version.cuda
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()
    except OSError:
        env["git_commit"] = None
    return env


def summarise(rows: list) -> dict:
    """Ratios: dpfa / non-private step time per setting; scaling efficiency against the plain 1-GPU run."""
    by = {(r["wrapper"], r["private"], r["world_size"]): r for r in rows if "error" not in r}
    out = {}
    for (wrapper, private, world), r in by.items():
        if private and (wrapper, False, world) in by:
            np_ = by[(wrapper, False, world)]
            out[f"{wrapper}_w{world}_dp_over_nonprivate"] = r["step_ms_mean"] / np_["step_ms_mean"]
            out[f"{wrapper}_w{world}_dp_throughput_fraction"] = r["tokens_per_s"] / np_["tokens_per_s"]
        base = by.get(("plain", private, 1))
        if world > 1 and base is not None:
            key = "dpfa" if private else "nonprivate"
            out[f"{wrapper}_{key}_scaling_efficiency"] = r["tokens_per_s"] / (world * base["tokens_per_s"])
    for wrapper in ("ddp", "fsdp"):
        a, b = out.get(f"{wrapper}_dpfa_scaling_efficiency"), out.get(f"{wrapper}_nonprivate_scaling_efficiency")
        if a is not None and b is not None:
            out[f"{wrapper}_scaling_gap_points"] = 100 * (b - a)
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# DP-SGD on 1 and 2 GPUs ({env.get('device', env['device_type'])}, torch {env['torch']})", "",
             f"GPT d{result['config']['n_embd']} x {result['config']['n_layer']} layers, T {result['config']['seq']}, "
             f"{result['config']['batch_per_gpu']} sequences per GPU a step (dpfa: in expectation), "
             f"{'bf16 autocast' if result['config']['bf16'] else 'fp32'}, mean of {result['config']['steps']} steps.", "",
             "| GPUs | wrapper | mode | step ms | tokens/s | peak GiB |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mode = "dpfa" if r["private"] else "non-private"
        if "error" in r:
            lines.append(f"| {r['world_size']} | {r['wrapper']} | {mode} | error: {r['error'][:80]} | | |")
            continue
        mem = "" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        lines.append(f"| {r['world_size']} | {r['wrapper']} | {mode} | {r['step_ms_mean']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {mem} |")
    s = result["summary"]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in s.items()]
    if result["checks"]:
        lines += ["", "Private gradient, noise off, 2 ranks vs one process on the union batch:"]
        for c in result["checks"]:
            if "error" in c:
                lines.append(f"- {c['wrapper']}: error {c['error']}")
            else:
                lines.append(f"- {c['wrapper']}: batch sizes {c['batch_sizes']}, max |diff| {c['max_abs_diff']:.2e} "
                             f"(relative to the largest entry {c['rel']:.2e}): {'equal' if c['ok'] else 'DIFFERENT'}")
    return "\n".join(lines) + "\n"


def driver(args, argv) -> int:
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **SAFE_ENV, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    available = torch.cuda.device_count() if args.device == "cuda" else 2
    worlds = [w for w in (1, 2) if w <= available]
    if args.device == "cuda" and len(worlds) < 2:
        print(f"only {available} GPU(s): the 2-GPU runs need 2", file=sys.stderr)
    rows, checks = [], []
    for world in worlds:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            part = f.name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               str(pathlib.Path(__file__).resolve()), "--worker-out", part] + argv
        print("+", " ".join(cmd[2:]), flush=True)
        rc = subprocess.run(cmd, env=env, timeout=args.timeout).returncode
        text = pathlib.Path(part).read_text()
        if rc != 0:
            print(f"torchrun with {world} process(es) exited {rc}", file=sys.stderr)
        if not text:
            continue
        got = json.loads(text)
        rows += got["rows"]
        checks += got["checks"]
    cfg = dict(vars(args), **model_config(args).__dict__)
    cfg.pop("worker_out", None)
    result = {"config": cfg, "environment": environment(args), "rows": rows, "checks": checks,
              "summary": summarise(rows)}
    (out / "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "distributed.md").write_text(markdown(result))
    print(markdown(result))
    bad = [r for r in rows if "error" in r] + [c for c in checks if "error" in c or not c.get("ok", True)]
    return 1 if bad or len(worlds) < 2 else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Launch it plainly: it starts torchrun itself, for 1 and then 2 processes.")
    p.add_argument("--out-dir", default=str(ROOT / "experiments" / "results"), help="where distributed.{json,md} go")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda: NCCL, one process a GPU; cpu: gloo (a smoke run of the logic, not a benchmark)")
    p.add_argument("--tiny", action="store_true", help="a tiny model (d 32, 2 layers) for a smoke run")
    p.add_argument("--seq", type=int, default=512, help="sequence length T (default 512)")
    p.add_argument("--batch-per-gpu", type=int, default=16, help="sequences per GPU a step (default 16)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per cell (default 12)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--data-batches", type=int, default=64, help="dataset size in global batches (sets q)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 (TF32) instead of bf16 autocast")
    p.add_argument("--skip-check", action="store_true", help="skip the noise-off gradient equality check")
    p.add_argument("--timeout", type=float, default=540, help="seconds one torchrun may take")
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_out:
        worker(args)
        return 0
    return driver(args, argv)


if __name__ == "__main__":
    sys.exit(main())
