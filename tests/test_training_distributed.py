"""DP-SGD under torch.distributed: 2 gloo processes on CPU (DDP and FSDP2).

One torchrun launch (the README's command) runs every scenario of distributed_worker.py;
the tests compare what the ranks measured with a single-process run of the same functions.
Two more launches, by this file's own launcher, stop rank 1 (killed, or hanging) and check
that rank 0 ends with a DistributedError within a bounded time.
"""

import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import distributed_worker as W
from dp_reference import per_example_grads
from dpfa.errors import PrivacyParameterError, StateMismatchError
from dpfa.training import PrivacyEngine
from dpfa.training.distributed import DistributedPoissonBatchSampler, sampler_seed

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD = 2


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else root
    return env


@pytest.fixture(scope="module")
def gloo_run(tmp_path_factory):
    """torchrun --standalone --nproc-per-node 2 distributed_worker.py main OUT: [rank 0's results, rank 1's]."""
    t0 = time.perf_counter()
    for attempt in range(2):
        out = tmp_path_factory.mktemp("gloo")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(WORLD), str(WORKER), "main", str(out)],
                              capture_output=True, text=True, timeout=120, env=_env())
        # gloo's C++ threads rarely abort a process ("terminate called without an active exception",
        # SIGABRT); that crash, and only it, is retried once on a fresh process group
        gloo_abort = "terminate called without an active exception" in proc.stderr
        if proc.returncode == 0 or not gloo_abort:
            break
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    ranks[0]["wall_seconds"] = time.perf_counter() - t0
    ranks[0]["out"] = out
    return ranks


def single_process(sigma, logical_batches, seed=W.SEED):
    """The single-process engine on the union of the ranks' batches, one logical step each."""
    model = W.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
    engine = PrivacyEngine(accountant="rdp", seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, _ = engine.make_private(model, opt, DataLoader(W.dataset(), batch_size=W.BATCH),
                                            noise_multiplier=sigma, target_delta=1e-5, max_grad_norm=W.C)
    x, y = W.dataset().tensors
    for idx in logical_batches:
        opt.zero_grad()
        W.lm_loss(model(x[idx]), y[idx]).backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}, engine


def union(ranks, key="batches"):
    """Per logical step, the sorted union of the ranks' batches (each rank's shard is disjoint)."""
    return [sorted(sum(parts, [])) for parts in zip(*(r[key] for r in ranks))]


@pytest.mark.parametrize("sigma", [0.0, 0.7])
@pytest.mark.parametrize("kind", ["ddp", "fsdp", "plain"])
def test_distributed_steps_equal_single_process(gloo_run, kind, sigma):
    """Two logical steps (SGD with momentum, physical batches of 2, empty ones padded) on 2 ranks equal one process.

    Noise off: the clipped sums are reduced right. Noise on, same seed: rank 0's noise is the
    single-process noise, added once. "plain": no DDP/FSDP wrapper, rank 1 starts from other
    weights, which make_private replaces by rank 0's.
    """
    r0, r1 = (r[f"step_{kind}_{sigma}"] for r in gloo_run)
    batches = union([r0, r1])
    assert len(batches) == W.STEPS == r0["steps"] == r1["steps"]
    for rank, r in enumerate((r0, r1)):  # each rank drew from its own shard
        assert all(i % WORLD == rank for b in r["batches"] for i in b)
    # the step clips some examples and not others
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per_example_grads(
        W.build_model(), W.lm_loss, *(t[batches[0]] for t in W.dataset().tensors)).values()))
    assert (norms > W.C).any() and (norms < W.C).any()

    expected, _ = single_process(sigma, batches)
    init = {n: p.detach() for n, p in W.build_model().named_parameters()}
    total = torch.cat([(expected[n] - init[n]).flatten() for n in init]).norm().item()
    for n, want in expected.items():
        assert torch.equal(r0["params"][n], r1["params"][n]), f"{kind}: replicas differ in {n}"
        moved, want_moved = r0["params"][n] - init[n], want - init[n]
        err = (moved - want_moved).double().norm().item()
        # fp32 floor: storing p + u rounds to ulp(p); a movement that is 0 in theory (the key bias under
        # softmax) is float noise of the order 1e-7 of the whole update
        floor = 4 * torch.finfo(torch.float32).eps * init[n].norm().item() + 1e-7 * total
        assert err <= 1e-5 * want_moved.double().norm().item() + floor, f"{kind} sigma={sigma}: {n} off by {err:.3g}"


