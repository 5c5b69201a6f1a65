"""Alias of :mod:`dpfa` under the original project's import name.

``import dp_flash_attention`` gives the same module objects as ``import dpfa``:
``dp_flash_attention.mechanisms`` *is* ``dpfa.mechanisms``, and so is any deeper
module (``dp_flash_attention.mechanisms.gaussian``), so classes are never loaded twice
and registries stay single.
"""

import importlib
import importlib.abc
import importlib.util
import sys

import dpfa
from dpfa import *  # noqa: F401,F403
from dpfa import __version__  # noqa: F401

_ALIAS, _TARGET = __name__, "dpfa"


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``dp_flash_attention.X`` to the already-importable ``dpfa.X``."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(_ALIAS + "."):
            return None
        real = _TARGET + fullname[len(_ALIAS):]
        if importlib.util.find_spec(real) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=real)

    def create_module(self, spec):
        return importlib.import_module(spec.origin)

    def exec_module(self, module):
        pass


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())


def __getattr__(name):
    """Attributes of dpfa (subpackages included) resolve through dpfa."""
    try:
        return getattr(dpfa, name)
    except AttributeError:
        pass
    try:
        return importlib.import_module(f"{_ALIAS}.{name}")
    except ImportError:
        raise AttributeError(f"module {_ALIAS!r} has no attribute {name!r}") from None
