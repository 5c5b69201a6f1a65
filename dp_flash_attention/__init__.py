"""Alias of :mod:`dpfa` under the original project's import name.

``import dp_flash_attention`` gives the same objects as ``import dpfa``, and
``dp_flash_attention.mechanisms`` (or any other subpackage) is ``dpfa.mechanisms``.
"""

import importlib
import sys

import dpfa
from dpfa import *  # noqa: F401,F403
from dpfa import __version__  # noqa: F401

_SUBMODULES = ("errors", "mechanisms", "accountants")
for _name in _SUBMODULES:
    _mod = importlib.import_module(f"dpfa.{_name}")
    sys.modules[f"{__name__}.{_name}"] = _mod
    globals()[_name] = _mod


def __getattr__(name):
    """Anything else of dpfa (added by later subpackages) resolves through dpfa."""
    try:
        return getattr(dpfa, name)
    except AttributeError:
        raise AttributeError(f"module 'dp_flash_attention' has no attribute {name!r}") from None
