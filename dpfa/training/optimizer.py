"""DPOptimizer: clip per example, sum, add noise once per logical batch, then step.

Wraps any torch optimizer. ``step()`` on a physical batch that is not the last of its
logical batch only accumulates the clipped sum (virtual steps); on the last one it adds
noise of scale ``noise_multiplier * max_grad_norm`` from the mechanism, once per
parameter, divides by the expected batch size and lets the wrapped optimizer step:

    grad = (sum_i c_i grad_i + z) / E[B],   z ~ mechanism(scale = sigma C).

Gradient accumulation (several forward/backward passes, then one ``step()``) and virtual
steps (``step()`` after every physical batch) both equal one step on the union of the
physical batches, as long as they are physical batches of ONE logical batch: a step that
would release gradients of two logical batches is refused (the accountant records one
sampled batch per step).

Under torch.distributed a ``reducer`` (distributed.py) sums the ranks' clipped sums before
the division; only the rank whose ``reducer.adds_noise`` is true adds z, so it is added
once in total.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional

import torch
from torch import nn

from dpfa.errors import DPFAError
from dpfa.mechanisms.base import DPMechanism
from dpfa.mechanisms.secure import SecureGridRelease
from dpfa.training.clipping import clipped_grads
from dpfa.training.collector import GradSampleCollector


class DPOptimizer:
    """A torch optimizer made private. Attribute access falls through to the wrapped one."""

    def __init__(self, optimizer: torch.optim.Optimizer, collector: GradSampleCollector, *,
                 noise_multiplier: float, max_grad_norm: float, expected_batch_size: float,
                 mechanism: DPMechanism, clipping: str = "flat",
                 per_layer_thresholds: Optional[Dict[nn.Parameter, float]] = None,
                 noise_generator: Callable[[torch.device], Optional[torch.Generator]] = lambda d: None,
                 before_step: Callable[[], None] = lambda: None, after_step: Callable[[], None] = lambda: None,
                 batch_info: Optional[object] = None, reducer: Optional[Callable] = None,
                 secure_mode: bool = False):
        self.original_optimizer = optimizer
        self.collector = collector
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.mechanism = mechanism
        self.clipping = clipping
        self.per_layer_thresholds = per_layer_thresholds
        self.noise_generator = noise_generator
        self.before_step = before_step
        self.after_step = after_step
        self.batch_info = batch_info
        self.reducer = reducer
        # secure_mode (PrivacyEngine(secure_mode=True)): the noisy clipped sum is released through
        # dpfa.mechanisms.secure.SecureGridRelease (randomised rounding to 2^-k + integer noise)
        self.secure_mode = bool(secure_mode)
        if self.secure_mode and reducer is not None:
            raise DPFAError("secure_mode is single-process: the ranks' sums would be added after the grid release.")
        self.norm = "l1" if mechanism.sensitivity_norm == "l1" else "l2"
        self.adaptive = None  # a dpfa.calibration.AdaptiveClipping (make_private(clipping="adaptive"))
        self.summed: Dict[nn.Parameter, torch.Tensor] = {}
        self.summed_logical: set = set()  # the logical batches whose clipped sums are in self.summed
        self.physical_batches = 0
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        untracked = [p for p in self.params if all(p is not q for q in collector.parameters)]
        if untracked:
            raise DPFAError(f"{len(untracked)} parameters of the optimizer are not parameters of the private module.")

    # ------------------------------------------------------------ delegation
    def __getattr__(self, name):
        return getattr(self.original_optimizer, name)

    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @property
    def state(self):
        return self.original_optimizer.state

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state):
        self.original_optimizer.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the parameters' gradients and drop the current physical batch's contributions."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self.collector.clear()

    # ------------------------------------------------------------------ step
    def _end_of_logical_batch(self) -> bool:
        return True if self.batch_info is None else bool(getattr(self.batch_info, "end_of_logical_batch", True))

    def _check_one_logical_batch(self) -> None:
        """Refuse to mix logical batches in one step: the accountant would under-count the sampled batches."""
        current = getattr(self.batch_info, "logical_batch", None)
        if current is not None and self.summed_logical and current not in self.summed_logical:
            warnings.warn(f"Dropping the partial clipped sum of logical batch(es) {sorted(self.summed_logical)}: the "
                          "loader moved on before their last physical batch was stepped (nothing was released).",
                          stacklevel=4)
            self.summed, self.summed_logical = {}, set()
        tags = self.collector.logical_batches() | self.summed_logical
        if len(tags) > 1 or (current is not None and tags and tags != {current}):
            raise DPFAError(
                f"optimizer.step() would release per-example gradients of logical batches {sorted(tags)} (the loader "
                f"is at logical batch {current}) in one step, but the accountant records one sampled batch per step. "
                "Call optimizer.step() at the end of every logical batch (zero_grad() drops the backward passes not "
                "yet stepped); for larger batches raise batch_size and set max_physical_batch_size."
            )

    def _accumulate(self) -> None:
        """Add this physical batch's clipped sum to the logical batch's."""
        self._check_one_logical_batch()
        if not self.collector.has_contributions():
            last = None if self.batch_info is None else getattr(self.batch_info, "last_batch_size", None)
            if last != 0:
                raise DPFAError(
                    "optimizer.step() was called with no per-example gradients: call loss.backward() first. (Only "
                    "an empty Poisson batch may step without a backward pass.)"
                )
            if self.reducer is not None and self.reducer.requires_backward:
                raise DPFAError(
                    "optimizer.step() on an empty batch without a backward pass: under DistributedDataParallel or "
                    "FSDP every rank must run forward and backward on every batch, even an empty one (the wrapper's "
                    "collectives need every rank)."
                )
            return
        self.summed_logical |= self.collector.logical_batches()
        for group, scale in zip(self.collector.groups(), self.collector.group_scales()):  # one per backward pass
            norms = [] if self.adaptive is not None else None
            sums = clipped_grads(group, self.max_grad_norm, self.clipping, self.norm, self.per_layer_thresholds,
                                 norms_out=norms, scale=scale)
            if norms:  # clipping="adaptive": the private count of unclipped examples (dpfa.calibration)
                self.adaptive.observe(norms[0], self.max_grad_norm)
            for p, s in sums.items():
                self.summed[p] = s if p not in self.summed else self.summed[p] + s
        self.collector.clear()

    def _fused_noise(self, scale: float) -> bool:
        """The noise and the division in one Triton launch over all parameters (dpfa.kernels.dpsgd_noise),
        where contributions.kernels_enabled says so: one device, the mechanism's device sampler, single
        process, not secure_mode. A fresh 63-bit seed per step from the engine's CPU noise generator; the
        Philox counters are the flat offsets of the parameters, disjoint. Returns False to use the torch path."""
        from dpfa.training import contributions

        devices = {p.device for p in self.params}
        sampler = getattr(self.mechanism, "triton_sampler", None)
        if (self.secure_mode or self.reducer is not None or sampler is None or len(devices) != 1
                or not contributions.kernels_enabled(next(iter(devices)))):
            return False
        from dpfa.kernels.dpsgd_noise import noisy_average

        seed = int(torch.randint(0, 2**62, (1,), generator=self.noise_generator(torch.device("cpu"))).item())
        grads = noisy_average([self.summed.get(p) for p in self.params], [p.shape for p in self.params], sampler,
                              seed, scale, self.expected_batch_size, device=next(iter(devices)))
        for p, g in zip(self.params, grads):
            p.grad = g.to(p.dtype)
        self.summed = {}
        self.summed_logical = set()
        return True

    def _add_noise(self) -> None:
        scale = self.noise_multiplier * self.max_grad_norm
        if self._fused_noise(scale):
            return
        adds_noise = scale > 0 and (self.reducer is None or self.reducer.adds_noise)
        totals = {}
        secure = None
        if self.secure_mode and adds_noise:  # one release of all parameters: dim = their total size
            secure = SecureGridRelease.for_sum(self.noise_multiplier, self.max_grad_norm,
                                               sum(p.numel() for p in self.params))
        for p in self.params:
            total = self.summed.get(p)
            if total is None:  # p.shape: the full shape, also for a sharded parameter
                total = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
            if secure is not None:  # float64, exactly on the grid; / E[B] below is post-processing
                total = secure.release(total)
            elif adds_noise:
                noise = self.mechanism.sample(tuple(p.shape), scale, generator=self.noise_generator(p.device),
                                              device=p.device, dtype=torch.float32)
                total = total + noise.to(total.dtype)
            totals[p] = total
        if self.reducer is not None:
            totals = self.reducer(totals)  # the sum over ranks, in each parameter's own layout
        for p, total in totals.items():
            p.grad = (total / self.expected_batch_size).to(p.dtype)
        self.summed = {}
        self.summed_logical = set()

    def pre_step(self) -> bool:
        """Clip and accumulate; at the end of a logical batch add noise and return True."""
        self._accumulate()
        self.physical_batches += 1
        if not self._end_of_logical_batch():
            for p in self.params:  # the wrapped optimizer must not see this batch's raw gradients
                p.grad = None
            return False
        self.before_step()  # the engine checks the budget here, before anything is released
        self._add_noise()
        if self.adaptive is not None:  # release the noisy count, move C (Andrew et al. 2021)
            self.max_grad_norm = self.adaptive.update(self.max_grad_norm, self.expected_batch_size,
                                                      self.noise_generator(torch.device("cpu")))
        self.physical_batches = 0
        return True

    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pre_step():
            self.original_optimizer.step()
            self.after_step()
        return loss

    def __repr__(self) -> str:
        return (f"DPOptimizer({type(self.original_optimizer).__name__}, noise_multiplier={self.noise_multiplier}, "
                f"max_grad_norm={self.max_grad_norm}, mechanism={self.mechanism.name!r}, clipping={self.clipping!r})")


def warn_zero_noise() -> None:
    warnings.warn("noise_multiplier=0: training is NOT private (epsilon = inf). Use this only to check exactness.",
                  stacklevel=3)
