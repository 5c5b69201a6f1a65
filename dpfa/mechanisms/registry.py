"""The mechanism registry: ``get(name)`` returns a DPMechanism subclass, ``register(cls)`` adds one."""

from __future__ import annotations

from dpfa._registry import Registry
from dpfa.mechanisms.base import DPMechanism

_REGISTRY: Registry = Registry("mechanism", DPMechanism)


def register(cls=None, *, overwrite: bool = False):
    """Register a DPMechanism subclass under ``cls.name``; usable as ``@register``."""
    if cls is None:
        return lambda c: _REGISTRY.register(c, overwrite=overwrite)
    return _REGISTRY.register(cls, overwrite=overwrite)


def get(name: str) -> type[DPMechanism]:
    """The mechanism class registered as ``name`` (``get("gaussian")()`` is an instance)."""
    return _REGISTRY.get(name)


def names() -> list[str]:
    return _REGISTRY.names()


def resolve(mechanism) -> DPMechanism:
    """An instance from a registered name, a DPMechanism subclass or an instance."""
    if isinstance(mechanism, DPMechanism):
        return mechanism
    if isinstance(mechanism, type) and issubclass(mechanism, DPMechanism):
        return mechanism()
    return get(mechanism)()
