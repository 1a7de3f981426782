"""Building blocks of the Triton decode kernel (kernels/attention_with_kv_cache.py): the live-key
partition, one key block of the online softmax, the paged-KV row lookup and the rotary embedding.

Rotary follows FlashAttention (flash_attn/layers/rotary.py): for the first `rot_dim` channels,
interleaved (GPT-J) pairs (2i, 2i+1) and non-interleaved (GPT-NeoX) pairs (i, i + rot_dim / 2)
are rotated by cos/sin row `pos`, column i:

    out_a = x_a * cos - x_b * sin,    out_b = x_b * cos + x_a * sin

in fp32, each product rounded on its own (no FMA contraction), so the result equals PyTorch's
`x * cos + rotate_half(x) * sin` bit for bit before the one rounding to the storage dtype.
Channels from rot_dim on pass through.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .attention_blocks import _variant_scores
from .common import online_softmax_step


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
def _load_kv(k_ptrs, v_ptrs, n_ok, d_ok, UPCAST: tl.constexpr):
    """K^T tile (D, N) at k_ptrs and V tile (N, D) at v_ptrs, keys masked by n_ok."""
    kt = tl.load(k_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
    v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    return kt, v


@triton.jit
def _attend_block(acc, l_i, m_i, q, kt, v, n_ok, offs_n, t, Lk, Tq, qk_scale,
                  CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  FOLD_SCALE: tl.constexpr, slope=None, scale=1.0, softcap=0.0, win_left=-1, win_right=-1,
                  VARIANT: tl.constexpr = False, SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False):
    """One key block: K^T tile kt (D, N), V tile v (N, D), keys masked by n_ok.
    VARIANT: window, softcap, ALiBi with this sequence's offset Lk - Tq (`_variant_scores`)."""
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


@triton.jit
def _page_rows(table, n0, offs_nb, n_ok, stride_tn, PAGE_SIZE: tl.constexpr, ONE_PAGE: tl.constexpr):
    """(page, row in page), int64, of logical rows n0 + offs_nb of a paged cache: row j lives at
    page table[j // PAGE_SIZE], row j % PAGE_SIZE. One table read per tile, shared by K and V:
    ONE_PAGE (the caller guarantees the tile lies in one page: n0 a multiple of BLOCK_N and
    PAGE_SIZE of BLOCK_N) reads one scalar; otherwise one vector read gives each row its page."""
    if ONE_PAGE:
        page = tl.load(table + (n0 // PAGE_SIZE) * stride_tn).to(tl.int64)
        return page, ((n0 % PAGE_SIZE) + offs_nb).to(tl.int64)
    else:
        n = n0 + offs_nb
        page = tl.load(table + (n // PAGE_SIZE) * stride_tn, mask=n_ok, other=0).to(tl.int64)
        return page, (n % PAGE_SIZE).to(tl.int64)


@triton.jit
def _rotate(x, row_ptrs, d, stride_d, pos, mask, COS, SIN, stride_cs, rot_dim, s_ro,
            INTERLEAVED: tl.constexpr, EXACT: tl.constexpr):
    """Rotary embedding of a tile x loaded from row_ptrs + d * stride_d (any layout: d, pos, mask
    and row_ptrs broadcast to x's shape); pos: cos/sin rows. Returns the rotated tile in fp32,
    not yet rounded. EXACT (GPU): products through
    mul.rn so they are never fused into an FMA; the interpreter computes them unfused anyway."""
    if INTERLEAVED:
        freq = d // 2
        partner = d + 1 - 2 * (d % 2)
        neg = (d % 2) == 0
    else:
        half = rot_dim // 2
        first = d < half
        freq = tl.where(first, d, d - half)
        partner = tl.where(first, d + half, d - half)
        neg = first
    rot = d < rot_dim
    m = mask & rot
    xp = tl.load(row_ptrs + partner * stride_d, mask=m, other=0.0).to(tl.float32)
    # Positions are clamped into the table, as reference.apply_rotary does (the host checks them).
    cs_off = tl.minimum(tl.maximum(pos, 0), s_ro - 1).to(tl.int64) * stride_cs + freq
    c = tl.load(COS + cs_off, mask=m, other=1.0).to(tl.float32)
    s = tl.load(SIN + cs_off, mask=m, other=0.0).to(tl.float32)
    x32 = x.to(tl.float32)
    xs = tl.where(neg, -xp, xp)
    if EXACT:
        r = libdevice.mul_rn(x32, c) + libdevice.mul_rn(xs, s)
    else:
        r = x32 * c + xs * s
    return tl.where(rot, r, x32)


def rotary_args(q, rotary_cos, rotary_sin, has_new: bool):
    """(COS, SIN, row stride, rot_dim, S_ro) for the kernel: rotary applies only with new rows
    (FlashAttention ignores rotary_cos / sin without new k / v, for q as well)."""
    if rotary_cos is None or not has_new:
        dummy = q.new_empty(1, dtype=q.dtype)
        return (dummy, dummy, 0, 0, 0), False
    cos = rotary_cos.to(q.device).contiguous()
    sin = rotary_sin.to(q.device).contiguous()
    return (cos, sin, cos.stride(0), 2 * cos.shape[1], cos.shape[0]), True


def paged_args(k_cache, block_table):
    """(table, row stride, entry stride, PAGE_SIZE, capacity per sequence) of a paged cache."""
    page = k_cache.shape[1]
    return block_table, block_table.stride(0), block_table.stride(1), page, block_table.shape[1] * page


@triton.jit
def _round_to(x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """fp32 x rounded to `dtype`. RNE_BF16 (the interpreter with bf16, whose fp32 -> bf16 cast
    truncates): round to nearest even on the bits first, so the cast is exact."""
    if RNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
    return x.to(dtype)
