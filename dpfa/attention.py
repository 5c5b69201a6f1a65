"""Release mode (DESIGN.md 1.2): attention outputs over a private key/value store, with the
noise made inside the flash-attention kernel.

Unit of privacy: one record of the store, that is ``record_size`` = g consecutive rows of
K and V (all heads of them) within one batch element; each batch element is its own
store. Queries, masks and positions are public. Neighbouring stores differ by replacing
one record. This covers cross-attention over a private memory, a retrieval store or a
prefix whose KV cache was computed record by record; it does NOT cover self-attention
inside a model whose residual stream carries the private token (the queries and the
other rows would then depend on it too).

What the kernel enforces (:func:`dpfa.kernels.flash_attn_with_hooks`): scaled scores capped
to ``|s| <= b`` (``score_cap``), each value row clipped to norm ``C`` (``value_clip``; L2,
or L1 for an L1 mechanism). For a query row that sees n keys, replacing one record moves
its output by at most

    Delta(n) = 2 C w_max(n),   w_max(n) = g e^b / (g e^b + max(n - g, 0) e^-b)

(DESIGN.md 1.2: with W, W' the record's total weight before and after, W >= W',
O - O' = W' (v - v') + (W - W') (v - o_rest), each bracket at most 2C). Rows that see
no key output 0 whatever the store, so Delta(0) = 0. A floating-point slack covers
the kernel's rounding (:func:`row_sensitivity`).

Calibration (the contract of the issue). A record is visible to at most R query rows (R
= the number of rows that see at least one key, the most over the batch) in each of
the H query heads. Divide row i of every head by its Delta_i: the normalised release
moves by at most 1 per (row, head), so its sensitivity is sqrt(R H) in L2 and R H in L1.
The mechanism's own ``calibrate(S, epsilon, delta)`` gives the noise scale s for that
sensitivity, and row i gets noise of scale ``Delta_i * s`` (for the Gaussian, sigma_i =
Delta_i sqrt(R H) / mu with mu the analytic-Gaussian mu of (epsilon, delta): the call
is mu-GDP). Multiplying back by the public Delta_i is post-processing. Per-head budgets
(``head_epsilons``) calibrate each head alone at sensitivity sqrt(R) (R); the
``importance`` strategy splits one budget across heads by weights, keeping the sum of
(Delta / sigma)^2 (Gaussian, discrete Gaussian) or of Delta / b (Laplace) of the
uniform split, so the call's guarantee is unchanged.

The discrete Gaussian releases on a grid: row i's grid step is g_i = Delta_i / (k sqrt(D))
(k = ``GRID_STEPS``), the kernel rounds O / g_i to the nearest integer and adds integer
noise. Rounding moves each coordinate by at most 1/2, so a row's integer sensitivity is
at most k sqrt(D) + sqrt(D) = (k + 1) sqrt(D) (plus the float32 error of O / g, see
:func:`grid_sensitivity`), the same for every row, and the noise scale in grid units is
``calibrate((k + 1) sqrt(D R H), epsilon, delta)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import secrets
from typing import Optional, Sequence

import torch
from torch import nn

from dpfa import _validate
from dpfa.accountants import registry as accountant_registry
from dpfa.accountants.events import SampledMechanismEvent
from dpfa.errors import PrivacyParameterError, ShapeError
from dpfa.kernels.flash_attention import EpilogueNoise, flash_attn_with_hooks, runs_kernels
from dpfa.kernels.noise import _scale_arg
from dpfa.mechanisms import registry as mechanism_registry
from dpfa.mechanisms.base import DPMechanism
from dpfa.mechanisms.secure import grid_bits_for, grid_release, rounded_sensitivity

__all__ = ["dp_flash_attn_func", "DPFlashAttention", "PrivacyStats", "row_sensitivity", "visible_keys",
           "DEFAULT_SCORE_CAP", "GRID_STEPS"]

#: default score cap b. The sensitivity grows like e^{2b} / n, so b must be small; b = 2
#: keeps scores in [-2, 2] (weights within a factor e^4 = 55 of each other).
DEFAULT_SCORE_CAP = 2.0
#: grid steps per unit of a row's sensitivity and sqrt(head_dim) (discrete Gaussian); the
#: rounding then costs a factor (k + 1) / k = 1.0625 in sensitivity
GRID_STEPS = 16
#: the discrete Gaussian's noise must stay an exact integer in float32 (|z| < 2^24) out to
#: 40 of its scales
_MAX_GRID_SCALE = 2.0**24 / 40.0
#: unit round-off of the P @ V operands, and the spacing of the smallest subnormals
_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
_SUBNORMAL = {torch.float32: 0.0, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}
_SEED_LIMIT = 2**63


@dataclasses.dataclass(frozen=True)
class PrivacyStats:
    """What one call released and what it cost. Nothing here is computed from private data:
    sensitivities and noise scales depend only on the public shapes, masks and parameters."""

    epsilon_spent: float
    delta_spent: float
    mechanism: str
    noise_scale_per_head: tuple[float, ...]  # largest per-row noise scale of each head
    max_sensitivity: float  # largest per-row sensitivity Delta_i, in the mechanism's norm
    records_visible_rows: int  # R: query rows that can see one record
    events: tuple[SampledMechanismEvent, ...]  # compose these in any dpfa accountant
    seed: int
    grid_step: Optional[float] = None  # secure_mode: every released value is a multiple of it (a power of 2)
    #: how epsilon_spent was obtained: "accountant" (the events, composed by a dpfa accountant) or
    #: "basic_composition" (a user mechanism that overrides only add_noise: the (epsilon, delta) of its
    #: calls, as its author claims them, added up; no events, and the noise scales are unknown: NaN)
    accounting: str = "accountant"

    @property
    def is_private(self) -> bool:
        return math.isfinite(self.epsilon_spent)


# ----------------------------------------------------------------- sensitivity


def visible_keys(batch: int, seqlen_q: int, seqlen_k: int, causal: bool,
                 key_padding_mask: Optional[torch.Tensor], device) -> torch.Tensor:
    """n[b, i]: keys that query row i of batch element b sees (int64, (B, Nq)).

    Causal masks are bottom-right aligned (row i sees keys j <= i + Nk - Nq);
    ``key_padding_mask`` is (B, Nk) bool, True = the key takes part.
    """
    rows = torch.arange(seqlen_q, device=device)
    last = rows + (seqlen_k - seqlen_q) if causal else torch.full_like(rows, seqlen_k - 1)
    last = last.clamp(min=-1, max=seqlen_k - 1)  # index of the last visible key, -1 = none
    if key_padding_mask is None:
        return (last + 1).expand(batch, seqlen_q).clone()
    csum = key_padding_mask.to(torch.int64).cumsum(-1)  # (B, Nk)
    n = csum[:, last.clamp(min=0)]
    return torch.where(last[None, :] >= 0, n, torch.zeros_like(n))


def row_sensitivity(n: torch.Tensor, score_cap: float, value_clip: float, record_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Delta(n) = 2 C w_max(n) per row (float64), with a floating-point slack for ``dtype``.

    Slack: the kernel rounds each clipped value row to ``dtype`` (norm <= C (1 + u)), rounds
    the weights P to ``dtype`` before P @ V (a relative error u each, plus subnormal
    spacing t for fp16, on weights that sum to 1: at most u + n t in total, on every row),
    and its float32 sums over n keys err by at most n 2^-24 relative. So
    Delta = 2 C (1 + u) (w_max + 2u + n t) (1 + 2 n 2^-24 + 1e-6), with the second u for the
    torch path, which rounds O to ``dtype`` before the noise. u = 2^-8 (bf16), 2^-11 (fp16),
    2^-24 (fp32).
    """
    n = n.to(torch.float64)
    g = float(record_size)
    others = (n - g).clamp(min=0.0)
    w_max = 1.0 / (1.0 + others / g * math.exp(-2.0 * score_cap))
    u, t = _ROUNDOFF[dtype], _SUBNORMAL[dtype]
    delta = 2.0 * value_clip * (1.0 + u) * (w_max + 2.0 * u + n * t) * (1.0 + 2.0 * n * 2.0**-24 + 1e-6)
    return torch.where(n > 0, delta, torch.zeros_like(delta))


