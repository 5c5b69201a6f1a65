"""Book-keeping clipped sum: ``sum_b c_b L_b^T R_b = L^T diag(c) R`` in one matmul kernel.

Once the clip factors ``c_b = min(1, C / (||G_b|| + 1e-6))`` are known, the clipped weight
gradient of a layer is one contraction over the B*T token rows of the whole batch (Bu et
al. 2023, "Differentially private optimization on large model at small cost":
book-keeping; the non-private weight gradient ``L^T R`` is the special case c = 1):

    grad[o, i] = sum_b c_b sum_t L[b, t, o] R[b, t, i].

Kernel ``_clipped_sum_kernel``: a tiled matmul over the token rows, visited example by
example in ``BLOCK_K``-row chunks that never straddle two examples. Each program owns a
``BLOCK_O x BLOCK_I`` tile of the gradient (float32 accumulator in registers) and a range of
examples (split-K, so that a 768 x 768 layer still fills the GPU). The clip factor is never
multiplied into an operand: the operands are only rounded to the compute dtype, exactly as
the norm kernels round them, and the factor scales the float32 accumulator. As in flash
attention's online softmax, the accumulator holds ``sum_{b' < b} c_b' M_b' / c_b`` while
example b's products ``M_b = L_b^T R_b`` are added, and is rescaled by ``c_{b-1} / c_b`` at
each example's first chunk and by the last ``c`` at the end. So each example contributes
``c_b`` times the float32 product whose norm the norm kernels measured: the clipped norm is
at most C up to float32 accumulation error. (Scaling an operand by c_b before rounding it to
bf16 instead would perturb the clipped gradient by up to 2^-8 of ||L_b|| ||R_b||, which
can exceed C by several percent for long sequences.) An example with c_b = 0 is skipped.
Split partial sums go to a (splits, out, in) float32 buffer that torch sums
(deterministic, no atomics). ``clipped_sum_reference`` is plain torch in float64.
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

#: (BLOCK_O, BLOCK_I, BLOCK_K, warps, stages) tried once per shape on a GPU; the fastest is kept
GPU_CONFIGS = ((128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 128, 4, 3))
_CHOSEN: Dict[tuple, tuple] = {}
#: clip factors below this are treated as 0 (the example is left out, which only lowers its contribution)
TINY_FACTOR = 2.0**-100

_SMS: Dict[int, int] = {}


@triton.jit
def _add_rows(acc, l_base, r_base, t, t_end, offs_o, offs_i, in_o, in_i, s_l_t, s_l_o, s_r_t, s_r_i,
              COMPUTE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + L[t]^T R[t] for the rows ``t`` < ``t_end`` of one example (operands rounded, not scaled)."""
    valid = t < t_end
    lt = tl.load(l_base + t[:, None] * s_l_t + offs_o[None, :] * s_l_o, mask=valid[:, None] & in_o, other=0.0)
    rt = tl.load(r_base + t[:, None] * s_r_t + offs_i[None, :] * s_r_i, mask=valid[:, None] & in_i, other=0.0)
    return dot(tl.trans(operand(lt, COMPUTE, UPCAST)), operand(rt, COMPUTE, UPCAST), acc, IEEE)


