"""Adaptive clipping: the clipping norm as a private quantile of per-example gradient norms.

Andrew, Thakkar, McMahan & Ramaswamy 2021 ("Differentially private learning with adaptive
clipping"). With C_t the current norm, gamma the target quantile (the fraction of examples
whose gradient norm should stay unclipped) and a Poisson batch of expected size m = q N,
one round releases the noisy unclipped count and takes a geometric step:

    b_t = (sum_i 1[||g_i|| <= C_t] + N(0, sigma_b^2)) / m,     C_{t+1} = C_t exp(-eta (b_t - gamma)).

The count changes by at most 1 when one example is added or removed, so a round is a
Poisson-subsampled Gaussian mechanism of noise multiplier sigma_b: the accountant records
it as such (``SampledMechanismEvent("gaussian", sigma_b, q)``). No un-noised statistic of the
norms is ever released or used: C moves only through b_t.

- :class:`AdaptiveNoiseCalibrator`: before training, ``calibrate(model, loader)`` runs
  ``rounds`` rounds on Poisson batches of the loader's dataset (a ``budget_fraction`` of the
  target epsilon is what they may cost alone), charges them to an accountant (the engine's,
  if given), and sets the noise multiplier that the remaining budget allows for ``epochs``
  epochs: the composition of the rounds and the training steps meets the target.
- :class:`AdaptiveClipping`: during training (``make_private(..., clipping="adaptive")``), one
  round per step on the step's own batch; the step's gradient noise is raised to
  z_grad = (z^-2 - (2 sigma_b)^-2)^(-1/2), so the pair (gradient sum, centred count) is one
  Gaussian release of noise multiplier z (Andrew et al., Thm 1): the accountant records z.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
from torch import nn

from dpfa import _validate, accountants
from dpfa.errors import DPFAError, PrivacyParameterError

__all__ = ["AdaptiveNoiseCalibrator", "AdaptiveClipping", "Calibration", "private_quantile",
           "noise_multiplier_after"]


def _step(C: float, count: float, noise: float, expected: float, quantile: float, lr: float) -> float:
    b = (count + noise) / expected
    return C * math.exp(-lr * (b - quantile))


def private_quantile(norms_of_batch: Callable[[torch.Tensor], torch.Tensor], n: int, quantile: float, *,
                     sample_rate: float, rounds: int, count_noise_multiplier: float, initial: float = 1.0,
                     lr: float = 0.2, generator: Optional[torch.Generator] = None) -> float:
    """Andrew et al.'s geometric update, ``rounds`` times on Poisson batches of [0, n).

    ``norms_of_batch(indices)`` returns the per-example norms of the examples at those indices
    (private; only their noisy count below C is used). Returns the last C (public: a function
    of the noisy counts). Costs ``rounds`` Poisson-subsampled Gaussian releases of noise
    multiplier ``count_noise_multiplier`` at ``sample_rate``.
    """
    quantile = float(quantile)
    if not 0.0 < quantile < 1.0:
        raise PrivacyParameterError(f"Expected a target quantile in (0, 1), got {quantile!r}.")
    C = _validate.positive(initial, "initial")
    expected = sample_rate * n
    for _ in range(rounds):
        idx = torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten()
        count = float((norms_of_batch(idx) <= C).sum()) if len(idx) else 0.0
        noise = float(torch.randn((), generator=generator)) * count_noise_multiplier
        C = _step(C, count, noise, expected, quantile, lr)
    return C


def noise_multiplier_after(prior: accountants.Accountant, target_epsilon: float, delta: float, sample_rate: float,
                           steps: int, mechanism="gaussian", sampling: str = "poisson") -> float:
    """Smallest noise multiplier z such that ``prior``'s history plus ``steps`` steps of ``mechanism`` at z meets
    ``target_epsilon`` at ``delta`` (bisection; the epsilon is decreasing in z)."""
    def eps(z: float) -> float:
        acc = type(prior)()
        acc.load_state_dict(prior.state_dict())
        acc.compose(mechanism, z, sample_rate, steps, sampling=sampling)
        return acc.get_epsilon(delta)

    if prior.history and prior.get_epsilon(delta) >= target_epsilon:
        raise PrivacyParameterError(
            f"The privacy already spent ({prior.get_epsilon(delta):.4g} at delta={delta:g}) leaves nothing of "
            f"target_epsilon={target_epsilon:g} for training.")
    lo, hi = 0.1, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise PrivacyParameterError(f"No noise multiplier up to 1e4 meets target_epsilon={target_epsilon:g}.")
    while eps(lo) <= target_epsilon and lo > 1e-3:
        hi, lo = lo, lo / 2
    while hi / lo - 1 > 1e-4:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What :meth:`AdaptiveNoiseCalibrator.calibrate` chose. Iterates as (noise_multiplier, max_grad_norm)."""

    noise_multiplier: float  # for the training steps, from the budget that remains
    max_grad_norm: float  # the private quantile
    quantile: float
    rounds: int
    count_noise_multiplier: float  # sigma_b of the rounds
    sample_rate: float
    steps: int  # training steps the noise multiplier is for
    calibration_epsilon: float  # what the rounds alone cost at target_delta

    def __iter__(self):
        return iter((self.noise_multiplier, self.max_grad_norm))


