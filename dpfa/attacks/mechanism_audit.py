"""Mechanism audits: run a mechanism many times on two neighbouring inputs and bound its epsilon from below.

For a mechanism M calibrated to (epsilon, delta) at sensitivity Delta, take the
neighbouring inputs x0 = 0 and x1 = Delta e_1, of which only the first coordinate
matters (the noise is independent across coordinates, so the others are pure noise on
both sides). Any pair of neighbours gives a valid lower bound; this one is the worst
case for the built-in noises (isotropic Gaussian: every direction of norm Delta is the
same; Laplace with L1 sensitivity: a shift along one axis), so it also makes the bound
tight. Draw n outputs of M(x0) and n of M(x1), choose a rejection region
{y >= t} or {y <= t} on one half of them and compute the Clopper-Pearson bound of
:mod:`dpfa.attacks.bounds` on the other half (:class:`dpfa.attacks.thresholds.Split`):

    with probability >= confidence,  epsilon_true >= epsilon_lower_bound.

``passed`` is False when the lower bound exceeds the claimed epsilon: the mechanism
is then, with that confidence, not (epsilon, delta)-DP. For a correct mechanism the
bound must also be *near* the claim (a loose audit, or a mechanism that adds more noise
than it claims, is a bug too): for the Gaussian at epsilon = 1, delta = 1e-5 with 10^6
samples per input it is about 0.6 to 0.7 (the best threshold test at this sample size
cannot see further into the tail, where the remaining privacy loss lives).

The audit treats the mechanism as a black box: it needs ``calibrate`` and ``sample``
(every registered mechanism), or only ``add_noise(tensor, sensitivity, epsilon, delta)``
for a user's mechanism, which is then called on a length-n tensor of x0 (and of x1) so
that each entry is one release (this assumes, as for every additive mechanism, that the
noise of an entry does not depend on the others). The code path audited is the one a
caller runs: ``add_noise`` when a class overrides it below the class that defines
``sample``/``calibrate`` (a subclass of the Gaussian that changes only ``add_noise``),
otherwise ``calibrate`` + ``sample``. An ``add_noise`` without a ``generator`` argument
draws from torch's global generator, which the audit seeds (and restores) so that a
seeded audit is repeatable.

References: Jagielski, Ullman & Oprea 2020 ("Auditing differentially private machine
learning: how private is private SGD?"); Nasr, Song, Thakurta, Papernot & Carlini 2021
("Adversary instantiation: lower bounds for differentially private machine learning").
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import numbers
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from dpfa import _validate
from dpfa.attacks.thresholds import ScoreBound, Split, epsilon_lower_bound_from_scores
from dpfa.errors import PrivacyParameterError, ShapeError, UnknownNameError
from dpfa.mechanisms.base import DPMechanism
from dpfa.mechanisms.registry import resolve

__all__ = ["AuditResult", "audit_mechanism", "audit_samples", "audits_add_noise"]

CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """An audit's verdict: with probability >= ``confidence``, the true epsilon >= ``epsilon_lower_bound``.

    ``passed`` is ``epsilon_lower_bound <= claimed_epsilon`` (a bound above the claim
    refutes it). ``epsilon_estimate`` is the point estimate at the chosen region (no
    confidence); ``tightness`` is lower bound / claim; ``n_samples`` is the number of
    outputs drawn per input (half choose the region, half give the bound). ``details``
    carries the region, the counts and their Clopper-Pearson intervals.
    """

    name: str
    claimed_epsilon: float
    delta: float
    epsilon_lower_bound: float
    epsilon_estimate: float
    confidence: float
    n_samples: int
    scale: Optional[float] = None
    details: dict = dataclasses.field(default_factory=dict, compare=False)

    @property
    def passed(self) -> bool:
        return bool(self.epsilon_lower_bound <= self.claimed_epsilon)

    @property
    def tightness(self) -> float:
        return self.epsilon_lower_bound / self.claimed_epsilon if self.claimed_epsilon > 0 else math.inf

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["passed"] = self.passed
        out["tightness"] = self.tightness
        return out

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{self.name}: claimed epsilon {self.claimed_epsilon:.4g} (delta {self.delta:g}), empirical lower "
                f"bound {self.epsilon_lower_bound:.4g} at {self.confidence:.0%} confidence "
                f"(estimate {self.epsilon_estimate:.4g}, {self.n_samples} samples per input): {verdict}")


def _claimed(value) -> float:
    """A claimed epsilon in (0, inf]; inf (no claim: a mechanism without noise) is allowed, NaN is not."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value == math.inf:
        return math.inf
    return _validate.epsilon(value, "claimed_epsilon")


