"""PrivacyEngine: DP-SGD with per-example clipping in one backward pass (DESIGN.md 1.1).

``make_private(module, optimizer, data_loader, ...)`` returns the triple Opacus users know:
the same module with collecting hooks, a :class:`DPOptimizer`, and a loader that samples
batches the way the accountant assumes. The engine owns every piece of per-run state
(accountant, step count, random generators), and its ``state_dict`` goes into checkpoints
so that a resumed run reports the same epsilon and never under-counts. Under torch.distributed
(torchrun; DDP or FSDP2) the same calls work on every rank: see distributed.py.
"""

from __future__ import annotations

import math
import secrets
import warnings
from typing import Any, Dict, NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from dpfa import _validate, accountants, mechanisms
from dpfa.accountants.calibration import noise_multiplier_for
from dpfa.errors import BudgetExceededError, DPFAError, PrivacyParameterError, StateMismatchError
from dpfa.training.clipping import CLIPPING_MODES, per_layer_thresholds
from dpfa.training import collector as collector_module
from dpfa.training.collector import GradSampleCollector
from dpfa.training import distributed
from dpfa.training.data_loader import (BatchInfo, DPDataLoader, PoissonBatchSampler,
                                       WithoutReplacementBatchSampler)
from dpfa.training.multihead_attention import convert_multihead_attention, remap_optimizer
from dpfa.training.optimizer import DPOptimizer

ENGINE_MECHANISMS = ("gaussian", "laplace")


