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
