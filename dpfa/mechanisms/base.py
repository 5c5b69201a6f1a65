"""DPMechanism: the base class of every noise mechanism in dpfa.

A mechanism adds noise of a given *scale* to a quantity whose *sensitivity* (in the
mechanism's norm) is bounded by the caller. Accountants see it through its
*noise multiplier* z = scale / sensitivity and its privacy curve, given as any of:

- ``rdp(alpha, scale, sensitivity)``: the Renyi divergence bound of order alpha
  (Mironov 2017) between the outputs on neighbouring inputs;
- ``pld(noise_multiplier, sampling_prob, neighboring)``: a dp-accounting
  ``PrivacyLossDistribution``;
- ``prv(noise_multiplier, sampling_prob)``: a prv-accountant ``PrivacyRandomVariable``.

A subclass must define ``name``, ``sensitivity_norm`` and ``sample`` (or override
``add_noise`` alone, in which case it is accounted by the epsilon it is called with).
A subclass without a curve runs, but an accountant that needs the curve refuses it
with :class:`~dpfa.errors.MissingPrivacyCurveError`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from dpfa import _validate
from dpfa.errors import MissingPrivacyCurveError, PrivacyParameterError

SENSITIVITY_NORMS = ("l2", "l1", "l2_grid")
NEIGHBORING_RELATIONS = ("add_remove", "replace_one")


class DPMechanism:
    """Base class of noise mechanisms; see the module docstring for the contract."""

    #: registry name, e.g. ``"gaussian"``
    name: ClassVar[str] = ""
    #: the norm in which the caller must bound the sensitivity: "l2", "l1" or "l2_grid"
    sensitivity_norm: ClassVar[str] = "l2"
    #: a ``@triton.jit`` function ``f(seed, offsets, scale)`` returning noise of that scale
    #: at each offset (Philox counter), or None: kernels then read noise from ``sample``.
    triton_sampler: ClassVar[Optional[Callable[..., Any]]] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        norm = cls.__dict__.get("sensitivity_norm", None)
        if norm is not None and norm not in SENSITIVITY_NORMS:
            raise TypeError(
                f"{cls.__name__}.sensitivity_norm={norm!r}; expected one of {', '.join(SENSITIVITY_NORMS)}."
            )

    # ----------------------------------------------------------------- sampling
    def sample(
        self,
        shape: Sequence[int],
        scale: float,
        generator: Optional[torch.Generator] = None,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Noise of ``scale`` with the given shape (the torch reference sampler)."""
        raise MissingPrivacyCurveError(
            f"Mechanism {self.name!r} defines no torch sampler: override sample(shape, scale, generator, "
            "device, dtype) or add_noise(tensor, sensitivity, epsilon, delta)."
        )

    def has_sampler(self) -> bool:
        return type(self).sample is not DPMechanism.sample

    # ------------------------------------------------------------ privacy curves
    def rdp(self, alpha: float, scale: float, sensitivity: float = 1.0) -> float:
        """RDP epsilon of order ``alpha`` of one release with this scale and sensitivity."""
        raise MissingPrivacyCurveError(
            f"Mechanism {self.name!r} has no RDP curve: define rdp(alpha, scale, sensitivity) to use the "
            "'rdp' accountant (or the default calibration)."
        )

    def pld(self, noise_multiplier: float, sampling_prob: float = 1.0, neighboring: str = "add_remove",
            value_discretization_interval: float = 1e-4):
        """dp-accounting PrivacyLossDistribution of one (Poisson-subsampled) release."""
        raise MissingPrivacyCurveError(
            f"Mechanism {self.name!r} has no privacy loss distribution for the 'pld' accountant; "
            "define pld(noise_multiplier, sampling_prob, neighboring, value_discretization_interval) or use "
            "accountant='rdp'."
        )

    def prv(self, noise_multiplier: float, sampling_prob: float = 1.0):
        """prv-accountant PrivacyRandomVariable of one Poisson-subsampled release."""
        raise MissingPrivacyCurveError(
            f"Mechanism {self.name!r} has no privacy random variable for the 'prv' accountant; "
            "define prv(noise_multiplier, sampling_prob) or use accountant='rdp'."
        )

    def has_curve(self, kind: str) -> bool:
        """Whether the subclass overrides the curve ``kind`` ('rdp', 'pld' or 'prv')."""
        return getattr(type(self), kind) is not getattr(DPMechanism, kind)

    # --------------------------------------------------------------- calibration
    def epsilon(self, scale: float, sensitivity: float, delta: float) -> float:
        """epsilon at ``delta`` of one release (default: RDP curve + Balle et al. 2020 conversion)."""
        from dpfa.accountants.conversion import DEFAULT_ORDERS, epsilon_from_rdp

        if scale == 0:
            return math.inf
        rdp = [self.rdp(a, scale, sensitivity) for a in DEFAULT_ORDERS]
        return epsilon_from_rdp(DEFAULT_ORDERS, rdp, delta)[0]

    def calibrate(self, sensitivity: float, epsilon: float, delta: float) -> float:
        """Smallest scale whose single release is (epsilon, delta)-DP.

        Default: bisection on ``self.epsilon`` (which is decreasing in the scale).
        Subclasses with a closed form override this.
        """
        sensitivity = _validate.positive(sensitivity, "sensitivity")
        epsilon = _validate.epsilon(epsilon)
        delta = _validate.delta(delta, allow_zero=True)
        if delta == 0.0:
            raise PrivacyParameterError(
                f"Mechanism {self.name!r} is calibrated through its RDP curve, which needs delta in (0, 1); "
                "got delta=0."
            )
        return bisect_scale(lambda s: self.epsilon(s, sensitivity, delta) <= epsilon, sensitivity)

    def add_noise(self, tensor: torch.Tensor, sensitivity: float, epsilon: float, delta: float = 0.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``tensor`` plus noise calibrated so that releasing it is (epsilon, delta)-DP.

        The caller guarantees that ``tensor`` has ``sensitivity`` in ``self.sensitivity_norm``.
        """
        scale = self.calibrate(sensitivity, epsilon, delta)
        dtype = tensor.dtype if tensor.is_floating_point() else torch.float64
        noise = self.sample(tuple(tensor.shape), scale, generator=generator, device=tensor.device, dtype=dtype)
        return tensor + noise

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def bisect_scale(is_private: Callable[[float], bool], sensitivity: float, rel_tol: float = 1e-8) -> float:
    """Smallest scale s with ``is_private(s)``, by bisection in log space.

    ``is_private`` must be monotone (False below some scale, True above). The result errs
    on the private side: ``is_private(result)`` always holds.
    """
    lo, hi = sensitivity * 1e-3, sensitivity
    while not is_private(hi):
        lo, hi = hi, hi * 2.0
        if hi > sensitivity * 1e12:
            raise PrivacyParameterError(f"No noise scale up to {hi:g} x sensitivity meets the target.")
    while is_private(lo):
        hi, lo = lo, lo / 2.0
        if lo < sensitivity * 1e-15:
            return hi
    while hi / lo - 1.0 > rel_tol:
        mid = math.sqrt(lo * hi)
        if is_private(mid):
            hi = mid
        else:
            lo = mid
    return hi
