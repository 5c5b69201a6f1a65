"""``flash_attn_func``: flash attention with autograd, a drop-in for flash-attn's function.

Dispatch (DESIGN.md 4): CUDA tensors run the Triton kernels (autotuned for Hopper,
cached per shape bucket); CPU tensors run the same kernels under the Triton
interpreter when ``TRITON_INTERPRET=1`` was set before dpfa was imported (that is how
the tests check them), and otherwise the plain-torch reference of
:mod:`dpfa.kernels.flash_attention_reference`.

:func:`flash_attn_with_hooks` is the full entry point, with the hooks that the DP release
builds on (score cap, value-row clipping, epilogue noise); :func:`flash_attn_func`
keeps flash-attn's signature.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import numbers
import os
from typing import Callable

import torch
import triton

from dpfa.errors import DPFAError, ShapeError
from dpfa.kernels.flash_attention_bwd import flash_bwd_dkdv_kernel, flash_bwd_dq_kernel
from dpfa.kernels.flash_attention_fwd import clip_rows_kernel, flash_fwd_kernel
from dpfa.mechanisms.device_samplers import pair_form
from dpfa.kernels.flash_attention_reference import (SCORE_CAP_MODES, VALUE_CLIP_NORMS, attention_reference,
                                                    clip_value_rows)

__all__ = ["flash_attn_func", "flash_attn_with_hooks", "EpilogueNoise", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
_LN2 = math.log(2.0)
_CAP_CODES = {None: 0, "clamp": 1, "tanh": 2}
_CLIP_CODES = {None: 0, "l2": 1, "l1": 2}


# --------------------------------------------------------------------------- hooks


@dataclasses.dataclass(frozen=True)
class EpilogueNoise:
    """Noise that the forward epilogue adds to the output: ``O[b, i, h, :] += sigma[b, h, i] * z``.

    ``z`` comes from ``sampler`` (a ``@triton.jit`` function ``f(seed, offsets, scale)``,
    see :mod:`dpfa.mechanisms.device_samplers`; the offset of element (b, i, h, d) is its
    index in a contiguous (B, Nq, H, D) tensor, so the same seed gives the same noise)
    or, for a mechanism without a device sampler, from ``tensor`` (unit-scale noise of
    the output's shape, read by the epilogue). ``sigma`` is a float32 tensor
    broadcastable to (batch, heads, seqlen_q). The noise is an additive constant for
    autograd: gradients are those of the noiseless output.

    ``quantize=True`` (integer mechanisms, the discrete Gaussian): ``sigma`` is then each
    row's grid step g, and the epilogue releases ``g * (round(O / g) + z)`` with ``z``
    integer noise of scale ``scale`` (in grid units) from ``sampler``, or read from
    ``tensor`` (integer-valued).
    """

    sigma: torch.Tensor
    sampler: Callable | None = None
    seed: int = 0
    tensor: torch.Tensor | None = None
    quantize: bool = False
    scale: float = 0.0


# ------------------------------------------------------------------ configuration


def _interpreting() -> bool:
    """True when the kernels were defined under ``TRITON_INTERPRET=1``."""
    return type(flash_fwd_kernel).__name__ == "InterpretedFunction" or not hasattr(flash_fwd_kernel, "run")


_REFERENCE_ONLY = contextvars.ContextVar("dpfa_reference_only", default=False)


def runs_kernels(t: torch.Tensor) -> bool:
    """Whether a call on ``t`` runs the Triton kernels (CUDA, or the interpreter on a CPU)
    rather than the plain-torch reference."""
    return t.is_cuda or (_interpreting() and not _REFERENCE_ONLY.get())


@contextlib.contextmanager
def reference_path():
    """Within this block, CPU calls run the plain-torch reference even under
    ``TRITON_INTERPRET=1`` (the interpreter costs ~15 ms a program: audits that need
    10^5 releases on a CPU use the reference). CUDA calls are unaffected."""
    token = _REFERENCE_ONLY.set(True)
    try:
        yield
    finally:
        _REFERENCE_ONLY.reset(token)


def _autotune_enabled() -> bool:
    return os.environ.get("DPFA_FLASH_AUTOTUNE", "1") != "0"


def _cfg(bm, bn, w, s):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


# Hopper (H100/H200) candidates; the autotuner times them once per key and caches the winner.
_FWD_CONFIGS = [
    _cfg(128, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(128, 128, 8, 2),
    _cfg(128, 32, 4, 4), _cfg(64, 64, 4, 3), _cfg(64, 128, 4, 3),
]
_DKDV_CONFIGS = [  # BLOCK_N keys per program, BLOCK_M queries per step
    _cfg(32, 128, 4, 3), _cfg(64, 128, 8, 3), _cfg(64, 128, 8, 2), _cfg(64, 64, 4, 3), _cfg(32, 64, 4, 3),
]
_DQ_CONFIGS = [  # BLOCK_M queries per program, BLOCK_N keys per step
    _cfg(128, 32, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 3),
]
# head dims above 128 (padded to 256): tiles small enough for registers and shared memory
_BIG_D_CONFIGS = {
    "fwd": [_cfg(64, 32, 4, 2), _cfg(64, 64, 8, 2), _cfg(128, 32, 8, 2)],
    "dkdv": [_cfg(32, 32, 4, 2), _cfg(32, 64, 8, 2), _cfg(16, 64, 4, 2)],
    "dq": [_cfg(32, 32, 4, 2), _cfg(64, 32, 8, 2), _cfg(64, 16, 4, 2)],
}
# one fixed config: tests on a GPU (DPFA_FLASH_AUTOTUNE=0) and, smaller, the interpreter
_GPU_FIXED = {"fwd": (64, 64, 4, 2), "dkdv": (32, 64, 4, 2), "dq": (64, 32, 4, 2)}
_GPU_FIXED_BIG_D = {"fwd": (64, 32, 4, 2), "dkdv": (32, 32, 4, 2), "dq": (32, 32, 4, 2)}
_INTERPRET_FIXED = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
_TUNE_KEY = ["tune_q", "tune_k", "HEAD_DIM", "CAUSAL", "HAS_KPM", "SCORE_CAP", "VALUE_CLIP", "NOISE", "QUANTIZE"]


def _pruner(which: str):
    def prune(configs, named_args, **kwargs):
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 0))
        return _BIG_D_CONFIGS[which] if block_d > 128 else configs
    return {"early_config_prune": prune}


_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_pruner("fwd"))(flash_fwd_kernel)
_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_TUNE_KEY[:6], prune_configs_by=_pruner("dkdv"))(flash_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_TUNE_KEY[:6], prune_configs_by=_pruner("dq"))(flash_bwd_dq_kernel)


#: (pass, tuning key, dtype) -> the config the autotuner chose: later calls launch the kernel
#: directly (triton.autotune's own dispatch costs ~0.1 ms of CPU a call, more than a small
#: attention takes on the GPU)
_TUNED: dict = {}


def _launch(kernel, tuned, which: str, grid_of, args: dict, tune_q: int, tune_k: int):
    """Launch with the autotuner's choice on a GPU (tuned once per key), or with one fixed config."""
    if _interpreting() or not _autotune_enabled():
        fixed = _INTERPRET_FIXED if _interpreting() else (_GPU_FIXED_BIG_D if args["BLOCK_D"] > 128 else _GPU_FIXED)
        bm, bn, w, s = fixed[which]
    else:
        key = (which, tune_q, tune_k, args["Q"].dtype, args["Q"].device.index,
               *(args[name] for name in _TUNE_KEY[2:] if name in args))
        choice = _TUNED.get(key)
        if choice is None:
            tuned[lambda meta: grid_of(meta)](**args, tune_q=tune_q, tune_k=tune_k)
            best = tuned.best_config
            _TUNED[key] = (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages)
            return
        bm, bn, w, s = choice
    meta = {"BLOCK_M": bm, "BLOCK_N": bn}
    kernel[grid_of(meta)](**args, **meta, tune_q=tune_q, tune_k=tune_k, num_warps=w, num_stages=s)


def _bucket(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


# ----------------------------------------------------------------------- validation


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _validate(q, k, v, key_padding_mask, softmax_scale, score_cap, score_cap_mode, value_clip, noise,
              value_clip_norm="l2"):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ShapeError(f"Expected {name} to be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ShapeError(
                f"Expected {name} of rank 4 (batch, seqlen, heads, head_dim), got {name}.shape={_shape(t)}.")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ShapeError(f"Unsupported dtype {name}.dtype={t.dtype}; expected one of "
                             "torch.float16, torch.bfloat16, torch.float32.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ShapeError(f"Expected q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        raise ShapeError(f"Expected q, k, v on one device, got {q.device}, {k.device}, {v.device}.")
    B, Nq, H, D = q.shape
    if k.shape != v.shape:
        raise ShapeError(f"Expected k and v of one shape, got k.shape={_shape(k)} and v.shape={_shape(v)}.")
    Bk, Nk, Hk, Dk = k.shape
    if Bk != B:
        raise ShapeError(f"Batch sizes differ: q.shape[0]={B}, k.shape[0]={Bk} "
                         "(layout is (batch, seqlen, heads, head_dim)).")
    if Dk != D:
        raise ShapeError(f"Head dims differ: q.shape[3]={D}, k.shape[3]={Dk} "
                         "(layout is (batch, seqlen, heads, head_dim)).")
    for name, n in (("seqlen_q (q.shape[1])", Nq), ("seqlen_k (k.shape[1])", Nk),
                    ("heads (q.shape[2])", H), ("heads_k (k.shape[2])", Hk)):
        if n < 1:
            raise ShapeError(f"Expected {name} >= 1, got {n}.")
    if H % Hk != 0:
        raise ShapeError(f"heads of q must be a multiple of heads of k/v: q.shape[2]={H}, k.shape[2]={Hk} "
                         "(layout is (batch, seqlen, heads, head_dim); did you pass (batch, heads, seqlen, head_dim)?).")
    if not (16 <= D <= MAX_HEAD_DIM and D % 8 == 0):
        raise ShapeError(f"Unsupported head_dim={D}; expected a multiple of 8 in [16, {MAX_HEAD_DIM}] "
                         "(e.g. 32, 64, 80, 96, 128, 256).")
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, torch.Tensor):
            raise ShapeError(f"Expected key_padding_mask to be a torch.Tensor, got {type(m).__name__}.")
        if m.dtype != torch.bool:
            raise ShapeError(f"Expected key_padding_mask of dtype torch.bool (True = attend), got {m.dtype}.")
        if tuple(m.shape) != (B, Nk):
            raise ShapeError(f"Expected key_padding_mask of shape (batch, seqlen_k) = ({B}, {Nk}), "
                             f"got {_shape(m)}.")
        if m.device != q.device:
            raise ShapeError(f"Expected key_padding_mask on {q.device}, got {m.device}.")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) \
                or not (0.0 < softmax_scale < math.inf):
            raise ShapeError(f"Expected softmax_scale={softmax_scale!r} in (0, inf) or None.")
    for name, val in (("score_cap", score_cap), ("value_clip", value_clip)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, numbers.Real)
                                or not (0.0 < val < math.inf)):
            raise ShapeError(f"Expected {name}={val!r} in (0, inf) or None.")
    if score_cap_mode not in SCORE_CAP_MODES:
        raise ShapeError(f"Unknown score_cap_mode={score_cap_mode!r}; expected one of {SCORE_CAP_MODES}.")
    if value_clip_norm not in VALUE_CLIP_NORMS:
        raise ShapeError(f"Unknown value_clip_norm={value_clip_norm!r}; expected one of {VALUE_CLIP_NORMS}.")
    if noise is not None:
        if not isinstance(noise, EpilogueNoise):
            raise ShapeError(f"Expected noise to be an EpilogueNoise, got {type(noise).__name__}.")
        if (noise.sampler is None) == (noise.tensor is None):
            raise ShapeError("EpilogueNoise needs exactly one of sampler= (a @triton.jit f(seed, offsets, scale)) "
                             "and tensor= (unit noise of the output's shape).")
        try:
            torch.broadcast_shapes(tuple(noise.sigma.shape), (B, H, Nq))
        except (RuntimeError, AttributeError):
            raise ShapeError(f"Expected noise.sigma broadcastable to (batch, heads, seqlen_q) = ({B}, {H}, {Nq}), "
                             f"got {getattr(noise.sigma, 'shape', noise.sigma)!r}.") from None
        if noise.tensor is not None and tuple(noise.tensor.shape) != tuple(q.shape):
            raise ShapeError(f"Expected noise.tensor of the output's shape {_shape(q)}, got {_shape(noise.tensor)}.")
        if noise.quantize and not (0.0 <= float(noise.scale) < math.inf):
            raise ShapeError(f"Expected noise.scale={noise.scale!r} in [0, inf) (grid units) with quantize=True.")


