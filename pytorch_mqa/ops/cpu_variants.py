"""The CPU kernels of the attention variants (DESIGN §3: window_size, softcap, alibi_slopes,
dropout_p) and of packed (varlen) sequences; what backend "reference" runs on CPU tensors.

- window and ALiBi without softcap or dropout: PyTorch's fused CPU attention
  (`aten._scaled_dot_product_flash_attention_for_cpu`) and its backward with an additive float32
  mask (0 / -inf for causal and window, -slope * |i + Tk - Tq - j| for ALiBi), run per block of
  128 query rows over only the keys that block can see (`_blocks`), so that a window's work
  scales with the window and not with Tk. Its semantics match
  except for rows that see no key, which it returns with lse = 0: they are set to zeros and
  lse = -inf here, and given a finite lse in the backward, where the mask makes their P zero.
- softcap or dropout: the fused kernel has neither a score transform nor a dropout mask it can
  replay, so these run as explicit float32 math on the masked, transformed scores, with the
  analytic backward (dS is multiplied by 1 - tanh^2 = 1 / cosh^2 under softcap; the dropout mask is drawn again
  from the call's seed with `reference.dropout_keep`, so forward and backward use the same one).
- varlen: one call of the above per sequence (the lengths are read on the host once).
- the cache op: the new rows are appended in place as in `pytorch_mqa.ops.cpu`, then one call
  over the longest visible prefix with a per-sequence mask (each sequence's own offset).
"""

from __future__ import annotations

import torch

from pytorch_mqa.ops.cpu import append_new_rows
from pytorch_mqa.reference import dropout_keep, visible

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def has_variant(window_size, softcap, alibi_slopes, dropout_p) -> bool:
    return tuple(window_size) != (-1, -1) or softcap > 0 or alibi_slopes is not None or dropout_p > 0


def _bias(B, Hq, Tq, Tk, causal, window_size, alibi_slopes, key_lens=None, rows=None, cols=None):
    """Additive float32 mask (B|1, Hq|1, rows, cols) and the (B|1, rows) rows that see no key.

    key_lens: the keys each sequence has (the cache op), or None: all Tk; the offset of query i
    is key_len - Tq. rows, cols: (start, stop) of a block of the (Tq, Tk) problem (default all)."""
    i = torch.arange(*(rows or (0, Tq)))[None, :, None]
    j = torch.arange(*(cols or (0, Tk)))[None, None, :]
    lens = torch.tensor([Tk] if key_lens is None else key_lens, dtype=torch.long)[:, None, None]
    diag = i + (lens - Tq)  # (B|1, rows, 1)
    vis = visible(j, diag, lens, causal, window_size)
    bias = torch.zeros(vis.shape).masked_fill_(~vis, float("-inf"))[:, None]
    if alibi_slopes is not None:
        slopes = alibi_slopes.float()
        slopes = slopes[None] if slopes.dim() == 1 else slopes
        bias = bias - slopes[:, :, None, None] * (diag - j).abs().float()[:, None]
    return bias, ~vis.any(-1)


CHUNK = 128  # query rows per block when a window or the causal mask bounds the keys


def _blocks(Tq, Tk, causal, window_size):
    """[(i0, i1, j0, j1)]: query blocks and the one key range each can see. Keys outside every
    row's window are never touched, so the work scales with the window, not with Tk."""
    left, right = window_size
    if left < 0 and right < 0 and not causal:
        return [(0, Tq, 0, Tk)]
    off = Tk - Tq
    r = None if right < 0 else right
    if causal:
        r = 0 if r is None else min(r, 0)
    out = []
    for i0 in range(0, Tq, CHUNK):
        i1 = min(Tq, i0 + CHUNK)
        j0 = 0 if left < 0 else min(Tk, max(0, i0 + off - left))
        j1 = Tk if r is None else max(j0, min(Tk, i1 - 1 + off + r + 1))
        out.append((i0, i1, j0, j1))
    return out


def _bhsd(x):
    x = x.transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()


def _fused_forward(q, k, v, causal, scale, window_size, alibi_slopes):
    B, Tq, Hq, D = q.shape
    Tk = k.shape[1]
    qh, kh, vh = _bhsd(q), _bhsd(k), _bhsd(v)
    out = q.new_zeros((B, Tq, Hq, D))
    lse = torch.full((B, Hq, Tq), float("-inf"))
    for i0, i1, j0, j1 in _blocks(Tq, Tk, causal, window_size):
        if j1 == j0:
            continue  # these rows see no key
        bias, empty = _bias(B, Hq, Tq, Tk, causal, window_size, alibi_slopes, rows=(i0, i1), cols=(j0, j1))
        o, l = _flash(qh[:, :, i0:i1], kh[:, :, j0:j1], vh[:, :, j0:j1], 0.0, False, attn_mask=bias, scale=scale)
        o = o.transpose(1, 2)
        if bool(empty.any()):
            o = o.masked_fill(empty[:, :, None, None], 0.0)
            l = l.masked_fill(empty[:, None, :], float("-inf"))
        out[:, i0:i1], lse[:, :, i0:i1] = o, l
    return out, lse


