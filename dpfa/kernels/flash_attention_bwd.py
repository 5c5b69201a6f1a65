"""Flash attention backward: two Triton templates (dK/dV, then dQ), no atomics.

Both recompute the probabilities ``P = exp2(S * log2(e) - LSE)`` tile by tile from the
log-sum-exp that the forward saved, so nothing of size seqlen_q x seqlen_k is ever
stored. With ``Delta_i = sum_d dO[i, d] O[i, d]`` (computed beforehand, from the output
BEFORE any noise):

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - Delta),   dK = scale dS^T Q,   dQ = scale dS K

- ``flash_bwd_dkdv_kernel``: one program per BLOCK_N keys of one (batch, kv head);
  K, V and the dK, dV accumulators stay in registers while the query tiles of every
  query head of the group stream past (so grouped-query attention sums over its
  group without atomics).
- ``flash_bwd_dq_kernel``: one program per BLOCK_M query rows of one (batch, head),
  looping over key tiles like the forward.

The score cap's derivative multiplies dS (clamp: 1 inside [-b, b], else 0; tanh:
1 - tanh^2). Value clipping is not applied here: the caller passes the clipped V and
applies the clipping's Jacobian to dV (a per-row operation, done in torch).
"""

from __future__ import annotations

import triton
import triton.language as tl

from dpfa.kernels.flash_attention_fwd import _cap, _mm


@triton.jit
def _cap_grad(s, cap, SCORE_CAP: tl.constexpr):
    """d cap(s) / ds at the scaled scores s."""
    if SCORE_CAP == 1:
        g = tl.where((s >= -cap) & (s <= cap), 1.0, 0.0)
    else:
        t = _cap(s, cap, SCORE_CAP) / cap
        g = 1.0 - t * t
    return g


@triton.jit
def _bwd_kv_tiles(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, keep,
                  stride_qn, stride_don, offs_n, offs_d, lo, hi, seq_q, seq_k, shift,
                  sm_scale, qk_scale, cap,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                  CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, HAS_KPM: tl.constexpr,
                  SCORE_CAP: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi) (transposed tiles:
    rows are keys, columns queries)."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = q_ptr + offs_m[:, None] * stride_qn + offs_d[None, :]
        do_ptrs = do_ptr + offs_m[:, None] * stride_don + offs_d[None, :]
        if MASKED:
            if EVEN_D:
                ld_mask = offs_m[:, None] < seq_q
            else:
                ld_mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
            q = tl.load(q_ptrs, mask=ld_mask, other=0.0)
            # rows past seq_q get lse = +inf, hence p = 0
            lse = tl.load(lse_ptr + offs_m, mask=offs_m < seq_q, other=float("inf"))
        else:
            if EVEN_D:
                q = tl.load(q_ptrs)
            else:
                ld_mask = offs_d[None, :] < HEAD_DIM
                q = tl.load(q_ptrs, mask=ld_mask, other=0.0)
            lse = tl.load(lse_ptr + offs_m)
        st = _mm(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), DOT_F32, INPUT_PRECISION)
        if SCORE_CAP == 0:
            pt = tl.exp2(st * qk_scale - lse[None, :])
        else:
            st = st * sm_scale
            pt = tl.exp2(_cap(st, cap, SCORE_CAP) * 1.4426950408889634 - lse[None, :])
        if MASKED or HAS_KPM:
            if MASKED:
                visible = offs_n[:, None] < seq_k
                if CAUSAL:
                    visible = visible & (offs_n[:, None] <= offs_m[None, :] + shift)
                if HAS_KPM:
                    visible = visible & (keep[:, None] != 0)
            else:
                visible = keep[:, None] != 0
            pt = tl.where(visible, pt, 0.0)
        if MASKED:
            do = tl.load(do_ptrs, mask=ld_mask, other=0.0)
            delta = tl.load(delta_ptr + offs_m, mask=offs_m < seq_q, other=0.0)
        else:
            if EVEN_D:
                do = tl.load(do_ptrs)
            else:
                do = tl.load(do_ptrs, mask=ld_mask, other=0.0)
            delta = tl.load(delta_ptr + offs_m)
        dv = _mm(pt.to(do.dtype), do, dv, DOT_F32, INPUT_PRECISION)
        dpt = _mm(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), DOT_F32, INPUT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        if SCORE_CAP != 0:
            dst = dst * _cap_grad(st, cap, SCORE_CAP)
        dk = _mm(dst.to(q.dtype), q, dk, DOT_F32, INPUT_PRECISION)
    return dk, dv


