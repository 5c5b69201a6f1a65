"""One training run of a privacy-utility experiment, in one of four modes.

- ``non_private``: no per-example clipping, no noise (epsilon = inf). Optionally the
  batch gradient's norm is clipped (``batch_grad_clip``, as nanoGPT trains: a global
  rescale of the averaged gradient, not per-example clipping).
- ``clip_only``: dpfa's DP-SGD with per-example clipping and no noise (epsilon = inf):
  the cost of clipping alone.
- ``dpfa``: dpfa's DP-SGD (:class:`dpfa.training.PrivacyEngine`): per-example norms in the
  one backward pass, flat clipping, Gaussian noise calibrated so that ``steps`` steps
  spend ``epsilon`` at ``delta`` with the accountant.
- ``textbook``: the post-hoc baseline: per-example gradients materialised with
  ``torch.func.vmap(grad)``, clipped, summed and noised by the same rule (the algorithm of
  Abadi et al. 2016 as most libraries run it, and the reference dpfa's exactness tests
  compare against). For a comparison at the same wall clock the caller gives it
  ``steps = dpfa's steps x (dpfa's seconds per step / its own)``, the two measured by
  :func:`step_times` in turns on a *synthetic* batch (random inputs of the expected batch
  size, so the plan does not depend on private data); its noise is calibrated for those
  steps.

Every mode draws Poisson batches of expected size ``batch_size`` from a generator seeded
by ``seed`` (dpfa's modes through the engine's own sampler, seeded from the same ``seed``);
the caller seeds the model's initialisation. The wall time counts the
training loop (data, forward, backward, clipping, noise, optimizer), not evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from dpfa.errors import ConfigError

MODES = ("non_private", "clip_only", "dpfa", "textbook")


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Optimisation shared by every mode and epsilon of one experiment: only clipping and noise differ."""

    steps: int = 200              # optimizer steps (the textbook baseline: as many as fit its time budget)
    batch_size: int = 256         # expected Poisson batch size; sampling rate batch_size / training-set size
    physical_batch: int = 0       # largest batch in memory (0: the whole logical batch)
    lr: float = 3e-3              # Adam
    max_grad_norm: float = 1.0    # per-example clipping norm C
    delta: float = 1e-5           # below 1 / training-set size
    accountant: str = "prv"       # the tight accountant
    batch_grad_clip: float = 0.0  # non_private only: clip the batch gradient's norm (0: off)

    def __post_init__(self):
        from dpfa import accountants

        for k in ("steps", "batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"Expected train.{k}={getattr(self, k)!r} >= 1.")
        if self.physical_batch < 0:
            raise ConfigError(f"Expected train.physical_batch={self.physical_batch!r} >= 0 (0: no limit).")
        for k in ("lr", "max_grad_norm"):
            if not getattr(self, k) > 0:
                raise ConfigError(f"Expected train.{k}={getattr(self, k)!r} > 0.")
        if not 0 < self.delta < 1:
            raise ConfigError(f"Expected train.delta={self.delta!r} in (0, 1).")
        if self.batch_grad_clip < 0:
            raise ConfigError(f"Expected train.batch_grad_clip={self.batch_grad_clip!r} >= 0 (0: off).")
        if self.accountant not in accountants.names():
            raise ConfigError(f"Unknown train.accountant={self.accountant!r}; expected one of "
                              f"{', '.join(accountants.names())}.")


def _batches(dataset, idx, device, physical: int):
    """The examples ``idx`` of ``dataset`` as (inputs, targets) chunks of at most ``physical`` (0: one chunk)."""
    step = physical or max(len(idx), 1)
    for s in range(0, len(idx), step):
        xs, ys = zip(*(dataset[i] for i in idx[s:s + step]))
        yield torch.stack(xs).to(device), torch.stack(ys).to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train(model: nn.Module, dataset, loss_fn: Callable, spec: TrainSpec, *, mode: str, epsilon: float = math.inf,
          seed: int = 0, device: str = "cpu", steps: Optional[int] = None, progress: bool = False,
          desc: str = "training"):
    """Train ``model`` in place for ``steps`` (default ``spec.steps``) steps; returns (model to evaluate, info dict
    of what the run did and spent). A private mode's noise is calibrated for exactly those steps."""
    from dpfa.accountants import noise_multiplier_for
    from dpfa.experiments.common import progress_bar
    from dpfa.training.data_loader import PoissonBatchSampler

    if mode not in MODES:
        raise ConfigError(f"Unknown training mode {mode!r}; expected one of {', '.join(MODES)}.")
    private = mode in ("dpfa", "textbook")
    if private and not math.isfinite(epsilon):
        raise ConfigError(f"mode={mode!r} needs a finite epsilon.")
    n = len(dataset)
    if spec.batch_size > n:
        raise ConfigError(f"train.batch_size={spec.batch_size} is larger than the training set ({n}).")
    q = spec.batch_size / n
    steps = spec.steps if steps is None else int(steps)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    z = noise_multiplier_for(epsilon, spec.delta, q, steps, accountant=spec.accountant) if private else 0.0
    info = {"mode": mode, "target_epsilon": epsilon, "sample_rate": q, "dataset_size": n, "seed": seed,
            "clipping": mode != "non_private", "max_grad_norm": spec.max_grad_norm if mode != "non_private" else None,
            "noise_multiplier": z, "threads": torch.get_num_threads()}

    g = torch.Generator().manual_seed(seed)
    bar = progress_bar(steps, desc, enabled=progress, leave=False)
    engine = None
    step_fn = _TextbookStep(model, loss_fn, spec, device, seed) if mode == "textbook" else None
    if mode == "clip_only" or mode == "dpfa":
        from dpfa.training import PrivacyEngine

        engine = PrivacyEngine(accountant=spec.accountant, seed=seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=spec.batch_size)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="noise_multiplier=0")  # clip_only: not private, on purpose
            model, opt, loader = engine.make_private(model, opt, loader, noise_multiplier=z, target_delta=spec.delta,
                                                     max_grad_norm=spec.max_grad_norm,
                                                     max_physical_batch_size=spec.physical_batch or None)
    _sync(device)
    t0 = time.perf_counter()
    if engine is None:
        for idx in PoissonBatchSampler(n, q, g, steps=steps):
            if mode == "non_private":
                opt.zero_grad()
                if idx:
                    for x, y in _batches(dataset, idx, device, spec.physical_batch):
                        (loss_fn(model(x), y) * (len(x) / len(idx))).backward()
                    if spec.batch_grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.batch_grad_clip)
                    opt.step()
            else:
                step_fn(opt, idx, dataset, z)
            bar.update(1)
        done = steps
    else:
        while engine.steps < steps:
            for x, y in loader:
                opt.zero_grad()
                if len(x):
                    loss_fn(model(x.to(device)), y.to(device)).backward()
                before = engine.steps
                opt.step()  # also on an empty batch: its noise is part of the guarantee
                if engine.steps > before:
                    bar.update(1)
                if engine.steps >= steps:
                    break
        done = engine.steps
    _sync(device)
    seconds = time.perf_counter() - t0
    bar.close()
    if private:
        from dpfa.accountants import epsilon_for

        spent = engine.get_epsilon(spec.delta) if engine is not None else epsilon_for(z, spec.delta, q, done,
                                                                                        spec.accountant)
    else:
        spent = math.inf
    info.update(steps=done, seconds=seconds, seconds_per_step=seconds / max(done, 1), epsilon_spent=spent,
                delta=spec.delta, accountant=spec.accountant)
    return model, info


