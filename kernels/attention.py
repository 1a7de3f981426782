"""Triton MQA/GQA attention: forward (online softmax, exp2) and backward (dQ, dK, dV).

Layout is BSHD: q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D), any strides; query head h reads KV head
h // G with G = Hq // Hkv. Every program works on one KV head and packs the G query heads of
that KV head into the M dimension of its tiles: packed row r of KV head hk is query position
t = r // G of query head hk * G + r % G, so each K/V tile is loaded once for the whole group
and K/V are never expanded.

Causal masking is bottom-right aligned (query t sees key j iff j <= t + Tk - Tq). The key loop
of a row block is split in two: key blocks every row of the block sees in full run without
masks, the diagonal band (and the ragged last block) runs with masks. Rows that see no key
give zeros and lse = -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_blocks import (
    _dkdv_inner,
    _dq_inner,
    _fwd_inner,
    _key_ranges,
    _row_block_pid,
    _variant_key_range,
    _variant_launch_args,
    _varlen_sequence,
)
from .common import (
    LOG2E,
    autotune_configs,
    block_d,
    dot_flags,
    elem_bytes,
    lse_to_log2,
    packed_rows,
    sm_count,
    softmax_epilogue,
    store_dtype,
)


def _pruner(fp32_configs: list[tuple[int, int, int, int]]):
    """Config pruning for one kernel: 16-bit inputs keep the shared list, fp32 inputs (tf32x3 dots
    hold hi/lo halves of every tile, about twice the registers) only `fp32_configs`; then drop
    what cannot fit in shared memory (about 200 KB). Keeps at least one."""
    fp32_set = set(fp32_configs)

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        elem = elem_bytes(args["DOT_PRECISION"])

        def key(c):
            return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages

        fits = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            if (key(c) in fp32_set) != (elem == 4) and len(configs) > 1:
                continue
            if c.num_stages * (bm + bn) * args["BLOCK_D"] * elem <= 200 * 1024:
                fits.append(c)
        return fits or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]

    return prune


# Autotune configs (BLOCK_M, BLOCK_N, num_warps, num_stages). tests/kernels/triton_compile_check.py
# compiles every one for sm_90 and fails on spills: the forward's 128x64 with 4 warps and the dK/dV
# kernel's 64x64 / 64x32 with 4 warps and 128x64 with 8 warps spill at D = 96 and 128, so they are gone.
FWD_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)]
DKDV_CONFIGS = [(32, 64, 4, 2), (32, 32, 4, 1)]
DQ_CONFIGS = [(64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 1), (128, 64, 8, 2)]
# fp32 inputs (tf32x3 keeps hi/lo halves of every tile): the only spill-free tiles at D = 96 / 128
# (32x32 and 64x32 with 8 warps spill there too).
FWD_FP32 = [(16, 32, 4, 1)]
DKDV_FP32 = [(32, 16, 4, 1)]
DQ_FP32 = [(16, 32, 4, 1)]
# Keys of the autotune cache: power-of-two buckets of the lengths, never the raw lengths.
TUNE_KEY = ["tq_bucket", "tk_bucket", "G", "BLOCK_D", "CAUSAL", "DOT_PRECISION"]


@triton.autotune(configs=autotune_configs(("BLOCK_M", "BLOCK_N"), FWD_CONFIGS + FWD_FP32, (128, 128)), key=TUNE_KEY,
                 prune_configs_by={"early_config_prune": _pruner(FWD_FP32)})
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lb, stride_lh, stride_lt,
    Tq, Tk, BH, Hkv, qk_scale, tq_bucket, tk_bucket,
    Alibi, stride_ab, stride_ah, scale, softcap, win_left, win_right, drop_p, drop_seed, CU_Q, CU_K,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, FOLD_SCALE: tl.constexpr,
    VARIANT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (packed row block, batch * KV head), both on axis 0.

    Q (B, Tq, Hq, D), K/V (B, Tk, Hkv, D) -> Out (B, Tq, Hq, D), Lse (B, Hq, Tq) fp32 natural log.
    qk_scale = scale * log2(e).
    """
    row0, b, hk = _row_block_pid(tl.program_id(0), BH, Tq, Hkv, G, CAUSAL, BLOCK_M)
    if VARLEN:
        # Batch strides are 0; Tq, Tk arrive as the maxima and become this sequence's.
        q0, k0, Tq, Tk, drop_seed = _varlen_sequence(CU_Q, CU_K, b, drop_seed)
        Tk = tl.where(row0 < Tq * G, Tk, 0)  # a row block past this sequence's rows loops over no key
        Q += q0 * stride_qt
        Out += q0 * stride_ot
        Lse += q0 * stride_lt
        K += k0 * stride_kt
        V += k0 * stride_vt
    t, h, row_ok = packed_rows(row0, hk, Tq, G, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q_ptrs = Q + b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if VARIANT:
        slope = tl.zeros([BLOCK_M], dtype=tl.float32)
        if ALIBI:
            slope = tl.load(Alibi + b * stride_ab + h * stride_ah, mask=row_ok, other=0.0)
        start, end = _variant_key_range(row0, Tq, Tk, win_left, win_right, G, CAUSAL, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
            t, start, end, Tq, Tk, qk_scale, offs_d, D, CAUSAL, True, UPCAST, DOT_PRECISION, BLOCK_N, False,
            slope, scale, softcap, win_left, win_right, True, SOFTCAP, ALIBI,
            drop_p, drop_seed, b * Hkv * G, h, DROPOUT,
        )
    else:
        full_end, masked_end = _key_ranges(row0, Tq, Tk, G, CAUSAL, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
            t, 0, full_end, Tq, Tk, qk_scale, offs_d, D, CAUSAL, False, UPCAST, DOT_PRECISION, BLOCK_N, FOLD_SCALE,
        )
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
            t, full_end, masked_end, Tq, Tk, qk_scale, offs_d, D, CAUSAL, True, UPCAST, DOT_PRECISION, BLOCK_N, FOLD_SCALE,
        )

    out, lse = softmax_epilogue(acc, l_i, m_i)
    o_ptrs = Out + b * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b * stride_lb + h * stride_lh + t * stride_lt, lse, mask=row_ok)