@triton.jit
def _clipped_sum_kernel(l_ptr, r_ptr, c_ptr, out_ptr, T, O, I, n_tiles_i, examples_per_split, B,
                        s_l_b, s_l_t, s_l_o, s_r_b, s_r_t, s_r_i, s_out_split,
                        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
                        ONE_CHUNK: tl.constexpr, TINY: tl.constexpr, COMPUTE: tl.constexpr, UPCAST: tl.constexpr,
                        IEEE: tl.constexpr):
    """out[split, o, i] = sum over the examples b of this split of c[b] sum_t L[b, t, o] R[b, t, i].

    ``ONE_CHUNK`` (T <= BLOCK_K): no inner loop, so that the loads of the next examples are prefetched."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    offs_o = (tile // n_tiles_i) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = (tile % n_tiles_i) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_o = offs_o[None, :] < O
    in_i = offs_i[None, :] < I
    b0 = split * examples_per_split
    b1 = tl.minimum(b0 + examples_per_split, B)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    c_prev = tl.full((), 1.0, tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for b in range(b0, b1):
        c = tl.load(c_ptr + b)
        live = c >= TINY  # a smaller c counts as 0 (the accumulator is divided by c)
        c_safe = tl.where(live, c, 1.0)
        # acc <- acc c_prev / c: it now holds sum_{b' < b} c_b' M_b' / c_b (a skipped example changes nothing)
        acc = acc * tl.where(live, c_prev / c_safe, 1.0)
        c_prev = tl.where(live, c_safe, c_prev)
        t_end = tl.where(live, T, 0)  # a skipped example loads nothing
        b64 = b0.to(tl.int64) + (b - b0)  # int64 offsets (b is a plain int under the interpreter)
        l_base = l_ptr + b64 * s_l_b
        r_base = r_ptr + b64 * s_r_b
        if ONE_CHUNK:
            acc = _add_rows(acc, l_base, r_base, offs_k, t_end, offs_o, offs_i, in_o, in_i, s_l_t, s_l_o, s_r_t,
                            s_r_i, COMPUTE, UPCAST, IEEE)
        else:
            for t0 in range(0, T, BLOCK_K):  # example b's rows: an unscaled chain of products (pipelined)
                acc = _add_rows(acc, l_base, r_base, t0 + offs_k, t_end, offs_o, offs_i, in_o, in_i, s_l_t, s_l_o,
                                s_r_t, s_r_i, COMPUTE, UPCAST, IEEE)
    acc = acc * c_prev
    out = out_ptr + split * s_out_split + offs_o[:, None] * I + offs_i[None, :]
    tl.store(out, acc, mask=(offs_o[:, None] < O) & in_i)


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _splits(device: torch.device, tiles: int, B: int, O: int, I: int) -> int:
    """Split-K over examples: enough programs for the SMs, at most B splits and a bounded buffer."""
    if device.type != "cuda":
        return 1
    want = max(1, PROGRAMS_PER_SM * _sm_count(device) // tiles)
    cap = max(1, SPLIT_BUFFER_BYTES // max(1, 4 * O * I))
    return max(1, min(want, cap, B))


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
    # c < 2^-100 (a norm beyond 2^100 C) counts as 0 in the kernel: the accumulator is divided by c
    c = factors_b.to(device=right.device, dtype=torch.float32).contiguous()
    meta = factors.meta(compute)
    if interp:
        config = (block_o or factors.block(O, 16, 128), block_i or factors.block(I, 16, 128),
                  block_k or factors.block(T, 16, 256), None, None)
    elif block_o or block_i or block_k:
        config = (block_o or GPU_BLOCK_O, block_i or GPU_BLOCK_I, block_k or GPU_BLOCK_K, GPU_WARPS, GPU_STAGES)
    else:
        bucket = 1 << max(0, (B - 1).bit_length())  # Poisson batch sizes up to a power of two share a choice
        key = (bucket, T, O, I, left.dtype, right.dtype, tuple(left.stride()), tuple(right.stride()),
               str(right.device))
        if key not in _CHOSEN:
            _CHOSEN[key] = min(GPU_CONFIGS, key=lambda cfg: _time_config(left, right, c, meta, cfg, splits))
        config = _CHOSEN[key]
    return _launch(left, right, c, meta, config, splits)


def _launch(left, right, c, meta, config, splits):
    B, T, O = left.shape
    I = right.shape[2]
    bo, bi, bk, warps, stages = config
    n_i = triton.cdiv(I, bi)
    tiles = triton.cdiv(O, bo) * n_i
    n_split = splits or _splits(right.device, tiles, B, O, I)
    per_split = triton.cdiv(B, min(n_split, B))
    n_split = triton.cdiv(B, per_split)
    out = torch.empty((n_split, O, I), device=right.device, dtype=torch.float32)
    opts = {} if warps is None else dict(num_warps=warps, num_stages=stages)
    _clipped_sum_kernel[(tiles, n_split)](left, right, c, out, T, O, I, n_i, per_split, B,
                                          *left.stride(), *right.stride(), O * I,
                                          BLOCK_O=bo, BLOCK_I=bi, BLOCK_K=bk, ONE_CHUNK=T <= bk, TINY=TINY_FACTOR,
                                          **meta, **opts)
    return out[0] if n_split == 1 else out.sum(0)


def _time_config(left, right, c, meta, config, splits, reps: int = 3) -> float:
    """Milliseconds a launch with ``config`` takes (after one compiling launch); inf if it fails to compile."""
    try:
        _launch(left, right, c, meta, config, splits)
    except Exception:  # noqa: BLE001 - a config that does not fit this GPU (shared memory) is skipped
        return float("inf")
    return gpu_time_ms(lambda: _launch(left, right, c, meta, config, splits), reps)


def gpu_time_ms(fn, reps: int = 3) -> float:
    """GPU milliseconds per call of ``fn`` (already compiled): the calls are queued behind a ~1 ms GPU
    sleep, so that the host's launch cost (comparable to a small kernel's run) is not timed."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(2_000_000)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def clipped_sum_reference(left: torch.Tensor, right: torch.Tensor, factors_b: torch.Tensor) -> torch.Tensor:
    """Float64 reference: sum_b c_b L_b^T R_b."""
    return torch.einsum("b,bto,bti->oi", factors_b.double(), left.double(), right.double())


__all__ = ["clipped_sum", "clipped_sum_reference"]
