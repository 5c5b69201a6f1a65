"""One rank of the gloo runs of tests/test_training_distributed.py.

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py main OUT_DIR
    RANK=r WORLD_SIZE=2 DPFA_TEST_INIT=file://... python tests/distributed_worker.py hang|die OUT_DIR

``main`` runs every distributed scenario in one process group (process start-up is most of
the cost) and writes what it measured to OUT_DIR/rank{r}.pt; the test compares that with a
single-process run built from the same functions (this file is importable). ``hang`` and
``die``: rank 1 stops before the first collective of the engine (it sleeps until the test
kills it); rank 0 records the error its optimizer.step() raised and how long it took.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpfa.training import PrivacyEngine
from dpfa.training.multihead_attention import convert_multihead_attention

N, SEQ, VOCAB, D = 16, 5, 11, 8
BATCH = 8  # global expected batch size: q = 8 / 16
C = 8.5  # between the per-example gradient norms (4.7 to 11.6): some examples clipped, some not
SEED = 1234
STEPS = 2
NOISE_SIGMA, NOISE_C, NOISE_SHAPE = 1.7, 0.9, (200, 50)


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> attention -> Linear -> RMSNorm -> tied head: most rules, tied weights."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D, padding_idx=0)
        self.ln = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.fc = nn.Linear(D, D)
        self.norm = nn.RMSNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.ln(self.emb(idx))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(torch.tanh(self.fc(h + a))))


def build_model() -> nn.Module:
    """The same initial weights in every process; attention already rebuilt from nn.Linear."""
    torch.manual_seed(0)
    model, _ = convert_multihead_attention(TinyLM())
    return model


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(99)
    return TensorDataset(torch.randint(0, VOCAB, (N, SEQ), generator=g), torch.randint(1, VOCAB, (N, SEQ), generator=g))


def lm_loss(logits, targets):
    """Mean over the batch of per-example losses (NaN on an empty batch, whose gradients are empty)."""
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def mse_loss(out, y):
    return (out - y).pow(2).flatten(1).sum(1).mean()


class Recorder:
    """A batch sampler that remembers the index lists it yields."""

    def __init__(self, sampler):
        self.sampler, self.seen = sampler, []

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        for b in self.sampler:
            self.seen.append(list(b))
            yield b


def train(model, opt, loader, engine, loss_fn, steps):
    """Logical steps with every physical batch through forward and backward, even an empty one."""
    while engine.steps < steps:
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            if engine.steps == steps:
                return


def full_params(model) -> dict:
    """{name: full tensor}; collective under FSDP (DTensor.full_tensor)."""
    inner = getattr(model, "module", model)
    out = {}
    for n, p in inner.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n] = t.detach().clone()
    return out


def wrap(model, kind):
    if kind == "plain":  # no wrapper: make_private must broadcast rank 0's weights
        import torch.distributed as dist

        if dist.get_rank() != 0:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(-1.0)
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.attn)
    fully_shard(model.fc)
    fully_shard(model)
    return model


def private_run(kind, sigma, *, seed=SEED, perturb=False):
    model = build_model()
    if perturb:  # other weights, so that a restored checkpoint shows
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    model = wrap(model, kind)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
    engine = PrivacyEngine(accountant="rdp", seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0 warns "NOT private"
        model, opt, loader = engine.make_private(model, opt, DataLoader(dataset(), batch_size=BATCH),
                                                 noise_multiplier=sigma, target_delta=1e-5, max_grad_norm=C,
                                                 max_physical_batch_size=2)
    loader.batch_sampler = Recorder(loader.batch_sampler)
    return model, opt, loader, engine


def scenario_step(kind, sigma, tmp):
    """STEPS logical steps; with noise, also a checkpoint round trip and one more step on both copies."""
    model, opt, loader, engine = private_run(kind, sigma)
    train(model, opt, loader, engine, lm_loss, STEPS)
    out = {"params": full_params(model), "batches": list(loader.batch_sampler.seen), "steps": engine.steps,
           "epsilon": engine.get_epsilon(1e-5) if sigma > 0 else None, "sample_rate": engine.sample_rate,
           "len_loader": len(loader)}
    if sigma > 0:
        saves = []
        real_save = torch.save
        torch.save = lambda obj, f, *a, **k: (saves.append(f) if isinstance(f, (str, os.PathLike)) else None,
                                              real_save(obj, f, *a, **k))  # buffers: pickled collectives
        try:
            path = os.path.join(tmp, f"ckpt_{kind}.pt")
            engine.save_checkpoint(path, model, opt, note="hello")
        finally:
            torch.save = real_save
        model2, opt2, loader2, engine2 = private_run(kind, sigma, seed=SEED + 1, perturb=True)  # all restored
        extra = engine2.load_checkpoint(path, model2, opt2)
        restored = {"params": full_params(model2), "steps": engine2.steps, "epsilon": engine2.get_epsilon(1e-5),
                    "note": extra.get("note"), "saves": len(saves)}
        n_seen = len(loader.batch_sampler.seen)
        train(model, opt, loader, engine, lm_loss, STEPS + 1)
        train(model2, opt2, loader2, engine2, lm_loss, STEPS + 1)
        restored["continued"] = full_params(model2)
        restored["continued_batches"] = list(loader2.batch_sampler.seen)
        out["continued"] = full_params(model)
        out["continued_batches"] = loader.batch_sampler.seen[n_seen:]
        out["restored"] = restored
    return out


def scenario_noise(kind, seed=5):
    """Zero data and zero bias: the step is pure noise, (z on rank 0, summed) / B."""
    torch.manual_seed(3)
    model = nn.Linear(NOISE_SHAPE[0], NOISE_SHAPE[1])
    with torch.no_grad():
        model.bias.zero_()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = wrap_whole(model, kind)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine(accountant="rdp", seed=seed)
    ds = TensorDataset(torch.zeros(N, NOISE_SHAPE[0]), torch.zeros(N, NOISE_SHAPE[1]))
    model, opt, loader = engine.make_private(model, opt, DataLoader(ds, batch_size=BATCH), noise_multiplier=NOISE_SIGMA,
                                             target_delta=1e-5, max_grad_norm=NOISE_C)
    train(model, opt, loader, engine, mse_loss, 1)
    after = full_params(model)
    return torch.cat([(after[n] - before[n]).flatten() for n in before])


def wrap_whole(model, kind):
    """DDP, or one fully_shard unit for the whole model."""
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model)


def scenario_sampling(rank):
    """The sampler of a run with N=400, q=0.05, the SAME seed on every rank: 300 batches."""
    n = 400
    ds = TensorDataset(torch.zeros(n, 3), torch.zeros(n, 1))
    model = nn.Linear(3, 1)
    engine = PrivacyEngine(accountant="rdp", seed=7)
    _, _, loader = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                       DataLoader(ds, batch_size=20), noise_multiplier=1.0, target_delta=1e-5,
                                       max_grad_norm=1.0)
    sampler = loader.batch_sampler
    steps_per_epoch = len(loader)
    sampler.steps = 300
    return {"batches": list(sampler), "sample_rate": engine.sample_rate, "len": steps_per_epoch}


def scenario_errors(rank):
    """Misuse that must raise the same clear error on every rank (no rank left waiting)."""
    from torch.nn.parallel import DistributedDataParallel

    errors = {}

    def attempt(name, fn):
        try:
            fn()
            errors[name] = None
        except Exception as e:  # noqa: BLE001 - the test checks the type and message
            errors[name] = (type(e).__name__, str(e))

    def make(model, **kw):
        args = dict(noise_multiplier=1.0, target_delta=1e-5, max_grad_norm=1.0) | kw
        return PrivacyEngine(accountant="rdp").make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                            DataLoader(dataset(), batch_size=BATCH), **args)

    attempt("without_replacement", lambda: make(build_model(), poisson_sampling=False))
    attempt("mismatch", lambda: make(build_model(), max_grad_norm=1.0 + rank))
    attempt("mha_in_ddp", lambda: make(DistributedDataParallel(TinyLM())))

    def skip_backward():
        model, opt, loader = make(DistributedDataParallel(build_model()))
        opt.zero_grad()
        loader.info.last_batch_size = 0  # an empty batch, and no forward/backward
        opt.step()

    attempt("skipped_backward", skip_backward)
    return errors


def init(timeout_s: float):
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    url = os.environ.get("DPFA_TEST_INIT")
    if url:  # the test's own launcher
        dist.init_process_group("gloo", init_method=url, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    else:  # torchrun: env:// rendezvous, exactly as the README shows
        dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank()


def main_all(out_dir):
    rank = init(60)
    t0 = time.perf_counter()
    results = {"rank": rank}
    for kind in ("ddp", "fsdp", "plain"):
        for sigma in (0.0, 0.7):
            results[f"step_{kind}_{sigma}"] = scenario_step(kind, sigma, out_dir)
    for kind in ("ddp", "fsdp"):
        results[f"noise_{kind}"] = scenario_noise(kind)
    # mutants, for the test to show that its check rejects them: noise on every rank (independent
    # streams: seeds differ), on none
    from dpfa.training.distributed import ClippedSumReducer

    for name, adds in (("every_rank", True), ("no_rank", False)):
        original = ClippedSumReducer.adds_noise
        ClippedSumReducer.adds_noise = property(lambda self, adds=adds: adds)
        try:
            results[f"noise_ddp_{name}"] = scenario_noise("ddp", seed=5 + rank)
        finally:
            ClippedSumReducer.adds_noise = original
    results["sampling"] = scenario_sampling(rank)
    results["errors"] = scenario_errors(rank)
    results["seconds"] = time.perf_counter() - t0
    import torch.distributed as dist

    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # gloo's C++ threads sometimes abort in interpreter teardown ("terminate called without an
    # active exception") after everything is written and the group is destroyed; leave at once
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main_failure(mode, out_dir):
    rank = init(float(os.environ["DPFA_TEST_TIMEOUT"]))
    torch.manual_seed(0)
    model = wrap_whole(nn.Linear(4, 2), "ddp")
    engine = PrivacyEngine(accountant="rdp", seed=1)
    ds = TensorDataset(torch.randn(N, 4), torch.randn(N, 2))
    model, opt, loader = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                             DataLoader(ds, batch_size=BATCH), noise_multiplier=1.0,
                                             target_delta=1e-5, max_grad_norm=1.0)
    x, y = next(iter(loader))
    opt.zero_grad()
    mse_loss(model(x), y).backward()
    if rank == 1:  # stop before the engine's all-reduce: hang, or wait to be killed
        open(os.path.join(out_dir, "rank1.ready"), "w").close()
        time.sleep(600)
        return
    t0 = time.perf_counter()
    try:
        opt.step()
        outcome = None
    except Exception as e:  # noqa: BLE001 - the test checks the type and message
        outcome = (type(e).__name__, str(e), "".join(traceback.format_exception(e)))
    torch.save({"error": outcome, "seconds": time.perf_counter() - t0}, os.path.join(out_dir, f"{mode}.pt"))
    sys.exit(1 if outcome else 0)


if __name__ == "__main__":
    scenario, out = sys.argv[1], sys.argv[2]
    if scenario == "main":
        main_all(out)
    else:
        main_failure(scenario, out)