@triton.autotune(configs=autotune_configs(("BLOCK_M", "BLOCK_N"), DKDV_CONFIGS + DKDV_FP32, (128, 128)), key=TUNE_KEY,
                 prune_configs_by={"early_config_prune": _pruner(DKDV_FP32)})
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_lb, stride_lh, stride_lt,
    stride_dks, stride_dkb, stride_dkt, stride_dkh, stride_dkd,
    stride_dvs, stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    Tq, Tk, BH, Hkv, row_splits, qk_scale, scale, tq_bucket, tk_bucket,
    Alibi, stride_ab, stride_ah, softcap, win_left, win_right, drop_p, drop_seed, CU_Q, CU_K,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARIANT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (key block, batch * KV head, row split): dK, dV summed over the G query
    heads and over the split's share of the packed rows.

    Q, DO (B, Tq, Hq, D); K, V (B, Tk, Hkv, D); Lse, Delta (B, Hq, Tq) fp32 with
    Delta = rowsum(dO * O) - dLse -> DK, DV (row_splits, B, Tk, Hkv, D): with row_splits > 1 the
    launcher sums the fp32 partials (MQA has few key blocks, so the rows are split to fill the SMs).
    """
    # Axis 0: consecutive pids walk the row splits, then the (batch, KV head) pairs of one key
    # block; the first key blocks (the heaviest under the causal mask) start first.
    pid = tl.program_id(0)
    rs = pid % row_splits
    rest = pid // row_splits
    bh = (rest % BH).to(tl.int64)
    b = bh // Hkv
    hk = bh % Hkv
    n0 = (rest // BH) * BLOCK_N
    if VARLEN:
        # Batch strides are 0; Tq, Tk arrive as the maxima and become this sequence's.
        q0, k0, Tq, Tk, drop_seed = _varlen_sequence(CU_Q, CU_K, b, drop_seed)
        Tq = tl.where(n0 < Tk, Tq, 0)  # a key block past this sequence's keys loops over no row
        Q += q0 * stride_qt
        DO += q0 * stride_dot
        Lse += q0 * stride_lt
        Delta += q0 * stride_lt
        K += k0 * stride_kt
        V += k0 * stride_vt
        DK += k0 * stride_dkt
        DV += k0 * stride_dvt
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Tk
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    n64 = offs_n.to(tl.int64)
    k = tl.load(K + b * stride_kb + hk * stride_kh + n64[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + n64[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    q_base = Q + b * stride_qb + hk * G * stride_qh
    do_base = DO + b * stride_dob + hk * G * stride_doh
    lse_base = Lse + b * stride_lb + hk * G * stride_lh
    delta_base = Delta + b * stride_lb + hk * G * stride_lh
    R = Tq * G
    if CAUSAL:
        # Rows before t = n0 - (Tk - Tq) see no key of this block; rows from t = n_last - (Tk - Tq)
        # on see all of it.
        n_last = tl.minimum(n0 + BLOCK_N, Tk) - 1
        t_first = tl.maximum(n0 - (Tk - Tq), 0)
        t_full = tl.minimum(tl.maximum(n_last - (Tk - Tq), 0), Tq)
        start = tl.minimum((t_first * G // BLOCK_M) * BLOCK_M, R)
        full_start = tl.maximum(tl.minimum(tl.cdiv(t_full * G, BLOCK_M) * BLOCK_M, R), start)
    else:
        start = 0
        full_start = 0
    # This split's rows: [r_lo, r_hi), a multiple of BLOCK_M long.
    chunk = tl.cdiv(tl.cdiv(R, row_splits), BLOCK_M) * BLOCK_M
    r_lo = rs * chunk
    r_hi = tl.minimum(r_lo + chunk, R)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if VARIANT:
        # Rows that see some key of [n0, n_end): t + off + right >= n0 and t + off - left < n_end.
        n_end = tl.minimum(n0 + BLOCK_N, Tk)
        t_first = 0
        if win_right >= 0:
            t_first = tl.maximum(n0 - (Tk - Tq) - win_right, 0)
        if CAUSAL:
            t_first = tl.maximum(t_first, n0 - (Tk - Tq))
        t_first = tl.minimum(t_first, Tq)
        t_end = Tq
        if win_left >= 0:
            t_end = tl.minimum(tl.maximum(n_end - (Tk - Tq) + win_left, 0), Tq)
        v_start = (t_first * G // BLOCK_M) * BLOCK_M
        v_end = tl.maximum(t_end * G, v_start)
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qt, stride_qh, stride_qd, stride_dot, stride_doh, stride_dod, stride_lh, stride_lt,
            offs_n, tl.maximum(v_start, r_lo), tl.minimum(v_end, r_hi), Tq, Tk, qk_scale, offs_d,
            G, D, CAUSAL, True, UPCAST, DOT_PRECISION, BLOCK_M,
            Alibi + b * stride_ab + hk * G * stride_ah, stride_ah, scale, softcap, win_left, win_right,
            True, SOFTCAP, ALIBI, drop_p, drop_seed, (b * Hkv + hk) * G, DROPOUT,
        )
    else:
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qt, stride_qh, stride_qd, stride_dot, stride_doh, stride_dod, stride_lh, stride_lt,
            offs_n, tl.maximum(start, r_lo), tl.minimum(full_start, r_hi), Tq, Tk, qk_scale, offs_d,
            G, D, CAUSAL, True, UPCAST, DOT_PRECISION, BLOCK_M,
        )
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qt, stride_qh, stride_qd, stride_dot, stride_doh, stride_dod, stride_lh, stride_lt,
            offs_n, tl.maximum(full_start, r_lo), r_hi, Tq, Tk, qk_scale, offs_d,
            G, D, CAUSAL, False, UPCAST, DOT_PRECISION, BLOCK_M,
        )
    dk = dk * scale
    DK += rs.to(tl.int64) * stride_dks
    DV += rs.to(tl.int64) * stride_dvs
    tl.store(DK + b * stride_dkb + hk * stride_dkh + n64[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + n64[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=autotune_configs(("BLOCK_M", "BLOCK_N"), DQ_CONFIGS + DQ_FP32, (128, 128)), key=TUNE_KEY,
                 prune_configs_by={"early_config_prune": _pruner(DQ_FP32)})
@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_lb, stride_lh, stride_lt,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    Tq, Tk, BH, Hkv, qk_scale, scale, tq_bucket, tk_bucket,
    Alibi, stride_ab, stride_ah, softcap, win_left, win_right, drop_p, drop_seed, CU_Q, CU_K,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARIANT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (packed row block, batch * KV head): dQ (B, Tq, Hq, D), no atomics."""
    row0, b, hk = _row_block_pid(tl.program_id(0), BH, Tq, Hkv, G, CAUSAL, BLOCK_M)
    if VARLEN:
        # Batch strides are 0; Tq, Tk arrive as the maxima and become this sequence's.
        q0, k0, Tq, Tk, drop_seed = _varlen_sequence(CU_Q, CU_K, b, drop_seed)
        Tk = tl.where(row0 < Tq * G, Tk, 0)  # a row block past this sequence's rows loops over no key
        Q += q0 * stride_qt
        DO += q0 * stride_dot
        Lse += q0 * stride_lt
        Delta += q0 * stride_lt
        DQ += q0 * stride_dqt
        K += k0 * stride_kt
        V += k0 * stride_vt
    t64, h, row_ok = packed_rows(row0, hk, Tq, G, BLOCK_M)
    t = t64
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    qd_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + t64[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=qd_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + t64[:, None] * stride_dot + h[:, None] * stride_doh + offs_d[None, :] * stride_dod,
                 mask=qd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + t64 * stride_lt, mask=row_ok, other=float("-inf"))
    delta = tl.load(Delta + b * stride_lb + h * stride_lh + t64 * stride_lt, mask=row_ok, other=0.0)
    lse2 = lse_to_log2(lse)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if VARIANT:
        slope = tl.zeros([BLOCK_M], dtype=tl.float32)
        if ALIBI:
            slope = tl.load(Alibi + b * stride_ab + h * stride_ah, mask=row_ok, other=0.0)
        start, end = _variant_key_range(row0, Tq, Tk, win_left, win_right, G, CAUSAL, BLOCK_M, BLOCK_N)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                       t, start, end, Tq, Tk, qk_scale, offs_d, D, CAUSAL, True, UPCAST, DOT_PRECISION, BLOCK_N,
                       slope, scale, softcap, win_left, win_right, True, SOFTCAP, ALIBI,
                       drop_p, drop_seed, b * Hkv * G, h, DROPOUT)
    else:
        full_end, masked_end = _key_ranges(row0, Tq, Tk, G, CAUSAL, BLOCK_M, BLOCK_N)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                       t, 0, full_end, Tq, Tk, qk_scale, offs_d, D, CAUSAL, False, UPCAST, DOT_PRECISION, BLOCK_N)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                       t, full_end, masked_end, Tq, Tk, qk_scale, offs_d, D, CAUSAL, True, UPCAST, DOT_PRECISION, BLOCK_N)
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + t64[:, None] * stride_dqt + h[:, None] * stride_dqh + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=qd_mask)


