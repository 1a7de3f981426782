"""The inner loops of the Triton attention kernels (kernels/attention.py) and the variants'
scores (DESIGN §3: window_size, softcap, ALiBi).

`_key_ranges` / `_variant_key_range` give the key blocks a packed row block can see, so blocks
the causal mask or a window removes entirely are never loaded; `_variant_scores` applies softcap,
ALiBi and the masks to a tile of raw dot products and returns the softcap's derivative for the
backward (1 / cosh^2 from exp(-2|x|), which neither overflows nor cancels where tanh saturates).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LOG2E_C, lse_to_log2, online_softmax_step, packed_rows


@triton.jit
def _varlen_sequence(CU_Q, CU_K, b, drop_seed):
    """Packed sequences: sequence b is rows [cu_q[b], cu_q[b+1]) of q and [cu_k[b], cu_k[b+1])
    of k/v. Returns its first q row, first k row, Tq, Tk and its own Philox key (counters restart
    per sequence)."""
    q0 = tl.load(CU_Q + b).to(tl.int64)
    k0 = tl.load(CU_K + b).to(tl.int64)
    Tq = (tl.load(CU_Q + b + 1) - q0).to(tl.int32)
    Tk = (tl.load(CU_K + b + 1) - k0).to(tl.int32)
    return q0, k0, Tq, Tk, drop_seed + b * 1000003


@triton.jit
def _row_block_pid(pid, BH, Tq, Hkv, G: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Axis-0 pid -> (row0, b, hk) with BH = B * Hkv. Consecutive pids walk the (batch, KV head)
    pairs of one row block; with CAUSAL the row blocks run last-first, so the heaviest start first."""
    m = pid // BH
    bh = (pid % BH).to(tl.int64)
    if CAUSAL:
        m = tl.cdiv(Tq * G, BLOCK_M) - 1 - m
    return m * BLOCK_M, bh // Hkv, bh % Hkv


