"""Triton decoding attention with fused cache append, split-KV (Flash-Decoding).

q (B, Tq, Hq, D); k_cache, v_cache (B, S, Hkv, D); optional new k, v (B, Tq, Hkv, D);
cache_seqlens int32 (B,) on the device. Sequence b attends keys [0, Lk_b) with
Lk_b = clamp(L_b + Tq, 0, S) (or clamp(L_b, 0, S) without new rows), causal bottom-right per
sequence: query t sees key j iff j <= t + Lk_b - Tq.

Three launches, in stream order:

1. `_append_kernel` writes the new rows to [L_b, L_b + Tq) of both caches, masked to [0, S).
   It runs as its own launch, before attention, because a split that reads row j may belong to
   a different program than the one that writes row j, and programs of one launch have no
   ordering: only a launch boundary makes the new rows visible to every split.
2. `_decode_split_kernel`: one program per (batch * KV head, split, packed row block). The G
   query heads (x Tq rows) of a KV head are packed into the M dimension of `tl.dot` (padded to
   >= 16 rows), so MQA/GQA decoding runs on tensor cores and reads each K/V tile once per group.
   Each split covers a fixed slice of the cache capacity S and writes its normalised partial
   output and LSE; splits past Lk_b write zeros and -inf.
3. `_combine_kernel` merges the partials, weighted by exp(lse_split - lse).

The split count depends only on static shapes (B, Hkv, Tq * G, S and the device's SM count), so
the launch is the same for every step and works under torch.compile and CUDA graph capture;
lengths are read on the device only. With one split the attention kernel writes the final
output directly and the combine is skipped. The split kernel is autotuned on its first call per
(capacity bucket, row block, head dim): make one call before capturing a CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .attention import _interpreting, _online_softmax_step

LOG2E = 1.4426950408889634
# A split covers a multiple of this many cache rows (a multiple of every BLOCK_N below).
SPLIT_ALIGN = 128
MAX_SPLITS = 64
# SM count assumed for CPU tensors under the interpreter (no device to ask).
INTERPRETER_SMS = 8


def _configs() -> list[triton.Config]:
    """One config under the interpreter (it cannot benchmark); BLOCK_N candidates on a GPU."""
    if _interpreting():
        return [triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (32, 4, 2)]
    ]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose K/V stages cannot fit in about 200 KB of shared memory. Keeps at least one."""
    args = {**named_args, **kwargs}
    elem = 4 if args["DOT_PRECISION"] == "ieee" else 2
    fits = [c for c in configs if c.num_stages * 2 * c.kwargs["BLOCK_N"] * args["BLOCK_D"] * elem <= 200 * 1024]
    return fits or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.num_stages)]


