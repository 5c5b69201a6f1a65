"""Book-keeping clipped sum: ``sum_b c_b L_b^T R_b = L^T diag(c) R`` in one matmul kernel.

Once the clip factors ``c_b = min(1, C / (||G_b|| + 1e-6))`` are known, the clipped weight
gradient of a layer is one contraction over the B*T token rows of the whole batch (Bu et
al. 2023, "Differentially private optimization on large model at small cost":
book-keeping; the non-private weight gradient ``L^T R`` is the special case c = 1):

    grad[o, i] = sum_{n = (b, t)} c_b L[b, t, o] R[b, t, i].

Kernel ``_clipped_sum_kernel``: a tiled matmul over the flattened row index n = b T + t.
Each program owns a ``BLOCK_O x BLOCK_I`` tile of the gradient (float32 accumulator in
registers) and a contiguous range of row chunks (split-K, so that a 768 x 768 layer still
fills the GPU); for each chunk of ``BLOCK_K`` rows it loads the L and R tiles, scales the
L rows by their example's c_b in float32, rounds them to the compute dtype and
accumulates ``L_tile^T R_tile``. Split partial sums go to a (splits, out, in) float32
buffer that torch sums (deterministic, no atomics). No per-example gradient and no
separate non-private gradient is ever formed.

Rounding: c_b L is rounded to the compute dtype (``factors``) before the product, as
autocast rounds its operands; in float32 that is the float32 product. The reference
``clipped_sum_reference`` is plain torch in float64.
"""

from __future__ import annotations

from typing import Dict

import torch
import triton
import triton.language as tl

from dpfa.errors import ShapeError
from dpfa.kernels import factors
from dpfa.kernels.factors import dot, operand
from dpfa.kernels.noise import interpreted

GPU_BLOCK_O = 128
GPU_BLOCK_I = 128
GPU_BLOCK_K = 64
GPU_WARPS = 8
GPU_STAGES = 3
#: split-K aims at this many programs per streaming multiprocessor
PROGRAMS_PER_SM = 2
#: split-K partial sums may take at most this many bytes
SPLIT_BUFFER_BYTES = 256 * 2**20

_SMS: Dict[int, int] = {}


@triton.jit
def _clipped_sum_kernel(l_ptr, r_ptr, c_ptr, out_ptr, T, N, O, I, n_tiles_i, rows_per_split,
                        s_l_b, s_l_t, s_l_o, s_r_b, s_r_t, s_r_i, s_out_split,
                        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
                        COMPUTE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """out[split, o, i] = sum over rows n of this split of c[n // T] L[n, o] R[n, i]."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    offs_o = (tile // n_tiles_i) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = (tile % n_tiles_i) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_o = offs_o[None, :] < O
    in_i = offs_i[None, :] < I
    n0 = split.to(tl.int64) * rows_per_split
    n1 = tl.minimum(n0 + rows_per_split, N)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(n0, n1, BLOCK_K):
        nn = k0 + offs_k
        valid = nn < n1
        b = nn // T
        t = nn - b * T
        c = tl.load(c_ptr + b, mask=valid, other=0.0)
        lt = tl.load(l_ptr + b[:, None] * s_l_b + t[:, None] * s_l_t + offs_o[None, :] * s_l_o,
                     mask=valid[:, None] & in_o, other=0.0)
        rt = tl.load(r_ptr + b[:, None] * s_r_b + t[:, None] * s_r_t + offs_i[None, :] * s_r_i,
                     mask=valid[:, None] & in_i, other=0.0)
        lt = lt.to(tl.float32) * c[:, None]
        acc = dot(tl.trans(operand(lt, COMPUTE, UPCAST)), operand(rt, COMPUTE, UPCAST), acc, IEEE)
    out = out_ptr + split * s_out_split + offs_o[:, None] * I + offs_i[None, :]
    tl.store(out, acc, mask=(offs_o[:, None] < O) & in_i)


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _splits(device: torch.device, tiles: int, chunks: int, O: int, I: int) -> int:
    if device.type != "cuda":
        return 1
    want = max(1, PROGRAMS_PER_SM * _sm_count(device) // tiles)
    cap = max(1, SPLIT_BUFFER_BYTES // max(1, 4 * O * I))
    return max(1, min(want, cap, chunks // 4))


def clipped_sum(left: torch.Tensor, right: torch.Tensor, factors_b: torch.Tensor, *, block_o: int | None = None,
                block_i: int | None = None, block_k: int | None = None, splits: int | None = None) -> torch.Tensor:
    """``sum_b factors_b L_b^T R_b`` as a float32 (out, in) tensor.

    ``left`` (B, T, out), ``right`` (B, T, in): float16, bfloat16 or float32 (multiplied in
    ``factors.compute_dtype``, float32 accumulation); ``factors_b`` (B,) any float dtype (used
    in float32). CUDA, or CPU under ``TRITON_INTERPRET=1``. ``splits`` forces the split-K
    count (tests).
    """
    if left.dim() != 3 or right.dim() != 3 or left.shape[:2] != right.shape[:2]:
        raise ShapeError(f"Expected left (B, T, out) and right (B, T, in) with the same B and T, got "
                         f"{tuple(left.shape)} and {tuple(right.shape)}.")
    B, T, O = left.shape
    I = right.shape[2]
    if tuple(factors_b.shape) != (B,):
        raise ShapeError(f"Expected one clip factor per example, shape ({B},), got {tuple(factors_b.shape)}.")
    factors.check_device(left, right, factors_b)
    compute = factors.compute_dtype((left, right))
    N = B * T
    if N == 0 or O == 0 or I == 0:
        return torch.zeros((O, I), device=right.device, dtype=torch.float32)
    interp = interpreted()
    bo = block_o or (factors.block(O, 16, 128) if interp else GPU_BLOCK_O)
    bi = block_i or (factors.block(I, 16, 128) if interp else GPU_BLOCK_I)
    bk = block_k or (factors.block(N, 16, 256) if interp else GPU_BLOCK_K)
    n_i = triton.cdiv(I, bi)
    tiles = triton.cdiv(O, bo) * n_i
    chunks = triton.cdiv(N, bk)
    n_split = splits or _splits(right.device, tiles, chunks, O, I)
    per_split = triton.cdiv(chunks, n_split)
    n_split = triton.cdiv(chunks, per_split)
    c = factors_b.to(device=right.device, dtype=torch.float32).contiguous()
    out = torch.empty((n_split, O, I), device=right.device, dtype=torch.float32)
    opts = {} if interp else dict(num_warps=GPU_WARPS, num_stages=GPU_STAGES)
    _clipped_sum_kernel[(tiles, n_split)](left, right, c, out, T, N, O, I, n_i, per_split * bk,
                                          *left.stride(), *right.stride(), O * I,
                                          BLOCK_O=bo, BLOCK_I=bi, BLOCK_K=bk, **factors.meta(compute), **opts)
    return out[0] if n_split == 1 else out.sum(0)


def clipped_sum_reference(left: torch.Tensor, right: torch.Tensor, factors_b: torch.Tensor) -> torch.Tensor:
    """Float64 reference: sum_b c_b L_b^T R_b."""
    return torch.einsum("b,bto,bti->oi", factors_b.double(), left.double(), right.double())


__all__ = ["clipped_sum", "clipped_sum_reference"]