class AdaptiveNoiseCalibrator:
    """Private clipping norm and noise multiplier for a budget (``target_epsilon``, ``target_delta``).

    ``confidence_interval`` is the seed's name for the target quantile gamma (0.95: clip about
    5% of the examples); ``quantile=`` is dpfa's name (give one). ``budget_fraction`` of the
    target epsilon is what the ``rounds`` quantile rounds may cost on their own.
    """

    def __init__(self, target_epsilon: float, target_delta: float, confidence_interval: Optional[float] = None, *,
                 quantile: Optional[float] = None, rounds: int = 20, budget_fraction: float = 0.1, lr: float = 0.2,
                 initial_norm: float = 1.0, accountant: str = "prv", seed: Optional[int] = None):
        if confidence_interval is not None and quantile is not None:
            raise PrivacyParameterError("Give quantile= or the seed's confidence_interval=, not both.")
        q = 0.95 if confidence_interval is None and quantile is None else (quantile or confidence_interval)
        if not 0.0 < float(q) < 1.0:
            raise PrivacyParameterError(f"Expected the target quantile in (0, 1), got {q!r}.")
        self.quantile = float(q)
        self.target_epsilon = _validate.epsilon(target_epsilon, "target_epsilon")
        self.target_delta = _validate.delta(target_delta, "target_delta")
        self.rounds = _validate.count(rounds, "rounds")
        if not 0.0 < budget_fraction < 1.0:
            raise PrivacyParameterError(f"Expected budget_fraction in (0, 1), got {budget_fraction!r}.")
        self.budget_fraction = float(budget_fraction)
        self.lr = _validate.positive(lr, "lr")
        self.initial_norm = _validate.positive(initial_norm, "initial_norm")
        self.accountant_name = accountant
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(int(seed))
        else:
            import secrets
            self.generator.manual_seed(secrets.randbits(62))

    def count_noise_multiplier(self, sample_rate: float) -> float:
        """sigma_b such that the rounds alone cost budget_fraction x target_epsilon."""
        return accountants.noise_multiplier_for(self.budget_fraction * self.target_epsilon, self.target_delta,
                                                sample_rate=sample_rate, steps=self.rounds,
                                                accountant=self.accountant_name)

    def calibrate(self, model: nn.Module, loader, *, loss_fn: Callable = nn.functional.cross_entropy,
                  epochs: float = 1.0, engine=None) -> Calibration:
        """Run the quantile rounds on ``model`` over ``loader``'s dataset; charge them; set the noise.

        ``loader``: a DataLoader with ``dataset`` and ``batch_size`` (the training loader: its rate
        q = batch_size / len(dataset) is used for the rounds and the training steps). ``loss_fn(
        model(x), y)`` is a mean over the batch. ``engine``: a PrivacyEngine before make_private;
        the rounds are composed into its accountant, so ``make_private(..., target_epsilon=...)``
        then calibrates the training noise for what remains and reports the total. Without
        ``engine`` the rounds are recorded in ``self.accountant``.
        """
        from dpfa.training.clipping import per_example_norms
        from dpfa.training.collector import GradSampleCollector

        dataset, batch_size = getattr(loader, "dataset", None), getattr(loader, "batch_size", None)
        if dataset is None or batch_size is None:
            raise DPFAError("calibrate needs a DataLoader with a dataset and a batch_size.")
        n = len(dataset)
        rate = _validate.sample_rate(batch_size / n, "batch_size / len(dataset)")
        sigma_b = self.count_noise_multiplier(rate)
        collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
        collector = GradSampleCollector(model)
        was_training = model.training
        try:
            def norms_of_batch(idx: torch.Tensor) -> torch.Tensor:
                x, y = collate([dataset[int(i)] for i in idx])
                collector.clear()
                model.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                total = None
                for group, scale in zip(collector.groups(), collector.group_scales()):
                    sq = scale**2 * sum(v.double().pow(2) for v in per_example_norms(group).values())
                    total = sq if total is None else torch.cat([total, sq])
                model.zero_grad(set_to_none=True)
                collector.clear()
                return total.sqrt()

            C = private_quantile(norms_of_batch, n, self.quantile, sample_rate=rate, rounds=self.rounds,
                                 count_noise_multiplier=sigma_b, initial=self.initial_norm, lr=self.lr,
                                 generator=self.generator)
        finally:
            collector.detach()
            model.train(was_training)
        acc = engine.accountant if engine is not None else accountants.create(self.accountant_name)
        acc.compose("gaussian", sigma_b, rate, self.rounds)
        self.accountant = acc
        steps = max(1, math.ceil(_validate.positive(epochs, "epochs") * n / batch_size))
        z = noise_multiplier_after(acc, self.target_epsilon, self.target_delta, rate, steps)
        cal_eps = accountants.create(self.accountant_name).compose("gaussian", sigma_b, rate,
                                                                   self.rounds).get_epsilon(self.target_delta)
        return Calibration(noise_multiplier=z, max_grad_norm=C, quantile=self.quantile, rounds=self.rounds,
                           count_noise_multiplier=sigma_b, sample_rate=rate, steps=steps, calibration_epsilon=cal_eps)