@triton.jit
def flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KPM,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_kpmb,
    heads, heads_k, seq_q, seq_k, shift, group,
    sm_scale, cap, tune_q, tune_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, SCORE_CAP: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV for BLOCK_N keys of one (batch, kv head); grid (cdiv(seq_k, BLOCK_N), batch * heads_k)."""
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    start_n = tl.program_id(0) * BLOCK_N
    off_bhk = tl.program_id(1)
    off_b = off_bhk // heads_k
    off_hk = off_bhk % heads_k
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    kv_mask = offs_n[:, None] < seq_k
    if not EVEN_D:
        kv_mask = kv_mask & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + off_b.to(tl.int64) * stride_kb + off_hk * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + off_b.to(tl.int64) * stride_vb + off_hk * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    if HAS_KPM:
        keep = tl.load(KPM + off_b.to(tl.int64) * stride_kpmb + offs_n, mask=offs_n < seq_k, other=0)
    else:
        keep = offs_n
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    # query tiles before m_lo see none of these keys; from m_full on, every query
    # row sees every key of the tile (causal); only a full key tile can skip masks
    if CAUSAL:
        m_lo = (tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.maximum(start_n + BLOCK_N - 1 - shift, 0)
        m_full = tl.maximum(((m_full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, m_lo)
    else:
        m_lo = 0
        m_full = 0
    m_even = (seq_q // BLOCK_M) * BLOCK_M
    if start_n + BLOCK_N <= seq_k:
        a_end = tl.minimum(m_full, seq_q)
        b_end = tl.maximum(a_end, m_even)
    else:
        a_end = seq_q
        b_end = seq_q

    for g in range(0, group):
        off_h = off_hk * group + g
        q_ptr = Q + off_b.to(tl.int64) * stride_qb + off_h * stride_qh
        do_ptr = DO + off_b.to(tl.int64) * stride_dob + off_h * stride_doh
        lse_ptr = LSE + (off_b * heads + off_h).to(tl.int64) * seq_q
        delta_ptr = DELTA + (off_b * heads + off_h).to(tl.int64) * seq_q
        dk, dv = _bwd_kv_tiles(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, keep,
                               stride_qn, stride_don, offs_n, offs_d, m_lo, a_end, seq_q, seq_k, shift,
                               sm_scale, qk_scale, cap, HEAD_DIM, BLOCK_M, True, CAUSAL, EVEN_D, HAS_KPM,
                               SCORE_CAP, DOT_F32, INPUT_PRECISION)
        dk, dv = _bwd_kv_tiles(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, keep,
                               stride_qn, stride_don, offs_n, offs_d, a_end, b_end, seq_q, seq_k, shift,
                               sm_scale, qk_scale, cap, HEAD_DIM, BLOCK_M, False, CAUSAL, EVEN_D, HAS_KPM,
                               SCORE_CAP, DOT_F32, INPUT_PRECISION)
        dk, dv = _bwd_kv_tiles(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, keep,
                               stride_qn, stride_don, offs_n, offs_d, b_end, seq_q, seq_q, seq_k, shift,
                               sm_scale, qk_scale, cap, HEAD_DIM, BLOCK_M, True, CAUSAL, EVEN_D, HAS_KPM,
                               SCORE_CAP, DOT_F32, INPUT_PRECISION)

    dk = dk * sm_scale
    tl.store(DK + off_b.to(tl.int64) * stride_dkb + off_hk * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b.to(tl.int64) * stride_dvb + off_hk * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_q_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, kpm_ptr, stride_kn, stride_vn,
                 offs_m, offs_d, lo, hi, seq_k, shift, sm_scale, qk_scale, cap,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, HAS_KPM: tl.constexpr,
                 SCORE_CAP: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles [lo, hi)."""
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
            v = tl.load(v_ptrs, mask=ld_mask, other=0.0)
        else:
            if EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                ld_mask = offs_d[None, :] < HEAD_DIM
                k = tl.load(k_ptrs, mask=ld_mask, other=0.0)
                v = tl.load(v_ptrs, mask=ld_mask, other=0.0)
        s = _mm(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_F32, INPUT_PRECISION)
        if SCORE_CAP == 0:
            p = tl.exp2(s * qk_scale - lse[:, None])
        else:
            s = s * sm_scale
            p = tl.exp2(_cap(s, cap, SCORE_CAP) * 1.4426950408889634 - lse[:, None])
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
            p = tl.where(visible, p, 0.0)
        dp = _mm(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_F32, INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        if SCORE_CAP != 0:
            ds = ds * _cap_grad(s, cap, SCORE_CAP)
        dq = _mm(ds.to(k.dtype), k, dq, DOT_F32, INPUT_PRECISION)
    return dq


@triton.jit
def flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KPM,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_dqb, stride_dqn, stride_dqh,
    stride_kpmb,
    heads, seq_q, seq_k, shift, group,
    sm_scale, cap, tune_q, tune_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, SCORE_CAP: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ for BLOCK_M query rows of one (batch, head); grid (cdiv(seq_q, BLOCK_M), batch * heads)."""
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // heads
    off_h = off_bh % heads
    off_hk = off_h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    row_mask = offs_m[:, None] < seq_q
    if not EVEN_D:
        row_mask = row_mask & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_h * stride_qh
                + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h * stride_doh
                 + offs_m[:, None] * stride_don + offs_d[None, :], mask=row_mask, other=0.0)
    lse = tl.load(LSE + off_bh.to(tl.int64) * seq_q + offs_m, mask=offs_m < seq_q, other=float("inf"))
    delta = tl.load(DELTA + off_bh.to(tl.int64) * seq_q + offs_m, mask=offs_m < seq_q, other=0.0)
    k_ptr = K + off_b.to(tl.int64) * stride_kb + off_hk * stride_kh
    v_ptr = V + off_b.to(tl.int64) * stride_vb + off_hk * stride_vh
    kpm_ptr = KPM + off_b.to(tl.int64) * stride_kpmb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    full_end = (seq_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        first_row_limit = tl.maximum(start_m * BLOCK_M + shift + 1, 0)
        full_end = tl.minimum(full_end, (first_row_limit // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(seq_k, (start_m + 1) * BLOCK_M + shift)
    else:
        hi = seq_k
    dq = _bwd_q_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, kpm_ptr, stride_kn, stride_vn,
                      offs_m, offs_d, 0, full_end, seq_k, shift, sm_scale, qk_scale, cap,
                      HEAD_DIM, BLOCK_N, False, CAUSAL, EVEN_D, HAS_KPM, SCORE_CAP, DOT_F32, INPUT_PRECISION)
    dq = _bwd_q_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, kpm_ptr, stride_kn, stride_vn,
                      offs_m, offs_d, full_end, hi, seq_k, shift, sm_scale, qk_scale, cap,
                      HEAD_DIM, BLOCK_N, True, CAUSAL, EVEN_D, HAS_KPM, SCORE_CAP, DOT_F32, INPUT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + off_b.to(tl.int64) * stride_dqb + off_h * stride_dqh
             + offs_m[:, None] * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_mask)
