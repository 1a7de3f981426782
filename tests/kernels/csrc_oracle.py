"""The oracle of the cache-indexing features for the csrc tests (SERVING_API.md semantics):
block_table, cache_batch_idx and cache_leftpad mapped onto pytorch_mqa.reference by plain tensor
indexing, plus the inputs those tests use.

- Logical row j of sequence b is k_cache[block_table[r, j // page_size], j % page_size] (paged) or
  k_cache[r, j] (contiguous), with r = cache_batch_idx[b] (else b).
- Left padding: sequence b's rows [leftpad_b, L_b) are moved to [0, L_b - leftpad_b) and the
  reference runs with cache_seqlens L_b - leftpad_b, so causal / window / ALiBi align on
  j - leftpad_b. This needs L_b + Tq <= S (the shifted capacity is then never reached).
- The expected caches are the inputs with logical rows [L_b, L_b + Tq) ∩ [0, S) replaced by the
  new rows; nothing else changes (pages nobody points to included).
"""

from __future__ import annotations

import torch

from pytorch_mqa import reference

SENTINEL = 7.0


def capacity(k_cache, block_table):
    return block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]


def _rows(B, batch_idx):
    return batch_idx.long().cpu() if batch_idx is not None else torch.arange(B)


def logical_caches(k_cache, v_cache, B, block_table=None, batch_idx=None):
    """(B, S, Hkv, D) copies of what each sequence sees as its cache."""
    rows = _rows(B, batch_idx)
    if block_table is None:
        return k_cache[rows].clone(), v_cache[rows].clone()
    pages = block_table.long().cpu()[rows]  # (B, max_blocks)
    S = capacity(k_cache, block_table)
    return (k_cache[pages].reshape(B, S, *k_cache.shape[2:]).clone(),
            v_cache[pages].reshape(B, S, *v_cache.shape[2:]).clone())


