"""Per-example ghost norm of a weight gradient, tiled flash-style (the T x T Gram never in memory).

For a weight used as ``y_t = W x_t`` the gradient of example b is ``G_b = L_b^T R_b`` with
``L_b`` (T x out) the output gradients and ``R_b`` (T x in) the inputs. Its squared
Frobenius norm is, without forming G_b (Goodfellow 2015; Li et al. 2022, "Large language
models can be strong differentially private learners", ghost clipping; Bu et al. 2023,
"Differentially private optimization on large model at small cost", book-keeping):

    ||L_b^T R_b||_F^2 = tr(R_b^T L_b L_b^T R_b) = sum_{s,t} (L_b[s] . L_b[t]) (R_b[s] . R_b[t]).

Kernel ``_ghost_norm_kernel``: one program per (example b, tile pair (S, T')) of token
tiles of ``BLOCK_T`` rows. It forms the two ``BLOCK_T x BLOCK_T`` Gram tiles
``L[S] L[T']^T`` and ``R[S] R[T']^T`` by looping over the feature dimension in
``BLOCK_K`` chunks (float32 accumulators in registers), multiplies them elementwise,
reduces the tile to one float32 number and writes it to a (B, pairs) buffer that torch
sums (deterministic: no atomics). Only two Gram tiles and two operand chunks are ever on
chip; the full T x T Grams are never in memory. The sum is symmetric in (s, t), so only
tile pairs with S <= T' are visited and off-diagonal ones count twice: T^2 (out + in)
multiply-adds per example instead of 2 T^2 (out + in).

Sums of contributions (tied weights: the token embedding and the LM head) have
``G_b = sum_k L_k^T R_k`` and ``||G_b||^2 = sum_{k,l} C_kl`` with the cross terms
``C_kl = sum_{s,t} (L_k[s] . L_l[t]) (R_k[s] . R_l[t])``; the same kernel computes a
cross term (``SYMMETRIC`` off). An embedding's left factor is one-hot, kept as row
indices: its Gram tile is ``[rows_s == rows_t]`` (``LEFT`` 1), and against a dense
factor ``L_l`` it is the gather ``L_l[t, rows_s]`` (``LEFT`` 2); the one-hot matrix is
never formed.

``ghost_sq_norms_reference`` is the plain-torch float64 reference: it materialises G_b.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import triton
import triton.language as tl

from dpfa.errors import ShapeError
from dpfa.kernels import factors
from dpfa.kernels.factors import dot, operand
from dpfa.kernels.noise import interpreted

#: tile of token rows of one program on a GPU (two BLOCK_T^2 float32 Gram tiles in registers)
GPU_BLOCK_T = 64
GPU_BLOCK_K = 64
GPU_WARPS = 4
GPU_STAGES = 3

Term = Tuple[torch.Tensor, torch.Tensor]


@triton.jit
def _gram_tile(a_ptr, b_ptr, stride_at, stride_ak, stride_bt, stride_bk, offs_s, offs_t, Ta, Tb, K,
               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr, UPCAST: tl.constexpr,
               IEEE: tl.constexpr):
    """A[S] B[T']^T for row tiles S (``offs_s`` < Ta) and T' (``offs_t`` < Tb), over K features."""
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    row_a = offs_s[:, None] < Ta
    row_b = offs_t[:, None] < Tb
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        in_k = kk[None, :] < K
        a = tl.load(a_ptr + offs_s[:, None] * stride_at + kk[None, :] * stride_ak, mask=row_a & in_k, other=0.0)
        b = tl.load(b_ptr + offs_t[:, None] * stride_bt + kk[None, :] * stride_bk, mask=row_b & in_k, other=0.0)
        acc = dot(operand(a, COMPUTE, UPCAST), tl.trans(operand(b, COMPUTE, UPCAST)), acc, IEEE)
    return acc


@triton.jit
def _ghost_norm_kernel(la_ptr, ra_ptr, lb_ptr, rb_ptr, pairs_ptr, part_ptr, Ta, Tb, O, I, n_pairs,
                       s_la_b, s_la_t, s_la_o, s_ra_b, s_ra_t, s_ra_i,
                       s_lb_b, s_lb_t, s_lb_o, s_rb_b, s_rb_t, s_rb_i,
                       LEFT: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """part[b, p] = sum over tile pair p = (S, T') of (L_a[S] . L_b[T']) (R_a[S] . R_b[T']) for example b.

    ``LEFT``: 0 both left factors dense; 1 both one-hot (row indices); 2 ``la`` one-hot,
    ``lb`` dense. ``SYMMETRIC``: a and b are the same term and only S <= T' is visited, so
    off-diagonal pairs count twice.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    si = tl.load(pairs_ptr + 2 * pid_p)
    ti = tl.load(pairs_ptr + 2 * pid_p + 1)
    offs_s = si * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_t = ti * BLOCK_T + tl.arange(0, BLOCK_T)
    in_s = offs_s < Ta
    in_t = offs_t < Tb
    g_r = _gram_tile(ra_ptr + pid_b * s_ra_b, rb_ptr + pid_b * s_rb_b, s_ra_t, s_ra_i, s_rb_t, s_rb_i,
                     offs_s, offs_t, Ta, Tb, I, BLOCK_T, BLOCK_K, COMPUTE, UPCAST, IEEE)
    if LEFT == 0:
        g_l = _gram_tile(la_ptr + pid_b * s_la_b, lb_ptr + pid_b * s_lb_b, s_la_t, s_la_o, s_lb_t, s_lb_o,
                         offs_s, offs_t, Ta, Tb, O, BLOCK_T, BLOCK_K, COMPUTE, UPCAST, IEEE)
    elif LEFT == 1:  # one-hot Gram: [rows_s == rows_t]; padding rows never match (-1 vs -2)
        rows_s = tl.load(la_ptr + pid_b * s_la_b + offs_s * s_la_t, mask=in_s, other=-1)
        rows_t = tl.load(lb_ptr + pid_b * s_lb_b + offs_t * s_lb_t, mask=in_t, other=-2)
        g_l = (rows_s[:, None] == rows_t[None, :]).to(tl.float32)
    else:  # onehot(rows_s) . L_b[t] = L_b[t, rows_s]: a gather, no multiplication
        rows_s = tl.load(la_ptr + pid_b * s_la_b + offs_s * s_la_t, mask=in_s, other=0)
        ptrs = lb_ptr + pid_b * s_lb_b + offs_t[None, :] * s_lb_t + rows_s[:, None] * s_lb_o
        g_l = operand(tl.load(ptrs, mask=in_s[:, None] & in_t[None, :], other=0.0), COMPUTE, UPCAST).to(tl.float32)
    total = tl.sum(tl.sum(g_l * g_r, axis=1), axis=0)
    if SYMMETRIC:
        total = total * (1.0 + (si != ti).to(tl.float32))
    tl.store(part_ptr + pid_b * n_pairs + pid_p, total)


_PAIRS: Dict[tuple, torch.Tensor] = {}


def _pairs(n_a: int, n_b: int, symmetric: bool, device: torch.device) -> torch.Tensor:
    """int32 (S, T') tile index pairs, flattened; S <= T' when symmetric. Cached per shape."""
    key = (n_a, n_b, symmetric, str(device))
    if key not in _PAIRS:
        pairs = [(s, t) for s in range(n_a) for t in range(n_b) if not symmetric or s <= t]
        _PAIRS[key] = torch.tensor(pairs, dtype=torch.int32, device=device).reshape(-1)
    return _PAIRS[key]


def _is_one_hot(left: torch.Tensor) -> bool:
    return not left.is_floating_point()


def _check_term(left: torch.Tensor, right: torch.Tensor) -> None:
    if right.dim() != 3 or not right.is_floating_point():
        raise ShapeError(f"Expected a floating right factor of shape (B, T, in), got {tuple(right.shape)} "
                         f"{right.dtype}.")
    want = 2 if _is_one_hot(left) else 3
    if left.dim() != want or tuple(left.shape[:2]) != tuple(right.shape[:2]):
        raise ShapeError(f"Expected a left factor of shape (B, T{', out' if want == 3 else ''}) = "
                         f"({right.shape[0]}, {right.shape[1]}{', out' if want == 3 else ''}) matching the right "
                         f"factor {tuple(right.shape)}, got {tuple(left.shape)}.")


def _cross(a: Term, b: Term, symmetric: bool, compute: torch.dtype, block_t: int, block_k: int) -> torch.Tensor:
    """Per-example cross term C_ab (float32, (B,)); C_aa with ``symmetric``."""
    (la, ra), (lb, rb) = a, b
    if not _is_one_hot(la) and _is_one_hot(lb):  # C_ab = C_ba: the one-hot factor goes first
        (la, ra), (lb, rb) = (lb, rb), (la, ra)
    left = 1 if _is_one_hot(la) and _is_one_hot(lb) else 2 if _is_one_hot(la) else 0
    B, Ta, I = ra.shape
    Tb = rb.shape[1]
    O = 0 if left else la.shape[2]
    if left == 0 and lb.shape[2] != O or rb.shape[2] != I:
        raise ShapeError(f"Tied terms must have the same parameter shape, got {tuple(la.shape)}/{tuple(ra.shape)} "
                         f"and {tuple(lb.shape)}/{tuple(rb.shape)}.")
    n_a, n_b = triton.cdiv(Ta, block_t), triton.cdiv(Tb, block_t)
    pairs = _pairs(n_a, n_b, symmetric, ra.device)
    n_pairs = pairs.numel() // 2
    part = torch.empty((B, n_pairs), device=ra.device, dtype=torch.float32)

    def strides(t):
        return tuple(t.stride()) + ((0,) if t.dim() == 2 else ())

    opts = {} if interpreted() else dict(num_warps=GPU_WARPS, num_stages=GPU_STAGES)
    _ghost_norm_kernel[(B, n_pairs)](
        la, ra, lb, rb, pairs, part, Ta, Tb, O, I, n_pairs,
        *strides(la), *ra.stride(), *strides(lb), *rb.stride(),
        LEFT=left, SYMMETRIC=symmetric, BLOCK_T=block_t, BLOCK_K=block_k, **factors.meta(compute), **opts)
    return part.sum(1)


def ghost_sq_norms(terms: Sequence[Term], *, block_t: int | None = None, block_k: int | None = None
                   ) -> torch.Tensor:
    """Per-example ``||sum_k L_k^T R_k||_F^2`` (float32, shape (B,)) by the ghost-norm kernel.

    ``terms`` is a list of (left, right): ``right`` (B, T_k, in) floating; ``left`` (B, T_k,
    out) floating, or (B, T_k) integer row indices of a one-hot left factor (an embedding;
    against a dense tied term its rows index that term's ``out``). Several terms are the uses
    of one tied parameter. Factors are float16, bfloat16 or float32, multiplied in
    :func:`dpfa.kernels.factors.compute_dtype` with float32 accumulation. Tensors live on
    CUDA, or on CPU under ``TRITON_INTERPRET=1``. ``block_t``/``block_k`` override the tiles
    (tests use small ones to exercise ragged edges).
    """
    if not terms:
        raise ShapeError("ghost_sq_norms() needs at least one (left, right) term.")
    for left, right in terms:
        _check_term(left, right)
    B = terms[0][1].shape[0]
    if any(r.shape[0] != B for _, r in terms):
        raise ShapeError(f"All terms need batch size {B}, got {[tuple(r.shape) for _, r in terms]}.")
    factors.check_device(*[t for term in terms for t in term])
    if B == 0:
        return torch.zeros(B, device=terms[0][1].device, dtype=torch.float32)
    compute = factors.compute_dtype(t for term in terms for t in term)
    T_max = max(r.shape[1] for _, r in terms)
    K_max = max([r.shape[2] for _, r in terms] + [l.shape[2] for l, _ in terms if not _is_one_hot(l)])
    interp = interpreted()
    bt = block_t or (factors.block(T_max, 16, 128) if interp else GPU_BLOCK_T)
    bk = block_k or (factors.block(K_max, 16, 256) if interp else GPU_BLOCK_K)
    device = terms[0][1].device
    terms = [(l, r) for l, r in terms if r.shape[1] > 0]
    out = None
    for i, a in enumerate(terms):
        part = _cross(a, a, True, compute, bt, bk)
        out = part if out is None else out + part
        for b in terms[i + 1:]:
            out = out + 2.0 * _cross(a, b, False, compute, bt, bk)
    return torch.zeros(B, device=device, dtype=torch.float32) if out is None else out


def ghost_sq_norms_reference(terms: Sequence[Term]) -> torch.Tensor:
    """Float64 reference: materialise G_b = sum_k L_k^T R_k per example and sum its squares."""
    dense_out = [l.shape[2] for l, _ in terms if l.is_floating_point()]
    n_rows = max(dense_out + [int(l.max()) + 1 for l, _ in terms if not l.is_floating_point() and l.numel()] + [1])
    total = None
    for left, right in terms:
        if not left.is_floating_point():
            left = torch.nn.functional.one_hot(left.long(), n_rows)
        g = torch.einsum("bto,bti->boi", left.double(), right.double())
        total = g if total is None else total + g
    return total.pow(2).sum((1, 2))


__all__ = ["ghost_sq_norms", "ghost_sq_norms_reference"]
