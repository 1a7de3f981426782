"""The CPU path of both ops: the same math as the oracle, with less work per call.

Decoding on CPU reads its lengths on the host (no sync there), so the append is a slice copy and
each sequence attends only its own prefix. The oracle (`pytorch_mqa.reference`) stays the
readable reference the tests compare against; this module is what CPU users run.
"""

from __future__ import annotations

import math

import torch

from pytorch_mqa.reference import attention


def _decode_one_row(q, k, v, scale):
    """`attention` for one query row and Tk >= 1 visible keys (no mask), in few ops.

    q (B, 1, Hq, D), k/v (B, Tk, Hkv, D) -> out (B, 1, Hq, D), lse (B, Hq, 1); float32 math.
    """
    B, _, Hq, D = q.shape
    Hkv = k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.reshape(B, Hkv, Hq // Hkv, D).to(acc)  # one row: the G heads of a KV head are the rows
    s = torch.matmul(qg, k.to(acc).permute(0, 2, 3, 1)) * scale  # (B, Hkv, G, Tk)
    m = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p / l, v.to(acc).transpose(1, 2))  # (B, Hkv, G, D)
    return o.reshape(B, 1, Hq, D).to(q.dtype), (m + torch.log(l)).reshape(B, Hq, 1)


def attention_with_kv_cache_host(q, k_cache, v_cache, k, v, lengths: list, causal, scale):
    """attention_with_kv_cache for lengths known on the host (a list, validated to be in range).

    Same math as `attention_with_kv_cache`, less work per decode step (it was ~1 ms per
    call at B=1 on a 2-core CPU, most of a GPT decode step): the append is one slice copy per
    sequence instead of the sync-free masked scatter, and sequences of equal length attend
    their own prefix through `attention` (bottom-right causal, the cache's alignment),
    with no masks to build.
    """
    Tq = q.shape[1]
    uniform = len(set(lengths)) == 1
    if k is not None:
        if uniform:
            k_cache[:, lengths[0] : lengths[0] + Tq] = k
            v_cache[:, lengths[0] : lengths[0] + Tq] = v
        else:
            for b, L in enumerate(lengths):
                k_cache[b, L : L + Tq] = k[b]
                v_cache[b, L : L + Tq] = v[b]
        lengths = [L + Tq for L in lengths]
    causal = causal and Tq > 1  # a single query row sees its whole prefix either way
    if uniform:
        Lk = lengths[0]
        if Tq == 1 and Lk > 0:
            return _decode_one_row(q, k_cache[:, :Lk], v_cache[:, :Lk], scale)
        return attention(q, k_cache[:, :Lk], v_cache[:, :Lk], causal=causal, scale=scale)
    parts = [
        attention(q[b : b + 1], k_cache[b : b + 1, :L], v_cache[b : b + 1, :L], causal=causal, scale=scale)
        for b, L in enumerate(lengths)
    ]
    return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])


def decode_one_row_functional(q, k_cache, v_cache, k, v, cache_seqlens, scale=None):
    """attention_with_kv_cache for Tq = 1 in plain torch ops that leave the caches untouched.

    q (B, 1, Hq, D), k/v (B, 1, Hkv, D), caches (B, S, Hkv, D), cache_seqlens int32 (B,):
    sequence b attends cache rows [0, cache_seqlens[b]) plus its new k/v, which the caller
    appends afterwards (KVCache.append). The cache rows are masked over all S, so the shapes never
    change and nothing reads a length on the host: for compiled CPU decoding, where inductor fuses
    this into a few kernels, the registered op costs ~0.2 ms of dispatch per call, and an in-graph
    write into the cache would be functionalized into a copy of the whole buffer. Returns out
    (B, 1, Hq, D); same math as `_decode_one_row`.
    """
    B, _, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.reshape(B, Hkv, Hq // Hkv, D)
    k_new, v_new = k.reshape(B, Hkv, 1, D), v.reshape(B, Hkv, 1, D)
    s_cache = torch.matmul(qg, k_cache.permute(0, 2, 3, 1))  # (B, Hkv, G, S)
    visible = torch.arange(S, device=q.device)[None, :] < cache_seqlens[:, None]  # (B, S)
    s_cache = s_cache.masked_fill(~visible[:, None, None, :], float("-inf"))
    s_new = (qg * k_new).sum(-1, keepdim=True)  # (B, Hkv, G, 1)
    p = torch.softmax(torch.cat([s_cache, s_new], dim=-1) * scale, dim=-1)
    o = torch.matmul(p[..., :S], v_cache.transpose(1, 2)) + p[..., S:] * v_new  # (B, Hkv, G, D)
    return o.reshape(B, 1, Hq, D)


__all__ = ["attention_with_kv_cache_host", "decode_one_row_functional"]