def noise_std_ratio(update):
    """Sample std of a pure-noise update over its expected std sigma C / B; and the tolerance (5 s.e.)."""
    expected = W.NOISE_SIGMA * W.NOISE_C / W.BATCH
    return update.std().item() / expected, 5 / math.sqrt(2 * update.numel())


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_noise_std_is_sigma_c_over_global_batch(gloo_run, kind):
    """Zero data: the update is (z on rank 0, summed) / B with std sigma C / B, B the global expected batch."""
    update = gloo_run[0][f"noise_{kind}"]
    assert torch.equal(update, gloo_run[1][f"noise_{kind}"])
    assert update.numel() == W.NOISE_SHAPE[0] * W.NOISE_SHAPE[1] + W.NOISE_SHAPE[1]
    ratio, tol = noise_std_ratio(update)
    assert abs(ratio - 1) < tol, f"std ratio {ratio:.4f}"
    assert abs(update.mean().item()) < 5 * W.NOISE_SIGMA * W.NOISE_C / W.BATCH / math.sqrt(update.numel())


def test_noise_std_check_rejects_noise_on_every_rank_or_none(gloo_run):
    """The same check fails where every rank adds noise (independent streams: std sqrt(2) too large) or none does."""
    ratio, tol = noise_std_ratio(gloo_run[0]["noise_ddp_every_rank"])
    assert abs(ratio / math.sqrt(WORLD) - 1) < tol and abs(ratio - 1) > tol
    ratio, tol = noise_std_ratio(gloo_run[0]["noise_ddp_no_rank"])
    assert ratio == 0.0


def test_every_rank_reports_the_single_process_epsilon(gloo_run):
    r0, r1 = (r["step_ddp_0.7"] for r in gloo_run)
    _, engine = single_process(0.7, union([r0, r1]))
    assert r0["epsilon"] == r1["epsilon"] == pytest.approx(engine.get_epsilon(1e-5), rel=1e-12)
    assert r0["sample_rate"] == r1["sample_rate"] == W.BATCH / W.N
    assert gloo_run[0]["step_fsdp_0.7"]["epsilon"] == r0["epsilon"]


def test_poisson_sampling_is_global(gloo_run):
    """Each rank samples its shard at rate q (same seed on both ranks); the union is Poisson(q) over all N."""
    n, q, steps = 400, 0.05, 300
    s0, s1 = (r["sampling"] for r in gloo_run)
    assert s0["sample_rate"] == s1["sample_rate"] == q and s0["len"] == s1["len"] == round(1 / q)
    masks = torch.zeros(WORLD, steps, n)
    for r, s in enumerate((s0, s1)):
        assert len(s["batches"]) == steps
        for t, b in enumerate(s["batches"]):
            assert all(i % WORLD == r for i in b) and len(set(b)) == len(b)
            masks[r, t, b] = 1
    sizes = masks.sum((0, 2))
    assert abs(sizes.mean().item() - n * q) < 5 * math.sqrt(n * q * (1 - q) / steps)
    counts = masks.sum((0, 1))
    assert abs(counts.mean().item() - steps * q) < 5 * math.sqrt(steps * q * (1 - q) / n)
    assert abs(sizes.var().item() / (n * q * (1 - q)) - 1) < 5 * math.sqrt(2 / steps)
    # independent streams: rank 0's i-th shard element and rank 1's are both drawn ~ steps * n/2 * q^2 times
    both = (masks[0, :, 0::2] * masks[1, :, 1::2]).sum().item()
    expected = steps * n / WORLD * q * q
    assert abs(both - expected) < 5 * math.sqrt(expected)


@pytest.mark.parametrize("kind", ["ddp", "fsdp", "plain"])
def test_checkpoint_written_once_and_resumed(gloo_run, kind):
    """Rank 0 alone writes; every rank restores model, optimizer, privacy spent and its own sampler and noise state."""
    r0, r1 = (r[f"step_{kind}_0.7"] for r in gloo_run)
    assert (r0["restored"]["saves"], r1["restored"]["saves"]) == (1, 0)
    for r in (r0, r1):
        res = r["restored"]
        assert res["steps"] == W.STEPS and res["epsilon"] == r["epsilon"] and res["note"] == "hello"
        for n, p in r["params"].items():
            assert torch.equal(res["params"][n], p), f"{kind}: {n} not restored"
        # one more step after the resume is the step the uninterrupted run took: same batch, noise and momentum
        assert res["continued_batches"] == r["continued_batches"]
        for n, p in r["continued"].items():
            assert torch.equal(res["continued"][n], p), f"{kind}: {n} differs after the resumed step"
    assert not torch.equal(r0["continued"]["fc.weight"], r0["params"]["fc.weight"])


def test_distributed_checkpoint_needs_the_same_number_of_ranks(gloo_run):
    ckpt = gloo_run[0]["out"] / "ckpt_ddp.pt"
    model = W.build_model()
    engine = PrivacyEngine(accountant="rdp")
    model, _, _ = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                      DataLoader(W.dataset(), batch_size=W.BATCH), noise_multiplier=0.7,
                                      target_delta=1e-5, max_grad_norm=W.C)
    with pytest.raises(StateMismatchError, match="saved by 2 ranks but this run has 1"):
        engine.load_checkpoint(ckpt, model)


