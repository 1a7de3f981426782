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


def append_to_cache(cache: torch.Tensor, new: torch.Tensor, cache_seqlens: torch.Tensor) -> None:
    """Write new (B, Tq, H, D) into cache (B, S, H, D) at rows [L_b, L_b + Tq), in place.

    Rows that would land outside [0, S) are dropped, without a host sync: they are redirected to
    row S-1 carrying the value that row gets anyway (the last in-range new row, or its old value
    when no new row is in range), so colliding writes all agree.
    """
    B, Tq = new.shape[:2]
    S = cache.shape[1]
    if B == 0 or Tq == 0 or S == 0:
        return
    L = cache_seqlens.to(device=cache.device, dtype=torch.long)
    t = torch.arange(Tq, device=cache.device)
    pos = L[:, None] + t[None, :]  # (B, Tq)
    valid = (pos >= 0) & (pos < S)
    b_idx = torch.arange(B, device=cache.device)[:, None].expand(B, Tq)
    pos_eff = pos.clamp(0, S - 1)
    # Source row for out-of-range slots: the new row that lands on S-1, if any.
    t_last = (S - 1 - L).clamp(0, Tq - 1)  # (B,)
    lands_on_last = (L <= S - 1) & (L + Tq - 1 >= S - 1)
    src_last = new[torch.arange(B, device=cache.device), t_last]  # (B, H, D)
    old_last = cache[:, S - 1]
    fill = torch.where(lands_on_last[:, None, None], src_last, old_last)  # (B, H, D)
    # pos < 0 rows are redirected to row 0 with row 0's old value unless a new row lands there.
    t_first = (-L).clamp(0, Tq - 1)
    lands_on_first = (L <= 0) & (L + Tq - 1 >= 0)
    fill_first = torch.where(
        lands_on_first[:, None, None], new[torch.arange(B, device=cache.device), t_first], cache[:, 0]
    )
    src = torch.where(valid[..., None, None], new, torch.where((pos < 0)[..., None, None], fill_first[:, None], fill[:, None]))
    cache.index_put_((b_idx, pos_eff), src.to(cache.dtype))


def attention_with_kv_cache(
    q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal: bool = True, scale=None, upcast: bool = True,
    *, window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
):
    """Reference decode: append k/v (if given) at cache_seqlens, then attend.

    q (B, Tq, Hq, D); caches (B, S, Hkv, D); cache_seqlens int32 (B,). Sequence b attends keys
    [0, L_b + Tq) (or [0, L_b) without new k/v), clamped to [0, S); causal alignment, window and
    ALiBi are per sequence, bottom-right. Returns (out, lse) like `attention`.
    """
    B, Tq, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    window_size, softcap, alibi_slopes = _variant_args(window_size, softcap, alibi_slopes)
    L = cache_seqlens.to(device=q.device, dtype=torch.long)
    if k is not None:
        append_to_cache(k_cache, k, L)
        append_to_cache(v_cache, v, L)
        Lk = L + Tq
    else:
        Lk = L
    Lk = Lk.clamp(0, S)
    vis, bias = _variant_masks(B, Hq, Tq, S, Lk, causal, window_size, alibi_slopes, q.device)
    cdt = _compute_dtype(q.dtype, upcast)
    s, _ = _scores(q, k_cache, scale, Hkv, cdt, vis, softcap, bias)
    out, lse = _softmax_out(s, v_cache, Tq, Hq // Hkv, cdt, q.dtype)
    return out, lse.to(torch.promote_types(q.dtype, torch.float32)).contiguous()
