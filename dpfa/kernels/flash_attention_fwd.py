"""Flash attention forward: one Triton template, specialised by ``tl.constexpr``.

Each program owns BLOCK_M query rows of one (batch, head). Its Q tile stays in
registers for the whole program; K and V tiles of BLOCK_N rows stream through shared
memory, and the running max ``m_i``, running sum ``l_i`` and the output accumulator
stay in registers (online softmax, in base 2 so that the exponent is one ``exp2``).
Only O and the log-sum-exp leave the chip.

The key loop is split in two: tiles that every row of the program sees in full run
without any mask (the hot path), the rest (the causal diagonal, the ragged last key
tile) run with masks. Hooks for the DP release (DESIGN.md 1.2), all off by default
and compiled out when off:

- ``SCORE_CAP``: 0 none, 1 hard clamp to [-b, b], 2 smooth ``b * tanh(s / b)`` built
  from ``tl.exp`` (libdevice's tanh does not run under the interpreter);
- ``VALUE_CLIP``: 0 none, 1 each V row is scaled to L2 norm <= C before it enters
  P @ V, 2 the same in L1 (for the Laplace mechanism);
- ``NOISE``: 0 none, 1 the ``NOISE_FN(seed, offsets, scale)`` device sampler adds
  noise of scale ``sigma[b, h, row]`` to each output element in the epilogue
  (``NOISE_PAIR``: ``NOISE_FN`` is the sampler's two-at-a-time form),
  2 the epilogue adds ``sigma[b, h, row] * Z`` for a noise tensor Z made beforehand
  (mechanisms without a device sampler). ``STORE_CLEAN`` also writes the output
  before noise, which the backward pass needs.
- ``QUANTIZE`` (with NOISE): integer noise on a grid (discrete Gaussian). ``SIGMA`` then
  holds each row's grid step g, and the row becomes ``g * (round(O / g) + Z)`` with Z
  integer noise of scale ``noise_scale`` (grid units) from ``NOISE_FN`` or ``Z``.

Lengths that are not a multiple of the block and head dims that are not a power of
two are handled with masked loads (``EVEN_D``: the head dim is its own block).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, acc, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b; ``DOT_F32`` upcasts the operands (bf16 dots are wrong under the interpreter)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _cap(s, cap, SCORE_CAP: tl.constexpr):
    """Scaled scores capped to |s| <= cap: 1 clamp, 2 cap * tanh(s / cap)."""
    if SCORE_CAP == 1:
        s = tl.minimum(tl.maximum(s, -cap), cap)
    elif SCORE_CAP == 2:
        # tanh(x) = sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|}): exact to rounding, no overflow
        x = s / cap
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        s = cap * tl.where(x < 0, -t, t)
    return s


@triton.jit
def _clip_rows(v, v_clip, VALUE_CLIP: tl.constexpr):
    """Scale each row of the tile ``v`` to norm <= v_clip (1: L2, 2: L1; in float32)."""
    vf = v.to(tl.float32)
    if VALUE_CLIP == 2:
        norm = tl.sum(tl.abs(vf), 1)
    else:
        norm = tl.sqrt(tl.sum(vf * vf, 1))
    factor = tl.minimum(v_clip / tl.maximum(norm, 1e-30), 1.0)
    return (vf * factor[:, None]).to(v.dtype)


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, kpm_ptr, stride_kn, stride_vn,
               offs_m, offs_d, lo, hi, seq_k, shift, sm_scale, qk_scale, cap, v_clip,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, HAS_KPM: tl.constexpr,
               SCORE_CAP: tl.constexpr, VALUE_CLIP: tl.constexpr, FIXED_MAX: tl.constexpr,
               DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Online softmax over key tiles [lo, hi); with ``MASKED`` the tiles need the
    key-bounds and causal masks (otherwise every row sees every key of the tile).

    ``FIXED_MAX`` (capped scores only): every score is at most b, so b is a valid
    softmax shift for every row from the start: p = 2^{(s - b) log2 e} lies in
    [e^{-2b}, 1] and needs no running max, no rescaling of the accumulator and no row
    reduction per tile (``m_i`` holds b log2 e throughout)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            if EVEN_D:
                ld_mask = offs_n[:, None] < seq_k
            else:
                ld_mask = (offs_n[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=ld_mask, other=0.0)
        else:
            if EVEN_D:
                k = tl.load(k_ptrs)
            else:
                ld_mask = offs_d[None, :] < HEAD_DIM
                k = tl.load(k_ptrs, mask=ld_mask, other=0.0)
        s = _mm(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_F32, INPUT_PRECISION)
        if MASKED or HAS_KPM:
            if MASKED:
                visible = offs_n[None, :] < seq_k
                if CAUSAL:
                    visible = visible & (offs_n[None, :] <= offs_m[:, None] + shift)
            else:
                visible = offs_n[None, :] >= 0
            if HAS_KPM:
                keep = tl.load(kpm_ptr + offs_n, mask=offs_n < seq_k, other=0)
                visible = visible & (keep[None, :] != 0)
        if FIXED_MAX:
            if SCORE_CAP == 1:  # clamp(s * scale, -b, b) in base 2, shifted by b: three ALU operations
                s = tl.minimum(tl.maximum(s * qk_scale, -m_i[:, None]), m_i[:, None])
            else:
                s = _cap(s * sm_scale, cap, SCORE_CAP) * 1.4426950408889634
            p = tl.exp2(s - m_i[:, None])
            if MASKED or HAS_KPM:
                p = tl.where(visible, p, 0.0)
            l_i = l_i + tl.sum(p, 1)
            m_new = m_i
        else:
            if SCORE_CAP != 0:
                s = _cap(s * sm_scale, cap, SCORE_CAP) * 1.4426950408889634
            elif MASKED or HAS_KPM:
                s = s * qk_scale
            if SCORE_CAP == 0 and not (MASKED or HAS_KPM):
                # hot path: the scale folds into one FMA with the max (softmax_scale > 0)
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
                p = tl.exp2(s * qk_scale - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
            elif MASKED or HAS_KPM:
                s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # a row that has seen no key yet keeps m = -inf; shift by 0 instead of -inf
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(s - m_use[:, None])
                alpha = tl.exp2(m_i - m_use)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.exp2(s - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=ld_mask, other=0.0)
        else:
            if EVEN_D:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=ld_mask, other=0.0)
        if VALUE_CLIP != 0:
            v = _clip_rows(v, v_clip, VALUE_CLIP)
        acc = _mm(p.to(v.dtype), v, acc, DOT_F32, INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def flash_fwd_kernel(
    Q, K, V, O, O_CLEAN, LSE, KPM, SIGMA, Z,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_kpmb,
    stride_sb, stride_sh, stride_sm,
    heads, seq_q, seq_k, shift, group,
    sm_scale, cap, v_clip, seed, noise_scale, tune_q, tune_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    SCORE_CAP: tl.constexpr, VALUE_CLIP: tl.constexpr,
    NOISE: tl.constexpr, NOISE_FN: tl.constexpr, STORE_CLEAN: tl.constexpr, QUANTIZE: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FIXED_MAX: tl.constexpr = False, NOISE_PAIR: tl.constexpr = False, NOISE_LARGE: tl.constexpr = False,
):
    """O[b, rows, h] and LSE[b, h, rows] (base 2, +inf for rows that see no key)
    for one tile of BLOCK_M query rows; grid (cdiv(seq_q, BLOCK_M), batch * heads)."""
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    if CAUSAL:
        # the tiles with the most keys first: less idle time in the last wave
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // heads
    off_h = off_bh % heads
    off_hk = off_h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptr = Q + off_b.to(tl.int64) * stride_qb + off_h * stride_qh
    k_ptr = K + off_b.to(tl.int64) * stride_kb + off_hk * stride_kh
    v_ptr = V + off_b.to(tl.int64) * stride_vb + off_hk * stride_vh
    kpm_ptr = KPM + off_b.to(tl.int64) * stride_kpmb

    q_mask = offs_m[:, None] < seq_q
    if not EVEN_D:
        q_mask = q_mask & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + offs_m[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)

    if FIXED_MAX:
        m_i = tl.full([BLOCK_M], 1.4426950408889634, dtype=tl.float32) * cap
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    # key tiles [0, full_end) are seen in full by every row of this program
    full_end = (seq_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        first_row_limit = tl.maximum(start_m * BLOCK_M + shift + 1, 0)
        full_end = tl.minimum(full_end, (first_row_limit // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(seq_k, (start_m + 1) * BLOCK_M + shift)
    else:
        hi = seq_k
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, kpm_ptr, stride_kn, stride_vn,
                               offs_m, offs_d, 0, full_end, seq_k, shift, sm_scale, qk_scale, cap, v_clip,
                               HEAD_DIM, BLOCK_N, False, CAUSAL, EVEN_D, HAS_KPM, SCORE_CAP, VALUE_CLIP, FIXED_MAX,
                               DOT_F32, INPUT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, kpm_ptr, stride_kn, stride_vn,
                               offs_m, offs_d, full_end, hi, seq_k, shift, sm_scale, qk_scale, cap, v_clip,
                               HEAD_DIM, BLOCK_N, True, CAUSAL, EVEN_D, HAS_KPM, SCORE_CAP, VALUE_CLIP, FIXED_MAX,
                               DOT_F32, INPUT_PRECISION)

    # epilogue: normalise, write the log-sum-exp, add noise if asked, write O
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    row_ok = offs_m < seq_q
    tl.store(LSE + off_bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)

    o_offs = offs_m[:, None] * stride_on + offs_d[None, :]
    o_base = off_b.to(tl.int64) * stride_ob + off_h * stride_oh
    if NOISE != 0:
        if STORE_CLEAN:
            tl.store(O_CLEAN + o_base + o_offs, out.to(O_CLEAN.dtype.element_ty), mask=q_mask)
        sigma = tl.load(SIGMA + off_b.to(tl.int64) * stride_sb + off_h * stride_sh + offs_m * stride_sm,
                        mask=row_ok, other=0.0)
        # one counter per element of a contiguous (B, Nq, H, D) output (int64 past 2^31 elements)
        if NOISE_LARGE:
            row_lin = (off_b.to(tl.int64) * seq_q + offs_m[:, None]) * heads + off_h
        else:
            row_lin = (off_b * seq_q + offs_m[:, None]) * heads + off_h
        lin = row_lin * HEAD_DIM + offs_d[None, :]
        if QUANTIZE:
            # sigma is the row's grid step g: g * (round(out / g) + integer noise); g = 0 only
            # for rows that see no key, whose output is 0 whatever the data
            g = sigma[:, None]
            on_grid = tl.floor(out / tl.where(g > 0, g, 1.0) + 0.5)
            if NOISE == 1:
                z = NOISE_FN(seed, lin, noise_scale)
            else:
                z = tl.load(Z + lin, mask=q_mask, other=0.0).to(tl.float32)
            out = tl.where(g > 0, (on_grid + z) * g, 0.0)
        elif NOISE == 1:
            if NOISE_PAIR:
                # two normals per generator call: elements 2j and 2j + 1 of the row from counter
                # lin // 2, the values the element-wise sampler gives (device_samplers.pair_form)
                pair = row_lin * (HEAD_DIM // 2) + tl.arange(0, BLOCK_D // 2)[None, :]
                za, zb = NOISE_FN(seed, pair, sigma[:, None])
                out = out + tl.reshape(tl.join(za, zb), [BLOCK_M, BLOCK_D])
            else:
                out = out + NOISE_FN(seed, lin, sigma[:, None])
        else:
            z = tl.load(Z + lin, mask=q_mask, other=0.0)
            out = out + sigma[:, None] * z.to(tl.float32)
    tl.store(O + o_base + o_offs, out.to(O.dtype.element_ty), mask=q_mask)


@triton.jit
def clip_rows_kernel(V, VC, n_rows, v_clip, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_R: tl.constexpr, VALUE_CLIP: tl.constexpr):
    """VC[r] = V[r] scaled to norm <= v_clip (``_clip_rows``), rows of a contiguous (rows, HEAD_DIM).

    The forward clips V once with this pass instead of in every program that loads a V
    tile (each V row is loaded by every query tile: seqlen_q / BLOCK_M times).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    offs = rows.to(tl.int64)[:, None] * HEAD_DIM + cols[None, :]
    v = tl.load(V + offs, mask=mask, other=0.0)
    tl.store(VC + offs, _clip_rows(v, v_clip, VALUE_CLIP), mask=mask)
