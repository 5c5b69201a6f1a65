"""The DP-SGD noise step for all parameters in one launch: ``(sum_i c_i g_i + z) / E[B]``.

DESIGN.md 1.1 step 5: after clipping, each parameter's clipped sum gets noise ``z`` of
scale ``sigma C`` from the mechanism (Gaussian ``N(0, sigma^2 C^2)``, Laplace, ...) and
is divided by the expected batch size (Abadi et al. 2016, "Deep learning with
differential privacy", Alg. 1; the E[B] normalisation of Poisson sampling).

The clipped sums of all parameters are laid end to end in one flat float32 buffer and
``_dpsgd_noise_kernel`` adds the noise and divides in place, ``BLOCK`` elements per
program. The noise is the mechanism's ``@triton.jit`` device sampler, passed as a
``tl.constexpr`` (DESIGN.md 3; the pattern of ``noise.fill_noise``); its Gaussian draws
two normals per Philox call (``PAIR``: the sampler's pair form), elements 2c and 2c + 1
from counter c, exactly as ``gaussian_sampler`` would at each element.

Counters. Element j of the flat buffer uses Philox counter j (the pair form: j // 2,
lane j mod 2) under this step's ``seed``. Parameter k occupies the flat range
[off_k, off_k + n_k), so no two parameters share a counter; the optimizer draws a fresh
63-bit seed every step (from the engine's noise generator, reseeded from the OS CSPRNG
under ``secure_rng``), so steps do not share keys. The noise of element j is
``sampler(seed, j, scale)`` whatever the block or grid: ``noisy_average_reference``
rebuilds it with ``fill_noise`` and the tests compare element for element.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from dpfa import _validate
from dpfa.errors import PrivacyParameterError, ShapeError
from dpfa.kernels.noise import _SEED_LIMIT, _scale_arg, fill_noise, interpreted
from dpfa.mechanisms.device_samplers import pair_form

GPU_BLOCK = 2048
GPU_WARPS = 8
INTERPRETER_BLOCK = 65536


@triton.jit
def _dpsgd_noise_kernel(buf_ptr, seed, numel, scale, batch, SAMPLER: tl.constexpr, PAIR: tl.constexpr,
                        BLOCK: tl.constexpr, LARGE: tl.constexpr):
    """buf[j] = (buf[j] + sampler(seed, j, scale)) / batch for j in this program's block."""
    pid = tl.program_id(0)
    if LARGE:
        pid = pid.to(tl.int64)
    if PAIR:  # BLOCK // 2 Philox calls, each giving elements 2c and 2c + 1
        c = pid * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
        z0, z1 = SAMPLER(seed, c, scale)
        even = 2 * c
        odd = even + 1
        x0 = tl.load(buf_ptr + even, mask=even < numel, other=0.0)
        x1 = tl.load(buf_ptr + odd, mask=odd < numel, other=0.0)
        tl.store(buf_ptr + even, (x0 + z0) / batch, mask=even < numel)
        tl.store(buf_ptr + odd, (x1 + z1) / batch, mask=odd < numel)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        z = SAMPLER(seed, offs, scale)
        x = tl.load(buf_ptr + offs, mask=offs < numel, other=0.0)
        tl.store(buf_ptr + offs, (x + z) / batch, mask=offs < numel)


def _check(sampler, seed, scale, expected_batch_size):
    if sampler is None or not hasattr(sampler, "fn"):
        raise TypeError(f"noisy_average needs a @triton.jit sampler f(seed, offsets, scale), got {sampler!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT:
        raise PrivacyParameterError(f"Expected seed={seed!r} to be an integer in [0, 2**63).")
    _validate.noise_multiplier(scale, "scale")
    _validate.positive(expected_batch_size, "expected_batch_size")


def flatten_sums(sums: Sequence[Optional[torch.Tensor]], shapes: Sequence[torch.Size], device: torch.device
                 ) -> torch.Tensor:
    """The clipped sums end to end in one float32 buffer (zeros for a parameter without one)."""
    if len(sums) != len(shapes):
        raise ShapeError(f"Got {len(sums)} sums for {len(shapes)} parameter shapes.")
    parts = []
    for s, shape in zip(sums, shapes):
        n = 1
        for d in shape:
            n *= int(d)
        if s is None:
            parts.append(torch.zeros(n, device=device, dtype=torch.float32))
        elif s.numel() != n:
            raise ShapeError(f"A clipped sum of {s.numel()} elements for a parameter of shape {tuple(shape)}.")
        else:
            parts.append(s.reshape(-1).to(device=device, dtype=torch.float32))
    if not parts:
        return torch.zeros(0, device=device, dtype=torch.float32)
    return torch.cat(parts)


def noisy_average(sums: Sequence[Optional[torch.Tensor]], shapes: Sequence[torch.Size], sampler, seed: int,
                  scale: float, expected_batch_size: float, device=None) -> List[torch.Tensor]:
    """``(sum_k + z_k) / expected_batch_size`` for every parameter k, float32, in its shape.

    ``sums[k]`` is parameter k's clipped sum (or None: zeros), ``shapes[k]`` its shape;
    ``sampler`` a device sampler ``f(seed, offsets, scale)`` (a mechanism's
    ``triton_sampler``); ``seed`` in [0, 2^63), fresh every step; ``scale`` = sigma C
    (passed as float32, rounded up: never less noise). One kernel launch over all the
    parameters; the results are views of one buffer. CUDA, or CPU under the interpreter.
    """
    _check(sampler, seed, scale, expected_batch_size)
    if device is None:
        device = next((s.device for s in sums if s is not None), torch.device("cpu"))
    device = torch.device(device)
    if device.type == "cpu" and not interpreted():
        raise ShapeError("noisy_average runs on CUDA, or on CPU under TRITON_INTERPRET=1.")
    buf = flatten_sums(sums, shapes, device)
    numel = buf.numel()
    if numel:
        interp = interpreted()
        block = min(INTERPRETER_BLOCK, max(16, triton.next_power_of_2(numel))) if interp else GPU_BLOCK
        pair = pair_form(sampler)
        large = numel + block > 2**31 - 1
        opts = {} if interp else dict(num_warps=GPU_WARPS)
        _dpsgd_noise_kernel[(triton.cdiv(numel, block),)](
            buf, int(seed), numel, _scale_arg(float(scale)), float(expected_batch_size),
            SAMPLER=pair if pair is not None else sampler, PAIR=pair is not None, BLOCK=block, LARGE=large, **opts)
    out, start = [], 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= int(d)
        out.append(buf[start:start + n].view(tuple(shape)))
        start += n
    return out


def noisy_average_reference(sums: Sequence[Optional[torch.Tensor]], shapes: Sequence[torch.Size], sampler,
                            seed: int, scale: float, expected_batch_size: float, device=None
                            ) -> List[torch.Tensor]:
    """The same values in torch: noise from ``fill_noise`` at the flat offsets, then the division."""
    _check(sampler, seed, scale, expected_batch_size)
    device = torch.device(device) if device is not None else next(
        (s.device for s in sums if s is not None), torch.device("cpu"))
    buf = flatten_sums(sums, shapes, device)
    z = fill_noise(sampler, seed, buf.numel(), scale, device=device)
    buf = (buf + z) / float(expected_batch_size)
    out, start = [], 0
    for shape in shapes:
        n = int(torch.Size(shape).numel())
        out.append(buf[start:start + n].view(tuple(shape)))
        start += n
    return out


__all__ = ["noisy_average", "noisy_average_reference", "flatten_sums"]
