"""Triton decoding attention with the cache append fused into the attention pass (split-KV).

q (B, Tq, Hq, D); k_cache, v_cache (B, S, Hkv, D); optional new k, v (B, Tq, Hkv, D);
cache_seqlens int32 (B,) on the device. Sequence b attends keys [0, Lk_b) with
Lk_b = clamp(L_b + Tq, 0, S) (or clamp(L_b, 0, S) without new rows), causal bottom-right per
sequence: query t sees key j iff j <= t + Lk_b - Tq. Key j in [L_b, L_b + Tq) is new row j - L_b.

At most two launches, in stream order:

1. `_decode_split_kernel`: one program per (batch * KV head, packed row block, split), all on
   grid axis 0. The G query heads (x Tq rows) of a KV head are packed into the M dimension of
   `tl.dot` (>= 16 rows), so MQA/GQA decoding runs on tensor cores and reads each K/V tile once
   per group. The splits partition the *live* keys [0, Lk_b): each program reads cache_seqlens[b]
   and takes its slice of cdiv(Lk_b, NUM_SPLITS) keys (rounded up to SPLIT_ALIGN), so every
   active program gets an equal share whatever the capacity S. Keys below L_b come from the
   cache; keys from L_b on come straight from k / v, and the program whose slice holds them (row
   block 0) writes them into the caches, masked to [0, S). No program reads a cache row another
   program writes, so the append needs no launch of its own. Splits past the live length write
   nothing.
2. `_combine_kernel` merges the active splits' partials, weighted by exp(lse_split - lse); it
   recomputes the active split count from cache_seqlens. With one split (static shapes say so)
   the split kernel writes the final output and this launch is skipped.

The split count depends only on static shapes (B, Hkv, Tq * G, S) and `sm_count`, so the launch
is the same for every step and works under torch.compile and CUDA graph capture. The split kernel
is autotuned on its first call per (capacity bucket, row block, head dim): make one call before
capturing a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention_blocks import _variant_launch_args, _variant_scores
from .common import (
    LOG2E,
    autotune_configs,
    block_d,
    dot_flags,
    elem_bytes,
    online_softmax_step,
    packed_rows,
    sm_count,
    softmax_epilogue,
    split_pid,
    store_dtype,
)

# A split's slice of the live keys is a multiple of this many rows (the smallest BLOCK_N).
SPLIT_ALIGN = 32
# Programs wanted per launch, in waves over the SMs.
WAVES = 2
# Packed rows per combine program (its fp32 accumulator stays small at D = 128).
COMBINE_M = 16
# Decode configs (BLOCK_N, num_warps, num_stages); the compile check keeps this list spill-free.
DECODE_CONFIGS = [(64, 4, 2), (64, 4, 3), (128, 8, 2), (32, 4, 2)]  # 128 x 4 warps spills


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose K/V stages cannot fit in about 200 KB of shared memory. Keeps at least one."""
    args = {**named_args, **kwargs}
    elem = elem_bytes(args["DOT_PRECISION"])
    fits = [c for c in configs if c.num_stages * 2 * c.kwargs["BLOCK_N"] * args["BLOCK_D"] * elem <= 200 * 1024]
    if elem == 4:  # fp32 tiles (tf32x3 keeps hi/lo halves): only 32-key tiles stay spill-free
        fits = [c for c in fits if c.kwargs["BLOCK_N"] <= 32]
    return fits or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.num_stages)]


@triton.jit
def _live_range(split, Lk, NUM_SPLITS: tl.constexpr, SPLIT_ALIGN_: tl.constexpr):
    """Keys [start, end) of `split` among the live keys [0, Lk), and the active split count
    (at least 1: with no live key, split 0 still writes the zero output and -inf LSE)."""
    chunk = tl.cdiv(tl.cdiv(Lk, NUM_SPLITS), SPLIT_ALIGN_) * SPLIT_ALIGN_
    chunk = tl.maximum(chunk, SPLIT_ALIGN_)
    start = split * chunk
    end = tl.minimum(start + chunk, Lk)
    return start, end, tl.maximum(tl.cdiv(Lk, chunk), 1)


