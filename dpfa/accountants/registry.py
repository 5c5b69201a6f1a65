"""The accountant registry: ``get(name)`` returns an Accountant subclass (``rdp``, ``prv``, ``pld``)."""

from __future__ import annotations

from dpfa._registry import Registry
from dpfa.accountants.base import Accountant

_REGISTRY: Registry = Registry("accountant", Accountant)


def register(cls=None, *, overwrite: bool = False):
    """Register an Accountant subclass under ``cls.name``; usable as ``@register``."""
    if cls is None:
        return lambda c: _REGISTRY.register(c, overwrite=overwrite)
    return _REGISTRY.register(cls, overwrite=overwrite)


def get(name: str) -> type[Accountant]:
    return _REGISTRY.get(name)


def names() -> list[str]:
    return _REGISTRY.names()


def create(name_or_accountant) -> Accountant:
    """A fresh accountant from a registered name (or the given instance unchanged)."""
    if isinstance(name_or_accountant, Accountant):
        return name_or_accountant
    return get(name_or_accountant)()