def audit_samples(samples_x1, samples_x0, claimed_epsilon: float, delta: float = 0.0, *,
                  confidence: float = 0.95, strategy=None, name: str = "samples",
                  scale: Optional[float] = None) -> AuditResult:
    """The audit's statistics on outputs already drawn: ``samples_x1`` from M(x1), ``samples_x0`` from M(x0).

    Each array holds independent scalar outputs (or any scalar statistic of them). The
    region is chosen with ``strategy`` (default :class:`Split` (1/2, seed 0)).
    """
    claimed = _claimed(claimed_epsilon)
    sb: ScoreBound = epsilon_lower_bound_from_scores(samples_x1, samples_x0, delta, confidence,
                                                     Split() if strategy is None else strategy, two_sided=True)
    b = sb.bound
    return AuditResult(
        name=name, claimed_epsilon=claimed, delta=float(delta), epsilon_lower_bound=b.epsilon,
        epsilon_estimate=b.estimate, confidence=b.confidence, n_samples=int(min(np.size(samples_x0),
                                                                                   np.size(samples_x1))),
        scale=scale, details=sb.to_dict(),
    )


def _takes_generator(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "generator" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _takes_delta(fn: Callable) -> bool:
    from dpfa.attention import _takes_delta as takes

    return takes(fn)


def _defined_in(cls: type, attr: str) -> type:
    """The class of ``cls``'s MRO whose body defines ``attr``."""
    return next(c for c in cls.__mro__ if attr in c.__dict__)


def audits_add_noise(mech: DPMechanism) -> bool:
    """Whether the audit must call ``add_noise`` (True) or ``calibrate`` + ``sample`` (False).

    ``add_noise`` when there is no torch sampler, or when ``add_noise`` is overridden in a
    strict subclass of the classes that define ``sample`` and ``calibrate``: that is the
    code a caller of ``add_noise`` runs, and it need not use the parent's sampler.
    """
    if not mech.has_sampler():
        return True
    cls = type(mech)
    owner = _defined_in(cls, "add_noise")
    samplers = (_defined_in(cls, "sample"), _defined_in(cls, "calibrate"))
    return all(owner is not s and issubclass(owner, s) for s in samplers)


@contextlib.contextmanager
def _seeded_global_rngs(seed: int):
    """Seed torch's and numpy's global generators inside the block; restore them afterwards."""
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % (2**32))
        try:
            yield
        finally:
            np.random.set_state(np_state)


def _draw(mech: DPMechanism, value: float, n: int, sensitivity: float, epsilon: float, delta: float,
          scale: Optional[float], gen: torch.Generator, progress: bool, desc: str) -> np.ndarray:
    """n outputs of the mechanism on the scalar input ``value``, in chunks.

    ``scale`` given: value + mech.sample(scale). Otherwise mech.add_noise on a tensor of
    ``value`` s (with ``generator=gen`` when it takes one; else the global generators,
    seeded from ``gen``).
    """
    out = np.empty(n, dtype=np.float64)
    use_gen = scale is None and _takes_generator(mech.add_noise)
    if scale is None and not use_gen:
        rngs = _seeded_global_rngs(int(torch.randint(0, 2**62, (1,), generator=gen)))
    else:
        rngs = contextlib.nullcontext()
    with rngs, tqdm(total=n, desc=desc, unit="sample", unit_scale=True, disable=not progress, leave=False) as bar:
        for s in range(0, n, CHUNK):
            m = min(CHUNK, n - s)
            if scale is not None:
                y = value + mech.sample((m,), scale, generator=gen, dtype=torch.float64)
            else:
                x = torch.full((m,), value, dtype=torch.float64)
                kwargs = {"generator": gen} if use_gen else {}
                if _takes_delta(mech.add_noise):
                    y = mech.add_noise(x, sensitivity, epsilon, delta, **kwargs)
                else:  # the seed's add_noise(tensor, sensitivity, epsilon): a pure epsilon-DP claim
                    y = mech.add_noise(x, sensitivity, epsilon, **kwargs)
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != (m,):
                what = "sample" if scale is not None else "add_noise"
                raise ShapeError(
                    f"{type(mech).__name__}.{what} returned {type(y).__name__} of shape "
                    f"{tuple(getattr(y, 'shape', ()))}; the audit needs a tensor of shape ({m},)."
                )
            out[s:s + m] = y.detach().to(torch.float64).cpu().numpy()
            bar.update(m)
    return out


