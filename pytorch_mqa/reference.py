"""Pure-PyTorch attention: the correctness oracle of both ops (readable math, fp32 accumulation).

Layout is BSHD: q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D). Query head h reads KV head h // G with
G = Hq // Hkv. K/V are never expanded: q is regrouped to (B, Hkv, G*Tq, D) so one matmul per KV
head serves all G query heads.

Every attention function (`attention`, `attention_backward`, `attention_with_kv_cache`) takes
`upcast`: True (the default) computes in float32 (float64 stays float64) and rounds only the
result, False mimics a low-precision kernel (matmul inputs and P in the input dtype, softmax in
float32). The tests use the second to measure PyTorch's own low-precision error (DESIGN §5).
Nothing here depends on the device: the same math runs, mask and all, wherever the tensors live.

The variants (DESIGN §3), applied in this order to the scaled score s = scale * q.k of query i and
key j, with offset = Tk - Tq (per sequence for the cache op: Tk is that sequence's key count):
- softcap c > 0: s = c * tanh(s / c);
- alibi_slopes (Hq,) or (B, Hq): s -= slope * |i + offset - j|;
- visibility: causal (j <= i + offset) and window_size (left, right), -1 unbounded:
  i + offset - left <= j <= i + offset + right; an invisible key has s = -inf;
- dropout_p (attention only): P = softmax(s) is multiplied by keep / (1 - p), keep ~ Bernoulli(1 - p)
  drawn from a CPU generator seeded with `dropout_seed` (`dropout_keep`), so the backward
  regenerates the forward's mask. The lse is that of the undropped softmax.
The fast CPU kernels are `pytorch_mqa.ops.cpu`; this module is what they are tested against.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "attention",
    "attention_backward",
    "attention_with_kv_cache",
    "append_to_cache",
    "apply_rotary",
    "cache_rows",
    "causal_mask",
    "dropout_keep",
    "attention_varlen",
    "attention_varlen_backward",
]


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if upcast else dtype


def causal_mask(Tq: int, Tk: int, device=None) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i may see key j: bottom-right aligned, j <= i + (Tk - Tq)."""
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    return j <= i + (Tk - Tq)


def _group_q(q: torch.Tensor, Hkv: int) -> torch.Tensor:
    """(B, Tq, Hq, D) -> (B, Hkv, G*Tq, D), rows ordered (g, t)."""
    B, Tq, Hq, D = q.shape
    G = Hq // Hkv
    return q.reshape(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Tq, D)


def _ungroup(x: torch.Tensor, Tq: int, G: int) -> torch.Tensor:
    """(B, Hkv, G*Tq, D) -> (B, Tq, Hq, D)."""
    B, Hkv, _, D = x.shape
    return x.reshape(B, Hkv, G, Tq, D).permute(0, 3, 1, 2, 4).reshape(B, Tq, Hkv * G, D)


def _raw_scores(q, k, scale, Hkv, cdt):
    """Scaled scores (B, Hkv, G*Tq, Tk) in float32 (or float64), before any variant."""
    qg = _group_q(q.to(cdt), Hkv)
    kt = k.to(cdt).permute(0, 2, 3, 1)  # (B, Hkv, D, Tk)
    acc = torch.promote_types(cdt, torch.float32)
    return torch.matmul(qg, kt).to(acc) * scale