# -------------------------------------------------------------------------- launchers


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _common(q, k):
    B, Nq, H, D = q.shape
    Nk, Hk = k.shape[1], k.shape[2]
    interp = _interpreting()
    return dict(
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        DOT_F32=bool(interp and q.dtype == torch.bfloat16),
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    ), (B, Nq, H, D, Nk, Hk)


#: the forward clips V in one pass before the attention kernel (False: in every program, per tile)
PRECLIP_VALUES = True
#: the capped softmax uses the cap as a fixed shift (no running max) when e^{-2 cap} stays normal in fp32
FIXED_MAX_CAP_LIMIT = 20.0


def _clip_values(v, v_clip, v_norm):
    """V with each row scaled to norm <= v_clip, by ``clip_rows_kernel`` (the in-kernel hook's arithmetic)."""
    v = v.contiguous()
    vc = torch.empty_like(v)
    rows, D = v.numel() // v.shape[-1], v.shape[-1]
    block_r = 256 if _interpreting() else 32
    clip_rows_kernel[(triton.cdiv(rows, block_r),)](v, vc, rows, float(v_clip), HEAD_DIM=D,
                                                    BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_R=block_r,
                                                    VALUE_CLIP=_CLIP_CODES[v_norm])
    return vc


def _forward(q, k, v, kpm, sm_scale, causal, cap, cap_mode, v_clip, v_norm, noise, store_clean):
    """Launch the forward kernel; returns (o, lse in base 2 with +inf for empty rows, o_clean)."""
    consts, (B, Nq, H, D, Nk, Hk) = _common(q, k)
    if v_clip is not None and PRECLIP_VALUES:
        v, v_clip = _clip_values(v, v_clip, v_norm), None
    pair = pair_form(noise.sampler) if noise is not None and noise.sampler is not None and not noise.quantize else None
    o = torch.empty_like(q)
    lse2 = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    noise_code, o_clean, sigma, z = 0, o, lse2, o
    sig_strides = (0, 0, 0)
    if noise is not None:
        noise_code = 1 if noise.sampler is not None else 2
        sigma = noise.sigma.to(device=q.device, dtype=torch.float32)
        sigma = sigma.reshape((1,) * (3 - sigma.dim()) + tuple(sigma.shape)).expand(B, H, Nq)
        sig_strides = sigma.stride()
        if noise.tensor is not None:
            z = noise.tensor.to(device=q.device).contiguous()
        if store_clean:
            o_clean = torch.empty_like(q)
    kpm_t = kpm if kpm is not None else q
    args = dict(
        Q=q, K=k, V=v, O=o, O_CLEAN=o_clean, LSE=lse2, KPM=kpm_t, SIGMA=sigma, Z=z,
        stride_qb=q.stride(0), stride_qn=q.stride(1), stride_qh=q.stride(2),
        stride_kb=k.stride(0), stride_kn=k.stride(1), stride_kh=k.stride(2),
        stride_vb=v.stride(0), stride_vn=v.stride(1), stride_vh=v.stride(2),
        stride_ob=o.stride(0), stride_on=o.stride(1), stride_oh=o.stride(2),
        stride_kpmb=kpm.stride(0) if kpm is not None else 0,
        stride_sb=sig_strides[0], stride_sh=sig_strides[1], stride_sm=sig_strides[2],
        heads=H, seq_q=Nq, seq_k=Nk, shift=Nk - Nq, group=H // Hk,
        sm_scale=sm_scale, cap=float(cap or 1.0), v_clip=float(v_clip or 1.0),
        seed=int(noise.seed) if noise is not None else 0,
        noise_scale=float(noise.scale) if noise is not None else 0.0,
        CAUSAL=bool(causal), HAS_KPM=kpm is not None,
        SCORE_CAP=_CAP_CODES[cap_mode if cap is not None else None], VALUE_CLIP=_CLIP_CODES[v_norm if v_clip is not None else None],
        NOISE=noise_code, NOISE_FN=pair or (noise.sampler if noise is not None else None),
        STORE_CLEAN=bool(noise is not None and store_clean),
        QUANTIZE=bool(noise is not None and noise.quantize), **consts,
        FIXED_MAX=cap is not None and float(cap) <= FIXED_MAX_CAP_LIMIT,
        NOISE_PAIR=pair is not None, NOISE_LARGE=q.numel() >= 2**31 - 2 * D,
    )
    _launch(flash_fwd_kernel, _fwd_tuned, "fwd", lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H),
            args, _bucket(Nq), _bucket(Nk))
    return o, lse2, (o_clean if noise is not None and store_clean else o)


