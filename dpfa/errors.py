"""Typed errors of dpfa.

Every error that a user can cause is one of these, and its message names the bad
value and what is allowed (as Opacus' ``validators/errors.py`` and jax_privacy's
``_validate.py`` do). All derive from :class:`DPFAError`; most also derive from
the builtin that a Python user would expect (``ValueError``, ``TypeError``), so
``except ValueError`` keeps working.
"""

from __future__ import annotations


class DPFAError(Exception):
    """Base class of every error dpfa raises on purpose."""


class PrivacyParameterError(DPFAError, ValueError):
    """A privacy parameter (epsilon, delta, noise, sampling rate, steps...) is out of range."""


class UnknownNameError(DPFAError, ValueError):
    """A registry lookup (mechanism, accountant) named something that is not registered."""


class MissingPrivacyCurveError(DPFAError, TypeError):
    """A mechanism lacks the privacy description that an accountant needs (RDP, PLD or PRV)."""


class UnsupportedEventError(DPFAError, ValueError):
    """An accountant cannot account an event (sampling scheme, neighbouring relation...)."""


class BudgetExceededError(DPFAError, RuntimeError):
    """A step would spend more privacy than the budget allows; it was not taken."""


class StateMismatchError(DPFAError, ValueError):
    """A saved state does not fit the object it is loaded into (it would lose spent privacy)."""


class ShapeError(DPFAError, ValueError):
    """A tensor has the wrong rank, shape, dtype or device for the call."""


class DistributedError(DPFAError, RuntimeError):
    """A torch.distributed collective of the engine failed: a rank exited, crashed or timed out."""


class ConfigError(DPFAError, ValueError):
    """An experiment configuration (a TOML file or a command-line override) has a bad key or value."""