# --------------------------------------------------------------------------------------------
# Launchers.
# --------------------------------------------------------------------------------------------


def _shapes(q, k, varlen):
    """(B, Tq, Tk, Hq, Hkv, D, batch-stride fix, cu_q, cu_k) of a batched or a packed call. Packed:
    q (total_q, Hq, D) runs as (1, total_q, Hq, D) views with batch strides 0, B sequences."""
    if varlen is None:
        B, Tq, Hq, D = q.shape
        return B, Tq, k.shape[1], Hq, k.shape[2], D, (lambda x: x.stride()), q.new_empty(1, dtype=torch.int32), None
    cu_q, cu_k, max_q, max_k = varlen
    st = lambda x: (0,) + tuple(x.stride()[1:])  # noqa: E731  (the (1, ...) views: batch stride 0)
    return cu_q.shape[0] - 1, max_q, max_k, q.shape[2], k.shape[2], q.shape[3], st, cu_q, cu_k


def attention_forward(q, k, v, causal: bool, scale: float, window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                      dropout_p: float = 0.0, dropout_seed=None, varlen=None):
    """q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D) -> out (B, Tq, Hq, D) in q.dtype, lse (B, Hq, Tq) fp32.

    window_size, softcap, alibi_slopes, dropout_p as in DESIGN §3 (key blocks no row of a block
    can see are skipped; the dropout mask comes from Philox counters seeded with dropout_seed,
    drawn again in the backward, never stored). varlen = (cu_seqlens_q, cu_seqlens_k, max_q,
    max_k) with q, k, v given as (1, total, H, D) views: every sequence in this one launch, out
    (1, total_q, Hq, D) and lse (1, Hq, total_q)."""
    B, Tq, Tk, Hq, Hkv, D, st, cu_q, cu_k = _shapes(q, k, varlen)
    cu_k = cu_q if cu_k is None else cu_k
    G = Hq // Hkv
    upcast, precision = dot_flags(q.dtype)
    out = torch.empty(q.shape, dtype=store_dtype(q.dtype, upcast), device=q.device)
    lse = torch.empty((q.shape[0], Hq, q.shape[1]), dtype=torch.float32, device=q.device)

    def grid(meta):
        return (triton.cdiv(Tq * G, meta["BLOCK_M"]) * B * Hkv,)

    (a, sab, sah, cap, left, right, dp, ds), flags = _variant_launch_args(
        q, window_size, softcap, alibi_slopes, (dropout_p, dropout_seed))
    _attention_fwd_kernel[grid](
        q, k, v, out, lse,
        *st(q), *st(k), *st(v), *st(out), *st(lse),
        Tq, Tk, B * Hkv, Hkv, scale * LOG2E, triton.next_power_of_2(Tq), triton.next_power_of_2(Tk),
        a, sab, sah, scale, cap, left, right, dp, ds, cu_q, cu_k, VARLEN=varlen is not None,
        G=G, D=D, BLOCK_D=block_d(D), CAUSAL=causal, UPCAST=upcast, DOT_PRECISION=precision,
        FOLD_SCALE=scale > 0 and not flags["VARIANT"], **flags,
    )
    return out.to(q.dtype), lse


