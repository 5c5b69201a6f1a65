"""Alias of :mod:`dpfa` under the original project's import name.

``import dp_flash_attention`` gives the same module objects as ``import dpfa``:
``dp_flash_attention.mechanisms`` *is* ``dpfa.mechanisms``, and so is any deeper
module (``dp_flash_attention.mechanisms.gaussian``), so classes are never loaded twice
and registries stay single.

Exceptions, for the seed project's code (its README's examples; see the migration table):
``DPFlashAttention`` and ``DPCheckpointedAttention`` here are thin subclasses of dpfa's that
take the seed's positional order ``(embed_dim, num_heads, epsilon, delta, max_grad_norm)``
and ``noise_mechanism=``; ``dp_flash_attention.privacy`` (``RenyiAccountant``) and
``dp_flash_attention.amplification`` are small seed-only modules of this package.
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


from dpfa import attention as _attention  # noqa: E402
from dpfa import checkpointing as _checkpointing  # noqa: E402


class _SeedSignature:
    """The seed's constructor: ``(embed_dim, num_heads, epsilon, delta, max_grad_norm, *, head_epsilons,
    strategy, head_weights, noise_mechanism, ...)``.

    ``max_grad_norm`` becomes dpfa's ``value_clip``: in the release mode the per-record quantity
    whose norm the layer must bound is a value row (||v_j|| <= C), which with the score cap gives
    the output's sensitivity; nothing in a forward pass has a gradient to clip. (The gradient
    clipping norm of DP-SGD training is ``max_grad_norm`` of ``PrivacyEngine.make_private``.)
    ``batch_first`` defaults to True (the seed's (batch, seq, embed) tensors).
    """

    def __init__(self, embed_dim, num_heads, epsilon, delta, max_grad_norm=1.0, *, head_epsilons=None,
                 strategy=None, head_weights=None, noise_mechanism="gaussian", batch_first=True, **kwargs):
        for dpfa_name, seed_name in (("value_clip", "max_grad_norm"), ("mechanism", "noise_mechanism")):
            if dpfa_name in kwargs:
                raise TypeError(f"Give {seed_name}= (the seed's name) here, or {dpfa_name}= to the dpfa class; "
                                "not both.")
        super().__init__(embed_dim, num_heads, batch_first=batch_first, epsilon=epsilon, delta=delta,
                         mechanism=noise_mechanism, value_clip=max_grad_norm, head_epsilons=head_epsilons,
                         strategy=strategy, head_weights=head_weights, **kwargs)


class DPFlashAttention(_SeedSignature, _attention.DPFlashAttention):
    """dpfa.DPFlashAttention with the seed's constructor (see ``_SeedSignature``)."""


class DPCheckpointedAttention(_SeedSignature, _checkpointing.DPCheckpointedAttention):
    """dpfa.checkpointing.DPCheckpointedAttention with the seed's constructor (see ``_SeedSignature``)."""