class AdaptiveClipping:
    """Per-step adaptive clipping state (``make_private(..., clipping="adaptive")``); see the module docstring.

    ``count_noise_multiplier`` sigma_b must exceed 1 / (2 z) so that z_grad is finite.
    """

    def __init__(self, noise_multiplier: float, quantile: float = 0.5, lr: float = 0.2,
                 count_noise_multiplier: Optional[float] = None):
        if not 0.0 < quantile < 1.0:
            raise PrivacyParameterError(f"Expected target_quantile in (0, 1), got {quantile!r}.")
        if noise_multiplier <= 0:
            raise PrivacyParameterError("clipping='adaptive' needs noise (noise_multiplier > 0).")
        self.quantile, self.lr = float(quantile), float(lr)
        # Andrew et al.'s default: sigma_b = m / 20 in count units is for large m; here a multiple of 1 / (2 z)
        self.count_noise_multiplier = (count_noise_multiplier if count_noise_multiplier is not None
                                       else 2.0 / noise_multiplier)
        inv = noise_multiplier ** -2 - (2.0 * self.count_noise_multiplier) ** -2
        if inv <= 0:
            raise PrivacyParameterError(
                f"count_noise_multiplier={self.count_noise_multiplier:g} leaves no budget for the gradient at "
                f"noise_multiplier={noise_multiplier:g}; it must exceed 1 / (2 z) = {0.5 / noise_multiplier:g}.")
        self.gradient_noise_multiplier = inv ** -0.5
        self.centred = 0.0  # sum_i (1[||g_i|| <= C] - 1/2) of the logical batch so far (private)

    def observe(self, norms: torch.Tensor, max_grad_norm: float) -> None:
        """Add this physical batch's centred count (kept private until released)."""
        self.centred += float((norms <= max_grad_norm).sum()) - 0.5 * norms.numel()

    def update(self, max_grad_norm: float, expected_batch_size: float, generator: Optional[torch.Generator]) -> float:
        """Release the centred count + N(0, sigma_b^2) (sensitivity 1/2: Andrew et al.) and return the next C.

        b = (sum_i (b_i - 1/2) + noise) / m + 1/2 uses only the expected batch size m (the real one
        is private under Poisson sampling)."""
        noise = float(torch.randn((), generator=generator)) * self.count_noise_multiplier
        b = (self.centred + noise) / expected_batch_size + 0.5
        self.centred = 0.0
        return max_grad_norm * math.exp(-self.lr * (b - self.quantile))