def _backward(do, q, k, v_used, o, lse2, kpm, sm_scale, causal, cap, cap_mode):
    """Launch the two backward kernels; returns (dq, dk, dv w.r.t. the V the forward used)."""
    consts, (B, Nq, H, D, Nk, Hk) = _common(q, k)
    delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()  # (B, H, Nq)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v_used)
    kpm_t = kpm if kpm is not None else q
    shared = dict(
        Q=q, K=k, V=v_used, DO=do, LSE=lse2, DELTA=delta, KPM=kpm_t,
        stride_qb=q.stride(0), stride_qn=q.stride(1), stride_qh=q.stride(2),
        stride_kb=k.stride(0), stride_kn=k.stride(1), stride_kh=k.stride(2),
        stride_vb=v_used.stride(0), stride_vn=v_used.stride(1), stride_vh=v_used.stride(2),
        stride_dob=do.stride(0), stride_don=do.stride(1), stride_doh=do.stride(2),
        stride_kpmb=kpm.stride(0) if kpm is not None else 0,
        seq_q=Nq, seq_k=Nk, shift=Nk - Nq, group=H // Hk, heads=H,
        sm_scale=sm_scale, cap=float(cap or 1.0),
        CAUSAL=bool(causal), HAS_KPM=kpm is not None,
        SCORE_CAP=_CAP_CODES[cap_mode if cap is not None else None], **consts,
    )
    _launch(flash_bwd_dkdv_kernel, _dkdv_tuned, "dkdv",
            lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B * Hk),
            dict(shared, DK=dk, DV=dv, heads_k=Hk,
                 stride_dkb=dk.stride(0), stride_dkn=dk.stride(1), stride_dkh=dk.stride(2),
                 stride_dvb=dv.stride(0), stride_dvn=dv.stride(1), stride_dvh=dv.stride(2)),
            _bucket(Nq), _bucket(Nk))
    _launch(flash_bwd_dq_kernel, _dq_tuned, "dq",
            lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H),
            dict(shared, DQ=dq, stride_dqb=dq.stride(0), stride_dqn=dq.stride(1), stride_dqh=dq.stride(2)),
            _bucket(Nq), _bucket(Nk))
    return dq, dk, dv


