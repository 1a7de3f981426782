"""Inputs of the serving-cache tests: paged pools with a permuted block table and sentinel
(NaN) pages no sequence points to, cache slots in a permuted order, left padding, rotary tables.

Every row that a call must not write or read is NaN: the sentinel pages, the unused slots, the
rows of live pages past each sequence's new rows and, with left padding, the padding rows.
"""

from __future__ import annotations

import math

import torch
from helpers import assert_close

import pytorch_mqa
from pytorch_mqa import reference
from pytorch_mqa.testing import randn, seeded

I32 = torch.int32


def make_case(B, Tq, Hq, Hkv, D, dtype, *, lens, S, page=None, slots=False, leftpad=None, rotary=None,
              with_new=True, seed=0):
    """A dict with q, k_cache, v_cache, k, v, cache_seqlens and the serving keywords (`kw`).

    page: page size (paged caches) or None (contiguous); S: capacity per sequence (a multiple of
    page); slots: cache_batch_idx in a permuted order over more slots (or table rows) than B;
    leftpad: list or None; rotary: (rotary_dim, interleaved) or None. lens may use "full" = S - Tq.
    """
    gen = seeded(seed)
    lens = [S - Tq if x == "full" else x for x in lens]
    new = Tq if with_new else 0
    pads = leftpad or [0] * B
    q = randn((B, Tq, Hq, D), dtype, gen)
    k = randn((B, Tq, Hkv, D), dtype, gen) if with_new else None
    v = randn((B, Tq, Hkv, D), dtype, gen) if with_new else None
    n_rows = B + 2 if slots else B  # cache slots or table rows
    order = torch.randperm(n_rows, generator=gen)[:B].to(I32) if slots else torch.arange(B, dtype=I32)
    kw = {}
    if slots:
        kw["cache_batch_idx"] = order
    if page is None:
        kc, vc = randn((n_rows, S, Hkv, D), dtype, gen), randn((n_rows, S, Hkv, D), dtype, gen)
        where = lambda r, j: (r, j)  # noqa: E731
    else:
        per_seq = S // page
        n_pages = n_rows * per_seq + 3  # three sentinel pages nobody points to
        kc, vc = randn((n_pages, page, Hkv, D), dtype, gen), randn((n_pages, page, Hkv, D), dtype, gen)
        table = torch.randperm(n_pages, generator=gen)[: n_rows * per_seq].reshape(n_rows, per_seq).to(I32)
        kw["block_table"] = table
        where = lambda r, j: (int(table[r, j // page]), j % page)  # noqa: E731
    # NaN everywhere, then the live rows [P_b, L_b) of each sequence back to their values.
    k0, v0 = kc.clone(), vc.clone()
    kc.fill_(float("nan"))
    vc.fill_(float("nan"))
    for b in range(B):
        for j in range(pads[b], lens[b]):
            a = where(int(order[b]), j)
            kc[a], vc[a] = k0[a], v0[a]
    if leftpad is not None:
        kw["cache_leftpad"] = torch.tensor(leftpad, dtype=I32)
    if rotary is not None:
        R, inter = rotary
        S_ro = S + Tq
        angle = torch.rand(S_ro, R // 2, generator=gen, dtype=torch.float64) * 2 * math.pi
        kw.update(rotary_cos=angle.cos().float(), rotary_sin=angle.sin().float(), rotary_interleaved=inter)
    return dict(q=q, k_cache=kc, v_cache=vc, k=k, v=v, cache_seqlens=torch.tensor(lens, dtype=I32), kw=kw,
                where=where, order=order, lens=lens, new=new)


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of x, so that NaN sentinels compare equal to themselves."""
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def expected_caches(case, k_written, v_written):
    """The caches after the call: the inputs with row t of sequence b at logical row L_b + t."""
    kc, vc = case["k_cache"].clone(), case["v_cache"].clone()
    if k_written is not None:
        for b, L in enumerate(case["lens"]):
            for t in range(case["new"]):
                a = case["where"](int(case["order"][b]), L + t)
                kc[a], vc[a] = k_written[b, t], v_written[b, t]
    return kc, vc


def run_case(case, dtype, causal, label, backend="reference", **variant):
    """Call the op on `case`, check the caches bit for bit and out/lse by the §5 rule."""
    q, kc, vc, k, v, lens = (case[n] for n in ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens"))
    kw = dict(case["kw"], **variant)
    f = lambda x: None if x is None else x.float()  # noqa: E731
    o32, l32 = reference.attention_with_kv_cache(q.float(), kc.float(), vc.float(), f(k), f(v), lens, causal=causal, **kw)
    olp, llp = reference.attention_with_kv_cache(q, kc.clone(), vc.clone(), k, v, lens, causal=causal, upcast=False, **kw)
    k_written = k
    if k is not None and "rotary_cos" in kw:
        pos = reference.rotary_positions(lens, k.shape[1], True)
        k_written = reference.apply_rotary(k, kw["rotary_cos"], kw["rotary_sin"], pos, kw["rotary_interleaved"])
    kc_want, vc_want = expected_caches(case, k_written, v)
    out, lse = pytorch_mqa.attention_with_kv_cache(
        q, kc, vc, k, v, cache_seqlens=lens, causal=causal, return_lse=True, backend=backend, **kw
    )
    assert torch.equal(bits(kc), bits(kc_want)), "k_cache: rows other than the new ones changed, or wrong new rows"
    assert torch.equal(bits(vc), bits(vc_want)), "v_cache: rows other than the new ones changed, or wrong new rows"
    assert_close(out, o32, olp, dtype, "out", label)
    assert_close(lse, l32, llp, dtype, "lse", label)
    return k_written


__all__ = ["make_case", "bits", "expected_caches", "run_case", "I32"]
