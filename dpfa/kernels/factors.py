"""Operands of the per-example gradient kernels (ghost norm, direct norm, clipped sum).

A Linear layer's per-example weight gradient is ``grad_b = L_b^T R_b`` with ``L_b``
(T x out, the output gradients) and ``R_b`` (T x in, the inputs): see
``dpfa.training.contributions``. The kernels read both factors in their own dtype and
multiply them in one *compute dtype*, always accumulating in float32:

- both float32: float32 products (``input_precision="ieee"``, not TF32: the exactness
  tests compare with float64 to 1e-5, and torch's fp32 matmul is not TF32 by default);
- otherwise the narrowest 16-bit type among them. Under bf16 autocast a layer's input is
  often the float32 residual stream while its output gradient is bf16; autocast's own
  weight gradient multiplies the bf16 copy of the input, and so do these kernels.

Under ``TRITON_INTERPRET=1`` (CPU) ``tl.dot`` on bf16 gives wrong values, so operands are
rounded to the compute dtype and then upcast to float32 (``UPCAST``): the interpreter sees
the same rounded operands the GPU multiplies.
"""

from __future__ import annotations

from typing import Iterable

import torch
import triton
import triton.language as tl

from dpfa.errors import ShapeError
from dpfa.kernels.noise import interpreted

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def operand(x, COMPUTE: tl.constexpr, UPCAST: tl.constexpr):
    """``x`` rounded to the compute dtype; with ``UPCAST`` then widened to float32 (interpreter).

    The interpreter's float32 -> bfloat16 cast truncates (rounds toward zero) where the GPU
    rounds to nearest even, so under ``UPCAST`` the bf16 rounding is done on the bits:
    add 0x7FFF plus the lowest kept bit, clear the low 16 bits (finite values)."""
    if UPCAST:
        x = x.to(tl.float32)
        if COMPUTE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        else:
            x = x.to(COMPUTE).to(tl.float32)
    else:
        x = x.to(COMPUTE)
    return x


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b with a, b already passed through :func:`operand`; float32 accumulation
    (``IEEE``: float32 operands multiplied exactly, not as TF32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


def compute_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """float32 if every factor is float32, else the 16-bit dtype among them (bf16 before fp16)."""
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    bad = dtypes - set(SUPPORTED_DTYPES)
    if bad:
        raise ShapeError(f"Kernel factors must be float16, bfloat16 or float32, got {sorted(map(str, bad))}.")
    if dtypes <= {torch.float32}:
        return torch.float32
    return torch.bfloat16 if torch.bfloat16 in dtypes else torch.float16


def meta(dtype: torch.dtype) -> dict:
    """The COMPUTE / UPCAST / IEEE constexprs for a compute dtype."""
    upcast = bool(interpreted() and dtype != torch.float32)
    return dict(COMPUTE=_TL[dtype], UPCAST=upcast, IEEE=upcast or dtype == torch.float32)


def check_device(*tensors: torch.Tensor) -> None:
    """Tensors on one device: CUDA, or CPU under the interpreter."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ShapeError(f"Kernel operands must share one device, got {sorted(map(str, devices))}.")
    device = devices.pop()
    if device.type == "cpu" and not interpreted():
        raise ShapeError("dpfa's per-example gradient kernels run on CUDA, or on CPU under TRITON_INTERPRET=1 "
                         "(set before dpfa is imported); use the torch path (kernels='off') otherwise.")


def block(n: int, lo: int, hi: int) -> int:
    """A power-of-two block for a dimension of size n, clamped to [lo, hi] (tl.dot needs >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


__all__ = ["operand", "dot", "compute_dtype", "meta", "check_device", "block", "SUPPORTED_DTYPES"]