def step_times(build_model: Callable[[], nn.Module], loss_fn: Callable, batch, spec: TrainSpec, device: str,
               methods=("non_private", "dpfa", "textbook"), warmup: int = 2, repeats: int = 5) -> dict:
    """Median seconds of one optimizer step of each method on ``batch`` (synthetic data), interleaved.

    The methods take turns, step by step, so that a change in the machine's load (a shared
    CPU) falls on all of them alike; the ratios are what the wall-clock baseline uses.
    Throwaway models; the dpfa step includes clipping and noise (noise multiplier 1).
    """
    import statistics

    x, y = (t.to(device) for t in batch)
    dataset = torch.utils.data.TensorDataset(*batch)
    steppers = {}
    for method in methods:
        torch.manual_seed(0)
        model = build_model().to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        if method == "textbook":
            tb = _TextbookStep(model, loss_fn, spec, device, 0)
            idx = list(range(len(x)))
            steppers[method] = (lambda tb=tb, opt=opt, idx=idx: tb(opt, idx, dataset, 1.0))
            continue
        if method == "dpfa":
            from dpfa.training import PrivacyEngine

            engine = PrivacyEngine(accountant="rdp", seed=0)
            loader = torch.utils.data.DataLoader(dataset, batch_size=len(x))
            model, opt, _ = engine.make_private(model, opt, loader, noise_multiplier=1.0, target_delta=spec.delta,
                                                max_grad_norm=spec.max_grad_norm)

        def plain(model=model, opt=opt):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        steppers[method] = plain
    times = {m: [] for m in methods}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(warmup + repeats):
            for m, fn in steppers.items():
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                if r >= warmup:
                    times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(t) for m, t in times.items()}


class _TextbookStep:
    """DP-SGD with materialised per-example gradients: vmap(grad), clip each, sum, add N(0, z^2 C^2), divide by E[B]."""

    def __init__(self, model: nn.Module, loss_fn: Callable, spec: TrainSpec, device: str, seed: int):
        from torch.func import functional_call, grad, vmap

        self.model, self.spec, self.device = model, spec, device
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.params = dict(model.named_parameters())

        def loss_one(ps, x, y):
            return loss_fn(functional_call(model, ps, (x.unsqueeze(0),)), y.unsqueeze(0))

        self.per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))
        self.noise = torch.Generator(device=device).manual_seed(seed ^ 0x2B2B2B2B)

    def _clipped_sum(self, x, y, sums):
        ps = {k: self.params[k].detach() for k in self.names}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap's loop fallback
            g = self.per_example(ps, x, y)
        norms = torch.sqrt(sum(g[k].flatten(1).pow(2).sum(1) for k in self.names))
        c = torch.clamp(self.spec.max_grad_norm / (norms + 1e-6), max=1.0)
        for k in self.names:
            sums[k] += torch.einsum("b,b...->...", c, g[k])

    def __call__(self, opt, idx, dataset, z: float) -> None:
        sums = {k: torch.zeros_like(self.params[k]) for k in self.names}
        if idx:
            for x, y in _batches(dataset, idx, self.device, self.spec.physical_batch):
                self._clipped_sum(x, y, sums)
        C, B = self.spec.max_grad_norm, self.spec.batch_size
        for k in self.names:
            noise = torch.randn(sums[k].shape, generator=self.noise, device=self.device) * (z * C) if z else 0.0
            self.params[k].grad = (sums[k] + noise) / B
        opt.step()