class PrivacyEngine:
    """DP-SGD engine. ``accountant``: "prv", "rdp" or "pld"; ``mechanism``: "gaussian" or "laplace".

    ``secure_rng=True`` draws every noise and sampling seed from the OS CSPRNG
    (``secrets``); otherwise generators are seeded from ``seed`` (reproducible runs, not
    secure against an adversary who learns the seed).

    ``secure_mode=True`` (Mironov 2012; Jin et al. 2022): the noisy clipped sum is released
    by :class:`dpfa.mechanisms.secure.SecureGridRelease` (randomised rounding to a grid 2^-k,
    the rounding counted in the sensitivity, integer discrete Gaussian noise keyed by the OS
    CSPRNG), accounted as the discrete Gaussian by the RDP accountant (``accountant=None``
    picks it; "prv"/"pld" are refused), with ``secure_rng`` on; ``seed`` must be None and
    ``mechanism`` "gaussian" (the default) or "discrete_gaussian". Single process, flat clipping.
    """

    def __init__(self, accountant: Optional[str] = None, mechanism="gaussian", secure_rng: bool = False,
                 seed: Optional[int] = None, secure_mode: bool = False):
        self.secure_mode = bool(secure_mode)
        if self.secure_mode:  # secure_mode: checks and the discrete Gaussian (dpfa.mechanisms.secure)
            if seed is not None or accountant not in (None, "rdp") or mechanisms.resolve(mechanism).name not in (
                    "gaussian", "discrete_gaussian"):
                raise PrivacyParameterError(
                    f"secure_mode=True needs seed=None (the noise is keyed by the OS CSPRNG), accountant='rdp' or None "
                    f"(the discrete Gaussian has an RDP curve only) and mechanism 'gaussian' or 'discrete_gaussian'; "
                    f"got seed={seed!r}, accountant={accountant!r}, mechanism={mechanism!r}.")
            accountant, mechanism, secure_rng = "rdp", "discrete_gaussian", True
        self.accountant = accountants.create("prv" if accountant is None else accountant)
        self.mechanism = mechanisms.resolve(mechanism)
        if self.mechanism.name not in ENGINE_MECHANISMS and not self.secure_mode:
            raise PrivacyParameterError(
                f"The DP-SGD engine supports mechanism in {ENGINE_MECHANISMS}, got {self.mechanism.name!r}."
            )
        self.secure_rng = bool(secure_rng)
        self.seed = secrets.randbits(62) if seed is None else int(seed)
        self.steps = 0
        self.noise_multiplier: Optional[float] = None
        self.sample_rate: Optional[float] = None
        self.sampling: Optional[str] = None
        self.max_grad_norm: Optional[float] = None
        self.target_epsilon: Optional[float] = None
        self.target_delta: Optional[float] = None
        self.max_steps: Optional[int] = None
        self._noise_generators: Dict[str, torch.Generator] = {}
        self.sampler_generator = torch.Generator()
        self.sampler_generator.manual_seed(self.seed ^ 0x5A5A5A5A)
        self.batch_info = BatchInfo()
        self._distributed: Optional[distributed.DistributedContext] = None

    # ------------------------------------------------------------ randomness
    def _noise_generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._noise_generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._noise_generators[key] = g
        g = self._noise_generators[key]
        if self.secure_rng:
            g.manual_seed(secrets.randbits(63))
        return g

    # ------------------------------------------------------------- set-up
    def make_private(self, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader, *,
                     noise_multiplier: Optional[float] = None, target_epsilon: Optional[float] = None,
                     target_delta: float, epochs: Optional[int] = None, max_grad_norm: float,
                     clipping: str = "flat", per_layer_norms: Optional[Sequence[float]] = None,
                     poisson_sampling: bool = True, max_physical_batch_size: Optional[int] = None,
                     loss_reduction: str = "mean", target_quantile: float = 0.5):
        """Make (module, optimizer, data_loader) private; returns the new triple.

        Give exactly one of ``noise_multiplier`` and ``target_epsilon`` (with ``epochs``):
        the latter calibrates the noise so that ``epochs`` epochs (a real number: 0.5 is
        half an epoch) spend ``target_epsilon``, and training stops with
        BudgetExceededError before a step that would exceed it.

        In a torch.distributed run of W > 1 ranks (distributed.py), call it on every rank with
        the DDP- or fully_shard-wrapped module (or a plain one) and a loader over the whole
        dataset whose ``batch_size`` is the global expected batch size: each rank
        Poisson-samples its shard at rate batch_size / len(dataset), rank 0 adds the noise, the
        clipped sums are summed across ranks, every rank accounts the same steps.

        ``clipping="adaptive"`` (Andrew et al. 2021; :mod:`dpfa.calibration`): ``max_grad_norm`` is the
        initial norm, which each step moves toward the ``target_quantile`` of the per-example gradient
        norms through a noisy count; the gradient noise is raised so that each step, count included,
        is accounted as one Gaussian release at ``noise_multiplier``. If this engine's accountant already
        holds releases (``AdaptiveNoiseCalibrator.calibrate(..., engine=engine)``), ``target_epsilon``
        covers them too: the training noise is calibrated for what remains.
        """
        if self.noise_multiplier is not None:
            raise DPFAError("This PrivacyEngine already made a model private; create one engine per run.")
        self.target_delta = _validate.delta(target_delta, "target_delta")
        self.max_grad_norm = _validate.positive(max_grad_norm, "max_grad_norm")
        _validate.choice(clipping, "clipping", CLIPPING_MODES + ("adaptive",))
        if clipping == "adaptive" and (self.secure_mode or self.mechanism.name != "gaussian"):
            raise PrivacyParameterError("clipping='adaptive' needs the Gaussian mechanism and secure_mode=False.")
        if clipping == "per_layer" and self.mechanism.sensitivity_norm != "l2":
            raise PrivacyParameterError("clipping='per_layer' needs an L2 mechanism (gaussian).")
        dataset = getattr(data_loader, "dataset", None)
        batch_size = getattr(data_loader, "batch_size", None)
        if dataset is None or batch_size is None:
            raise DPFAError("make_private needs a torch DataLoader built with a dataset and a batch_size.")
        try:
            n = len(dataset)
        except TypeError:
            raise DPFAError("make_private needs a dataset with a length (the dataset size sets the sampling rate).")
        if batch_size > n:
            raise PrivacyParameterError(f"batch_size={batch_size} is larger than the dataset ({n} examples).")
        ctx = distributed.DistributedContext.current()
        if ctx is not None and clipping == "adaptive":
            raise PrivacyParameterError("clipping='adaptive' is single-process: the count would need a reduction.")
        if ctx is not None and not poisson_sampling:
            raise PrivacyParameterError(
                "poisson_sampling=False is not supported under torch.distributed; each rank Poisson-samples its shard "
                "so that the ranks' batches together are a Poisson sample of the whole dataset."
            )
        self.sampling = "poisson" if poisson_sampling else "without_replacement"
        self.sample_rate = batch_size / n
        if ctx is not None:
            self.sampler_generator.manual_seed(distributed.sampler_seed(self.seed, ctx.rank))
            sampler = distributed.DistributedPoissonBatchSampler(n, self.sample_rate, ctx.rank, ctx.world_size,
                                                                 self.sampler_generator, secure=self.secure_rng)
        elif poisson_sampling:
            sampler = PoissonBatchSampler(n, self.sample_rate, self.sampler_generator, secure=self.secure_rng)
        else:
            sampler = WithoutReplacementBatchSampler(n, batch_size, self.sampler_generator, secure=self.secure_rng)
        steps_per_epoch = len(sampler)

        if (noise_multiplier is None) == (target_epsilon is None):
            raise PrivacyParameterError(
                "Give exactly one of noise_multiplier and target_epsilon (with epochs); got "
                f"noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}."
            )
        if target_epsilon is not None:
            self.target_epsilon = _validate.epsilon(target_epsilon, "target_epsilon")
            if epochs is None:
                raise PrivacyParameterError("target_epsilon needs epochs (the number of epochs it must last).")
            total = max(1, math.ceil(_validate.positive(epochs, "epochs") * steps_per_epoch))
            if self.accountant.history:  # releases charged before training (the private quantile)
                from dpfa.calibration import noise_multiplier_after
                noise_multiplier = noise_multiplier_after(self.accountant, self.target_epsilon, self.target_delta,
                                                          self.sample_rate, total, self.mechanism, self.sampling)
            else:
                noise_multiplier = noise_multiplier_for(self.target_epsilon, self.target_delta, self.sample_rate,
                                                        total, accountant=self.accountant.name,
                                                        mechanism=self.mechanism, sampling=self.sampling)
        self.noise_multiplier = _validate.noise_multiplier(noise_multiplier)
        try:  # dry run: an accountant that cannot account the step must refuse now, not after the first release
            self._event_accountant(1)
        except DPFAError:
            self.noise_multiplier = None
            raise
        if self.noise_multiplier == 0:
            warnings.warn("noise_multiplier=0: training is NOT private (epsilon = inf); use it only to check "
                          "exactness.", stacklevel=2)
        self.max_steps = self._max_steps() if self.target_epsilon is not None else None

        reducer = None
        hooked = module
        if ctx is not None:
            ctx.check_same({"dataset size": n, "batch_size": batch_size, "noise_multiplier": self.noise_multiplier,
                            "max_grad_norm": self.max_grad_norm, "clipping": clipping,
                            "per_layer_norms": per_layer_norms, "mechanism": self.mechanism.name,
                            "accountant": self.accountant.name, "max_steps": self.max_steps,
                            "max_physical_batch_size": max_physical_batch_size, "loss_reduction": loss_reduction,
                            "secure_rng": self.secure_rng})
            hooked, wrapped = distributed.prepare_module(module, ctx)
            reducer = distributed.ClippedSumReducer(ctx, requires_backward=wrapped)
            self._distributed = ctx
        converted, replaced = convert_multihead_attention(hooked)
        remap_optimizer(optimizer, replaced)
        module = converted if hooked is module else module
        # autograd's own weight gradients are skipped (deferred_weight_grad.py), except under a DDP/FSDP
        # wrapper, whose gradient hooks wait for every parameter's
        defer = collector_module.DEFER_WEIGHT_GRADIENTS and (reducer is None or not reducer.requires_backward)
        collector = GradSampleCollector(converted, loss_reduction=loss_reduction, batch_info=self.batch_info,
                                        defer_weight_grads=defer)
        thresholds = None
        if clipping == "per_layer":
            cs = per_layer_thresholds(collector.parameters, self.max_grad_norm, per_layer_norms)
            thresholds = dict(zip(collector.parameters, cs))
        dp_optimizer = DPOptimizer(
            optimizer, collector, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            expected_batch_size=batch_size, mechanism=self.mechanism,
            clipping="flat" if clipping == "adaptive" else clipping,
            per_layer_thresholds=thresholds, noise_generator=self._noise_generator,
            before_step=self._before_step, after_step=self._after_step, batch_info=self.batch_info,
            reducer=reducer, secure_mode=self.secure_mode,
        )
        if clipping == "adaptive":  # the accountant records noise_multiplier; the gradient gets z_grad > it
            from dpfa.calibration import AdaptiveClipping
            dp_optimizer.adaptive = AdaptiveClipping(self.noise_multiplier, target_quantile)
            dp_optimizer.noise_multiplier = dp_optimizer.adaptive.gradient_noise_multiplier
        loader = DPDataLoader(dataset, sampler, collate_fn=data_loader.collate_fn,
                              max_physical_batch_size=max_physical_batch_size, info=self.batch_info,
                              sync_chunks=None if ctx is None else ctx.max_over_ranks)
        return module, dp_optimizer, loader

    # ---------------------------------------------------------- accounting
    def _event_accountant(self, extra_steps: int):
        acc = type(self.accountant)()
        acc.load_state_dict(self.accountant.state_dict())
        if extra_steps:
            acc.compose(self.mechanism, self.noise_multiplier, self.sample_rate, extra_steps, sampling=self.sampling)
        return acc

    def _max_steps(self) -> int:
        """Largest total step count whose epsilon at target_delta stays <= target_epsilon."""
        if self.noise_multiplier == 0:
            return self.steps
        eps = lambda k: self._event_accountant(k).get_epsilon(self.target_delta)  # noqa: E731
        if eps(1) > self.target_epsilon:
            return self.steps
        lo, hi = 1, 2
        while eps(hi) <= self.target_epsilon:
            lo, hi = hi, hi * 2
            if hi > 10**9:
                return 10**9
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if eps(mid) <= self.target_epsilon:
                lo = mid
            else:
                hi = mid
        return self.steps + lo

    def _before_step(self) -> None:
        if self.max_steps is not None and self.steps + 1 > self.max_steps:
            raise BudgetExceededError(
                f"Step {self.steps + 1} would spend more than target_epsilon={self.target_epsilon:g} at "
                f"delta={self.target_delta:g} (epsilon so far {self.get_epsilon(self.target_delta):.4f}); the step "
                "was not taken."
            )

    def _after_step(self) -> None:
        self.accountant.compose(self.mechanism, self.noise_multiplier, self.sample_rate, 1, sampling=self.sampling)
        self.steps += 1

    def get_epsilon(self, delta: Optional[float] = None) -> float:
        """epsilon spent so far at ``delta`` (default: target_delta)."""
        return self.accountant.get_epsilon(self.target_delta if delta is None else delta)

    # ------------------------------------------------------------ checkpoint
    def _config(self) -> Dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "sampling": self.sampling, "max_grad_norm": self.max_grad_norm,
                "mechanism": self.mechanism.name, "target_epsilon": self.target_epsilon,
                "target_delta": self.target_delta}

    def state_dict(self) -> Dict[str, Any]:
        """The privacy spent and the random state. Collective in a distributed run (every rank's sampler state)."""
        state = {
            "accountant": self.accountant.state_dict(),
            "steps": self.steps,
            "config": self._config(),
            "seed": self.seed,
            "secure_rng": self.secure_rng,
        }
        if not self.secure_rng:
            state["sampler_rng"] = self.sampler_generator.get_state()
            state["noise_rng"] = {k: g.get_state() for k, g in self._noise_generators.items()}
        if self._distributed is not None:
            state = distributed.gather_sampler_states(self._distributed, state)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore after make_private; the configuration must match the saved one."""
        mine = self._config()
        theirs = state["config"]
        for k in ("noise_multiplier", "sample_rate", "sampling", "max_grad_norm", "mechanism"):
            if mine[k] != theirs[k] and mine[k] is not None:
                raise StateMismatchError(f"Checkpoint has {k}={theirs[k]!r} but this engine has {mine[k]!r}.")
        self.accountant.load_state_dict(state["accountant"])
        self.steps = int(state["steps"])
        self.seed = int(state["seed"])
        sampler_state = None if self.secure_rng else distributed.local_sampler_state(state, self._distributed)
        if sampler_state is not None:
            self.sampler_generator.set_state(sampler_state)
            for k, s in state.get("noise_rng", {}).items():
                g = torch.Generator(device=k)
                g.set_state(s)
                self._noise_generators[k] = g
        if self.target_epsilon is not None:
            self.max_steps = self._max_steps()

    def save_checkpoint(self, path, module: nn.Module, optimizer: Optional[DPOptimizer] = None, **extra) -> None:
        """Save module, optimizer and engine state (the privacy spent) in one file.

        Distributed: call on every rank; the full state is gathered and rank 0 alone writes.
        """
        if self._distributed is not None:
            distributed.save_checkpoint(self, self._distributed, path, module, optimizer, **extra)
            return
        torch.save({"module": module.state_dict(),
                    "optimizer": None if optimizer is None else optimizer.state_dict(),
                    "privacy_engine": self.state_dict(), **extra}, path)

    def load_checkpoint(self, path, module: nn.Module, optimizer: Optional[DPOptimizer] = None) -> Dict[str, Any]:
        """Restore what save_checkpoint saved. Distributed: call on every rank; rank 0 reads and broadcasts."""
        if self._distributed is not None:
            return distributed.load_checkpoint(self, self._distributed, path, module, optimizer)
        ckpt = torch.load(path, weights_only=False)
        module.load_state_dict(ckpt["module"])
        if optimizer is not None and ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        self.load_state_dict(ckpt["privacy_engine"])
        return ckpt


class PrivateTraining(NamedTuple):
    model: nn.Module
    optimizer: DPOptimizer
    data_loader: DPDataLoader
    engine: PrivacyEngine


def make_model_differentially_private(model: nn.Module, target_epsilon: float, target_delta: float,
                                      num_epochs: int, batch_size: int, dataset_size: Optional[int] = None,
                                      max_grad_norm: float = 1.0, *, dataset=None, optimizer=None, lr: float = 1e-3,
                                      accountant: str = "prv", mechanism: str = "gaussian", **kwargs
                                      ) -> PrivateTraining:
    """The seed's one-call form: a private (model, optimizer, data_loader, engine) for a budget.

    ``dataset`` gives the training data (its length is the dataset size); the optimizer
    defaults to Adam(lr). The noise is calibrated so that ``num_epochs`` epochs spend
    exactly ``target_epsilon``; more steps stop with BudgetExceededError.
    """
    if dataset is None:
        raise PrivacyParameterError("make_model_differentially_private needs dataset= (the training data).")
    if dataset_size is not None and dataset_size != len(dataset):
        raise PrivacyParameterError(f"dataset_size={dataset_size} but len(dataset)={len(dataset)}.")
    batch_size = _validate.count(batch_size, "batch_size")
    if optimizer is None:
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    engine = PrivacyEngine(accountant=accountant, mechanism=mechanism)
    loader = DataLoader(dataset, batch_size=batch_size)
    m, o, dl = engine.make_private(model, optimizer, loader, target_epsilon=target_epsilon, target_delta=target_delta,
                                   epochs=num_epochs, max_grad_norm=max_grad_norm, **kwargs)
    return PrivateTraining(m, o, dl, engine)
