"""Test set-up: without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1).

The variable must be set before any ``@triton.jit`` function is defined, so it is set
here, before dpfa is imported by any test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def gen():
    """A seeded torch generator: statistical tests are repeatable."""
    g = torch.Generator()
    g.manual_seed(20261125)
    return g


@pytest.fixture(autouse=True)
def _fresh_attention_caches():
    """The DP release caches calibrations and row sensitivities per shape; a test that patches
    one of them (to check that a wrong bound is caught) must not meet another test's cache."""
    from dpfa import attention
    attention.clear_caches()
    yield
    attention.clear_caches()
