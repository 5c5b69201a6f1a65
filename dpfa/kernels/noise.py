"""fill_noise: a tensor of noise from a device sampler, and the template pattern for kernels.

``_fill_noise_kernel`` takes the sampler as a ``tl.constexpr`` argument, as every dpfa
kernel does (DESIGN.md 3): Triton specialises the kernel per sampler, so the sampler is
inlined. Element ``i`` of the output is ``sampler(seed, i, scale)``: the noise of a
(seed, offset) pair does not depend on the block size, the grid or the device, which is
what lets a fused kernel and this reference agree element for element.

On a CPU tensor the kernel runs only under ``TRITON_INTERPRET=1`` (set before Triton
functions are defined; ``tests/conftest.py`` does so when there is no GPU).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import triton
import triton.language as tl

from dpfa import _validate
from dpfa.errors import PrivacyParameterError, ShapeError

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: block of one program on a GPU; under the interpreter larger blocks are much faster
#: (its cost is per operation, not per element) and give the same values.
GPU_BLOCK = 1024
INTERPRETER_BLOCK = 65536
_SEED_LIMIT = 2**63


@triton.jit
def _fill_noise_kernel(out_ptr, seed, numel, scale, SAMPLER: tl.constexpr, BLOCK: tl.constexpr,
                       LARGE: tl.constexpr):
    pid = tl.program_id(0)
    if LARGE:  # offsets beyond int32: the sampler sees int64 offsets (same counters below 2^32)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    noise = SAMPLER(seed, offs, scale)
    tl.store(out_ptr + offs, noise.to(out_ptr.dtype.element_ty), mask=mask)


def interpreted() -> bool:
    """Whether dpfa's Triton kernels were defined under ``TRITON_INTERPRET=1`` (run on CPU)."""
    return type(_fill_noise_kernel).__name__ == "InterpretedFunction"


def _scale_arg(scale: float) -> float:
    """``scale`` as the float32 the kernel receives, rounded up (more noise, never less)."""
    s32 = np.float32(scale)
    if float(s32) < scale:
        s32 = np.nextafter(s32, np.float32(np.inf))
    return float(s32)


def fill_noise(sampler: Callable[..., Any], seed: int, numel: int, scale: float, device: Any = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 1-D tensor of ``numel`` noise values, element i = ``sampler(seed, i, scale)``.

    ``sampler`` is a device sampler ``f(seed, offsets, scale)`` (e.g. a mechanism's
    ``triton_sampler``), ``seed`` an integer in [0, 2^63) (draw it from the OS CSPRNG, e.g.
    ``secrets.randbits(63)``, for a private release), ``scale`` >= 0 (passed to the kernel as
    float32, rounded up). The same seed gives the same noise.
    """
    if sampler is None or not hasattr(sampler, "fn"):
        raise TypeError(f"fill_noise needs a @triton.jit sampler f(seed, offsets, scale), got {sampler!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < _SEED_LIMIT:
        raise PrivacyParameterError(f"Expected seed={seed!r} to be an integer in [0, 2**63).")
    numel = _validate.count(numel, "numel", minimum=0)
    scale = _validate.noise_multiplier(scale, "scale")
    if dtype not in _DTYPES:
        raise ShapeError(f"fill_noise dtype={dtype}; expected one of {', '.join(map(str, _DTYPES))}.")
    device = torch.device(device)
    interp = interpreted()
    if device.type == "cpu" and not interp:
        raise ShapeError(
            "fill_noise on a CPU tensor runs the Triton kernel under the interpreter only: set "
            "TRITON_INTERPRET=1 before dpfa is imported, or use a CUDA device (or the mechanism's torch "
            "sampler, `sample`, on CPU)."
        )
    out = torch.empty(numel, device=device, dtype=dtype)
    if numel == 0:
        return out
    block = min(INTERPRETER_BLOCK, max(16, triton.next_power_of_2(numel))) if interp else GPU_BLOCK
    grid = (triton.cdiv(numel, block),)
    large = numel + block > 2**31 - 1
    _fill_noise_kernel[grid](out, int(seed), numel, _scale_arg(scale), SAMPLER=sampler, BLOCK=block,
                             LARGE=large)
    return out


__all__ = ["fill_noise", "interpreted", "GPU_BLOCK", "INTERPRETER_BLOCK"]
