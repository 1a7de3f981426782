"""FlashAttention's own kvcache test, rebuilt on CPU: a seeded sample of the parametrization of
tests/test_flash_attn.py::test_flash_attn_kvcache (github:Dao-AILab/flash-attention), with its
reference built its way (key padding mask, leftpad-aware local mask, ALiBi bias, rotary of
k at cache_seqlens + t and of q per token or at cache_seqlens, paged caches through a permuted
block table), and its acceptance rule: max|out - out_ref| <= mult * max|out_pt - out_ref| + 1e-5
and the cache contents equal to the reference's (k within 1e-3, v exactly). Cases FlashAttention 2
skips (paged with cache_batch_idx or with leftpad) are kept: this package supports them."""

import math
import random

import pytest
import torch

import pytorch_mqa

SEQLENS = [(1, 128), (1, 339), (3, 799), (64, 256), (16, 300), (128, 128), (3, 1024)]


def _sample(n, seed=0):
    r = random.Random(seed)
    out = []
    while len(out) < n:
        c = dict(seqlens=r.choice(SEQLENS), d=r.choice([32, 59, 64, 128]), batch_idx=r.random() < 0.4,
                 leftpad=r.random() < 0.5, paged=r.choice([None, 256, 16]), rot_frac=r.choice([0.0, 0.5, 1.0]),
                 interleaved=r.random() < 0.5, new_eq_q=r.random() < 0.5, causal=r.random() < 0.5,
                 local=r.random() < 0.4, alibi=r.random() < 0.3, new_kv=r.random() < 0.75,
                 mha=r.choice(["mha", "mqa", "gqa"]), dtype=r.choice([torch.float16, torch.bfloat16]))
        sq, sk = c["seqlens"]
        if (sq > sk and c["new_kv"]) or (not c["new_kv"] and c["rot_frac"] > 0):
            continue  # FlashAttention skips these
        out.append(c)
    return out


def _rotate_half(x, interleaved):
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _rotary_emb(x, cos, sin, offsets, interleaved):
    """flash_attn.layers.rotary.apply_rotary_emb with seqlen_offsets (float32 math)."""
    R = cos.shape[-1] * 2
    pos = offsets.long()[:, None] + torch.arange(x.shape[1])[None, :]
    c, s = cos.float()[pos], sin.float()[pos]  # (B, T, R/2)
    if interleaved:
        c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
    else:
        c, s = torch.cat([c, c], -1), torch.cat([s, s], -1)
    xr = x[..., :R].float()
    y = xr * c[:, :, None] + _rotate_half(xr, interleaved) * s[:, :, None]
    return torch.cat([y.to(x.dtype), x[..., R:]], dim=-1)


def _local_mask(sq, sk, window, key_padding_mask, key_leftpad):
    row = torch.arange(sq)[:, None]
    col = torch.arange(sk)
    if key_leftpad is not None:
        lp = key_leftpad.long()[:, None, None, None]
        col = col.expand(lp.shape[0], 1, 1, sk)
        col = torch.where(col >= lp, col - lp, 2**32)
    skk = key_padding_mask.sum(-1)[:, None, None, None]
    if window[0] < 0:
        return col > row + skk - sq + window[1]
    return torch.logical_or(col > torch.minimum(row + skk - sq + window[1], skk), col < row + skk - sq - window[0])


def _alibi_bias(slopes, sq, sk, key_padding_mask, causal, key_leftpad):
    slopes = slopes[:, :, None, None]
    if causal:
        return torch.arange(-sk + 1, 1, dtype=torch.float32) * slopes
    row = torch.arange(sq)[:, None]
    col = torch.arange(sk)
    if key_leftpad is not None:
        lp = key_leftpad.long()[:, None, None, None]
        col = col.expand(lp.shape[0], 1, 1, sk)
        col = torch.where(col >= lp, col - lp, 2**32)
    skk = key_padding_mask.sum(-1)[:, None, None, None]
    return -slopes * (row + skk - sq - col).abs().float()


def _attention_ref(q, k, v, key_padding_mask, attn_bias, causal, window, key_leftpad, upcast=True, reorder=False):
    if causal:
        window = (window[0], 0)
    dt = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    G = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    d = q.shape[-1]
    if reorder:
        scores = torch.einsum("bthd,bshd->bhts", q, k / math.sqrt(d))
    else:
        scores = torch.einsum("bthd,bshd->bhts", q / math.sqrt(d), k)
    scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    local = None
    if window[0] >= 0 or window[1] >= 0:
        local = _local_mask(q.shape[1], k.shape[1], window, key_padding_mask, key_leftpad)
        scores = scores.masked_fill(local, float("-inf"))
    if attn_bias is not None:
        scores = scores + attn_bias
    attn = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    if local is not None:
        attn = attn.masked_fill(torch.all(local, dim=-1, keepdim=True), 0.0)
    return torch.einsum("bhts,bshd->bthd", attn, v).to(dt)


def _paged(seqlen_k, page, rows, nheads_k, d, dtype, gen):
    num_blocks = math.ceil(seqlen_k / page) * rows * 3
    kp = torch.randn(num_blocks, page, nheads_k, d, generator=gen).to(dtype)
    vp = torch.randn(num_blocks, page, nheads_k, d, generator=gen).to(dtype)
    table = torch.randperm(num_blocks, generator=gen)[: rows * math.ceil(seqlen_k / page)].reshape(rows, -1).to(torch.int32)
    flat = lambda p: p[table.long().flatten()].reshape(rows, -1, nheads_k, d)[:, :seqlen_k]  # noqa: E731
    return flat(kp), flat(vp), table, kp, vp, num_blocks, flat