def _fused_backward(dout, q, k, v, out, lse, dlse, causal, scale, window_size, alibi_slopes):
    """The kernel's backward with the mask, per block of `_blocks`; K/V expanded to Hq heads and
    dK/dV summed over the G query heads in float32. A nonzero dLSE is carried by one padded
    head-dim column (q, k, v: 0; dO: 1; O: -dLSE), as in `pytorch_mqa.ops.cpu`."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dt = q.dtype
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).float()  # empty rows: P = 0 by the mask
    if dlse is not None and bool(dlse.any()):
        pad = torch.nn.functional.pad
        q, k, v = (pad(x.float(), (0, 1)) for x in (q, k, v))
        dout = pad(dout.float(), (0, 1), value=1.0)
        out = torch.cat([out.float(), -dlse.float().transpose(1, 2).unsqueeze(-1)], dim=-1)
    ke, ve = (_bhsd(x.repeat_interleave(G, dim=2)) for x in (k, v))
    qh, doh, oh = _bhsd(q), _bhsd(dout), _bhsd(out)
    dq = torch.zeros(B, Tq, Hq, D, dtype=torch.float32)
    dk = torch.zeros(B, Tk, Hkv, D, dtype=torch.float32)
    dv = torch.zeros(B, Tk, Hkv, D, dtype=torch.float32)
    for i0, i1, j0, j1 in _blocks(Tq, Tk, causal, window_size):
        if j1 == j0:
            continue
        bias, _ = _bias(B, Hq, Tq, Tk, causal, window_size, alibi_slopes, rows=(i0, i1), cols=(j0, j1))
        gq, gk, gv = _flash_backward(
            doh[:, :, i0:i1], qh[:, :, i0:i1], ke[:, :, j0:j1], ve[:, :, j0:j1], oh[:, :, i0:i1],
            lse[:, :, i0:i1], 0.0, False, attn_mask=bias, scale=scale,
        )
        dq[:, i0:i1] = gq.transpose(1, 2)[..., :D]
        dk[:, j0:j1] += gk.transpose(1, 2).unflatten(2, (Hkv, G)).sum(3, dtype=torch.float32)[..., :D]
        dv[:, j0:j1] += gv.transpose(1, 2).unflatten(2, (Hkv, G)).sum(3, dtype=torch.float32)[..., :D]
    return dq.to(dt), dk.to(dt), dv.to(dt)


def _explicit_scores(q, k, causal, scale, window_size, softcap, alibi_slopes, key_lens=None):
    """float32 scores (B, Hq, Tq, Tk) after softcap, ALiBi and the mask; and the softcap's
    derivative 1 / cosh^2 (or None): 1 - tanh^2 would cancel where tanh saturates."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    qh = q.float().transpose(1, 2).reshape(B, Hkv, (Hq // Hkv) * Tq, D)  # rows (g, t) per KV head
    s = torch.matmul(qh, k.float().permute(0, 2, 3, 1)).reshape(B, Hq, Tq, Tk) * scale
    t = None
    if softcap > 0:
        x = s / softcap
        t = torch.cosh(x).pow(-2)
        s = torch.tanh(x) * softcap
    bias, empty = _bias(B, Hq, Tq, Tk, causal, window_size, alibi_slopes, key_lens)
    return s + bias, t, empty


def _drop(seed, p, shape):
    return None if p <= 0 else dropout_keep(seed, shape, p).float() / (1.0 - p)


def _pv(p, v):
    """(B, Hq, Tq, Tk) @ v (B, Tk, Hkv, D) -> (B, Tq, Hq, D), K/V not expanded."""
    B, Hq, Tq, Tk = p.shape
    Hkv = v.shape[2]
    o = torch.matmul(p.reshape(B, Hkv, -1, Tk), v.float().transpose(1, 2))  # (B, Hkv, G*Tq, D)
    return o.reshape(B, Hq, Tq, -1).transpose(1, 2)


def _explicit_forward(q, k, v, causal, scale, window_size, softcap, alibi_slopes, dropout_p, seed):
    s, _, empty = _explicit_scores(q, k, causal, scale, window_size, softcap, alibi_slopes)
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows that see no key
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    d = _drop(seed, dropout_p, s.shape)
    if d is not None:
        p = p * d
    return _pv(p, v).to(q.dtype).contiguous(), lse.contiguous()


