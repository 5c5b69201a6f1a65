"""Per-example direct norm of a weight gradient: squared entries of L_b^T R_b, tile by tile.

The gradient of example b is ``G_b = L_b^T R_b`` (``L_b`` T x out, ``R_b`` T x in; see
ghost_norm.py). When ``T (out + in) >= 2 out in`` (long sequences, narrow layers) the
ghost norm's T^2 term loses to forming G_b itself (Bu et al. 2023, "Differentially
private optimization on large model at small cost", sec. 3: the per-layer choice between
ghost norm and per-sample gradient instantiation). Here G_b is formed one
``BLOCK_O x BLOCK_I`` tile at a time in float32 registers, squared and reduced to one
number per (example, tile) that torch sums: memory O(tile), never (B, out, in).

Cost: 2 T out in multiply-adds per example, one weight-gradient matmul per example.

``direct_sq_norms_reference`` is the plain-torch float64 reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dpfa.errors import ShapeError
from dpfa.kernels import factors
from dpfa.kernels.factors import dot, operand
from dpfa.kernels.noise import interpreted

GPU_BLOCK_O = 64
GPU_BLOCK_I = 128
GPU_BLOCK_T = 32
GPU_WARPS = 4
GPU_STAGES = 3


@triton.jit
def _direct_norm_kernel(l_ptr, r_ptr, part_ptr, T, O, I, n_tiles_i, n_tiles,
                        s_l_b, s_l_t, s_l_o, s_r_b, s_r_t, s_r_i,
                        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
                        COMPUTE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """part[b, tile] = sum of squares of the (BLOCK_O x BLOCK_I) tile of L_b^T R_b."""
    pid_b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    offs_o = (tile // n_tiles_i) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = (tile % n_tiles_i) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_t = tl.arange(0, BLOCK_T)
    l_base = l_ptr + pid_b * s_l_b
    r_base = r_ptr + pid_b * s_r_b
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        tt = t0 + offs_t
        in_t = tt[:, None] < T
        lt = tl.load(l_base + tt[:, None] * s_l_t + offs_o[None, :] * s_l_o, mask=in_t & (offs_o[None, :] < O),
                     other=0.0)
        rt = tl.load(r_base + tt[:, None] * s_r_t + offs_i[None, :] * s_r_i, mask=in_t & (offs_i[None, :] < I),
                     other=0.0)
        acc = dot(tl.trans(operand(lt, COMPUTE, UPCAST)), operand(rt, COMPUTE, UPCAST), acc, IEEE)
    tl.store(part_ptr + pid_b * n_tiles + tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


def direct_sq_norms(left: torch.Tensor, right: torch.Tensor, *, block_o: int | None = None,
                    block_i: int | None = None, block_t: int | None = None) -> torch.Tensor:
    """Per-example ``||L_b^T R_b||_F^2`` (float32, (B,)) for dense ``left`` (B, T, out), ``right`` (B, T, in).

    Factors float16, bfloat16 or float32 (multiplied in ``factors.compute_dtype``, float32
    accumulation); CUDA, or CPU under ``TRITON_INTERPRET=1``.
    """
    if left.dim() != 3 or right.dim() != 3 or left.shape[:2] != right.shape[:2]:
        raise ShapeError(f"Expected left (B, T, out) and right (B, T, in) with the same B and T, got "
                         f"{tuple(left.shape)} and {tuple(right.shape)}.")
    factors.check_device(left, right)
    compute = factors.compute_dtype((left, right))
    B, T, O = left.shape
    I = right.shape[2]
    if B == 0 or T == 0 or O == 0 or I == 0:
        return torch.zeros(B, device=right.device, dtype=torch.float32)
    interp = interpreted()
    bo = block_o or (factors.block(O, 16, 128) if interp else GPU_BLOCK_O)
    bi = block_i or (factors.block(I, 16, 128) if interp else GPU_BLOCK_I)
    bt = block_t or (factors.block(T, 16, 256) if interp else GPU_BLOCK_T)
    n_i = triton.cdiv(I, bi)
    n_tiles = triton.cdiv(O, bo) * n_i
    part = torch.empty((B, n_tiles), device=right.device, dtype=torch.float32)
    opts = {} if interp else dict(num_warps=GPU_WARPS, num_stages=GPU_STAGES)
    _direct_norm_kernel[(B, n_tiles)](left, right, part, T, O, I, n_i, n_tiles, *left.stride(), *right.stride(),
                                      BLOCK_O=bo, BLOCK_I=bi, BLOCK_T=bt, **factors.meta(compute), **opts)
    return part.sum(1)


def direct_sq_norms_reference(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Float64 reference: ||L_b^T R_b||_F^2 with G_b materialised."""
    return torch.einsum("bto,bti->boi", left.double(), right.double()).pow(2).sum((1, 2))


__all__ = ["direct_sq_norms", "direct_sq_norms_reference"]
