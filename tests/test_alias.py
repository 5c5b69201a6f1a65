"""The ``dp_flash_attention`` alias package resolves to the very same modules as ``dpfa``."""

import importlib


def test_alias_is_dpfa():
    import dp_flash_attention
    import dpfa

    assert dp_flash_attention.mechanisms is dpfa.mechanisms
    assert dp_flash_attention.accountants is dpfa.accountants
    assert dp_flash_attention.DPMechanism is dpfa.DPMechanism
    assert dp_flash_attention.__version__ == dpfa.__version__


def test_alias_submodules_are_not_loaded_twice():
    import dpfa.mechanisms.gaussian as real

    alias = importlib.import_module("dp_flash_attention.mechanisms.gaussian")
    assert alias is real
    from dp_flash_attention.mechanisms import get

    assert get("gaussian") is real.GaussianMechanism