def _resolve(mechanism) -> DPMechanism:
    is_class = isinstance(mechanism, type) and issubclass(mechanism, DPMechanism)
    if isinstance(mechanism, (str, DPMechanism)) or is_class:
        return resolve(mechanism)
    raise UnknownNameError(
        f"Expected a registered mechanism name, a DPMechanism subclass or instance, got {mechanism!r}."
    )


def audit_mechanism(mechanism, epsilon: float, delta: float = 0.0, sensitivity: float = 1.0, *,
                    n_samples: int = 1_000_000, seed: Optional[int] = 0, confidence: float = 0.95,
                    strategy=None, progress: bool = False, name: Optional[str] = None) -> AuditResult:
    """Audit ``mechanism`` (a registered name, a DPMechanism subclass or an instance) at (epsilon, delta).

    With a torch sampler: scale = ``mechanism.calibrate(sensitivity, epsilon, delta)``,
    outputs x + ``mechanism.sample(scale)`` for x in {0, sensitivity}. Without one (a user
    mechanism that overrides only ``add_noise``), or when a subclass overrides
    ``add_noise`` below its sampler (see :func:`audits_add_noise`): ``mechanism.add_noise``
    on tensors of 0s and of ``sensitivity`` s. ``n_samples`` outputs per input; the region
    is chosen on half of them (``strategy``, default :class:`Split`) and the
    Clopper-Pearson bound at ``confidence`` computed on the other half. ``seed`` seeds the
    noise and the split (None: fresh randomness). Returns an :class:`AuditResult` whose
    ``passed`` is False when the lower bound exceeds ``epsilon``.
    """
    mech = _resolve(mechanism)
    epsilon = _validate.epsilon(epsilon)
    delta = _validate.delta(delta, allow_zero=True)
    sensitivity = _validate.positive(sensitivity, "sensitivity")
    n = _validate.count(n_samples, "n_samples", minimum=4)
    if seed is not None:
        seed = _validate.count(seed, "seed", minimum=0)
    if mech.sensitivity_norm == "l2_grid" and not float(sensitivity).is_integer():
        raise PrivacyParameterError(
            f"Mechanism {mech.name!r} works on the integer grid: audit it with an integer sensitivity, got "
            f"sensitivity={sensitivity!r}."
        )
    gen = torch.Generator()
    gen.manual_seed(int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
    via_add_noise = audits_add_noise(mech)
    scale = None if via_add_noise else mech.calibrate(sensitivity, epsilon, delta)
    label = name or (mech.name or type(mech).__name__)
    y0 = _draw(mech, 0.0, n, sensitivity, epsilon, delta, scale, gen, progress, f"audit {label} x0")
    y1 = _draw(mech, float(sensitivity), n, sensitivity, epsilon, delta, scale, gen, progress, f"audit {label} x1")
    strategy = Split(seed=seed) if strategy is None else strategy
    res = audit_samples(y1, y0, epsilon, delta, confidence=confidence, strategy=strategy, name=label, scale=scale)
    res.details.update({"path": "add_noise" if via_add_noise else "calibrate+sample", "sensitivity": sensitivity,
                        "seed": seed})
    return res