def expected_caches(k_cache, v_cache, k, v, seqlens, block_table=None, batch_idx=None):
    """The caches after the append: new row t of sequence b at logical row L_b + t, if in [0, S)."""
    kc, vc = k_cache.clone(), v_cache.clone()
    if k is None:
        return kc, vc
    B, Tq = k.shape[:2]
    S = capacity(k_cache, block_table)
    rows = _rows(B, batch_idx)
    for b in range(B):
        for t in range(Tq):
            j = int(seqlens[b]) + t
            if not 0 <= j < S:
                continue
            if block_table is None:
                kc[rows[b], j], vc[rows[b], j] = k[b, t], v[b, t]
            else:
                page = int(block_table[rows[b], j // k_cache.shape[1]])
                kc[page, j % k_cache.shape[1]], vc[page, j % k_cache.shape[1]] = k[b, t], v[b, t]
    return kc, vc


def serving_reference(q, k_cache, v_cache, k, v, seqlens, causal, scale, *, window=(-1, -1), softcap=0.0,
                      alibi=None, block_table=None, batch_idx=None, leftpad=None, upcast=True):
    """(out, lse, k_cache after, v_cache after) of the op, from pytorch_mqa.reference."""
    B, Tq = q.shape[:2]
    S = capacity(k_cache, block_table)
    kl, vl = logical_caches(k_cache, v_cache, B, block_table, batch_idx)
    L = seqlens.long().cpu()
    if leftpad is not None:
        pad = leftpad.long().cpu()
        if bool((pad > L).any()) or (k is not None and bool((L + Tq > S).any())):
            raise ValueError("serving_reference: leftpad needs leftpad <= cache_seqlens and cache_seqlens + Tq <= S")
        ks, vs = torch.zeros_like(kl), torch.zeros_like(vl)
        for b in range(B):
            n = S - int(pad[b])
            ks[b, :n], vs[b, :n] = kl[b, int(pad[b]):], vl[b, int(pad[b]):]
        kl, vl, L = ks, vs, L - pad
    out, lse = reference.attention_with_kv_cache(
        q, kl, vl, k, v, L.to(torch.int32), causal, scale, upcast, window_size=window, softcap=softcap,
        alibi_slopes=alibi,
    )
    kc, vc = expected_caches(k_cache, v_cache, k, v, seqlens, block_table, batch_idx)
    return out, lse, kc, vc


def paged_inputs(B, Tq, S_want, Hq, Hkv, D, lengths, page_size, dtype=torch.float32, *, with_new=True,
                 batch_rows=None, leftpad=None, seed=0, extra_pages=3):
    """q, k_cache, v_cache (pages, page_size, Hkv, D), k, v, seqlens, block_table, batch_idx, leftpad.

    Pages are shuffled; `extra_pages` pages that no table row points to hold SENTINEL. With
    batch_rows (a list of B distinct table rows), the table has max(batch_rows) + 1 rows and the
    rows no sequence uses point at pages of their own (also SENTINEL).
    """
    gen = torch.Generator().manual_seed(seed)
    max_blocks = -(-S_want // page_size)
    n_rows = B if batch_rows is None else max(batch_rows) + 1
    n_pages = n_rows * max_blocks + extra_pages
    perm = torch.randperm(n_pages, generator=gen)
    table = perm[: n_rows * max_blocks].view(n_rows, max_blocks).to(torch.int32)
    kc = torch.full((n_pages, page_size, Hkv, D), SENTINEL, dtype=dtype)
    vc = torch.full((n_pages, page_size, Hkv, D), SENTINEL, dtype=dtype)
    used_rows = list(range(B)) if batch_rows is None else list(batch_rows)
    for r in used_rows:
        pages = table[r].long()
        kc[pages] = torch.randn((max_blocks, page_size, Hkv, D), generator=gen).to(dtype)
        vc[pages] = torch.randn((max_blocks, page_size, Hkv, D), generator=gen).to(dtype)
    q = torch.randn((B, Tq, Hq, D), generator=gen).to(dtype)
    k = torch.randn((B, Tq, Hkv, D), generator=gen).to(dtype) if with_new else None
    v = torch.randn((B, Tq, Hkv, D), generator=gen).to(dtype) if with_new else None
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    bidx = None if batch_rows is None else torch.tensor(batch_rows, dtype=torch.int32)
    pad = None if leftpad is None else torch.tensor(leftpad, dtype=torch.int32)
    return q, kc, vc, k, v, seqlens, table, bidx, pad


def slot_inputs(B, Tq, S, Hq, Hkv, D, lengths, dtype=torch.float32, *, with_new=True, slots=None, leftpad=None,
                seed=0):
    """Contiguous caches with cache_batch_idx: (B_cache, S, Hkv, D) with B_cache = max(slots) + 2;
    the slots no sequence uses hold SENTINEL."""
    gen = torch.Generator().manual_seed(seed)
    n_slots = B if slots is None else max(slots) + 2
    kc = torch.full((n_slots, S, Hkv, D), SENTINEL, dtype=dtype)
    vc = torch.full((n_slots, S, Hkv, D), SENTINEL, dtype=dtype)
    for r in range(B) if slots is None else slots:
        kc[r] = torch.randn((S, Hkv, D), generator=gen).to(dtype)
        vc[r] = torch.randn((S, Hkv, D), generator=gen).to(dtype)
    q = torch.randn((B, Tq, Hq, D), generator=gen).to(dtype)
    k = torch.randn((B, Tq, Hkv, D), generator=gen).to(dtype) if with_new else None
    v = torch.randn((B, Tq, Hkv, D), generator=gen).to(dtype) if with_new else None
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    bidx = None if slots is None else torch.tensor(slots, dtype=torch.int32)
    pad = None if leftpad is None else torch.tensor(leftpad, dtype=torch.int32)
    return q, kc, vc, k, v, seqlens, None, bidx, pad


def alibi_slopes(B, Hq, kind, seed=0):
    """None, (Hq,) or (B, Hq) float32 slopes in the range ALiBi models use."""
    if kind is None:
        return None
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (Hq,) if kind == "h" else (B, Hq)
    return (torch.rand(shape, generator=gen) * 0.5 + 0.01).float()