def _explicit_backward(dout, q, k, v, out, lse, dlse, causal, scale, window_size, softcap, alibi_slopes, dropout_p, seed):
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    s, t, _ = _explicit_scores(q, k, causal, scale, window_size, softcap, alibi_slopes)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse.float())[..., None])
    do = dout.float().transpose(1, 2)  # (B, Hq, Tq, D)
    dp = torch.matmul(do.reshape(B, Hkv, G * Tq, D), v.float().permute(0, 2, 3, 1)).reshape(B, Hq, Tq, Tk)
    d = _drop(seed, dropout_p, s.shape)
    pd = p if d is None else p * d
    if d is not None:
        dp = dp * d
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)  # (B, Hq, Tq)
    if dlse is not None:
        delta = delta - dlse.float()
    ds = p * (dp - delta[..., None])
    if t is not None:
        ds = ds * t
    dsg = ds.reshape(B, Hkv, G * Tq, Tk)
    dq = torch.matmul(dsg, k.float().transpose(1, 2)).reshape(B, Hq, Tq, D).transpose(1, 2) * scale
    qg = q.float().transpose(1, 2).reshape(B, Hkv, G * Tq, D)
    dk = (torch.matmul(dsg.transpose(-1, -2), qg) * scale).transpose(1, 2)
    dv = torch.matmul(pd.reshape(B, Hkv, G * Tq, Tk).transpose(-1, -2), do.reshape(B, Hkv, G * Tq, D)).transpose(1, 2)
    return tuple(g.to(q.dtype).contiguous() for g in (dq, dk, dv))


def _empty(q):
    B, Tq, Hq, D = q.shape
    return q.new_zeros((B, Tq, Hq, D)), q.new_full((B, Hq, Tq), float("-inf"), dtype=torch.float32)


def attention_forward(q, k, v, causal, scale, window_size, softcap, alibi_slopes, dropout_p, seed):
    """out (B, Tq, Hq, D) and lse (B, Hq, Tq) float32, as `reference.attention` with the variants."""
    if q.numel() == 0 or k.shape[1] == 0:
        return _empty(q)
    if softcap > 0 or dropout_p > 0:
        return _explicit_forward(q, k, v, causal, scale, window_size, softcap, alibi_slopes, dropout_p, seed)
    return _fused_forward(q, k, v, causal, scale, window_size, alibi_slopes)


def attention_backward(dout, q, k, v, out, lse, dlse, causal, scale, window_size, softcap, alibi_slopes, dropout_p, seed):
    """dq, dk, dv of `attention_forward`, given dL/dout and dL/dlse (or None)."""
    if q.numel() == 0 or k.shape[1] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if softcap > 0 or dropout_p > 0:
        return _explicit_backward(
            dout, q, k, v, out, lse, dlse, causal, scale, window_size, softcap, alibi_slopes, dropout_p, seed
        )
    return _fused_backward(dout, q, k, v, out, lse, dlse, causal, scale, window_size, alibi_slopes)


def attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, window_size, softcap, alibi_slopes):
    """The cache op with window, softcap or ALiBi on CPU tensors: append k/v in place (lengths
    checked first), then attend the longest visible prefix with per-sequence offsets: the fused
    kernel with an additive mask, or (softcap) explicit float32 math."""
    B, Tq, Hq, D = q.shape
    lens, lo, hi, new = append_new_rows(q, k_cache, v_cache, k, v, cache_seqlens)
    if B == 0 or Tq == 0 or hi + new == 0:
        return _empty(q)
    n = hi + new
    kc, vc = k_cache.narrow(1, 0, n), v_cache.narrow(1, 0, n)
    key_lens = [L + new for L in lens]
    if softcap > 0:
        s, _, empty = _explicit_scores(q, kc, causal, scale, window_size, softcap, alibi_slopes, key_lens)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
        return _pv(p, vc).to(q.dtype).contiguous(), lse.contiguous()
    bias, empty = _bias(B, Hq, Tq, n, causal, window_size, alibi_slopes, key_lens)
    out, lse = _flash(_bhsd(q), _bhsd(kc), _bhsd(vc), 0.0, False, attn_mask=bias, scale=scale)
    out = out.transpose(1, 2)
    if bool(empty.any()):
        out = out.masked_fill(empty[:, :, None, None], 0.0)
        lse = lse.masked_fill(empty[:, None, :], float("-inf"))
    return out.contiguous(), lse.contiguous()


__all__ = ["has_variant", "attention_forward", "attention_backward", "attention_with_kv_cache"]