def _merge_vmap_dim(x, dim, size):
    """Fold a vmapped dimension into the batch dimension: (V, B, ...) -> (V * B, ...).

    Attention is already batched, so a vmap over examples (per-example gradients) is the
    same kernel on a larger batch. An input that is not vmapped (dim None) is broadcast.
    """
    if x is None:
        return None
    x = x.unsqueeze(0).expand(size, *x.shape) if dim is None else x.movedim(dim, 0)
    return x.reshape(size * x.shape[1], *x.shape[2:])


def _split_vmap_dim(x, size):
    return x.reshape(size, x.shape[0] // size, *x.shape[1:])


class _FlashAttnFunction(torch.autograd.Function):
    """Forward kernel with autograd; ``setup_context`` and ``vmap`` make it work under
    ``torch.func.grad``, ``vjp`` and ``vmap`` (per-example gradients through dpfa's attention)."""

    @staticmethod
    def forward(q, k, v, kpm_u8, sm_scale, causal, cap, cap_mode, v_clip, v_norm, noise, store_clean):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        o, lse2, o_clean = _forward(q, k, v, kpm_u8, sm_scale, causal, cap, cap_mode, v_clip, v_norm, noise,
                                    store_clean=store_clean)
        lse = torch.where(torch.isinf(lse2), torch.full_like(lse2, -math.inf), lse2 * _LN2)
        # the output before noise, which the backward needs (empty when there is no noise)
        clean = o_clean if (noise is not None and store_clean) else o.new_empty(0)
        return o, lse, clean, lse2

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, kpm_u8, sm_scale, causal, cap, cap_mode, v_clip, v_norm, noise, store_clean = inputs
        o, lse, clean, lse2 = output
        ctx.mark_non_differentiable(lse, clean, lse2)
        ctx.save_for_backward(q, k, v, o if clean.numel() == 0 else clean, lse2, kpm_u8)
        ctx.args = (sm_scale, causal, cap, cap_mode, v_clip, v_norm)

    @staticmethod
    def backward(ctx, do, _dlse, _dclean, _dlse2):
        q, k, v, o, lse2, kpm_u8 = ctx.saved_tensors
        dq, dk, dv = _FlashAttnBackward.apply(do, q, k, v, o, lse2, kpm_u8, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, q, k, v, kpm_u8, sm_scale, causal, cap, cap_mode, v_clip, v_norm, noise, store_clean):
        if noise is not None:
            raise ShapeError("Epilogue noise under torch.func.vmap is not supported: the noise offsets are those of "
                             "one (batch, seqlen, heads, head_dim) output. Call without vmap.")
        n = info.batch_size
        q, k, v, kpm_u8 = (_merge_vmap_dim(t, d, n) for t, d in zip((q, k, v, kpm_u8), in_dims[:4]))
        o, lse, clean, lse2 = _FlashAttnFunction.apply(q, k, v, kpm_u8, sm_scale, causal, cap, cap_mode, v_clip,
                                                       v_norm, None, store_clean)
        return (_split_vmap_dim(o, n), _split_vmap_dim(lse, n), clean, _split_vmap_dim(lse2, n)), (0, 0, None, 0)


class _FlashAttnBackward(torch.autograd.Function):
    """The two backward kernels (dK/dV, then dQ), as a function of its own so that the
    backward also runs under vmap (``vmap(grad(f))``). Not differentiable again."""

    @staticmethod
    def forward(do, q, k, v, o, lse2, kpm_u8, sm_scale, causal, cap, cap_mode, v_clip, v_norm):
        do = _last_dim_contiguous(do)
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        v_used = clip_value_rows(v, v_clip, v_norm)
        dq, dk, dv = _backward(do, q, k, v_used, o, lse2, kpm_u8, sm_scale, causal, cap, cap_mode)
        if v_clip is not None:
            # chain rule through the per-row clipping (computed in float32, as the forward did)
            _, vjp = torch.func.vjp(lambda x: clip_value_rows(x, v_clip, v_norm).float(), v.float())
            dv = vjp(dv.float())[0].to(v.dtype)
        return dq, dk, dv

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise DPFAError("dpfa.flash_attn_func has no double backward (gradients of its gradients).")

    @staticmethod
    def vmap(info, in_dims, do, q, k, v, o, lse2, kpm_u8, *args):
        n = info.batch_size
        merged = [_merge_vmap_dim(t, d, n) for t, d in zip((do, q, k, v, o, lse2, kpm_u8), in_dims[:7])]
        grads = _FlashAttnBackward.apply(*merged, *args)
        return tuple(_split_vmap_dim(g, n) for g in grads), (0, 0, 0)


# ------------------------------------------------------------------------ public API


def flash_attn_with_hooks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    score_cap: float | None = None,
    score_cap_mode: str = "clamp",
    value_clip: float | None = None,
    value_clip_norm: str = "l2",
    noise: EpilogueNoise | None = None,
    return_lse: bool = False,
):
    """Attention ``softmax(cap(q k^T * scale) + mask) @ clip(v)`` (+ epilogue noise), with autograd.

    Shapes (flash-attn layout): q (B, Nq, H, D); k, v (B, Nk, Hk, D) with H % Hk == 0;
    returns O (B, Nq, H, D) in q's dtype, and with ``return_lse`` the natural-log
    log-sum-exp (B, H, Nq), float32, ``-inf`` for rows that see no key (their O is 0).
    ``causal`` is aligned to the bottom-right corner (row i sees keys j <= i + Nk - Nq).
    ``key_padding_mask``: bool (B, Nk), True = attend. ``score_cap`` b caps each scaled
    score to [-b, b] (``score_cap_mode`` "clamp", the default: two ALU operations; or
    "tanh": b * tanh(s / b), smooth but it competes with exp for the special-function
    units). ``value_clip`` C scales each value row to norm <= C (``value_clip_norm`` "l2",
    or "l1" for the Laplace mechanism). ``noise`` adds
    :class:`EpilogueNoise` in the kernel's epilogue. Hooks are compiled out when off.
    """
    _validate(q, k, v, key_padding_mask, softmax_scale, score_cap, score_cap_mode, value_clip, noise,
              value_clip_norm)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if q.shape[0] == 0:
        out = q.new_zeros(q.shape)
        lse = torch.zeros((0, q.shape[2], q.shape[1]), device=q.device)
        return (out, lse) if return_lse else out
    if runs_kernels(q):
        kpm_u8 = key_padding_mask.to(torch.uint8).contiguous() if key_padding_mask is not None else None
        # keep the noiseless output for the backward only when a gradient can be asked for
        store_clean = noise is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        out, lse, _, _ = _FlashAttnFunction.apply(q, k, v, kpm_u8, sm_scale, bool(causal), score_cap,
                                                  score_cap_mode, value_clip, value_clip_norm, noise, store_clean)
        return (out, lse) if return_lse else out
    # plain torch: no GPU and no interpreter
    out, lse = attention_reference(q, k, v, causal=bool(causal), softmax_scale=sm_scale,
                                   key_padding_mask=key_padding_mask, score_cap=score_cap,
                                   score_cap_mode=score_cap_mode, value_clip=value_clip,
                                   value_clip_norm=value_clip_norm, return_lse=True)
    if noise is not None:
        if noise.tensor is None:
            raise ShapeError("Without a GPU or TRITON_INTERPRET=1 the epilogue noise needs tensor= "
                             "(the mechanism's torch sampler); a device sampler cannot run in plain torch.")
        sigma = noise.sigma.to(device=q.device, dtype=torch.float32)
        sigma = sigma.reshape((1,) * (3 - sigma.dim()) + tuple(sigma.shape)).expand(q.shape[0], q.shape[2], q.shape[1])
        sigma = sigma.transpose(1, 2)[..., None]  # (B, Nq, H, 1)
        if noise.quantize:  # sigma is the grid step: g * (round(O / g) + z), 0 where g = 0
            g = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
            released = torch.where(sigma > 0, (torch.floor(out.float() / g + 0.5) + noise.tensor.float()) * g, 0.0)
        else:
            released = out.float() + sigma * noise.tensor.float()
        # the value is exactly the released one (a function of the noisy output only); the
        # noise and the rounding are additive constants for autograd
        out = released.to(out.dtype).detach() + (out - out.detach())
    return (out, lse.float()) if return_lse else out


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    softcap: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Drop-in for ``flash_attn.flash_attn_func(q, k, v, dropout_p, softmax_scale, causal)``.

    q (B, Nq, H, D); k, v (B, Nk, Hk, D), H a multiple of Hk (GQA/MQA); fp16, bf16 or
    fp32; head_dim a multiple of 8 up to 256. ``causal`` is bottom-right aligned as in
    flash-attn >= 2.1. ``softcap`` > 0 applies ``softcap * tanh(s / softcap)`` to the
    scaled scores, as flash-attn does. ``key_padding_mask`` (B, Nk) bool, True =
    attend. ``return_lse`` also returns the log-sum-exp (B, H, Nq), float32. Dropout is
    not implemented: ``dropout_p`` other than 0 raises NotImplementedError.
    """
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p!r} is not supported by dpfa.flash_attn_func; "
                                  "only dropout_p=0.0.")
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not (0.0 <= softcap < math.inf):
        raise ShapeError(f"Expected softcap={softcap!r} in [0, inf) (0 = no cap).")
    return flash_attn_with_hooks(q, k, v, causal=causal, softmax_scale=softmax_scale,
                           key_padding_mask=key_padding_mask,
                           score_cap=float(softcap) if softcap > 0 else None, score_cap_mode="tanh",
                           return_lse=return_lse)
