"""Per-example gradient contributions in factored form, their norms and their clipped sums.

A layer sees, for each example i of a batch, its input activations and its output
gradients. For a weight W used as ``y_t = W x_t`` the per-example gradient is
``grad_i = sum_t g_{i,t} x_{i,t}^T = L_i^T R_i`` with ``L_i`` (T x out) and ``R_i``
(T x in): a :class:`Factored` contribution. It is never materialised:

- ghost norm (Li et al. 2022, "Large language models can be strong DP learners"; Bu et
  al. 2023, "DP optimization on large models at small cost"):
  ``||L_i^T R_i||_F^2 = sum_{s,t} (L_s . L_t)(R_s . R_t)``, computed in row tiles so
  that memory is O(tile x T), never T x T for the whole batch at once;
- direct norm: accumulate the squared entries of ``L_i^T R_i`` over tiles of the output
  dimension, O(tile x in) memory per example;
- the cost picks one per parameter: ghost ~ 2 T^2 (out + in), direct ~ 2 T out in
  (DESIGN.md 1.1).

A parameter used by several modules (tied weights: GPT-2's embedding and LM head) gets
one contribution per use; the per-example gradient is their sum, which in factored form
is the concatenation of the factors along T, so the norm of the sum (not the sum of
norms) comes out of the same formulas. An embedding's left factor is one-hot; it is kept
as indices (``num_rows``) and expanded only when tied to a dense factor.

Small parameters (biases, normalisation scales) use :class:`PerExample`: their
per-example gradients (B x param) are materialised, which costs no more than the
activations.

The clipped sum ``sum_i c_i grad_i`` is ``L^T diag(c) R`` (book-keeping, Bu et al. 2023):
one contraction, no per-example gradient.

Kernels. The functions below are the plain-torch rules; where :func:`kernels_enabled` holds
(``KERNELS = "auto"``: CUDA tensors; ``"on"``: also CPU under ``TRITON_INTERPRET=1``;
``"off"``: never) factored contributions go through the Triton kernels of
``dpfa.kernels``: ``ghost_norm`` (one-hot factors as comparisons and gathers, tied uses as
cross terms), ``direct_norm`` and ``clipped_sum``. The kernels' choice between ghost and
direct is measured once per shape on CUDA (``MEASURE_KERNEL_COST``), else the FLOP rule
:func:`kernel_prefers_ghost`. The optimizer's noise step follows the same switch
(``dpfa.kernels.dpsgd_noise``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, Iterator, Optional, Sequence, Union

import torch

from dpfa.errors import DPFAError

#: rows of the T x T Gram matrices computed at once by the ghost norm
GHOST_TILE = 256
#: output rows of the per-example gradient materialised at once by the direct norm
DIRECT_TILE = 64

KERNEL_MODES = ("auto", "on", "off")
#: Where the Triton kernels of dpfa.kernels (ghost_norm, direct_norm, clipped_sum, dpsgd_noise) replace the
#: torch rules below: "auto" for CUDA tensors, "on" for every tensor (on CPU only under TRITON_INTERPRET=1;
#: tests), "off" never. Set it, or use ``with use_kernels("on"):``. float64 factors always take the torch path.
KERNELS = "auto"
#: "auto" on CUDA: time the ghost and the direct kernel once per (T, out, in, dtypes) and keep the faster;
#: False: decide by the FLOP formula alone (kernel_prefers_ghost)
MEASURE_KERNEL_COST = True
_MEASURED: Dict[tuple, bool] = {}


@contextlib.contextmanager
def use_kernels(mode: str) -> Iterator[None]:
    """Temporarily set :data:`KERNELS` ("auto", "on" or "off")."""
    global KERNELS
    if mode not in KERNEL_MODES:
        raise DPFAError(f"Unknown kernels mode {mode!r}; expected one of {KERNEL_MODES}.")
    old, KERNELS = KERNELS, mode
    try:
        yield
    finally:
        KERNELS = old


def kernels_enabled(device: torch.device) -> bool:
    """Whether tensors on ``device`` go through the Triton kernels under the current :data:`KERNELS`."""
    if KERNELS not in KERNEL_MODES:
        raise DPFAError(f"contributions.KERNELS={KERNELS!r}; expected one of {KERNEL_MODES}.")
    if KERNELS == "off":
        return False
    if torch.device(device).type == "cuda":
        return True
    if KERNELS == "on":
        from dpfa.kernels.noise import interpreted
        if not interpreted():
            raise DPFAError("kernels='on' for CPU tensors needs TRITON_INTERPRET=1 set before dpfa is imported.")
        return True
    return False


def _kernel_dtypes(*tensors: torch.Tensor) -> bool:
    return all(t.dtype in (torch.float16, torch.bfloat16, torch.float32) for t in tensors if t.is_floating_point())


@dataclasses.dataclass
class Factored:
    """Per-example gradient ``grad_i = L_i^T R_i`` reshaped to the parameter's shape.

    ``left`` is (B, T, out) floating point, or (B, T) integer row indices of a one-hot
    left factor with ``num_rows`` columns (an embedding lookup). ``right`` is (B, T, in).
    ``transpose`` marks a parameter stored as (in, out) (transformers' Conv1D).
    """

    left: torch.Tensor
    right: torch.Tensor
    num_rows: Optional[int] = None
    transpose: bool = False

    @property
    def batch_size(self) -> int:
        return self.right.shape[0]

    @property
    def out_features(self) -> int:
        return self.num_rows if self.num_rows is not None else self.left.shape[-1]

    def dense_left(self) -> torch.Tensor:
        if self.num_rows is None:
            return self.left
        return torch.nn.functional.one_hot(self.left, self.num_rows).to(self.right.dtype)


@dataclasses.dataclass
class PerExample:
    """Materialised per-example gradients, (B, *param.shape)."""

    grad: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.grad.shape[0]


Contribution = Union[Factored, PerExample]


def _ghost_sq_norms(left: Sequence[torch.Tensor], right: torch.Tensor, rows: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """sum_{s,t} (L_s . L_t)(R_s . R_t) per example, tiled over s.

    ``left`` is one dense (B, T, out) tensor, or None with ``rows`` (B, T) indices of a
    one-hot factor, whose Gram matrix is [rows_s == rows_t].
    """
    B, T, _ = right.shape
    out = right.new_zeros(B, dtype=torch.float64 if right.dtype == torch.float64 else torch.float32)
    for s0 in range(0, T, GHOST_TILE):
        s1 = min(T, s0 + GHOST_TILE)
        gram_r = torch.bmm(right[:, s0:s1], right.transpose(1, 2))  # (B, tile, T)
        if rows is not None:
            gram_l = (rows[:, s0:s1, None] == rows[:, None, :]).to(gram_r.dtype)
        else:
            gram_l = torch.bmm(left[:, s0:s1], left.transpose(1, 2))
        out += (gram_l * gram_r).sum(dim=(1, 2)).to(out.dtype)
    return out


def _common(left: torch.Tensor, right: torch.Tensor):
    """Both factors in one dtype of at least float32: under autocast a layer's input (the fp32 residual
    stream) and its output gradient (bf16) differ. The torch path computes norms and clipped sums of the
    same values in float32 or wider, so that a clipped gradient's norm is C to float32 accuracy (16-bit
    products would round the norms and the clip factors by ~2^-9)."""
    dtype = torch.promote_types(torch.promote_types(left.dtype, right.dtype), torch.float32)
    return left.to(dtype), right.to(dtype)


def _direct_sq_norms(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """||L_i^T R_i||_F^2 per example, materialising DIRECT_TILE output rows at a time."""
    left, right = _common(left, right)
    B, _, n_out = left.shape
    out = right.new_zeros(B, dtype=torch.float64 if right.dtype == torch.float64 else torch.float32)
    for o0 in range(0, n_out, DIRECT_TILE):
        block = torch.bmm(left[:, :, o0:o0 + DIRECT_TILE].transpose(1, 2), right)  # (B, tile, in)
        out += block.pow(2).sum(dim=(1, 2)).to(out.dtype)
    return out


def prefers_ghost(T: int, n_out: int, n_in: int) -> bool:
    """Ghost norm when 2 T^2 (out + in) < 2 T out in, i.e. T (out + in) < out in."""
    return T * (n_out + n_in) < n_out * n_in


def kernel_prefers_ghost(T: int, n_out: int, n_in: int) -> bool:
    """The kernels' FLOP rule: the ghost kernel visits only the tile pairs s <= t (T^2 (out + in)
    multiply-adds), the direct kernel 2 T out in; ghost when T (out + in) < 2 out in."""
    return T * (n_out + n_in) < 2 * n_out * n_in


def _batch_bucket(b: int) -> int:
    """Batch sizes share a measurement up to the next power of two: Poisson batches change size
    every step, and measuring (and compiling) anew for each size cost more than it saved."""
    return 1 << max(0, (int(b) - 1).bit_length())


def _time_ms(fn, reps: int = 3) -> float:
    from dpfa.kernels.clipped_sum import gpu_time_ms

    fn()  # compile and warm up
    return gpu_time_ms(fn, reps)


def _kernel_ghost_wins(left: torch.Tensor, right: torch.Tensor) -> bool:
    """Ghost or direct kernel for dense factors: measured once per shape on CUDA, else by FLOPs."""
    from dpfa.kernels.direct_norm import direct_sq_norms
    from dpfa.kernels.ghost_norm import ghost_sq_norms

    T, n_out, n_in = right.shape[1], left.shape[2], right.shape[2]
    by_flops = kernel_prefers_ghost(T, n_out, n_in)
    if not (MEASURE_KERNEL_COST and right.is_cuda and right.shape[0] > 0):
        return by_flops
    key = (T, n_out, n_in, left.dtype, right.dtype, _batch_bucket(right.shape[0]), str(right.device))
    if key not in _MEASURED:
        ghost = _time_ms(lambda: ghost_sq_norms([(left, right)]))
        direct = _time_ms(lambda: direct_sq_norms(left, right))
        _MEASURED[key] = ghost < direct
    return _MEASURED[key]


def _scaled_matmul_sum(left: torch.Tensor, right: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """sum_b c_b L_b^T R_b for float32 factors as one cuBLAS matmul, L^T (c R) or (c L)^T R (the narrower
    factor scaled). Only for float32: rounding c_b L_b to 16 bits would perturb the clipped gradient by up to
    2^-8 ||L_b|| ||R_b||, beyond C (the clipped-sum kernel scales its float32 accumulator instead)."""
    if not (left.dtype == right.dtype == torch.float32):
        raise TypeError(f"_scaled_matmul_sum is for float32 factors, got {left.dtype} and {right.dtype}.")
    f = factors.to(device=left.device, dtype=torch.float32)[:, None, None]
    if right.shape[-1] < left.shape[-1]:
        a, b = left, right * f
    else:
        a, b = left * f, right
    return torch.mm(a.reshape(-1, a.shape[-1]).t(), b.reshape(-1, b.shape[-1]))


def _kernel_clipped_sum(left: torch.Tensor, right: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """The clipped-sum kernel; for float32 factors on CUDA the scaled cuBLAS matmul where it measured faster
    (once per shape). 16-bit factors always take the kernel (see _scaled_matmul_sum)."""
    from dpfa.kernels.clipped_sum import clipped_sum as kernel_clipped_sum

    fp32 = left.dtype == right.dtype == torch.float32
    if not (fp32 and MEASURE_KERNEL_COST and right.is_cuda and right.shape[0] > 0):
        return kernel_clipped_sum(left, right, factors)
    key = ("sum", _batch_bucket(left.shape[0])) + tuple(left.shape[1:]) + (right.shape[-1], left.dtype, right.dtype,
                                                                           str(right.device))
    if key not in _MEASURED:
        _MEASURED[key] = (_time_ms(lambda: kernel_clipped_sum(left, right, factors))
                          <= _time_ms(lambda: _scaled_matmul_sum(left, right, factors)))
    return kernel_clipped_sum(left, right, factors) if _MEASURED[key] else _scaled_matmul_sum(left, right, factors)


def _kernel_sq_norms(contributions: Sequence["Factored"], method: str) -> torch.Tensor:
    """squared_norms for factored contributions through the Triton kernels."""
    from dpfa.kernels.direct_norm import direct_sq_norms
    from dpfa.kernels.ghost_norm import ghost_sq_norms

    one_hot = any(c.num_rows is not None for c in contributions)
    if one_hot and method != "direct":  # one-hot Grams are comparisons and gathers: ghost is always cheaper
        return ghost_sq_norms([(c.left, c.right) for c in contributions])
    if len(contributions) == 1:
        left, right = contributions[0].dense_left(), contributions[0].right
    else:
        left = torch.cat([c.dense_left() for c in contributions], dim=1)
        right = torch.cat([c.right for c in contributions], dim=1)
    use_ghost = method == "ghost" or (method == "auto" and _kernel_ghost_wins(left, right))
    return ghost_sq_norms([(left, right)]) if use_ghost else direct_sq_norms(left, right)


def squared_norms(contributions: Sequence[Contribution], method: str = "auto") -> torch.Tensor:
    """Per-example squared norm of the gradient summed over ``contributions`` (one parameter).

    ``method`` is "auto" (by cost), "ghost" or "direct" for factored contributions.
    """
    if not contributions:
        raise ValueError("squared_norms() needs at least one contribution.")
    if all(isinstance(c, PerExample) for c in contributions):
        total = contributions[0].grad
        for c in contributions[1:]:
            total = total + c.grad
        wide = total.flatten(1).to(torch.promote_types(total.dtype, torch.float32))
        return wide.pow(2).sum(1)
    if not all(isinstance(c, Factored) for c in contributions):
        raise TypeError("A parameter cannot mix factored and materialised per-example contributions.")
    transposes = {c.transpose for c in contributions}
    if len(transposes) != 1:
        raise TypeError("Tied uses of one parameter must store it the same way round.")
    if kernels_enabled(contributions[0].right.device) and _kernel_dtypes(
            *[t for c in contributions for t in (c.left, c.right)]):
        return _kernel_sq_norms(contributions, method)
    if len(contributions) == 1 and contributions[0].num_rows is not None:
        c = contributions[0]
        return _ghost_sq_norms(None, c.right.to(torch.promote_types(c.right.dtype, torch.float32)), rows=c.left)
    left, right = _common(torch.cat([c.dense_left() for c in contributions], dim=1),
                          torch.cat([c.right for c in contributions], dim=1))
    T, n_out, n_in = right.shape[1], left.shape[2], right.shape[2]
    use_ghost = method == "ghost" or (method == "auto" and prefers_ghost(T, n_out, n_in))
    return _ghost_sq_norms(left, right) if use_ghost else _direct_sq_norms(left, right)


def clipped_sum(contributions: Sequence[Contribution], factors: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """sum_i factors_i grad_i summed over ``contributions``, in the parameter's ``shape``."""
    total = None
    for c in contributions:
        if isinstance(c, PerExample):
            wide = torch.promote_types(c.grad.dtype, torch.float32)
            part = torch.einsum("b,b...->...", factors.to(device=c.grad.device, dtype=wide), c.grad.to(wide))
        elif c.num_rows is not None:  # in (at least) float32: a 16-bit c_b g_t would round the clip factor
            wide = torch.promote_types(c.right.dtype, torch.float32)
            weighted = c.right.to(wide) * factors.to(device=c.right.device, dtype=wide)[:, None, None]
            part = weighted.new_zeros(c.num_rows, c.right.shape[-1])
            part.index_add_(0, c.left.reshape(-1), weighted.reshape(-1, c.right.shape[-1]))
        elif kernels_enabled(c.right.device) and _kernel_dtypes(c.left, c.right):
            part = _kernel_clipped_sum(c.left, c.right, factors)
        else:
            left, right = _common(c.left, c.right)
            weighted = left * factors.to(left.dtype)[:, None, None]
            part = torch.einsum("bto,bti->oi", weighted, right)
        if isinstance(c, Factored) and c.transpose:
            part = part.t()
        part = part.reshape(shape).to(torch.promote_types(part.dtype, torch.float32))  # sums and noise: >= fp32
        total = part if total is None else total + part
    return total
