"""The float64 oracle: a plain loop over query rows, and the reference run in float64.

`attention_loop` is the definition written as directly as possible (one query row, one softmax
at a time); it is slow and meant for small shapes. `attention_float64` and
`attention_with_kv_cache_float64` run `pytorch_mqa.reference` in float64 on copies of the inputs:
the package's tests check the two against each other before the reference is trusted.
"""

from __future__ import annotations

import math

import torch

from pytorch_mqa import reference


def attention_loop(q, k, v, causal=False, scale=None, key_len=None):
    """out (B, Tq, Hq, D) and lse (B, Hq, Tq) in float64, one query row at a time.

    key_len[b] (optional) limits sequence b to keys [0, key_len[b]); causal alignment is then
    bottom-right against key_len[b].
    """
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Tq, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, Tq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        Tk = k.shape[1] if key_len is None else int(key_len[b])
        for h in range(Hq):
            kh = h // G
            for i in range(Tq):
                js = [j for j in range(Tk) if not causal or j <= i + (Tk - Tq)]
                if not js:
                    continue
                s = torch.stack([(q[b, i, h] * k[b, j, kh]).sum() * scale for j in js])
                m = s.max()
                p = torch.exp(s - m)
                lse[b, h, i] = m + torch.log(p.sum())
                w = p / p.sum()
                out[b, i, h] = sum(w[n] * v[b, j, kh] for n, j in enumerate(js))
    return out, lse


def attention_float64(q, k, v, causal=False, scale=None):
    """(out, lse) of `reference.attention` computed in float64 (inputs are not modified)."""
    return reference.attention(q.double(), k.double(), v.double(), causal=causal, scale=scale)


def attention_with_kv_cache_float64(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=True, scale=None):
    """(out, lse, k_cache, v_cache) of `reference.attention_with_kv_cache` in float64, on copies of the caches."""
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    kn = None if k is None else k.double()
    vn = None if v is None else v.double()
    out, lse = reference.attention_with_kv_cache(q.double(), kc, vc, kn, vn, cache_seqlens, causal=causal, scale=scale)
    return out, lse, kc, vc


__all__ = ["attention_loop", "attention_float64", "attention_with_kv_cache_float64"]