def _grouped(x, B, Hq, Hkv, Tq, Tk):
    """A per-query-head (B|1, Hq|1, Tq, Tk) tensor as the grouped (B, Hkv, G*Tq, Tk) rows."""
    x = x.expand(B, Hq, Tq, Tk)
    return x.reshape(B, Hkv, (Hq // Hkv) * Tq, Tk)


def visible(j, diag, key_len, causal: bool, window_size=(-1, -1)):
    """True where a key is visible: key index j (broadcast), `diag` the key aligned with the query
    (i + key_len - Tq), key_len the sequence's keys; causal and the window are relative to diag."""
    left, right = window_size
    vis = j < key_len
    if causal:
        vis = vis & (j <= diag)
    if left >= 0:
        vis = vis & (j >= diag - left)
    if right >= 0:
        vis = vis & (j <= diag + right)
    return vis


def _variant_masks(B, Hq, Tq, Tk, key_lens, causal, window_size, alibi_slopes, device):
    """(visible (B, 1, Tq, Tk) bool or None, bias (B, Hq, Tq, Tk) float32 or None).

    key_lens (B,) long: the keys sequence b has (the cache op), or None: all Tk. The offset of
    query i is key_len - Tq, so causal, window and ALiBi are bottom-right aligned per sequence.
    """
    left, right = window_size
    if key_lens is None and not causal and left < 0 and right < 0 and alibi_slopes is None:
        return None, None
    i = torch.arange(Tq, device=device)[None, :, None]
    j = torch.arange(Tk, device=device)[None, None, :]
    lens = torch.full((B,), Tk, dtype=torch.long, device=device) if key_lens is None else key_lens
    diag = i + (lens[:, None, None] - Tq)  # (B, Tq, 1): the key aligned with query i
    vis = visible(j, diag, lens[:, None, None], causal, window_size)
    bias = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(device=device, dtype=torch.float32)
        slopes = slopes.expand(B, Hq) if slopes.dim() == 2 else slopes[None].expand(B, Hq)
        bias = -slopes[:, :, None, None] * (diag - j).abs()[:, None].to(torch.float32)
    return vis[:, None], bias


def _scores(q, k, scale, Hkv, cdt, key_mask, softcap=0.0, bias=None):
    """Scores (B, Hkv, G*Tq, Tk) after softcap and ALiBi, -inf where not visible; and the
    softcap's derivative 1 - tanh^2 = 1 / cosh^2 (None without softcap), which the backward needs
    (computed from cosh: 1 - t * t cancels where tanh saturates, the large-logit regime).

    key_mask broadcasts to (B, 1, Tq, Tk) and is True where a key is visible; bias is
    (B, Hq, Tq, Tk) or None.
    """
    B, Tq, Hq, D = q.shape
    Tk = k.shape[1]
    s = _raw_scores(q, k, scale, Hkv, cdt)
    t = None
    if softcap > 0:
        x = s / softcap
        t = torch.cosh(x).pow(-2)
        s = softcap * torch.tanh(x)
    if bias is not None:
        s = s + _grouped(bias.to(s.dtype), B, Hq, Hkv, Tq, Tk)
    if key_mask is not None:
        G = Hq // Hkv
        m = key_mask.expand(B, 1, Tq, Tk)
        m = m.unsqueeze(2).expand(B, 1, G, Tq, Tk).reshape(B, 1, G * Tq, Tk)
        s = s.masked_fill(~m, float("-inf"))
    return s, t


def dropout_keep(seed, shape, p: float, device=None) -> torch.Tensor:
    """The keep mask of attention dropout: bool `shape` (B, Hq, Tq, Tk), True with probability
    1 - p, drawn on a CPU generator seeded with `seed` (an int or a one-element tensor)."""
    g = torch.Generator().manual_seed(int(seed) % (2**63))
    return (torch.rand(shape, generator=g) >= p).to(device)


def _dropout_scale(seed, p, B, Hq, Hkv, Tq, Tk, dtype, device):
    """keep / (1 - p) as grouped (B, Hkv, G*Tq, Tk) rows, or None without dropout."""
    if p <= 0:
        return None
    keep = dropout_keep(seed, (B, Hq, Tq, Tk), p, device)
    return _grouped(keep.to(dtype) / (1.0 - p), B, Hq, Hkv, Tq, Tk)


def _softmax_out(s, v, Tq, G, cdt, out_dtype, drop=None):
    """Softmax over keys and P @ V (P times `drop`, keep / (1 - p), with dropout). Rows with no
    visible key give zeros and lse = -inf."""
    B, Hkv, _, Tk = s.shape
    if Tk == 0:
        out = torch.zeros(B, Tq, Hkv * G, v.shape[-1], dtype=out_dtype, device=s.device)
        return out, torch.full((B, Hkv * G, Tq), float("-inf"), dtype=s.dtype, device=s.device)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    lse = torch.where(l > 0, m + torch.log(l), torch.full_like(l, float("-inf")))
    p = p / torch.where(l > 0, l, torch.ones_like(l))
    if drop is not None:
        p = p * drop
    o = torch.matmul(p.to(cdt), v.to(cdt).transpose(1, 2))  # v: (B, Tk, Hkv, D) -> (B, Hkv, Tk, D)
    out = _ungroup(o, Tq, G).to(out_dtype).contiguous()
    lse = lse.reshape(B, Hkv, G, Tq).reshape(B, Hkv * G, Tq)
    return out, lse


def _variant_args(window_size, softcap, alibi_slopes):
    left, right = (-1, -1) if window_size is None else (int(window_size[0]), int(window_size[1]))
    return (left, right), float(softcap or 0.0), alibi_slopes


def attention(
    q, k, v, causal: bool = False, scale: float | None = None, upcast: bool = True, *,
    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None, dropout_p: float = 0.0, dropout_seed=None,
):
    """Reference attention. Returns (out (B, Tq, Hq, D) in q.dtype, lse (B, Hq, Tq) float32).

    window_size, softcap, alibi_slopes and dropout_p (with its dropout_seed) as in the module
    docstring."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    window_size, softcap, alibi_slopes = _variant_args(window_size, softcap, alibi_slopes)
    cdt = _compute_dtype(q.dtype, upcast)
    mask, bias = _variant_masks(B, Hq, Tq, Tk, None, causal, window_size, alibi_slopes, q.device)
    s, _ = _scores(q, k, scale, Hkv, cdt, mask, softcap, bias)
    drop = _dropout_scale(dropout_seed, dropout_p, B, Hq, Hkv, Tq, Tk, s.dtype, q.device)
    out, lse = _softmax_out(s, v, Tq, Hq // Hkv, cdt, q.dtype, drop)
    return out, lse.to(torch.promote_types(q.dtype, torch.float32)).contiguous()


def attention_backward(
    dout, q, k, v, lse, delta, causal: bool = False, scale: float | None = None, upcast: bool = True, *,
    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None, dropout_p: float = 0.0, dropout_seed=None,
):
    """Analytic backward: returns (dq, dk, dv) in the input dtypes.

    lse (B, Hq, Tq) is the forward's log-sum-exp; delta (B, Hq, Tq) is rowsum(dout * out) minus
    the incoming gradient of lse (zero when only `out` is used), so dS = P * (dP - delta), with
    dP = dO V^T times the dropout's keep / (1 - p). The softcap multiplies dS by 1 - tanh^2 (as 1 / cosh^2).
    dK/dV are summed over the G query heads of each KV head. upcast=True computes in float32;
    False runs the matmuls on inputs, P and dS in the input dtype (P and dS from float32 math).
    """
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    window_size, softcap, alibi_slopes = _variant_args(window_size, softcap, alibi_slopes)
    cdt = _compute_dtype(q.dtype, upcast)
    mask, bias = _variant_masks(B, Hq, Tq, Tk, None, causal, window_size, alibi_slopes, q.device)
    s, t = _scores(q, k, scale, Hkv, cdt, mask, softcap, bias)  # (B, Hkv, G*Tq, Tk), float32 (or float64)
    acc = s.dtype
    lse_g = lse.to(acc).reshape(B, Hkv, G * Tq, 1)
    # exp(-inf - (-inf)) is NaN; rows with lse = -inf saw no key and have P = 0.
    p = torch.where(torch.isinf(lse_g), torch.zeros_like(s), torch.exp(s - lse_g))
    drop = _dropout_scale(dropout_seed, dropout_p, B, Hq, Hkv, Tq, Tk, acc, q.device)
    do = _group_q(dout.to(cdt), Hkv)  # (B, Hkv, G*Tq, D)
    vt = v.to(cdt).permute(0, 2, 3, 1)  # (B, Hkv, D, Tk)
    dp = torch.matmul(do, vt).to(acc)
    if drop is not None:
        dp = dp * drop
    ds = p * (dp - delta.to(acc).reshape(B, Hkv, G * Tq, 1))
    if t is not None:
        ds = ds * t  # d(softcap * tanh(s / softcap)) / ds
    ds = ds.to(cdt)
    kk = k.to(cdt).transpose(1, 2)  # (B, Hkv, Tk, D)
    dq = _ungroup(torch.matmul(ds, kk).to(acc) * scale, Tq, G)
    qg = _group_q(q.to(cdt), Hkv)
    dk = (torch.matmul(ds.transpose(-1, -2), qg).to(acc) * scale).transpose(1, 2)  # (B, Tk, Hkv, D)
    pd = p if drop is None else p * drop
    dv = torch.matmul(pd.to(cdt).transpose(-1, -2), do).transpose(1, 2)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


def _sequences(cu_seqlens_q, cu_seqlens_k):
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def _seq_alibi(alibi_slopes, b):
    if alibi_slopes is None or alibi_slopes.dim() == 1:
        return alibi_slopes
    return alibi_slopes[b]


def _seq_seed(dropout_seed, b):
    return None if dropout_seed is None else int(dropout_seed) + 1000003 * b


def attention_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, causal: bool = False, scale: float | None = None, upcast: bool = True, *,
    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None, dropout_p: float = 0.0, dropout_seed=None,
):
    """Packed sequences: q (total_q, Hq, D), k/v (total_k, Hkv, D); sequence b is rows
    [cu_seqlens_q[b], cu_seqlens_q[b+1]) of q and [cu_seqlens_k[b], cu_seqlens_k[b+1]) of k/v,
    attended as `attention` would with B = 1 (alibi_slopes row b; dropout seed
    dropout_seed + 1000003 * b). Returns (out (total_q, Hq, D), lse (Hq, total_q) float32)."""
    Hq = q.shape[1]
    out = q.new_zeros(q.shape)
    lse = torch.full((Hq, q.shape[0]), float("-inf"), dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    for b, (q0, q1, k0, k1) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        if q1 == q0:
            continue
        o, l = attention(
            q[q0:q1][None], k[k0:k1][None], v[k0:k1][None], causal, scale, upcast, window_size=window_size,
            softcap=softcap, alibi_slopes=_seq_alibi(alibi_slopes, b), dropout_p=dropout_p,
            dropout_seed=_seq_seed(dropout_seed, b),
        )
        out[q0:q1] = o[0]
        lse[:, q0:q1] = l[0]
    return out, lse


def attention_varlen_backward(
    dout, q, k, v, cu_seqlens_q, cu_seqlens_k, lse, delta, causal: bool = False, scale: float | None = None,
    upcast: bool = True, *, window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None, dropout_p: float = 0.0,
    dropout_seed=None,
):
    """Backward of `attention_varlen`; lse and delta are (Hq, total_q). Returns (dq, dk, dv)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, (q0, q1, k0, k1) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        if q1 == q0 or k1 == k0:
            continue
        g = attention_backward(
            dout[q0:q1][None], q[q0:q1][None], k[k0:k1][None], v[k0:k1][None], lse[:, q0:q1][None],
            delta[:, q0:q1][None], causal, scale, upcast, window_size=window_size, softcap=softcap,
            alibi_slopes=_seq_alibi(alibi_slopes, b), dropout_p=dropout_p, dropout_seed=_seq_seed(dropout_seed, b),
        )
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


def apply_rotary(x, cos, sin, positions, interleaved: bool = True):
    """Rotary embedding of x (B, T, H, D) at positions (B, T): the one rotary body of the package.

    cos, sin (S_ro, R/2) with R = rotary_dim even and <= D; token (b, t) uses row
    positions[b, t] of both (positions must lie in [0, S_ro); they are clamped there, so an
    unchecked out-of-range position reads the last row instead of failing on a device).
    interleaved=True pairs channels (2i, 2i+1) (GPT-J); False pairs (i, i + R/2) (GPT-NeoX). Each
    pair (x1, x2) becomes (x1 cos - x2 sin, x1 sin + x2 cos); channels >= R pass through. The math
    is float32 (float64 stays float64), rounded once to x.dtype.
    """
    R = 2 * cos.shape[-1]
    if R == 0:
        return x
    cdt = torch.promote_types(x.dtype, torch.float32)
    pos = positions.to(device=x.device, dtype=torch.long).clamp(0, max(cos.shape[0] - 1, 0))
    c = cos.to(device=x.device, dtype=cdt)[pos][:, :, None, :]  # (B, T, 1, R/2)
    s = sin.to(device=x.device, dtype=cdt)[pos][:, :, None, :]
    xr = x[..., :R].to(cdt)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    else:
        x1, x2 = xr[..., : R // 2], xr[..., R // 2 :]
    o1, o2 = x1 * c - x2 * s, x1 * s + x2 * c
    rotated = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., R:]), dim=-1)


