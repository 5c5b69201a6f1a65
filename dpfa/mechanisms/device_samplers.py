"""Triton device samplers ``f(seed, offsets, scale)`` used as ``tl.constexpr`` kernel arguments.

Each returns noise of the given scale at each Philox counter ``offsets`` under key
``seed``: same (seed, offsets) gives the same noise (DESIGN.md 4). The torch samplers
of the mechanisms are their references; tests compare the laws.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gaussian_sampler(seed, offsets, scale):
    """N(0, scale^2) at each offset (Philox + Box-Muller, ``tl.randn``)."""
    return tl.randn(seed, offsets) * scale


@triton.jit
def laplace_sampler(seed, offsets, scale):
    """Lap(scale) at each offset (placeholder body; replaced by the mechanisms work)."""
    return tl.randn(seed, offsets) * scale
