"""Pure-PyTorch attention: the correctness oracle of both ops (readable math, fp32 accumulation).

Layout is BSHD: q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D). Query head h reads KV head h // G with
G = Hq // Hkv. K/V are never expanded: q is regrouped to (B, Hkv, G*Tq, D) so one matmul per KV
head serves all G query heads.

Every attention function (`attention`, `attention_backward`, `attention_with_kv_cache`) takes
`upcast`: True (the default) computes in float32 (float64 stays float64) and rounds only the
result, False mimics a low-precision kernel (matmul inputs and P in the input dtype, softmax in
float32). The tests use the second to measure PyTorch's own low-precision error (DESIGN §5).
Nothing here depends on the device: the same math runs, mask and all, wherever the tensors live.
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


def _scores(q, k, scale, Hkv, cdt, key_mask):
    """Scaled scores (B, Hkv, G*Tq, Tk) in float32 (or float64), masked to -inf where not visible.

    key_mask broadcasts to (B, 1, Tq, Tk) and is True where a key is visible.
    """
    B, Tq, Hq, D = q.shape
    qg = _group_q(q.to(cdt), Hkv)
    kt = k.to(cdt).permute(0, 2, 3, 1)  # (B, Hkv, D, Tk)
    acc = torch.promote_types(cdt, torch.float32)
    s = torch.matmul(qg, kt).to(acc) * scale
    if key_mask is not None:
        G = Hq // Hkv
        m = key_mask.expand(B, 1, Tq, k.shape[1])
        m = m.unsqueeze(2).expand(B, 1, G, Tq, k.shape[1]).reshape(B, 1, G * Tq, k.shape[1])
        s = s.masked_fill(~m, float("-inf"))
    return s


def _softmax_out(s, v, Tq, G, cdt, out_dtype):
    """Softmax over keys and P @ V. Rows with no visible key give zeros and lse = -inf."""
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
    o = torch.matmul(p.to(cdt), v.to(cdt).transpose(1, 2))  # v: (B, Tk, Hkv, D) -> (B, Hkv, Tk, D)
    out = _ungroup(o, Tq, G).to(out_dtype).contiguous()
    lse = lse.reshape(B, Hkv, G, Tq).reshape(B, Hkv * G, Tq)
    return out, lse


def attention(q, k, v, causal: bool = False, scale: float | None = None, upcast: bool = True):
    """Reference attention. Returns (out (B, Tq, Hq, D) in q.dtype, lse (B, Hq, Tq) float32)."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cdt = _compute_dtype(q.dtype, upcast)
    mask = causal_mask(Tq, Tk, q.device)[None, None] if causal else None
    s = _scores(q, k, scale, Hkv, cdt, mask)
    out, lse = _softmax_out(s, v, Tq, Hq // Hkv, cdt, q.dtype)
    return out, lse.to(torch.promote_types(q.dtype, torch.float32)).contiguous()


def attention_backward(
    dout, q, k, v, lse, delta, causal: bool = False, scale: float | None = None, upcast: bool = True
):
    """Analytic backward: returns (dq, dk, dv) in the input dtypes.

    lse (B, Hq, Tq) is the forward's log-sum-exp; delta (B, Hq, Tq) is rowsum(dout * out) minus
    the incoming gradient of lse (zero when only `out` is used), so dS = P * (dP - delta).
    dK/dV are summed over the G query heads of each KV head. upcast=True computes in float32;
    False runs the matmuls on inputs, P and dS in the input dtype (P and dS from float32 math).
    """
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cdt = _compute_dtype(q.dtype, upcast)
    mask = causal_mask(Tq, Tk, q.device)[None, None] if causal else None
    s = _scores(q, k, scale, Hkv, cdt, mask)  # (B, Hkv, G*Tq, Tk), float32 (or float64)
    acc = s.dtype
    lse_g = lse.to(acc).reshape(B, Hkv, G * Tq, 1)
    # exp(-inf - (-inf)) is NaN; rows with lse = -inf saw no key and have P = 0.
    p = torch.where(torch.isinf(lse_g), torch.zeros_like(s), torch.exp(s - lse_g))
    do = _group_q(dout.to(cdt), Hkv)  # (B, Hkv, G*Tq, D)
    vt = v.to(cdt).permute(0, 2, 3, 1)  # (B, Hkv, D, Tk)
    dp = torch.matmul(do, vt).to(acc)
    ds = (p * (dp - delta.to(acc).reshape(B, Hkv, G * Tq, 1))).to(cdt)
    kk = k.to(cdt).transpose(1, 2)  # (B, Hkv, Tk, D)
    dq = _ungroup(torch.matmul(ds, kk).to(acc) * scale, Tq, G)
    qg = _group_q(q.to(cdt), Hkv)
    dk = (torch.matmul(ds.transpose(-1, -2), qg).to(acc) * scale).transpose(1, 2)  # (B, Tk, Hkv, D)
    dv = torch.matmul(p.to(cdt).transpose(-1, -2), do).transpose(1, 2)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


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
    q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal: bool = True, scale=None, upcast: bool = True
):
    """Reference decode: append k/v (if given) at cache_seqlens, then attend.

    q (B, Tq, Hq, D); caches (B, S, Hkv, D); cache_seqlens int32 (B,). Sequence b attends keys
    [0, L_b + Tq) (or [0, L_b) without new k/v), clamped to [0, S); causal alignment is per
    sequence, bottom-right. Returns (out, lse) like `attention`.
    """
    B, Tq, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    L = cache_seqlens.to(device=q.device, dtype=torch.long)
    if k is not None:
        append_to_cache(k_cache, k, L)
        append_to_cache(v_cache, v, L)
        Lk = L + Tq
    else:
        Lk = L
    Lk = Lk.clamp(0, S)
    kc, vc = k_cache, v_cache
    Tk = S
    j = torch.arange(Tk, device=q.device)[None, None, :]  # (1, 1, Tk)
    vis = j < Lk[:, None, None]  # (B, 1, Tk)
    if causal:
        i = torch.arange(Tq, device=q.device)[None, :, None]  # (1, Tq, 1)
        vis = vis & (j <= i + (Lk[:, None, None] - Tq))  # (B, Tq, Tk)
    cdt = _compute_dtype(q.dtype, upcast)
    s = _scores(q, kc, scale, Hkv, cdt, vis[:, None])
    out, lse = _softmax_out(s, vc, Tq, Hq // Hkv, cdt, q.dtype)
    return out, lse.to(torch.promote_types(q.dtype, torch.float32)).contiguous()