# ------------------------------------------------------------------ calibration


def _norm_of(mech: DPMechanism) -> str:
    norm = getattr(mech, "sensitivity_norm", None)
    if norm not in ("l2", "l1", "l2_grid"):
        raise PrivacyParameterError(
            f"Mechanism {mech.name!r} has sensitivity_norm={norm!r}; the attention release supports 'l2', "
            "'l1' and 'l2_grid'.")
    return norm


def _calibrate(mech: DPMechanism, sensitivity: float, epsilon: float, delta: float) -> tuple[float, float]:
    """(scale, delta used): pure DP where the mechanism offers it (Laplace), else (epsilon, delta).

    dpfa's own mechanisms have no state, so their answers are cached (the analytic
    Gaussian's root finding costs more than the attention on small shapes); a user's
    mechanism is asked every time."""
    if type(mech).__module__.startswith("dpfa.mechanisms.") and not vars(mech):
        return _calibrate_builtin(type(mech), sensitivity, epsilon, delta)
    return _calibrate_uncached(mech, sensitivity, epsilon, delta)


@functools.lru_cache(maxsize=256)
def _calibrate_builtin(cls, sensitivity: float, epsilon: float, delta: float) -> tuple[float, float]:
    return _calibrate_uncached(cls(), sensitivity, epsilon, delta)


def _calibrate_uncached(mech: DPMechanism, sensitivity: float, epsilon: float, delta: float) -> tuple[float, float]:
    if mech.sensitivity_norm == "l1":
        try:
            return mech.calibrate(sensitivity, epsilon, 0.0), 0.0
        except PrivacyParameterError:
            pass
    return mech.calibrate(sensitivity, epsilon, delta), delta