CASES = _sample(72)


@pytest.mark.parametrize("c", CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_flash_attn_kvcache_semantics(c):
    gen = torch.Generator().manual_seed(0)
    sq, sk = c["seqlens"]
    d, dtype, causal, local, new_kv = c["d"], c["dtype"], c["causal"], c["local"], c["new_kv"]
    B, nheads = 2, 6
    B_cache = B * 2 if c["batch_idx"] else B
    nheads_k = {"mha": 6, "mqa": 1, "gqa": 3}[c["mha"]]
    rotary_dim = math.floor(int(c["rot_frac"] * d) / 16) * 16
    window = (-1, -1) if not local else tuple(int(x) for x in torch.randint(0, sk, (2,), generator=gen))
    q = torch.randn(B, sq, nheads, d, generator=gen).to(dtype)
    seqlen_new = sq if c["new_eq_q"] else int(torch.randint(1, sq + 1, (1,), generator=gen))
    k = torch.randn(B, seqlen_new, nheads_k, d, generator=gen).to(dtype) if new_kv else None
    v = torch.randn(B, seqlen_new, nheads_k, d, generator=gen).to(dtype) if new_kv else None
    page = c["paged"]
    if page is None:
        k_cache = torch.randn(B_cache, sk, nheads_k, d, generator=gen).to(dtype)
        v_cache = torch.randn(B_cache, sk, nheads_k, d, generator=gen).to(dtype)
        table = None
    else:
        k_cache, v_cache, table, kp, vp, num_blocks, flat = _paged(sk, page, B_cache, nheads_k, d, dtype, gen)
    hi = (sk - (sq if (causal or local) and rotary_dim > 1 else seqlen_new) + 1) if new_kv else sk + 1
    lens = torch.randint(0 if new_kv else 1, hi, (B,), generator=gen, dtype=torch.int32)
    leftpad = None
    if c["leftpad"]:
        leftpad = torch.tensor([int(torch.randint(0, int(L), (1,), generator=gen)) if L > 0 else 0 for L in lens],
                               dtype=torch.int32)
    arange = torch.arange(sk)[None, :]
    lens_e = lens.long()[:, None]
    kpm = arange < lens_e + (seqlen_new if new_kv else 0)
    if leftpad is not None:
        kpm = kpm & (arange >= leftpad.long()[:, None])
    batch_idx = torch.randperm(B_cache, generator=gen)[:B].to(torch.int32) if c["batch_idx"] else None
    slopes = bias = None
    if c["alibi"]:
        slopes = torch.rand(B, nheads, generator=gen) * 0.3
        bias = _alibi_bias(slopes, sq, sk, kpm, causal, leftpad)
    cos = sin = None
    q_ro, k_ro = q, k
    if rotary_dim > 0:
        n_ro = sk if page is None else num_blocks * page
        angle = torch.rand(n_ro, rotary_dim // 2, generator=gen) * 2 * math.pi
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        if causal or local:
            q_ro = _rotary_emb(q, cos, sin, lens, c["interleaved"])
        else:
            q_ro = _rotary_emb(q.reshape(B, 1, sq * nheads, d), cos, sin, lens, c["interleaved"]).reshape(q.shape)
        k_ro = _rotary_emb(k, cos, sin, lens, c["interleaved"])
    sel = (lambda x: x) if batch_idx is None else (lambda x: x[batch_idx.long()])  # noqa: E731
    k_ref, v_ref = sel(k_cache).clone(), sel(v_cache).clone()
    if new_kv:
        upd = (lens_e <= arange) & (arange < lens_e + seqlen_new)
        k_ref[upd] = k_ro.reshape(-1, nheads_k, d)
        v_ref[upd] = v.reshape(-1, nheads_k, d)
    out = pytorch_mqa.attention_with_kv_cache(
        q, k_cache if page is None else kp, v_cache if page is None else vp, k, v, cache_seqlens=lens,
        rotary_cos=cos, rotary_sin=sin, cache_batch_idx=batch_idx, cache_leftpad=leftpad, block_table=table,
        causal=causal, window_size=window, rotary_interleaved=c["interleaved"], alibi_slopes=slopes,
    )
    out_ref = _attention_ref(q_ro, k_ref, v_ref, kpm, bias, causal, window, leftpad)
    out_pt = _attention_ref(q_ro, k_ref, v_ref, kpm, bias, causal, window, leftpad, upcast=False, reorder=True)
    if new_kv:
        if page is None:
            k_sel, v_sel = sel(k_cache), sel(v_cache)
        else:
            k_sel, v_sel = sel(flat(kp)), sel(flat(vp))
        assert torch.allclose(k_sel.float(), k_ref.float(), rtol=1e-3, atol=1e-3)
        assert torch.equal(v_sel, v_ref)
    mult = 5 if c["alibi"] else 3
    err, pt = (out.float() - out_ref.float()).abs().max().item(), (out_pt.float() - out_ref.float()).abs().max().item()
    assert err <= mult * pt + 1e-5, f"max|out - out_ref| = {err:.3e} > {mult} * {pt:.3e} + 1e-5 ({c})"