def cache_rows(k_cache, B: int, block_table=None, cache_batch_idx=None):
    """Where logical row j of sequence b lives: (first, second) index tensors (B, S), so that
    row j of sequence b is k_cache[first[b, j], second[b, j]], and the capacity S.

    Contiguous caches (B_cache, S, Hkv, D): first = cache_batch_idx[b] (default b), second = j.
    Paged caches (num_blocks, page_size, Hkv, D) with block_table (rows, max_blocks): the table
    row is r = cache_batch_idx[b] (default b), first = block_table[r, j // page_size],
    second = j % page_size, S = max_blocks * page_size. Indices are clamped into range, so that
    table entries past a sequence's pages (never visible, never written) cannot fault.
    """
    dev = k_cache.device
    rows = torch.arange(B, device=dev) if cache_batch_idx is None else cache_batch_idx.to(device=dev, dtype=torch.long)
    if block_table is None:
        S = k_cache.shape[1]
        first = rows.clamp(0, max(k_cache.shape[0] - 1, 0))[:, None].expand(B, S)
        second = torch.arange(S, device=dev)[None, :].expand(B, S)
        return first, second, S
    page = k_cache.shape[1]
    S = block_table.shape[1] * page
    j = torch.arange(S, device=dev)
    table = block_table.to(device=dev, dtype=torch.long)[rows.clamp(0, max(block_table.shape[0] - 1, 0))]
    first = table[:, j // page].clamp(0, max(k_cache.shape[0] - 1, 0))
    second = (j % page)[None, :].expand(B, S)
    return first, second, S


def _append_through(cache, new, L, first, second, S):
    """Write new (B, T, H, D) at logical rows [L_b, L_b + T) of each sequence, through the row map.

    Rows that would land outside [0, S) are dropped, without a host sync: they are redirected to
    logical row S-1 (or 0) carrying the value that row gets anyway (the new row landing there, or
    its old value), so colliding writes all agree.
    """
    B, T = new.shape[:2]
    if B == 0 or T == 0 or S == 0:
        return
    dev = cache.device
    ar = torch.arange(B, device=dev)
    pos = L[:, None] + torch.arange(T, device=dev)[None, :]  # (B, T) logical rows
    valid = (pos >= 0) & (pos < S)
    pos_eff = pos.clamp(0, S - 1)

    def redirect(row, t):  # value logical row `row` of each sequence ends with
        lands = (L <= row) & (L + T - 1 >= row)
        old = cache[first[:, row], second[:, row]]
        return torch.where(lands[:, None, None], new[ar, t.clamp(0, T - 1)].to(cache.dtype), old)

    fill_last, fill_first = redirect(S - 1, S - 1 - L), redirect(0, -L)
    src = torch.where(valid[..., None, None], new.to(cache.dtype),
                      torch.where((pos < 0)[..., None, None], fill_first[:, None], fill_last[:, None]))
    cache.index_put_((first.gather(1, pos_eff), second.gather(1, pos_eff)), src)


def append_to_cache(cache: torch.Tensor, new: torch.Tensor, cache_seqlens: torch.Tensor) -> None:
    """Write new (B, Tq, H, D) into a contiguous cache (B, S, H, D) at rows [L_b, L_b + Tq), in
    place; rows that would land outside [0, S) are dropped (see `_append_through`)."""
    L = cache_seqlens.to(device=cache.device, dtype=torch.long)
    first, second, S = cache_rows(cache, new.shape[0])
    _append_through(cache, new, L, first, second, S)


def rotary_positions(cache_seqlens, T: int, per_token: bool):
    """(B, T) int64 rotary positions of new rows: cache_seqlens_b + t, or cache_seqlens_b for
    every t when not per_token (FlashAttention: q of a non-causal, non-local call)."""
    L = cache_seqlens.to(torch.long)
    t = torch.arange(T, device=L.device)[None, :]
    return L[:, None] + (t if per_token else 0 * t)


def attention_with_kv_cache(
    q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal: bool = True, scale=None, upcast: bool = True,
    *, window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None, block_table=None, cache_batch_idx=None,
    cache_leftpad=None, rotary_cos=None, rotary_sin=None, rotary_interleaved: bool = True,
):
    """Reference decode (FlashAttention's `flash_attn_with_kvcache`): rotate, append, attend.

    q (B, Tq, Hq, D); k, v (B, Tn, Hkv, D) or None; cache_seqlens int32 (B,): L_b, the rows of
    sequence b before the call, padding included. The caches are contiguous (B_cache, S, Hkv, D)
    or, with block_table (rows, max_blocks) int32, paged (num_blocks, page_size, Hkv, D); the row
    map is `cache_rows` (cache_batch_idx picks the slot, or the table row, of sequence b).

    1. Rotary (rotary_cos/sin (S_ro, R/2), only with new k): new k is rotated at positions
       L_b + t; q at L_b + i if causal or a window is set, else every q row at L_b
       (`rotary_positions`; positions are absolute cache rows, the left padding included).
    2. Append: k/v land at logical rows [L_b, L_b + Tn) through the row map (dropped past S).
    3. Attend: sequence b's live keys are logical rows [P_b, K_b) with P_b = cache_leftpad[b]
       (default 0) and K_b = min(L_b + Tn, S). Causal, window and ALiBi are bottom-right aligned:
       query i's diagonal key is i + K_b - Tq (the same as i + (K_b - P_b) - Tq counted from the
       first live key). Rows seeing no key give zeros and lse = -inf.
    Returns (out (B, Tq, Hq, D) in q.dtype, lse (B, Hq, Tq) float32).
    """
    B, Tq, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    window_size, softcap, alibi_slopes = _variant_args(window_size, softcap, alibi_slopes)
    dev = q.device
    L = cache_seqlens.to(device=dev, dtype=torch.long)
    first, second, S = cache_rows(k_cache, B, block_table, cache_batch_idx)
    Tn = 0 if k is None else k.shape[1]
    if k is not None and rotary_cos is not None and rotary_cos.shape[-1] > 0:
        per_token = causal or tuple(window_size) != (-1, -1)
        k = apply_rotary(k, rotary_cos, rotary_sin, rotary_positions(L, Tn, True), rotary_interleaved)
        q = apply_rotary(q, rotary_cos, rotary_sin, rotary_positions(L, Tq, per_token), rotary_interleaved)
    if k is not None:
        _append_through(k_cache, k, L, first, second, S)
        _append_through(v_cache, v, L, first, second, S)
    key_len = (L + Tn).clamp(0, S)
    pad = torch.zeros_like(L) if cache_leftpad is None else cache_leftpad.to(device=dev, dtype=torch.long)
    j = torch.arange(S, device=dev)
    live = (j[None, :] >= pad[:, None]) & (j[None, :] < key_len[:, None])  # (B, S)
    # The live rows in logical order; dead rows are zeroed, so whatever they hold (stale or NaN
    # values of other sequences' pages) cannot reach the result.
    kl = torch.where(live[..., None, None], k_cache[first, second], 0)
    vl = torch.where(live[..., None, None], v_cache[first, second], 0)
    vis, bias = _variant_masks(B, Hq, Tq, S, key_len, causal, window_size, alibi_slopes, dev)
    vis = vis & (j[None, None, None, :] >= pad[:, None, None, None])
    cdt = _compute_dtype(q.dtype, upcast)
    s, _ = _scores(q, kl, scale, Hkv, cdt, vis, softcap, bias)
    out, lse = _softmax_out(s, vl, Tq, Hq // Hkv, cdt, q.dtype)
    return out, lse.to(torch.promote_types(q.dtype, torch.float32)).contiguous()