def test_misuse_is_the_same_clear_error_on_every_rank(gloo_run):
    e0, e1 = gloo_run[0]["errors"], gloo_run[1]["errors"]
    expected = {
        "without_replacement": ("PrivacyParameterError", "poisson_sampling=False"),
        "mismatch": ("PrivacyParameterError", "different max_grad_norm on different ranks (rank 0: 1.0, rank 1: 2.0)"),
        "mha_in_ddp": ("DPFAError", "convert_multihead_attention(model) before wrapping"),
        "skipped_backward": ("DPFAError", "every rank must run forward and backward on every batch"),
    }
    for name, (kind, needle) in expected.items():
        for errors in (e0, e1):
            assert errors[name] is not None, f"{name}: no error"
            assert errors[name][0] == kind and needle in errors[name][1], errors[name]


def test_sharded_sampler_checks_its_arguments():
    with pytest.raises(PrivacyParameterError, match="rank=2"):
        DistributedPoissonBatchSampler(10, 0.5, rank=2, world_size=2)
    with pytest.raises(PrivacyParameterError, match="world_size=0"):
        DistributedPoissonBatchSampler(10, 0.5, rank=0, world_size=0)
    assert sampler_seed(7, 0) != sampler_seed(7, 1)


# ------------------------------------------------------------------ a rank that dies or hangs
def _launch_failure(mode, tmp_path, timeout_s):
    """Start the 2 ranks of ``mode``; stop rank 1 as the mode says; return rank 0's record and wall time."""
    env = dict(WORLD_SIZE=str(WORLD), DPFA_TEST_INIT=f"file://{tmp_path / 'store'}", DPFA_TEST_TIMEOUT=str(timeout_s))
    procs, logs = [], []
    try:
        for r in range(WORLD):
            log = open(tmp_path / f"rank{r}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, str(WORKER), mode, str(tmp_path)], stdout=log,
                                          stderr=subprocess.STDOUT, env=_env(RANK=str(r), LOCAL_RANK=str(r), **env)))
        ready = tmp_path / "rank1.ready"
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline and procs[1].poll() is None, (tmp_path / "rank1.log").read_text()
            time.sleep(0.05)
        t0 = time.monotonic()
        if mode == "die":
            procs[1].kill()
        rc = procs[0].wait(timeout=timeout_s + 30)
        return rc, torch.load(tmp_path / f"{mode}.pt", weights_only=False), time.monotonic() - t0
    finally:
        for p in procs:  # only the processes started here
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def test_killed_rank_ends_the_run_with_an_error(tmp_path):
    """Rank 1 is killed (SIGKILL) while rank 0 steps: rank 0 raises DistributedError at once, not after its timeout."""
    rc, record, wall = _launch_failure("die", tmp_path, timeout_s=120)
    assert rc == 1 and record["error"] is not None, (tmp_path / "rank0.log").read_text()
    name, message, _ = record["error"]
    assert name == "DistributedError"
    assert "Rank 0 of 2: the all-reduce of the clipped gradient sums failed" in message
    assert record["seconds"] < 40 and wall < 60, f"rank 0 took {wall:.1f} s to notice the killed rank"


def test_hanging_rank_ends_the_run_after_the_timeout(tmp_path):
    """Rank 1 hangs (never reaches the step): rank 0's collective times out after init_process_group's 3 s."""
    rc, record, wall = _launch_failure("hang", tmp_path, timeout_s=3)
    # rc: 1, or SIGABRT where gloo's threads abort the interpreter's exit after the timeout
    assert rc != 0 and record["error"] is not None, (tmp_path / "rank0.log").read_text()
    name, message, _ = record["error"]
    assert name == "DistributedError" and "init_process_group(timeout=...)" in message
    assert "Timed out waiting 3000ms" in message  # gloo's own words, kept in the message
    assert 2.5 < record["seconds"] < 20 and wall < 30


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_empty_batch_backward_contributes_zero(norm):
    """Under DDP/FSDP a rank with an empty batch still runs backward; its clipped sum is exactly zero."""
    from dpfa.training.clipping import clipped_grads
    from dpfa.training.collector import GradSampleCollector

    model = W.build_model()
    collector = GradSampleCollector(model)
    x, y = (t[:0] for t in W.dataset().tensors)
    W.lm_loss(model(x), y).backward()
    assert collector.has_contributions() and collector.batch_size == 0
    sums = clipped_grads(collector.contributions, 1.0, norm=norm)
    assert set(sums) == set(collector.parameters)
    for p, s in sums.items():
        assert s.shape == p.shape and not s.any()