# Packed rows per dK/dV row split, at least: below this a split costs more than it saves.
MIN_ROWS_PER_SPLIT = 256
MAX_ROW_SPLITS = 16


def dkdv_row_splits(kv_programs: int, R: int, sms: int) -> int:
    """Row splits of the dK/dV launch: about two waves of programs over `sms` SMs when the key
    blocks alone are too few (MQA, small batch), each split at least MIN_ROWS_PER_SPLIT rows."""
    want = triton.cdiv(2 * sms, max(1, kv_programs))
    return max(1, min(want, triton.cdiv(R, MIN_ROWS_PER_SPLIT), MAX_ROW_SPLITS))


def attention_backward(dout, q, k, v, lse, delta, causal: bool, scale: float, window_size=(-1, -1), softcap: float = 0.0,
                       alibi_slopes=None, dropout_p: float = 0.0, dropout_seed=None, varlen=None):
    """Gradients of attention: dout (B, Tq, Hq, D), lse/delta (B, Hq, Tq) fp32 -> (dq, dk, dv).
    varlen as in `attention_forward` (all tensors as (1, total, ...) views)."""
    B, Tq, Tk, Hq, Hkv, D, st, cu_q, cu_k = _shapes(q, k, varlen)
    cu_k = cu_q if cu_k is None else cu_k
    G = Hq // Hkv
    lse = lse.contiguous()
    delta = delta.to(torch.float32).contiguous()
    upcast, precision = dot_flags(q.dtype)
    dq = torch.empty(q.shape, dtype=store_dtype(q.dtype, upcast), device=q.device)
    dk = torch.empty(k.shape, dtype=store_dtype(k.dtype, upcast), device=k.device)
    dv = torch.empty(v.shape, dtype=store_dtype(v.dtype, upcast), device=v.device)
    var_args, flags = _variant_launch_args(q, window_size, softcap, alibi_slopes, (dropout_p, dropout_seed))
    common = dict(G=G, D=D, BLOCK_D=block_d(D), CAUSAL=causal, UPCAST=upcast, DOT_PRECISION=precision,
                  VARLEN=varlen is not None, **flags)
    var_args = var_args + (cu_q, cu_k)
    buckets = (triton.next_power_of_2(Tq), triton.next_power_of_2(Tk))

    splits = dkdv_row_splits(B * Hkv * triton.cdiv(Tk, max(c[1] for c in DKDV_CONFIGS)), Tq * G, sm_count(q.device))
    if splits > 1:
        dk_part = torch.empty((splits,) + tuple(k.shape), dtype=torch.float32, device=k.device)
        dv_part = torch.empty((splits,) + tuple(v.shape), dtype=torch.float32, device=v.device)
    else:
        dk_part, dv_part = dk.unsqueeze(0), dv.unsqueeze(0)

    def grid_kv(meta):
        return (triton.cdiv(Tk, meta["BLOCK_N"]) * B * Hkv * splits,)

    _attention_bwd_dkdv_kernel[grid_kv](
        q, k, v, dout, lse, delta, dk_part, dv_part,
        *st(q), *st(k), *st(v), *st(dout), *st(lse), dk_part.stride(0), *st(dk_part[0]), dv_part.stride(0), *st(dv_part[0]),
        Tq, Tk, B * Hkv, Hkv, splits, scale * LOG2E, scale, *buckets, *var_args, **common,
    )
    if splits > 1:
        dk = dk_part.sum(0).to(dk.dtype)
        dv = dv_part.sum(0).to(dv.dtype)

    def grid_q(meta):
        return (triton.cdiv(Tq * G, meta["BLOCK_M"]) * B * Hkv,)

    _attention_bwd_dq_kernel[grid_q](
        q, k, v, dout, lse, delta, dq,
        *st(q), *st(k), *st(v), *st(dout), *st(lse), *st(dq),
        Tq, Tk, B * Hkv, Hkv, scale * LOG2E, scale, *buckets, *var_args, **common,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
