"""Triton decoding attention with the cache append fused into the attention pass (split-KV).

q (B, Tq, Hq, D); k_cache, v_cache (B, S, Hkv, D) (or pages, below); optional new k, v (B, Tq, Hkv, D);
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

Serving caches (DESIGN §3), each behind a constexpr flag so that the plain path compiles as
before: PAGED (k_cache / v_cache a pool of pages (num_blocks, page_size, Hkv, D); logical row j
of sequence b at page block_table[b, j // page_size]; S = max_blocks * page_size; the table is read
once per key tile, a scalar when tiles start on multiples of BLOCK_N and page_size is a multiple
of BLOCK_N, else one vector read giving each row its page; new rows are written through it),
HAS_BATCH_IDX (sequence b uses slot, or table row, cache_batch_idx[b]), HAS_LEFTPAD (the splits
partition the live keys [leftpad_b, Lk_b) only; alignment is unchanged in cache rows) and ROTARY
(new k rotated at cache row L_b + t before the write and again, identically, where the new keys
are attended; q rotated in registers at L_b + t when causal or windowed, else at L_b; fp32 math
rounded once; FlashAttention's positions, which count the left padding).

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

from .attention_blocks import _variant_launch_args
from .attention_with_kv_cache_blocks import (
    _attend_block,
    _live_range,
    _load_kv,
    _page_rows,
    _rotate,
    _round_to,
    paged_args,
    rotary_args,
)
from .common import (
    LOG2E,
    autotune_configs,
    block_d,
    dot_flags,
    elem_bytes,
    interpreting,
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
    if args.get("ROTARY"):  # 128-key tiles spill (16 B at D = 128) beside the rotation's tiles
        fits = [c for c in fits if c.kwargs["BLOCK_N"] <= 64]
    return fits or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.num_stages)]


@triton.autotune(
    configs=autotune_configs(("BLOCK_N",), DECODE_CONFIGS, (64,)),
    key=["s_bucket", "BLOCK_M", "G", "BLOCK_D", "CAUSAL", "DOT_PRECISION", "PAGED", "PAGE_SIZE"],
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
    Table, stride_tb, stride_tn, CacheIdx, LeftPad,
    Cos, Sin, stride_cs, rot_dim, s_ro,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HAS_NEW: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FOLD_SCALE: tl.constexpr, SPLIT_ALIGN_: tl.constexpr,
    VARIANT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    ROTARY: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr, ROTARY_Q_PER_TOKEN: tl.constexpr,
    EXACT_MUL: tl.constexpr, NEW_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """pid = (bh * row_blocks + m) * NUM_SPLITS + split; packed row r = t * G + g.

    Writes the split's normalised output to Out[split] (.., Tq, Hq, D) and its LSE (natural log)
    to Lse[split] (.., Hq, Tq); with HAS_NEW, appends K/V (B, Tq, Hkv, D) into KC/VC at L_b.
    PAGED: KC/VC are (num_blocks, PAGE_SIZE, Hkv, D) pages, row j of sequence b at page
    Table[b_cache, j // PAGE_SIZE]; HAS_BATCH_IDX: b_cache = CacheIdx[b] (else b), the cache slot
    or the table row; HAS_LEFTPAD: keys [LeftPad[b], Lk) are live; ROTARY: new k and q rotated
    by Cos/Sin (S_ro, rot_dim / 2) at their cache rows (FlashAttention's positions).
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
    if HAS_LEFTPAD:
        # The splits share the live keys [lp, Lk) only: rows of the padding are never visited.
        lp = tl.minimum(tl.maximum(tl.load(LeftPad + b), 0), Lk)
        start, end, n_active = _live_range(split, Lk - lp, NUM_SPLITS, SPLIT_ALIGN_)
        start += lp
        end += lp
    else:
        start, end, n_active = _live_range(split, Lk, NUM_SPLITS, SPLIT_ALIGN_)
    active = split < n_active
    if HAS_BATCH_IDX:
        b_cache = tl.load(CacheIdx + b).to(tl.int64)
    else:
        b_cache = b

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_nb = tl.arange(0, BLOCK_N)
    # New rows (at most Tq) in tiles of NEW_N: with rotary, tiles of NEW_BLOCK rows keep the
    # rotation's fp32 tiles (value, partner, cos, sin) in registers.
    NEW_N: tl.constexpr = NEW_BLOCK if ROTARY else BLOCK_N
    offs_new = tl.arange(0, NEW_N)
    if PAGED:
        table = Table + b_cache * stride_tb
        kc_base = KC + hk * stride_kch
        vc_base = VC + hk * stride_vch
    else:
        kc_base = KC + b_cache * stride_kcb + hk * stride_kch
        vc_base = VC + b_cache * stride_vcb + hk * stride_vch
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if HAS_NEW:
        if pid_m == 0:
            # This split owns the new rows in its slice: write them (rows outside [0, S) are never in a slice).
            for n0 in range(tl.maximum(start, L_cache), end, NEW_N):
                pos = (n0 + offs_new).to(tl.int64)
                m2 = (pos < end)[:, None] & d_ok[None, :]
                src = (pos - L)[:, None]
                kn = tl.load(k_base + src * stride_kt + offs_d[None, :] * stride_kd, mask=m2)
                vn = tl.load(v_base + src * stride_vt + offs_d[None, :] * stride_vd, mask=m2)
                if ROTARY:
                    kn = _round_to(_rotate(kn, k_base + src * stride_kt, offs_d[None, :], stride_kd, pos[:, None], m2,
                                           Cos, Sin, stride_cs, rot_dim, s_ro, ROTARY_INTERLEAVED, EXACT_MUL),
                                   KC.dtype.element_ty, UPCAST)
                if PAGED:
                    page, row = _page_rows(table, n0, offs_new, pos < end, stride_tn, PAGE_SIZE, False)
                    tl.store(kc_base + (page * stride_kcb + row * stride_kcs)[:, None] + offs_d[None, :] * stride_kcd,
                             kn.to(KC.dtype.element_ty), mask=m2)
                    tl.store(vc_base + (page * stride_vcb + row * stride_vcs)[:, None] + offs_d[None, :] * stride_vcd,
                             vn.to(VC.dtype.element_ty), mask=m2)
                else:
                    tl.store(kc_base + pos[:, None] * stride_kcs + offs_d[None, :] * stride_kcd,
                             kn.to(KC.dtype.element_ty), mask=m2)
                    tl.store(vc_base + pos[:, None] * stride_vcs + offs_d[None, :] * stride_vcd,
                             vn.to(VC.dtype.element_ty), mask=m2)

    t, h, row_ok = packed_rows(pid_m * BLOCK_M, hk, Tq, G, BLOCK_M)
    row_ok = row_ok & active
    q_rows = Q + b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh
    q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if ROTARY:
        # Query t sits at cache row L + t (causal or windowed), else every query at row L.
        if ROTARY_Q_PER_TOKEN:
            q_pos = L + t[:, None]
        else:
            q_pos = L + tl.zeros_like(t)[:, None]
        q = _round_to(_rotate(q, q_rows, offs_d[None, :], stride_qd, q_pos, row_ok[:, None] & d_ok[None, :],
                              Cos, Sin, stride_cs, rot_dim, s_ro, ROTARY_INTERLEAVED, EXACT_MUL),
                      Q.dtype.element_ty, UPCAST)
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
    if PAGED:
        # With pages a multiple of BLOCK_N, tiles start on multiples of BLOCK_N (keys below `start`
        # masked), so each lies in one page: one scalar table read per tile.
        ONE_PAGE: tl.constexpr = PAGE_SIZE % BLOCK_N == 0
        lo = start
        if ONE_PAGE:
            lo = (start // BLOCK_N) * BLOCK_N
        for n0 in range(lo, cache_end, BLOCK_N):
            offs_n = n0 + offs_nb
            n_ok = (offs_n >= start) & (offs_n < cache_end)
            page, row = _page_rows(table, n0, offs_nb, n_ok, stride_tn, PAGE_SIZE, ONE_PAGE)
            krows = page * stride_kcb + row * stride_kcs
            vrows = page * stride_vcb + row * stride_vcs
            kt, v = _load_kv(kc_base + krows[None, :] + offs_d[:, None] * stride_kcd,
                             vc_base + vrows[:, None] + offs_d[None, :] * stride_vcd, n_ok, d_ok, UPCAST)
            acc, l_i, m_i = _attend_block(
                acc, l_i, m_i, q, kt, v, n_ok, offs_n, t, Lk, Tq, qk_scale, CAUSAL, DOT_PRECISION, FOLD_SCALE,
                slope, scale, softcap, win_left, win_right, VARIANT, SOFTCAP, ALIBI,
            )
    else:
        for n0 in range(start, cache_end, BLOCK_N):
            offs_n = n0 + offs_nb
            n64 = offs_n.to(tl.int64)
            k_ptrs = kc_base + n64[None, :] * stride_kcs + offs_d[:, None] * stride_kcd
            v_ptrs = vc_base + n64[:, None] * stride_vcs + offs_d[None, :] * stride_vcd
            n_ok = offs_n < cache_end
            kt, v = _load_kv(k_ptrs, v_ptrs, n_ok, d_ok, UPCAST)
            acc, l_i, m_i = _attend_block(
                acc, l_i, m_i, q, kt, v, n_ok, offs_n, t, Lk, Tq, qk_scale, CAUSAL, DOT_PRECISION, FOLD_SCALE,
                slope, scale, softcap, win_left, win_right, VARIANT, SOFTCAP, ALIBI,
            )
    if HAS_NEW:
        for n0 in range(tl.maximum(start, L_cache), end, NEW_N):
            offs_n = n0 + offs_new
            src = (offs_n - L).to(tl.int64)
            k_ptrs = k_base + src[None, :] * stride_kt + offs_d[:, None] * stride_kd
            v_ptrs = v_base + src[:, None] * stride_vt + offs_d[None, :] * stride_vd
            n_ok = offs_n < end
            if ROTARY:
                # The same rotation (and rounding) as the rows written to the cache above, on the
                # (N, D) tile (the (D, N) layout's gathers along D cost ~70 registers), then transposed.
                k_rows = k_base + src[:, None] * stride_kt
                nd_ok = n_ok[:, None] & d_ok[None, :]
                kn = tl.load(k_rows + offs_d[None, :] * stride_kd, mask=nd_ok, other=0.0)
                kn = _round_to(_rotate(kn, k_rows, offs_d[None, :], stride_kd, offs_n[:, None], nd_ok, Cos, Sin,
                                       stride_cs, rot_dim, s_ro, ROTARY_INTERLEAVED, EXACT_MUL), KC.dtype.element_ty,
                               UPCAST)
                v = tl.load(v_ptrs, mask=nd_ok, other=0.0)
                kt = tl.trans(kn)
                if UPCAST:
                    kt = kt.to(tl.float32)
                    v = v.to(tl.float32)
            else:
                kt, v = _load_kv(k_ptrs, v_ptrs, n_ok, d_ok, UPCAST)
            acc, l_i, m_i = _attend_block(
                acc, l_i, m_i, q, kt, v, n_ok, offs_n, t, Lk, Tq, qk_scale, CAUSAL, DOT_PRECISION, FOLD_SCALE,
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
    Tq, S, Hkv, LeftPad,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_NEW: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLIT_ALIGN_: tl.constexpr, HAS_LEFTPAD: tl.constexpr, BLOCK_M: tl.constexpr,
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
    if HAS_LEFTPAD:  # the split kernel's partition of [lp, Lk)
        _s, _e, n_active = _live_range(0, Lk - tl.minimum(tl.maximum(tl.load(LeftPad + b), 0), Lk),
                                       NUM_SPLITS, SPLIT_ALIGN_)
    else:
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
                            window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None, *, block_table=None,
                            cache_batch_idx=None, cache_leftpad=None, rotary_cos=None, rotary_sin=None,
                            rotary_interleaved: bool = True):
    """Append k/v (if given) into the caches at cache_seqlens, in place, and attend, in one pass.

    q (B, Tq, Hq, D); k_cache, v_cache (B_cache, S, Hkv, D), or (num_blocks, page_size, Hkv, D)
    pages with block_table (B, max_blocks) int32 (S = max_blocks * page_size); k, v (B, Tq, Hkv, D)
    or None; cache_seqlens int32 (B,) on q's device. cache_batch_idx (B,): sequence b uses cache
    slot (or table row) cache_batch_idx[b]. cache_leftpad (B,): keys [leftpad_b, L_b (+ Tq)) are
    live. rotary_cos / rotary_sin (S_ro, rotary_dim / 2), with new k only: new k rotated at cache
    rows L_b + t before the write, q at L_b + t (causal or windowed) or L_b, in fp32, rounded once.
    Returns out (B, Tq, Hq, D) in q.dtype and lse (B, Hq, Tq) fp32. `num_splits` overrides the
    static split rule (tests, benchmarks). window_size, softcap, alibi_slopes as in DESIGN §3,
    with each sequence's own offset. Inputs are validated by the caller.
    """
    B, Tq, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    paged = block_table is not None
    seqlens = cache_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    if paged:
        table, stride_tb, stride_tn, page_size, S = paged_args(k_cache, block_table)
    else:  # unused pointers and strides
        table, stride_tb, stride_tn, page_size, S = seqlens, 0, 0, 0, k_cache.shape[1]
    G = Hq // Hkv
    plan = decode_plan(B, Hkv, Tq, G, S, sm_count(q.device), num_splits, q.dtype == torch.float32)
    batch_idx = seqlens if cache_batch_idx is None else cache_batch_idx.contiguous()
    leftpad = seqlens if cache_leftpad is None else cache_leftpad.contiguous()
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
    rot_args, rotary = rotary_args(q, rotary_cos, rotary_sin, has_new)
    _decode_split_kernel[(plan.split_programs,)](
        q, k_cache, v_cache, kn, vn, seqlens, out_part, lse_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *kn.stride(), *vn.stride(),
        *out_part.stride(), *lse_part.stride(),
        Tq, S, Hkv, scale * LOG2E, triton.next_power_of_2(max(S, 1)),
        a, sab, sah, scale, cap, left, right,
        table, stride_tb, stride_tn, batch_idx, leftpad, *rot_args,
        G=G, D=D, BLOCK_D=block_d(D), NUM_SPLITS=plan.num_splits, HAS_NEW=has_new,
        CAUSAL=causal, UPCAST=upcast, DOT_PRECISION=precision, FOLD_SCALE=scale > 0 and not flags["VARIANT"],
        SPLIT_ALIGN_=SPLIT_ALIGN, PAGED=paged, PAGE_SIZE=page_size, HAS_BATCH_IDX=cache_batch_idx is not None,
        HAS_LEFTPAD=cache_leftpad is not None, ROTARY=rotary, ROTARY_INTERLEAVED=bool(rotary_interleaved),
        ROTARY_Q_PER_TOKEN=causal or tuple(window_size) != (-1, -1), EXACT_MUL=not interpreting(),
        NEW_BLOCK=min(64, max(16, triton.next_power_of_2(Tq))) if rotary else 16,
        BLOCK_M=plan.block_m, **flags,
    )
    if plan.combine_programs:
        _combine_kernel[(plan.combine_programs,)](
            out_part, lse_part, seqlens, out, lse,
            *out_part.stride(), *lse_part.stride(), *out.stride(), *lse.stride(),
            Tq, S, Hkv, leftpad, G=G, D=D, BLOCK_D=block_d(D), HAS_NEW=has_new, NUM_SPLITS=plan.num_splits,
            SPLIT_ALIGN_=SPLIT_ALIGN, HAS_LEFTPAD=cache_leftpad is not None, BLOCK_M=COMBINE_M,
        )
    return out.to(q.dtype), lse
