"""A plain float64 loop: the oracle the reference itself is checked against (DESIGN §5)."""

from __future__ import annotations

import math

import torch


def attention_loop(q, k, v, causal=False, scale=None, key_len=None):
    """out (B, Tq, Hq, D) and lse (B, Hq, Tq) in float64, one query row at a time.

    key_len[b] (optional) limits sequence b to keys [0, key_len[b]); causal alignment is then
    bottom-right against key_len[b].
    """
    q, k, v = q.double(), k.double(), v.double()
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