@triton.jit
def _append_kernel(
    K, V, KC, VC, SEQLENS,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    Tq, S, Hkv,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """K, V (B, Tq, Hkv, D) -> rows [L_b, L_b + Tq) of KC, VC (B, S, Hkv, D); rows outside [0, S) dropped."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    L = tl.load(SEQLENS + b).to(tl.int64)
    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    pos = L + t
    offs_d = tl.arange(0, BLOCK_D)
    mask = ((t < Tq) & (pos >= 0) & (pos < S))[:, None] & (offs_d < D)[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh + t[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(V + b * stride_vb + hk * stride_vh + t[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=mask)
    tl.store(KC + b * stride_kcb + hk * stride_kch + pos[:, None] * stride_kcs + offs_d[None, :] * stride_kcd, k, mask=mask)
    tl.store(VC + b * stride_vcb + hk * stride_vch + pos[:, None] * stride_vcs + offs_d[None, :] * stride_vcd, v, mask=mask)


@triton.autotune(
    configs=_configs(),
    key=["s_bucket", "BLOCK_M", "G", "BLOCK_D", "CAUSAL", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _decode_split_kernel(
    Q, KC, VC, SEQLENS, Out, Lse,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_os, stride_ob, stride_ot, stride_oh, stride_od,
    stride_ls, stride_lb, stride_lh, stride_lt,
    Tq, S, Hkv, split_len, qk_scale, s_bucket,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_NEW: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (batch * KV head, split, packed row block of BLOCK_M >= 16 rows).

    Q (B, Tq, Hq, D) with packed row r = t * G + g (Tq * G rows per KV head); caches
    (B, S, Hkv, D). Writes the split's normalised output to Out[split] (.., Tq, Hq, D) and its
    LSE (natural log) to Lse[split] (.., Hq, Tq). HAS_NEW: the Tq new rows were appended at L_b.
    """
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    L = tl.load(SEQLENS + b)
    if HAS_NEW:
        L = L + Tq
    Lk = tl.minimum(tl.maximum(L, 0), S)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // G
    t64 = t.to(tl.int64)
    h = hk * G + rows % G
    row_ok = t < Tq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * stride_qb + t64[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    start = split * split_len
    end = tl.minimum(start + split_len, Lk)
    if CAUSAL:
        # The last row of the block sees keys up to t_hi + Lk - Tq.
        t_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, Tq - 1)
        end = tl.minimum(end, t_hi + Lk - Tq + 1)
    kc_base = KC + b * stride_kcb + hk * stride_kch
    vc_base = VC + b * stride_vcb + hk * stride_vch

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        n64 = offs_n.to(tl.int64)
        kt = tl.load(kc_base + n64[None, :] * stride_kcs + offs_d[:, None] * stride_kcd,
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        v = tl.load(vc_base + n64[:, None] * stride_vcs + offs_d[None, :] * stride_vcd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= t[:, None] + (Lk - Tq))
        qk = tl.where(visible, qk, float("-inf"))
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, qk, v, DOT_PRECISION)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    split64 = split.to(tl.int64)
    tl.store(Out + split64 * stride_os + b * stride_ob + t64[:, None] * stride_ot + h[:, None] * stride_oh
             + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + split64 * stride_ls + b * stride_lb + h * stride_lh + t64 * stride_lt, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    OutPart, LsePart, Out, Lse,
    stride_ps, stride_pb, stride_pt, stride_ph, stride_pd,
    stride_qs, stride_qb, stride_qh, stride_qt,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lb, stride_lh, stride_lt,
    Tq, Hkv,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge NUM_SPLITS partials: OutPart (NUM_SPLITS, B, Tq, Hq, D) fp32, LsePart (NUM_SPLITS, B, Hq, Tq)
    -> Out (B, Tq, Hq, D), Lse (B, Hq, Tq). One program per (packed row block, batch * KV head)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // G
    t64 = t.to(tl.int64)
    h = hk * G + rows % G
    row_ok = t < Tq
    offs_d = tl.arange(0, BLOCK_D)
    od_mask = row_ok[:, None] & (offs_d < D)[None, :]
    offs_s = tl.arange(0, BLOCK_S)
    lse_row = LsePart + b * stride_qb + h * stride_qh + t64 * stride_qt
    lse_all = tl.load(lse_row[:, None] + offs_s.to(tl.int64)[None, :] * stride_qs,
                      mask=row_ok[:, None] & (offs_s < NUM_SPLITS)[None, :], other=float("-inf"))
    m = tl.max(lse_all, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    denom = tl.zeros([BLOCK_M], dtype=tl.float32)
    part_row = OutPart + b * stride_pb + t64[:, None] * stride_pt + h[:, None] * stride_ph + offs_d[None, :] * stride_pd
    for _ in range(NUM_SPLITS):
        lse_s = tl.load(lse_row, mask=row_ok, other=float("-inf"))
        w = tl.math.exp2((lse_s - m_safe) * 1.4426950408889634)
        o_s = tl.load(part_row, mask=od_mask, other=0.0)
        acc += w[:, None] * o_s
        denom += w
        # Step the pointers (64-bit) rather than forming split * stride in 32 bits.
        lse_row += stride_qs
        part_row += stride_ps
    seen = denom > 0.0
    out = acc / tl.where(seen, denom, 1.0)[:, None]
    lse = tl.where(seen, m_safe + tl.log(tl.where(seen, denom, 1.0)), float("-inf"))
    tl.store(Out + b * stride_ob + t64[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=od_mask)
    tl.store(Lse + b * stride_lb + h * stride_lh + t64 * stride_lt, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Launcher.
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def num_splits_for(B: int, Hkv: int, R: int, S: int, sms: int) -> int:
    """Split count from static shapes: enough programs for about two waves over the SMs, each
    split at least SPLIT_ALIGN cache rows, at most MAX_SPLITS; rounded so splits tile S exactly."""
    row_blocks = triton.cdiv(R, _block_m(R))
    want = triton.cdiv(2 * sms, max(1, B * Hkv * row_blocks))
    splits = max(1, min(want, triton.cdiv(S, SPLIT_ALIGN), MAX_SPLITS))
    return triton.cdiv(S, _split_len(S, splits))


def _split_len(S: int, splits: int) -> int:
    return triton.cdiv(triton.cdiv(S, splits), SPLIT_ALIGN) * SPLIT_ALIGN


def _block_m(R: int) -> int:
    """Packed rows per program: all G * Tq rows of a KV head up to 64, padded to >= 16 for tl.dot."""
    return min(64, max(16, triton.next_power_of_2(R)))


def attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal: bool, scale: float, num_splits=None):
    """Append k/v (if given) into the caches at cache_seqlens, in place, then attend.

    q (B, Tq, Hq, D); k_cache, v_cache (B, S, Hkv, D); k, v (B, Tq, Hkv, D) or None;
    cache_seqlens int32 (B,) on q's device. Returns out (B, Tq, Hq, D) in q.dtype and
    lse (B, Hq, Tq) fp32. `num_splits` overrides the static split rule (tests, benchmarks).
    """
    B, Tq, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    R = Tq * G
    block_d = max(16, triton.next_power_of_2(D))
    seqlens = cache_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    if k is not None and S > 0:
        block_t = min(64, triton.next_power_of_2(Tq))
        _append_kernel[(triton.cdiv(Tq, block_t), B * Hkv)](
            k, v, k_cache, v_cache, seqlens,
            *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
            Tq, S, Hkv, D=D, BLOCK_D=block_d, BLOCK_T=block_t,
        )

    if num_splits is None:
        num_splits = num_splits_for(B, Hkv, R, S, _sm_count(q.device))
    split_len = _split_len(max(S, 1), max(1, num_splits))
    num_splits = max(1, triton.cdiv(S, split_len))
    block_m = _block_m(R)
    upcast = q.dtype == torch.bfloat16 and _interpreting()
    # The interpreter's fp32 -> bf16 cast truncates: there, the result is stored in fp32 and rounded by torch.
    out = torch.empty((B, Tq, Hq, D), dtype=torch.float32 if upcast else q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    if num_splits == 1:
        out_part, lse_part = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        out_part = torch.empty((num_splits, B, Tq, Hq, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((num_splits, B, Hq, Tq), dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
    _decode_split_kernel[(B * Hkv, num_splits, triton.cdiv(R, block_m))](
        q, k_cache, v_cache, seqlens, out_part, lse_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out_part.stride(), *lse_part.stride(),
        Tq, S, Hkv, split_len, scale * LOG2E, triton.next_power_of_2(max(S, 1)),
        G=G, D=D, BLOCK_D=block_d, HAS_NEW=k is not None,
        CAUSAL=causal, UPCAST=upcast, DOT_PRECISION=precision, BLOCK_M=block_m,
    )
    if num_splits > 1:
        _combine_kernel[(triton.cdiv(R, block_m), B * Hkv)](
            out_part, lse_part, out, lse,
            *out_part.stride(), *lse_part.stride(), *out.stride(), *lse.stride(),
            Tq, Hkv, G=G, D=D, BLOCK_D=block_d, NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_M=block_m,
        )
    return out.to(q.dtype), lse
