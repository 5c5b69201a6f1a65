"""Noise mechanisms: the DPMechanism base class, the registry and the built-in mechanisms; the secure
grid release of secure_mode (:mod:`dpfa.mechanisms.secure`)."""

from dpfa.mechanisms.base import DPMechanism
from dpfa.mechanisms.registry import get, names, register, resolve
from dpfa.mechanisms.gaussian import GaussianMechanism
from dpfa.mechanisms.laplace import LaplaceMechanism
from dpfa.mechanisms.discrete_gaussian import DiscreteGaussianMechanism
from dpfa.mechanisms.secure import SecureGridRelease

for _cls in (GaussianMechanism, LaplaceMechanism, DiscreteGaussianMechanism):
    register(_cls)
del _cls

__all__ = [
    "DPMechanism", "GaussianMechanism", "LaplaceMechanism", "DiscreteGaussianMechanism", "SecureGridRelease",
    "get", "names", "register", "resolve",
]