@triton.jit
def _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, n_ok, offs_n, t, Lk, Tq, qk_scale,
                  d_ok, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  FOLD_SCALE: tl.constexpr, slope=None, scale=1.0, softcap=0.0, win_left=-1, win_right=-1,
                  VARIANT: tl.constexpr = False, SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False):
    """One key block: K^T tile at k_ptrs (D, N), V tile at v_ptrs (N, D), keys masked by n_ok.
    VARIANT: window, softcap, ALiBi with this sequence's offset Lk - Tq (`_variant_scores`)."""
    kt = tl.load(k_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
    v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
    if VARIANT:
        qk, _ = _variant_scores(qk, t, offs_n, n_ok, slope, Tq, Lk, scale, softcap, win_left, win_right,
                                CAUSAL, SOFTCAP, ALIBI)
        return online_softmax_step(acc, l_i, m_i, qk, qk_scale, v, DOT_PRECISION, False)
    if not FOLD_SCALE:
        qk = qk * qk_scale
    visible = n_ok[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= t[:, None] + (Lk - Tq))
    qk = tl.where(visible, qk, float("-inf"))
    return online_softmax_step(acc, l_i, m_i, qk, qk_scale, v, DOT_PRECISION, FOLD_SCALE)


@triton.autotune(
    configs=autotune_configs(("BLOCK_N",), DECODE_CONFIGS, (64,)),
    key=["s_bucket", "BLOCK_M", "G", "BLOCK_D", "CAUSAL", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _decode_split_kernel(
    Q, KC, VC, K, V, SEQLENS, Out, Lse,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_os, stride_ob, stride_ot, stride_oh, stride_od,
    stride_ls, stride_lb, stride_lh, stride_lt,
    Tq, S, Hkv, qk_scale, s_bucket,
    Alibi, stride_ab, stride_ah, scale, softcap, win_left, win_right,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HAS_NEW: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FOLD_SCALE: tl.constexpr, SPLIT_ALIGN_: tl.constexpr,
    VARIANT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """pid = (bh * row_blocks + m) * NUM_SPLITS + split; packed row r = t * G + g.

    Writes the split's normalised output to Out[split] (.., Tq, Hq, D) and its LSE (natural log)
    to Lse[split] (.., Hq, Tq); with HAS_NEW, appends K/V (B, Tq, Hkv, D) into KC/VC at L_b.
    """
    n_m = tl.cdiv(Tq * G, BLOCK_M)
    bhm, split = split_pid(tl.program_id(0), NUM_SPLITS)
    bh, pid_m = split_pid(bhm, n_m)
    b = bh // Hkv
    hk = bh % Hkv
    L = tl.load(SEQLENS + b)
    if HAS_NEW:
        Lk = tl.minimum(tl.maximum(L + Tq, 0), S)
        L_cache = tl.minimum(tl.maximum(L, 0), S)  # keys below come from the cache, above from K/V
    else:
        Lk = tl.minimum(tl.maximum(L, 0), S)
        L_cache = Lk
    # A split past the live keys (split >= n_active) has start >= end: it loops over nothing and stores nothing.
    start, end, n_active = _live_range(split, Lk, NUM_SPLITS, SPLIT_ALIGN_)
    active = split < n_active

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_nb = tl.arange(0, BLOCK_N)
    kc_base = KC + b * stride_kcb + hk * stride_kch
    vc_base = VC + b * stride_vcb + hk * stride_vch
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if HAS_NEW:
        if pid_m == 0:
            # This split owns the new rows in its slice: write them (rows outside [0, S) are never in a slice).
            for n0 in range(tl.maximum(start, L_cache), end, BLOCK_N):
                pos = (n0 + offs_nb).to(tl.int64)
                m2 = (pos < end)[:, None] & d_ok[None, :]
                src = (pos - L)[:, None]
                kn = tl.load(k_base + src * stride_kt + offs_d[None, :] * stride_kd, mask=m2)
                vn = tl.load(v_base + src * stride_vt + offs_d[None, :] * stride_vd, mask=m2)
                tl.store(kc_base + pos[:, None] * stride_kcs + offs_d[None, :] * stride_kcd,
                         kn.to(KC.dtype.element_ty), mask=m2)
                tl.store(vc_base + pos[:, None] * stride_vcs + offs_d[None, :] * stride_vcd,
                         vn.to(VC.dtype.element_ty), mask=m2)

    t, h, row_ok = packed_rows(pid_m * BLOCK_M, hk, Tq, G, BLOCK_M)
    row_ok = row_ok & active
    q = tl.load(Q + b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if CAUSAL:
        # The last row of the block sees keys up to t_hi + Lk - Tq.
        t_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, Tq - 1)
        end = tl.minimum(end, t_hi + Lk - Tq + 1)
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if VARIANT:
        # The window's bounds for this row block: keys outside are never loaded (the split still
        # writes its zero output and -inf LSE, which the combine weighs by 0).
        t_lo = (pid_m * BLOCK_M) // G
        t_top = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, Tq - 1)
        if win_left >= 0:
            start = tl.maximum(start, t_lo + Lk - Tq - win_left)
        if win_right >= 0:
            end = tl.minimum(end, t_top + Lk - Tq + win_right + 1)
        if ALIBI:
            slope = tl.load(Alibi + b * stride_ab + h * stride_ah, mask=row_ok, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    cache_end = tl.minimum(end, L_cache)
    for n0 in range(start, cache_end, BLOCK_N):
        offs_n = n0 + offs_nb
        n64 = offs_n.to(tl.int64)
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q,
            kc_base + n64[None, :] * stride_kcs + offs_d[:, None] * stride_kcd,
            vc_base + n64[:, None] * stride_vcs + offs_d[None, :] * stride_vcd,
            offs_n < cache_end, offs_n, t, Lk, Tq, qk_scale, d_ok, CAUSAL, UPCAST, DOT_PRECISION, FOLD_SCALE,
            slope, scale, softcap, win_left, win_right, VARIANT, SOFTCAP, ALIBI,
        )
    if HAS_NEW:
        for n0 in range(tl.maximum(start, L_cache), end, BLOCK_N):
            offs_n = n0 + offs_nb
            src = (offs_n - L).to(tl.int64)
            acc, l_i, m_i = _attend_block(
                acc, l_i, m_i, q,
                k_base + src[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                v_base + src[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                offs_n < end, offs_n, t, Lk, Tq, qk_scale, d_ok, CAUSAL, UPCAST, DOT_PRECISION, FOLD_SCALE,
                slope, scale, softcap, win_left, win_right, VARIANT, SOFTCAP, ALIBI,
            )

    out, lse = softmax_epilogue(acc, l_i, m_i)
    split64 = split.to(tl.int64)
    tl.store(Out + split64 * stride_os + b * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh
             + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + split64 * stride_ls + b * stride_lb + h * stride_lh + t * stride_lt, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    OutPart, LsePart, SEQLENS, Out, Lse,
    stride_ps, stride_pb, stride_pt, stride_ph, stride_pd,
    stride_qs, stride_qb, stride_qh, stride_qt,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lb, stride_lh, stride_lt,
    Tq, S, Hkv,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_NEW: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLIT_ALIGN_: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge the active splits in one streaming pass: OutPart (NUM_SPLITS, B, Tq, Hq, D) fp32,
    LsePart (NUM_SPLITS, B, Hq, Tq) -> Out (B, Tq, Hq, D), Lse (B, Hq, Tq). pid = bh * row_blocks + m."""
    bh, pid_m = split_pid(tl.program_id(0), tl.cdiv(Tq * G, BLOCK_M))
    b = bh // Hkv
    hk = bh % Hkv
    L = tl.load(SEQLENS + b)
    if HAS_NEW:
        L = L + Tq
    Lk = tl.minimum(tl.maximum(L, 0), S)
    _s, _e, n_active = _live_range(0, Lk, NUM_SPLITS, SPLIT_ALIGN_)
    t, h, row_ok = packed_rows(pid_m * BLOCK_M, hk, Tq, G, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    od_mask = row_ok[:, None] & (offs_d < D)[None, :]
    lse_row = LsePart + b * stride_qb + h * stride_qh + t * stride_qt
    part_row = OutPart + b * stride_pb + t[:, None] * stride_pt + h[:, None] * stride_ph + offs_d[None, :] * stride_pd
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    denom = tl.zeros([BLOCK_M], dtype=tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for _ in range(n_active):
        lse_s = tl.load(lse_row, mask=row_ok, other=float("-inf"))
        o_s = tl.load(part_row, mask=od_mask, other=0.0)
        m_new = tl.maximum(m, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp(m - m_safe)
        w = tl.math.exp(lse_s - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * o_s
        denom = denom * alpha + w
        m = m_new
        # Step the pointers (64-bit) rather than forming split * stride in 32 bits.
        lse_row += stride_qs
        part_row += stride_ps
    seen = denom > 0.0
    out = acc / tl.where(seen, denom, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log(tl.where(seen, denom, 1.0)), float("-inf"))
    tl.store(Out + b * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=od_mask)
    tl.store(Lse + b * stride_lb + h * stride_lh + t * stride_lt, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Launch plan and launcher.
# --------------------------------------------------------------------------------------------


def _block_m(R: int, fp32: bool = False) -> int:
    """Packed rows per program: all G * Tq rows of a KV head up to 64 (32 for fp32, whose
    tf32x3 tiles take twice the registers), padded to >= 16 for tl.dot."""
    return min(32 if fp32 else 64, max(16, triton.next_power_of_2(R)))


@dataclass(frozen=True)
class DecodePlan:
    """Static launch plan of one decode call (depends on shapes and the SM count only)."""

    block_m: int  # packed rows per program
    row_blocks: int  # programs per (batch, KV head) and split
    num_splits: int  # slices of the live keys
    split_programs: int  # grid of the split kernel (axis 0)
    combine_programs: int  # grid of the combine kernel (COMBINE_M rows each), 0 when it is skipped

    @property
    def launches(self) -> int:
        return 1 + (self.combine_programs > 0)


def decode_plan(B: int, Hkv: int, Tq: int, G: int, S: int, sms: int, num_splits: int | None = None,
                fp32: bool = False) -> DecodePlan:
    """Splits for about WAVES waves of programs over `sms` SMs, at most one per SPLIT_ALIGN cache rows."""
    R = Tq * G
    bm = _block_m(R, fp32)
    row_blocks = triton.cdiv(R, bm)
    per_split = B * Hkv * row_blocks
    if num_splits is None:
        num_splits = triton.cdiv(WAVES * sms, max(1, per_split))
    num_splits = max(1, min(num_splits, triton.cdiv(S, SPLIT_ALIGN)))
    combine = B * Hkv * triton.cdiv(R, COMBINE_M) if num_splits > 1 else 0
    return DecodePlan(bm, row_blocks, num_splits, per_split * num_splits, combine)


def attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal: bool, scale: float, num_splits=None,
                            window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None):
    """Append k/v (if given) into the caches at cache_seqlens, in place, and attend, in one pass.

    q (B, Tq, Hq, D); k_cache, v_cache (B, S, Hkv, D); k, v (B, Tq, Hkv, D) or None;
    cache_seqlens int32 (B,) on q's device. Returns out (B, Tq, Hq, D) in q.dtype and
    lse (B, Hq, Tq) fp32. `num_splits` overrides the static split rule (tests, benchmarks).
    window_size, softcap, alibi_slopes as in DESIGN §3, with each sequence's own offset.
    """
    B, Tq, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    plan = decode_plan(B, Hkv, Tq, G, S, sm_count(q.device), num_splits, q.dtype == torch.float32)
    seqlens = cache_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    upcast, precision = dot_flags(q.dtype)
    out = torch.empty((B, Tq, Hq, D), dtype=store_dtype(q.dtype, upcast), device=q.device)
    lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    if plan.num_splits == 1:
        out_part, lse_part = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        out_part = torch.empty((plan.num_splits, B, Tq, Hq, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((plan.num_splits, B, Hq, Tq), dtype=torch.float32, device=q.device)
    has_new = k is not None
    kn, vn = (k, v) if has_new else (k_cache, v_cache)  # unused pointers without new rows
    (a, sab, sah, cap, left, right), flags = _variant_launch_args(q, window_size, softcap, alibi_slopes)
    _decode_split_kernel[(plan.split_programs,)](
        q, k_cache, v_cache, kn, vn, seqlens, out_part, lse_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *kn.stride(), *vn.stride(),
        *out_part.stride(), *lse_part.stride(),
        Tq, S, Hkv, scale * LOG2E, triton.next_power_of_2(max(S, 1)),
        a, sab, sah, scale, cap, left, right,
        G=G, D=D, BLOCK_D=block_d(D), NUM_SPLITS=plan.num_splits, HAS_NEW=has_new,
        CAUSAL=causal, UPCAST=upcast, DOT_PRECISION=precision, FOLD_SCALE=scale > 0 and not flags["VARIANT"],
        SPLIT_ALIGN_=SPLIT_ALIGN, BLOCK_M=plan.block_m, **flags,
    )
    if plan.combine_programs:
        _combine_kernel[(plan.combine_programs,)](
            out_part, lse_part, seqlens, out, lse,
            *out_part.stride(), *lse_part.stride(), *out.stride(), *lse.stride(),
            Tq, S, Hkv, G=G, D=D, BLOCK_D=block_d(D), HAS_NEW=has_new, NUM_SPLITS=plan.num_splits,
            SPLIT_ALIGN_=SPLIT_ALIGN, BLOCK_M=COMBINE_M,
        )
    return out.to(q.dtype), lse