def _head_shares(num_heads: int, strategy: Optional[str], head_weights) -> Optional[list[float]]:
    if strategy in (None, "uniform"):
        if head_weights is not None:
            raise PrivacyParameterError("head_weights are used only with strategy='importance'.")
        return None
    if strategy not in ("importance", "importance_based"):
        raise PrivacyParameterError(f"Unknown strategy={strategy!r}; expected 'uniform' or 'importance'.")
    if head_weights is None:
        raise PrivacyParameterError(
            f"strategy={strategy!r} needs head_weights (one positive weight per head, fixed before the call): dpfa "
            "does not measure head importance on the private keys and values, which would itself be an un-noised "
            "statistic of them. Pass head_weights=[...], or head_epsilons=[...] for explicit per-head budgets.")
    w = [float(x) for x in head_weights]
    if len(w) != num_heads:
        raise PrivacyParameterError(f"Expected {num_heads} head_weights (one per head), got {len(w)}.")
    if any(not (0.0 < x < math.inf) for x in w):
        raise PrivacyParameterError(f"Expected every head weight in (0, inf), got {list(head_weights)!r}.")
    total = sum(w)
    return [x / total for x in w]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Per-head normalised noise scales (in units of each row's Delta, or of the grid)."""

    scales: list[float]  # 0 = no noise on that head
    unit_sensitivity: float  # sensitivity of one normalised (row, head) in the mechanism's norm
    epsilon: float
    delta: float


def grid_sensitivity(head_dim: int, w_min: float) -> float:
    """Integer sensitivity of one row on its grid: k sqrt(D) for the change itself, sqrt(D) for
    the rounding (each coordinate moves by at most 1/2 in each neighbour), and the float32
    error of O / g before the rounding: at most 2^-23 |O| / g per coordinate, |O| <= C and
    C / g = k sqrt(D) / (2 w_max), so 2^-19 sqrt(D) / w_min over both neighbours (k = 16)."""
    return (GRID_STEPS + 1 + 2.0**-19 / w_min) * math.sqrt(head_dim)


def _plan(mech: DPMechanism, norm: str, R: int, H: int, D: int, epsilon: float, delta: float,
          head_epsilons: Optional[Sequence[float]], shares: Optional[list[float]], w_min: float = 1.0) -> _Plan:
    unit = grid_sensitivity(D, w_min) if norm == "l2_grid" else 1.0
    l1 = norm == "l1"
    if head_epsilons is not None:
        scales, used_delta = [], 0.0
        for h, e in enumerate(head_epsilons):
            if math.isinf(e):
                scales.append(0.0)
                continue
            s, d = _calibrate(mech, unit * (R if l1 else math.sqrt(R)), e, delta)
            scales.append(s)
            used_delta = max(used_delta, d)
        return _Plan(scales, unit, math.nan, used_delta)  # total epsilon: composed below
    if math.isinf(epsilon):
        return _Plan([0.0] * H, unit, math.inf, 0.0)
    s, used_delta = _calibrate(mech, unit * (R * H if l1 else math.sqrt(R * H)), epsilon, delta)
    if shares is None:
        return _Plan([s] * H, unit, epsilon, used_delta)
    if mech.name not in ("gaussian", "laplace", "discrete_gaussian"):
        raise PrivacyParameterError(
            f"strategy='importance' splits one budget by the composition rule of the Gaussian, Laplace or discrete "
            f"Gaussian mechanism; {mech.name!r} has none known to dpfa: give head_epsilons instead.")
    # keep sum_h R / s_h (L1) or sum_h R / s_h^2 (L2) equal to the uniform split's
    scales = [s / (H * p) if l1 else s / math.sqrt(H * p) for p in shares]
    return _Plan(scales, unit, epsilon, used_delta)


def _events(mech: DPMechanism, plan: _Plan, R: int) -> tuple[SampledMechanismEvent, ...]:
    """One event per noisy head: R releases, each of normalised sensitivity ``unit`` (the
    replace-one bound) with noise ``scale``. The accountants read a replace-one event as
    sensitivity 2C with noise z C, so z = 2 scale / unit."""
    events = []
    for s in plan.scales:
        if s == 0.0:
            continue
        events.append(SampledMechanismEvent(mechanism=mech.name, noise_multiplier=2.0 * s / plan.unit_sensitivity,
                                            sample_rate=1.0, count=R, sampling="poisson",
                                            neighboring="replace_one"))
    return tuple(events)


def _compose_epsilon(mech: DPMechanism, plan: _Plan, events, delta: float) -> float:
    """epsilon of the call at ``delta`` when the heads have their own budgets."""
    if any(s == 0.0 for s in plan.scales):
        return math.inf
    name = "pld" if mech.has_curve("pld") else "rdp"
    acc = accountant_registry.get(name)()
    for e in events:
        acc.compose_event(e)
    return acc.get_epsilon(delta)


# --------------------------------------------------------------------- the call


def _check_inputs(q, k, epsilon, delta, value_clip, score_cap, record_size, head_epsilons, seed):
    if not isinstance(epsilon, numbers.Real) or isinstance(epsilon, bool) or math.isnan(epsilon) or epsilon <= 0:
        raise PrivacyParameterError(
            f"Expected epsilon={epsilon!r} in (0, inf]; float('inf') is the documented no-noise switch.")
    delta = _validate.delta(delta)
    value_clip = _validate.positive(value_clip, "value_clip")
    score_cap = _validate.positive(score_cap, "score_cap")
    record_size = _validate.count(record_size, "record_size")
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ShapeError(f"Expected k of rank 4 (batch, seqlen, heads, head_dim), got {getattr(k, 'shape', k)!r}.")
    if k.shape[1] % record_size != 0:
        raise PrivacyParameterError(
            f"record_size={record_size} must divide seqlen_k={k.shape[1]}: a record is record_size consecutive rows.")
    H = q.shape[2]
    if head_epsilons is not None:
        head_epsilons = [float(e) for e in head_epsilons]
        if len(head_epsilons) != H:
            raise PrivacyParameterError(f"Expected {H} head_epsilons (one per query head), got {len(head_epsilons)}.")
        for e in head_epsilons:
            if math.isnan(e) or e <= 0:
                raise PrivacyParameterError(f"Expected every head epsilon in (0, inf], got {head_epsilons!r}.")
    if seed is None:
        seed = secrets.randbits(63)
    elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < _SEED_LIMIT:
        raise PrivacyParameterError(f"Expected seed={seed!r} to be an integer in [0, 2**63), or None (OS CSPRNG).")
    return float(epsilon), delta, value_clip, score_cap, record_size, head_epsilons, int(seed)


def _release_shapes(q, k, key_padding_mask) -> tuple:
    """(B, Nq, H, D, Nk) of a release, after the checks the sensitivity needs (q's rank, the mask)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ShapeError(f"Expected q of rank 4 (batch, seqlen, heads, head_dim), got {getattr(q, 'shape', q)!r}.")
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    if key_padding_mask is not None and (not isinstance(key_padding_mask, torch.Tensor)
                                         or tuple(key_padding_mask.shape) != (B, Nk)
                                         or key_padding_mask.dtype != torch.bool):
        raise ShapeError(f"Expected key_padding_mask of dtype torch.bool and shape (batch, seqlen_k) = ({B}, {Nk}), "
                         f"got {getattr(key_padding_mask, 'dtype', None)} {tuple(getattr(key_padding_mask, 'shape', ()))}.")
    return B, Nq, H, D, Nk


def dp_flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    *,
    epsilon: float,
    delta: float,
    mechanism="gaussian",
    value_clip: float = 1.0,
    score_cap: float = DEFAULT_SCORE_CAP,
    score_cap_mode: str = "clamp",
    record_size: int = 1,
    key_padding_mask: Optional[torch.Tensor] = None,
    head_epsilons: Optional[Sequence[float]] = None,
    strategy: Optional[str] = None,
    head_weights: Optional[Sequence[float]] = None,
    seed: Optional[int] = None,
    return_privacy_stats: bool = False,
    secure_mode: bool = False,
):
    """Differentially private attention output: ``cap``-ped, ``clip``-ped attention + noise.

    q (B, Nq, H, D) public queries; k, v (B, Nk, Hk, D) the private store (flash-attn layout,
    H a multiple of Hk). The whole call (all rows, all heads) is (epsilon, delta)-DP for one
    record (``record_size`` consecutive key/value rows) of each batch element, under
    replacement of the record; see the module docstring for the bound and the calibration.
    ``score_cap_mode``: "clamp" (the default: two ALU operations; the bound needs only
    |s| <= b) or "tanh" (b tanh(s / b): smooth, but tanh competes with exp for the
    special-function units). ``epsilon=float("inf")`` releases the clipped, capped
    attention without noise (stats say epsilon = inf). ``seed``: the noise is a function
    of it (reproducible); None draws it from the OS CSPRNG. Gradients are those of the
    clipped, capped attention (the noise is an additive constant).

    ``secure_mode=True`` (Mironov 2012; Jin et al. 2022): the discrete Gaussian with the
    noise keyed by the OS CSPRNG (``seed`` must stay None; ``mechanism`` must be the
    default "gaussian" or "discrete_gaussian"), released exactly on a grid of step 2^-k
    after randomised rounding, the rounding counted in the sensitivity (see
    :func:`_secure_release`); ``stats.grid_step`` is 2^-k. Float32 outputs are exactly on the
    grid; fp16/bf16 outputs are the grid values rounded to that type (post-processing).

    Returns O (B, Nq, H, D), and ``(O, PrivacyStats)`` with ``return_privacy_stats``.
    """
    if secure_mode:
        mechanism = _secure_mechanism(mechanism, seed)
    epsilon, delta, value_clip, score_cap, record_size, head_epsilons, seed = _check_inputs(
        q, k, epsilon, delta, value_clip, score_cap, record_size, head_epsilons, seed)
    mech = mechanism_registry.resolve(mechanism)
    norm = "l2" if secure_mode else _norm_of(mech)  # secure: one unit per (row, head), grid handled below
    if is_add_noise_only(mech):
        return _release_with_add_noise(mech, q, k, v, causal, softmax_scale, epsilon, delta, value_clip, score_cap,
                                       score_cap_mode, record_size, key_padding_mask, head_epsilons, strategy,
                                       head_weights, seed, return_privacy_stats)
    B, Nq, H, D, Nk = _release_shapes(q, k, key_padding_mask)
    shares = _head_shares(H, strategy, head_weights)
    if head_epsilons is not None and shares is not None:
        raise PrivacyParameterError("Give either head_epsilons or strategy='importance' with head_weights, not both.")

    rows_key = (Nq, Nk, bool(causal), score_cap, value_clip, record_size, q.dtype)
    if key_padding_mask is None:  # n depends on the shapes alone: computed once on the host, no device sync
        _, R, n_max, per_row = _rows_on_host(*rows_key)
        delta_rows = _rows_on_device(*rows_key, q.device).expand(B, Nq)
    else:
        n = visible_keys(B, Nq, Nk, causal, key_padding_mask, q.device)
        R = int((n > 0).sum(dim=1).max().item()) if B > 0 else 0
        delta_rows = row_sensitivity(n, score_cap, value_clip, record_size, q.dtype)  # (B, Nq) float64
        n_max = int(n.max().item()) if n.numel() else 0
        per_row = delta_rows.max().item() if delta_rows.numel() else 0.0
    w_min = 1.0 / (1.0 + max(n_max - record_size, 0) / record_size * math.exp(-2.0 * score_cap))
    plan = _plan(mech, norm, max(R, 1), H, D, epsilon, delta, head_epsilons, shares, w_min)
    events = _events(mech, plan, max(R, 1))

    clip_norm = "l1" if norm == "l1" else "l2"
    hooks = dict(causal=causal, softmax_scale=softmax_scale, key_padding_mask=key_padding_mask,
                 score_cap=score_cap, score_cap_mode=score_cap_mode, value_clip=value_clip,
                 value_clip_norm=clip_norm)
    noise = None
    sampler = getattr(mech, "triton_sampler", None) if runs_kernels(q) else None
    if any(s > 0 for s in plan.scales) and not secure_mode:
        if key_padding_mask is None and sampler is not None and norm != "l2_grid":
            # the hot path: Delta_i * s_h from the host cache, on the device already
            noise = EpilogueNoise(sigma=_sigma_on_device(rows_key, tuple(plan.scales), q.device).expand(B, H, Nq),
                                  sampler=sampler, seed=seed)
        else:
            scales = torch.tensor(plan.scales, dtype=torch.float64, device=q.device)  # (H,)
            noise = _noise(mech, norm, plan, scales, delta_rows, q, seed)
    out = flash_attn_with_hooks(q, k, v, noise=noise, **hooks)
    grid_step = None
    if secure_mode:
        scales = torch.tensor(plan.scales, dtype=torch.float64, device=q.device)  # (H,)
        out, grid_step, row_grid = _secure_release(out, scales, delta_rows, value_clip)
    if not return_privacy_stats:
        return out
    if head_epsilons is not None:
        eps_spent = _compose_epsilon(mech, plan, events, delta) if events else math.inf
        delta_spent = delta if math.isfinite(eps_spent) else 1.0
    else:
        eps_spent, delta_spent = plan.epsilon, (plan.delta if math.isfinite(plan.epsilon) else 1.0)
    if secure_mode:  # noise of scale s (Delta_i 2^k + sqrt(D)) grid steps of 2^-k
        per_head = [s * row_grid * grid_step for s in plan.scales]
    elif norm == "l2_grid":  # noise of scale s (grid units) on a grid of step Delta_i / (k sqrt(D))
        per_head = [s * per_row / (GRID_STEPS * math.sqrt(D)) for s in plan.scales]
    else:
        per_head = [s * per_row for s in plan.scales]
    stats = PrivacyStats(epsilon_spent=float(eps_spent), delta_spent=float(delta_spent), mechanism=mech.name,
                         noise_scale_per_head=tuple(per_head), max_sensitivity=float(per_row),
                         records_visible_rows=R, events=events, seed=seed, grid_step=grid_step)
    return out, stats


# ------------------------------------------------- a mechanism that only overrides add_noise


def is_add_noise_only(mech: DPMechanism) -> bool:
    """A user mechanism with no torch sampler that overrides ``add_noise`` (DESIGN.md 3)."""
    return not mech.has_sampler() and type(mech).add_noise is not DPMechanism.add_noise


def _add_noise_norm(mech: DPMechanism) -> str:
    """The norm in which add_noise's ``sensitivity`` is meant; it must be declared, not defaulted."""
    declared = any("sensitivity_norm" in c.__dict__ for c in type(mech).__mro__ if c is not DPMechanism)
    if not declared or mech.sensitivity_norm not in ("l1", "l2"):
        raise PrivacyParameterError(
            f"{type(mech).__name__} overrides only add_noise, so dpfa passes it the sensitivity of each tensor in the "
            f"norm the class declares; declare it in the class: sensitivity_norm = 'l1' (e.g. Laplace noise of scale "
            f"sensitivity / epsilon on every coordinate) or 'l2' (e.g. Gaussian). Got "
            f"{'no declaration' if not declared else repr(mech.sensitivity_norm)}.")
    return mech.sensitivity_norm


def _takes_delta(fn) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return "delta" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()) or len(
        [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 4


def _release_with_add_noise(mech, q, k, v, causal, softmax_scale, epsilon, delta, value_clip, score_cap,
                            score_cap_mode, record_size, key_padding_mask, head_epsilons, strategy, head_weights,
                            seed, return_privacy_stats):
    """The unfused path for a mechanism that only overrides ``add_noise(tensor, sensitivity, epsilon[, delta])``.

    The kernel (or its reference) computes the capped, clipped attention without noise; row i
    is divided by its public bound Delta_i, so every normalised (row, head) moves by at most 1
    in the mechanism's declared norm when one record is replaced, and at most R rows per head
    can see a record: the whole normalised output has sensitivity sqrt(R H) (L2) or R H (L1).
    Uniform budget: ONE call ``add_noise(normalised, that sensitivity, epsilon[, delta])``;
    ``head_epsilons``: one call per noisy head at sensitivity sqrt(R) (R) with that head's
    budget. Multiplying back by Delta_i is post-processing. The call is accounted by the
    (epsilon, delta) that add_noise was called with, as its author claims it (dpfa cannot
    check a noise it does not know; ``dpfa.attacks.audit_mechanism`` tests it empirically),
    added up over the calls (basic composition); an add_noise without a ``delta`` argument is
    taken as pure epsilon-DP. The stats say so (``accounting="basic_composition"``, no events).
    """
    norm = _add_noise_norm(mech)
    if strategy not in (None, "uniform"):
        raise PrivacyParameterError(
            f"strategy={strategy!r} splits one budget by a composition rule that dpfa knows only for its own "
            f"mechanisms; {type(mech).__name__} overrides only add_noise: give head_epsilons instead.")
    if head_weights is not None:
        raise PrivacyParameterError("head_weights are used only with strategy='importance'.")
    B, Nq, H, D, Nk = _release_shapes(q, k, key_padding_mask)
    out = flash_attn_with_hooks(q, k, v, noise=None, causal=causal, softmax_scale=softmax_scale,
                                key_padding_mask=key_padding_mask, score_cap=score_cap, score_cap_mode=score_cap_mode,
                                value_clip=value_clip, value_clip_norm=norm)
    n = visible_keys(B, Nq, Nk, causal, key_padding_mask, q.device)
    delta_rows = row_sensitivity(n, score_cap, value_clip, record_size, q.dtype)  # (B, Nq) float64
    R = max(int((n > 0).sum(dim=1).max().item()) if B > 0 else 0, 1)
    seen = (delta_rows > 0)[:, :, None, None]
    unit = torch.where(seen, delta_rows[:, :, None, None], torch.ones_like(delta_rows[:, :, None, None]))
    normalised = out.detach().to(torch.float64) / unit  # (B, Nq, H, D): each (row, head) moves by <= 1
    with_delta = _takes_delta(mech.add_noise)
    d_call = delta if with_delta else 0.0

    def call(x, sens, eps):
        y = mech.add_noise(x, sens, eps, delta) if with_delta else mech.add_noise(x, sens, eps)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape):
            raise ShapeError(f"{type(mech).__name__}.add_noise returned {type(y).__name__} of shape "
                             f"{tuple(getattr(y, 'shape', ()))}; expected a tensor of shape {tuple(x.shape)}.")
        return y.to(device=x.device, dtype=torch.float64)

    spent = []  # (epsilon, delta) of each add_noise call
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # a user's add_noise draws from torch's global generator: make it a function of seed
    try:
        if head_epsilons is None:
            if math.isfinite(epsilon):
                normalised = call(normalised, float(R * H) if norm == "l1" else math.sqrt(R * H), epsilon)
                spent.append((epsilon, d_call))
        else:
            parts = []
            for h, e in enumerate(head_epsilons):
                x = normalised[:, :, h, :]
                if math.isfinite(e):
                    x = call(x.contiguous(), float(R) if norm == "l1" else math.sqrt(R), e)
                    spent.append((e, d_call))
                parts.append(x)
            normalised = torch.stack(parts, dim=2)
    finally:
        torch.random.set_rng_state(gen_state)
    noisy = head_epsilons is None and math.isfinite(epsilon) or (
        head_epsilons is not None and all(math.isfinite(e) for e in head_epsilons))
    released = (normalised * unit).to(out.dtype)
    if out.requires_grad:  # gradients of the clipped, capped attention; the value is the release
        released = released + (out - out.detach())
    if not return_privacy_stats:
        return released
    eps_spent = sum(e for e, _ in spent) if noisy else math.inf
    delta_spent = min(1.0, sum(d for _, d in spent)) if noisy else 1.0
    stats = PrivacyStats(epsilon_spent=float(eps_spent), delta_spent=float(delta_spent),
                         mechanism=mech.name or type(mech).__name__, noise_scale_per_head=(math.nan,) * H,
                         max_sensitivity=float(delta_rows.max()) if delta_rows.numel() else 0.0,
                         records_visible_rows=R, events=(), seed=seed, accounting="basic_composition")
    return released, stats


def clear_caches() -> None:
    """Forget the cached calibrations and row sensitivities (tests that patch them call this)."""
    for f in (_calibrate_builtin, _rows_on_host, _rows_on_device, _sigma_on_device):
        f.cache_clear()


@functools.lru_cache(maxsize=128)
def _rows_on_host(Nq, Nk, causal, score_cap, value_clip, record_size, dtype):
    """(Delta per row (Nq,) float64 on the CPU, R, n_max, max Delta) without a padding mask."""
    n = visible_keys(1, Nq, Nk, causal, None, "cpu")[0]
    delta = row_sensitivity(n, score_cap, value_clip, record_size, dtype)
    return delta, int((n > 0).sum()), int(n.max()), float(delta.max())


@functools.lru_cache(maxsize=128)
def _rows_on_device(Nq, Nk, causal, score_cap, value_clip, record_size, dtype, device):
    return _rows_on_host(Nq, Nk, causal, score_cap, value_clip, record_size, dtype)[0].to(device)[None, :]


@functools.lru_cache(maxsize=128)
def _sigma_on_device(rows_key, scales: tuple, device) -> torch.Tensor:
    """(1, H, Nq) float32 noise scales Delta_i * s_h (rounded up), made on the host once."""
    delta = _rows_on_host(*rows_key)[0]
    sigma = _f32_up(delta[None, :] * torch.tensor(scales, dtype=torch.float64)[:, None])
    return sigma.to(device)[None]


def _secure_mechanism(mechanism, seed) -> DPMechanism:
    """secure_mode's mechanism: the discrete Gaussian; refuses a seed and any other mechanism."""
    if seed is not None:
        raise PrivacyParameterError(
            f"secure_mode=True keys the noise from the OS CSPRNG; got seed={seed!r}, which would make the noise "
            "reproducible by whoever knows it. Pass seed=None.")
    mech = mechanism_registry.resolve(mechanism)
    if mech.name not in ("gaussian", "discrete_gaussian"):
        raise PrivacyParameterError(
            f"secure_mode=True releases through the discrete Gaussian on a grid; got mechanism={mech.name!r}. "
            "Leave mechanism at its default ('gaussian', replaced by 'discrete_gaussian') or pass "
            "'discrete_gaussian'.")
    return mechanism_registry.resolve("discrete_gaussian")


def _secure_release(out: torch.Tensor, scales: torch.Tensor, delta_rows: torch.Tensor, value_clip: float):
    """secure_mode's release of the clipped, capped attention ``out``: (released, grid step, largest row
    sensitivity in grid units).

    One grid 2^-k for the call, k = :func:`~dpfa.mechanisms.secure.grid_bits_for` (Delta_min, D,
    1 / GRID_STEPS), so 2^-k sqrt(D) <= Delta_i / GRID_STEPS for every row that sees a key.
    Row i of head h is released as (R(O 2^k) + Z) 2^-k (randomised rounding, integer noise
    N_Z(0, (s_h S_i)^2), S_i = Delta_i 2^k + sqrt(D): :mod:`dpfa.mechanisms.secure`). For
    every value of the rounding's uniforms (the coupling of that module's proof), a record
    moves row i's integers by at most S_i in L2 and leaves the rows that cannot see it
    unchanged, so the call's RDP is the sum over (row, head) of alpha S_i^2 / (2 (s_h S_i)^2):
    that of the Gaussian plan with unit sensitivity, which ``_plan`` calibrated. O is
    computed, clipped, in float32 by the kernel and rounded to its dtype; Delta_i
    (``row_sensitivity``) already covers both roundings, and O 2^k is exact.
    """
    B, Nq, H, D = out.shape
    seen = delta_rows > 0  # (B, Nq)
    if bool((scales == 0).any()):
        raise PrivacyParameterError("secure_mode=True needs a finite budget on every head (noise on every value).")
    if not bool(seen.any()):  # no row sees a key: the output is 0 whatever the store
        return out, 1.0, 0.0
    k = grid_bits_for(float(delta_rows[seen].min()), D, 1.0 / GRID_STEPS)
    rows = torch.where(seen, rounded_sensitivity(delta_rows, D, k), torch.zeros_like(delta_rows))  # (B, Nq)
    sigma = rows[:, :, None, None] * scales.to(rows)[None, None, :, None]  # (B, Nq, H, 1) grid units
    if out.dtype == torch.float32:  # a public bound on |R(O 2^k) + Z|: |O| <= C (1 + u), Z within 40 scales
        bound = value_clip * (1.0 + 2.0**-8) * 2.0**k + 1.0 + 40.0 * float(sigma.max())
        if bound >= 2.0**24:
            raise PrivacyParameterError(
                f"secure_mode: the grid values (up to {bound:.3g} steps of 2^-{k}) do not fit exactly in float32 "
                "(2^24); use a larger epsilon or fewer query rows per call.")
    released = grid_release(out.detach(), k, sigma)  # float64, on the grid; fresh CSPRNG key
    released = released.to(out.dtype)
    if out.requires_grad:  # gradients of the clipped, capped attention; the value is the release
        released = released + (out - out.detach())
    return released, 2.0**-k, float(rows.max())


def _f32_up(t: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounded up: a noise scale or grid step never shrinks in the cast."""
    f = t.float()
    return torch.where(f.double() < t, torch.nextafter(f, torch.full_like(f, math.inf)), f)


def _noise(mech, norm, plan, scales, delta_rows, q, seed) -> EpilogueNoise:
    """The epilogue's noise: the mechanism's device sampler where kernels run, else a tensor
    from its torch sampler (same calibration)."""
    B, Nq, H, D = q.shape
    sampler = getattr(mech, "triton_sampler", None) if runs_kernels(q) else None
    quantize = norm == "l2_grid"
    if quantize:
        grid = delta_rows / (GRID_STEPS * math.sqrt(D))  # (B, Nq): step of each row
        sigma = _f32_up(grid[:, None, :].expand(B, H, Nq))
        zero = scales == 0
        if bool(zero.any()):  # a head without noise is released off the grid, as plain attention
            raise PrivacyParameterError("The discrete Gaussian release needs a finite budget on every head.")
        if float(scales.max()) > _MAX_GRID_SCALE:
            raise PrivacyParameterError(
                f"The discrete Gaussian noise scale ({float(scales.max()):.3g} grid steps) is too large for exact "
                f"integers in float32 (at most {_MAX_GRID_SCALE:.3g}); use a larger epsilon or mechanism='gaussian'.")
        uniform = bool((scales == scales[0]).all())
        if sampler is not None and uniform:
            return EpilogueNoise(sigma=sigma, sampler=sampler, seed=seed, quantize=True,
                                 scale=_scale_arg(float(scales[0])))
        z = _torch_noise(mech, scales, (B, Nq, H, D), q.device, seed)
        return EpilogueNoise(sigma=sigma, tensor=z, quantize=True)
    if sampler is not None:
        sigma = _f32_up(delta_rows[:, None, :] * scales[None, :, None])  # (B, H, Nq): Delta_i * s_h
        return EpilogueNoise(sigma=sigma, sampler=sampler, seed=seed)
    sigma = _f32_up(delta_rows[:, None, :].expand(B, H, Nq))  # Delta_i; the tensor holds noise of scale s_h
    z = _torch_noise(mech, scales, (B, Nq, H, D), q.device, seed)
    return EpilogueNoise(sigma=sigma, tensor=z)


def _torch_noise(mech, scales, shape, device, seed) -> torch.Tensor:
    """Noise of scale s_h in head h, from the mechanism's torch sampler, seeded by ``seed``."""
    B, Nq, H, D = shape
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    z = torch.zeros(shape, device=device, dtype=torch.float32)
    for h in range(H):
        s = float(scales[h])
        if s > 0:
            z[:, :, h, :] = mech.sample((B, Nq, D), s, generator=gen, device=device, dtype=torch.float32)
    return z


# ------------------------------------------------------------------------ module


class DPFlashAttention(nn.Module):
    """Multi-head attention whose output is (epsilon, delta)-DP for one key/value record.

    Constructor and call follow ``nn.MultiheadAttention`` (``embed_dim, num_heads, dropout,
    bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first``; ``forward(query, key,
    value, key_padding_mask=None, need_weights=False, attn_mask=None, ...)`` with its
    ``key_padding_mask`` convention, True = ignore). Privacy: ``epsilon``, ``delta`` per
    call (all heads), ``mechanism`` (a name or a DPMechanism instance), ``head_epsilons``
    (a budget per head; inf = no noise on that head, and the stats then say epsilon = inf),
    or ``strategy="importance"`` with ``head_weights`` to split one budget across heads.
    Keys and values are the private records (one record = ``record_size`` positions of the
    key/value sequence); queries are public. ``get_privacy_spent()`` composes every call so far.
    ``secure_mode=True``: every call releases through the secure grid release (see
    :func:`dp_flash_attn_func`), keyed by the OS CSPRNG; ``forward(..., seed=...)`` is then refused.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 epsilon: float, delta: float, mechanism="gaussian", value_clip: float = 1.0,
                 score_cap: float = DEFAULT_SCORE_CAP, score_cap_mode: str = "clamp", record_size: int = 1,
                 head_epsilons: Optional[Sequence[float]] = None, strategy: Optional[str] = None,
                 head_weights: Optional[Sequence[float]] = None, causal: bool = False,
                 accountant: Optional[str] = None, secure_mode: bool = False) -> None:
        super().__init__()
        if dropout != 0.0:
            raise PrivacyParameterError(f"dropout={dropout!r} is not supported by DPFlashAttention; only 0.0.")
        if add_bias_kv or add_zero_attn:
            raise PrivacyParameterError("add_bias_kv and add_zero_attn are not supported by DPFlashAttention.")
        embed_dim = _validate.count(embed_dim, "embed_dim")
        num_heads = _validate.count(num_heads, "num_heads")
        if embed_dim % num_heads != 0:
            raise ShapeError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}.")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.batch_first = batch_first
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.k_proj = nn.Linear(self.kdim, embed_dim, **kw)
        self.v_proj = nn.Linear(self.vdim, embed_dim, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.privacy = dict(epsilon=epsilon, delta=delta, mechanism=mechanism, value_clip=value_clip,
                            score_cap=score_cap, score_cap_mode=score_cap_mode, record_size=record_size,
                            head_epsilons=head_epsilons, strategy=strategy, head_weights=head_weights,
                            secure_mode=bool(secure_mode))
        self.causal = bool(causal)
        # check the budget now, not at the first forward: the checks and the calibration of a
        # call on a store of one record
        probe = torch.empty(1, record_size, num_heads, self.head_dim, device="meta")
        _check_inputs(probe, probe, epsilon, delta, value_clip, score_cap, record_size, head_epsilons, 0)
        mech = _secure_mechanism(mechanism, None) if secure_mode else mechanism_registry.resolve(mechanism)
        if is_add_noise_only(mech) and not secure_mode:  # accounted by the (epsilon, delta) of its calls
            _add_noise_norm(mech)
        else:
            _plan(mech, "l2" if secure_mode else _norm_of(mech), 1, num_heads, self.head_dim, float(epsilon), delta,
                  head_epsilons, _head_shares(num_heads, strategy, head_weights))
        self._claimed: list[tuple[float, float]] = []  # (epsilon, delta) of add_noise-only calls
        self._accountant_name = accountant or ("pld" if mech.has_curve("pld") else "rdp")
        self._accountant = accountant_registry.get(self._accountant_name)()
        self._not_private = False

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = False, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False, *, return_privacy_stats: bool = False,
                seed: Optional[int] = None):
        """(output, stats if ``return_privacy_stats`` else None), like nn.MultiheadAttention's (output, weights)."""
        if need_weights:
            raise PrivacyParameterError(
                "need_weights=True would return attention weights computed from the private keys without noise; "
                "DPFlashAttention releases only the noisy output (pass need_weights=False).")
        if attn_mask is not None:
            raise ShapeError("attn_mask is not supported; use key_padding_mask, or is_causal=True / causal=True.")
        out, stats = self._attend(query, key, value, key_padding_mask, is_causal, seed)
        self._record(stats)
        return out, (stats if return_privacy_stats else None)

    def _attend(self, query, key, value, key_padding_mask, is_causal, seed):
        """(output, stats) of one release; nothing is accounted here (see ``_record``)."""
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        B, Nq, _ = query.shape
        Nk = key.shape[1]
        H, D = self.num_heads, self.head_dim
        q = self.q_proj(query).view(B, Nq, H, D)
        k = self.k_proj(key).view(B, Nk, H, D)
        v = self.v_proj(value).view(B, Nk, H, D)
        kpm = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool:
                raise ShapeError(f"Expected key_padding_mask of dtype torch.bool (True = ignore, as "
                                 f"nn.MultiheadAttention), got {key_padding_mask.dtype}.")
            kpm = ~key_padding_mask  # dpfa's kernels take True = attend
        out, stats = dp_flash_attn_func(q, k, v, causal=self.causal or is_causal, key_padding_mask=kpm,
                                        seed=seed, return_privacy_stats=True, **self.privacy)
        out = self.out_proj(out.reshape(B, Nq, H * D))  # post-processing of the noisy output
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, stats

    def _record(self, stats: PrivacyStats) -> None:
        """Compose one release into the module's ledger."""
        for e in stats.events:
            self._accountant.compose_event(e)
        if stats.accounting == "basic_composition" and stats.is_private:
            self._claimed.append((stats.epsilon_spent, stats.delta_spent))
        if not stats.is_private:
            self._not_private = True

    def get_privacy_spent(self, delta: Optional[float] = None) -> tuple[float, float]:
        """(epsilon, delta) of every call so far, composed by the module's accountant.

        A mechanism that overrides only add_noise has no curve: its calls' (epsilon, delta) are
        added up (basic composition) and that delta is returned, whatever ``delta`` asks."""
        delta = self.privacy["delta"] if delta is None else _validate.delta(delta)
        if self._not_private:
            return math.inf, delta
        if self._claimed:
            return sum(e for e, _ in self._claimed), min(1.0, sum(d for _, d in self._claimed))
        if not self._accountant.history:
            return 0.0, 0.0
        return self._accountant.get_epsilon(delta), delta