@triton.jit
def _key_ranges(row0, Tq, Tk, G: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges of the packed rows [row0, row0 + BLOCK_M): (full_end, masked_end).

    Keys [0, full_end) are visible to every row of the block and full_end is a multiple of
    BLOCK_N (no masks needed); keys [full_end, masked_end) need the causal / length mask.
    """
    if CAUSAL:
        t_lo = row0 // G
        t_hi = tl.minimum((row0 + BLOCK_M - 1) // G, Tq - 1)
        lo = tl.minimum(tl.maximum(t_lo + (Tk - Tq) + 1, 0), Tk)
        hi = tl.minimum(tl.maximum(t_hi + (Tk - Tq) + 1, 0), Tk)
    else:
        lo = Tk
        hi = Tk
    full_end = (lo // BLOCK_N) * BLOCK_N
    return full_end, hi


@triton.jit
def _variant_key_range(row0, Tq, Tk, win_left, win_right, G: tl.constexpr, CAUSAL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[start, end) of the keys some packed row of [row0, row0 + BLOCK_M) sees under the causal
    mask and the window (start a multiple of BLOCK_N): key blocks outside are never loaded."""
    t_lo = row0 // G
    t_hi = tl.minimum((row0 + BLOCK_M - 1) // G, Tq - 1)
    start = 0
    if win_left >= 0:
        start = tl.minimum(tl.maximum(t_lo + (Tk - Tq) - win_left, 0), Tk)
    end = Tk
    if win_right >= 0:
        end = tl.minimum(tl.maximum(t_hi + (Tk - Tq) + win_right + 1, 0), Tk)
    if CAUSAL:
        end = tl.minimum(end, tl.minimum(tl.maximum(t_hi + (Tk - Tq) + 1, 0), Tk))
    start = (start // BLOCK_N) * BLOCK_N
    return start, tl.maximum(end, start)


@triton.jit
def _variant_scores(qk, t, offs_n, n_ok, slope, Tq, Tk, scale, softcap, win_left, win_right,
                    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Raw dot products qk (M, N) of query rows t and keys offs_n -> (scores in the log2 domain,
    -inf where not visible; d softcap(s) / ds, the softcap's 1 / cosh^2, ones without softcap).

    score = softcap * tanh(scale * qk / softcap) - slope * |t + Tk - Tq - j| (DESIGN §3)."""
    s = qk * scale
    dcap = tl.full(qk.shape, 1.0, tl.float32)
    if SOFTCAP:
        x = s / softcap
        e = tl.exp(-2.0 * tl.abs(x))  # tanh and 1 / cosh^2 from exp(-2|x|): no overflow, no cancellation
        th = (1.0 - e) / (1.0 + e)
        s = softcap * tl.where(x < 0, -th, th)
        dcap = 4.0 * e / ((1.0 + e) * (1.0 + e))
    diag = t[:, None] + (Tk - Tq)
    if ALIBI:
        dist = (diag - offs_n[None, :]).to(tl.float32)
        s = s - slope[:, None] * tl.abs(dist)
    visible = n_ok[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= diag)
    visible = visible & ((offs_n[None, :] >= diag - win_left) | (win_left < 0))
    visible = visible & ((offs_n[None, :] <= diag + win_right) | (win_right < 0))
    return tl.where(visible, s * LOG2E_C, float("-inf")), dcap


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
    t, start, end, Tq, Tk, qk_scale, offs_d,
    D: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, FOLD_SCALE: tl.constexpr,
    slope=None, scale=1.0, softcap=0.0, win_left=-1, win_right=-1,
    VARIANT: tl.constexpr = False, SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False,
    drop_p=0.0, drop_seed=0, bh0=0, h=None, DROPOUT: tl.constexpr = False,
):
    """Online-softmax update over key blocks [start, end) (start a multiple of BLOCK_N). VARIANT:
    window, softcap or ALiBi (`_variant_scores`), always masked, scores in the log2 domain."""
    d_ok = offs_d < D
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Tk
        kt_ptrs = k_base + offs_n.to(tl.int64)[None, :] * stride_kt + offs_d[:, None] * stride_kd
        v_ptrs = v_base + offs_n.to(tl.int64)[:, None] * stride_vt + offs_d[None, :] * stride_vd
        if MASK:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if VARIANT:
            qk, _ = _variant_scores(qk, t, offs_n, n_ok, slope, Tq, Tk, scale, softcap, win_left, win_right,
                                    CAUSAL, SOFTCAP, ALIBI)
        elif not FOLD_SCALE:
            qk = qk * qk_scale  # log2 domain
        if MASK and not VARIANT:
            visible = n_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= t[:, None] + (Tk - Tq))
            qk = tl.where(visible, qk, float("-inf"))
        if DROPOUT:
            # l sums the undropped P (the lse is the undropped softmax's); acc takes P * keep / (1 - p).
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            pd = p * _dropout_scale(drop_seed, drop_p, bh0, h, t, offs_n, Tq, Tk)
            acc = acc * alpha[:, None] + tl.dot(pd.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        else:
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, qk_scale, v, DOT_PRECISION, FOLD_SCALE)
    return acc, l_i, m_i


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base,
    stride_qt, stride_qh, stride_qd, stride_dot, stride_doh, stride_dod, stride_lh, stride_lt,
    offs_n, start, end, Tq, Tk, qk_scale, offs_d,
    G: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    slope_base=None, stride_ah=0, scale=1.0, softcap=0.0, win_left=-1, win_right=-1,
    VARIANT: tl.constexpr = False, SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False,
    drop_p=0.0, drop_seed=0, bh0=0, DROPOUT: tl.constexpr = False,
):
    """Accumulate dK, dV of one key block over the packed rows [start, end)."""
    d_ok = offs_d < D
    for r0 in range(start, end, BLOCK_M):
        t64, h, row_ok = packed_rows(r0, 0, Tq, G, BLOCK_M)  # bases already point at head hk * G
        t = t64
        q = tl.load(q_base + t64[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_base + t64[:, None] * stride_dot + h[:, None] * stride_doh + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_base + h * stride_lh + t64 * stride_lt, mask=row_ok, other=float("-inf"))
        delta = tl.load(delta_base + h * stride_lh + t64 * stride_lt, mask=row_ok, other=0.0)
        lse2 = lse_to_log2(lse)  # rows that saw no key (or padding rows) get P = 0
        if VARIANT:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            slope = tl.zeros([BLOCK_M], dtype=tl.float32)
            if ALIBI:
                slope = tl.load(slope_base + h * stride_ah, mask=row_ok, other=0.0)
            s2, dcap = _variant_scores(qk, t, offs_n, offs_n < Tk, slope, Tq, Tk, scale, softcap, win_left, win_right,
                                       CAUSAL, SOFTCAP, ALIBI)
            pt = tl.trans(tl.math.exp2(s2 - lse2[:, None]))
            dcapt = tl.trans(dcap)
            if DROPOUT:
                dropt = tl.trans(_dropout_scale(drop_seed, drop_p, bh0, h, t, offs_n, Tq, Tk))
        else:
            qkt = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            pt = tl.math.exp2(qkt * qk_scale - lse2[None, :])
            if MASK:
                if CAUSAL:
                    pt = tl.where(offs_n[:, None] <= t[None, :] + (Tk - Tq), pt, 0.0)
        if DROPOUT:
            dv += tl.dot((pt * dropt).to(do.dtype), do, input_precision=DOT_PRECISION)
        else:
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            dpt = dpt * dropt
        dst = pt * (dpt - delta[None, :])
        if VARIANT:
            dst = dst * dcapt
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
    t, start, end, Tq, Tk, qk_scale, offs_d,
    D: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    slope=None, scale=1.0, softcap=0.0, win_left=-1, win_right=-1,
    VARIANT: tl.constexpr = False, SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False,
    drop_p=0.0, drop_seed=0, bh0=0, h=None, DROPOUT: tl.constexpr = False,
):
    """Accumulate dQ of one packed row block over key blocks [start, end)."""
    d_ok = offs_d < D
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Tk
        n64 = offs_n.to(tl.int64)
        k_ptrs = k_base + n64[:, None] * stride_kt + offs_d[None, :] * stride_kd
        vt_ptrs = v_base + n64[None, :] * stride_vt + offs_d[:, None] * stride_vd
        if MASK:
            k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            vt = tl.load(vt_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            vt = tl.load(vt_ptrs, mask=d_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if VARIANT:
            s2, dcap = _variant_scores(qk, t, offs_n, n_ok, slope, Tq, Tk, scale, softcap, win_left, win_right,
                                       CAUSAL, SOFTCAP, ALIBI)
            p = tl.math.exp2(s2 - lse2[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])
            if MASK:
                visible = n_ok[None, :]
                if CAUSAL:
                    visible = visible & (offs_n[None, :] <= t[:, None] + (Tk - Tq))
                p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        if DROPOUT:
            dp = dp * _dropout_scale(drop_seed, drop_p, bh0, h, t, offs_n, Tq, Tk)
        ds = p * (dp - delta[:, None])
        if VARIANT:
            ds = ds * dcap
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


def _variant_launch_args(q, window_size, softcap, alibi_slopes, dropout=None):
    """Kernel arguments and constexprs of the variants (DESIGN §3). dropout: None (a kernel
    without it) or (dropout_p, seed), which adds (dropout_p, seed) to the arguments and DROPOUT."""
    left, right = window_size
    alibi = alibi_slopes is not None
    if alibi:
        a = alibi_slopes.to(device=q.device, dtype=torch.float32)
        stride_ab, stride_ah = (0, a.stride(0)) if a.dim() == 1 else a.stride()
    else:
        a, stride_ab, stride_ah = q.new_empty(1, dtype=torch.float32), 0, 0
    variant = left >= 0 or right >= 0 or softcap > 0 or alibi
    args = (a, stride_ab, stride_ah, float(softcap) if softcap > 0 else 1.0, int(left), int(right))
    flags = dict(VARIANT=variant, SOFTCAP=softcap > 0, ALIBI=alibi)
    if dropout is not None:
        p, seed = dropout
        on = p > 0
        args += (float(p) if on else 0.0, int(seed) % (2**62) if on else 0)
        flags.update(VARIANT=variant or on, DROPOUT=on)
    return args, flags


@triton.jit
def _dropout_scale(seed, p, bh0, h, t, offs_n, Tq, Tk):
    """keep / (1 - p) for the (rows, keys) tile: keep = rand >= p, with Philox counters
    ((b * Hq + h) * Tq + t) * Tk + j (64-bit), so the backward draws the same mask again."""
    off = ((bh0 + h[:, None]) * Tq + t[:, None]) * Tk + offs_n[None, :].to(tl.int64)
    r = tl.rand(seed, off)
    return tl.where(r >= p, 1.0 / (1.0 - p), 0.0)
