"""`bench attention_with_kv_cache`: one decode step (Tq = 1) through `attention_with_kv_cache` on
every backend, beside `sdpa+write`: what users do without the package, `k_cache[:, L] = k` then
SDPA over the first L+1 rows.

Each shape runs with an exact-fit cache (capacity S = L + 1) and, as a generator allocates it,
a preallocated one (S = capacity x L, `capacity` > 1): a kernel that splits work over S instead
of the live length shows up there.

`pages` adds paged caches beside the contiguous ones (None): a pool of pages of that size, each
sequence's pages in a permuted block table, beside `sdpa+gather` (write the new row through the
table, gather the live pages, SDPA). GB/s counts only the bytes a call must touch: the live rows
of the live pages (as for contiguous caches) plus the table entries of the live pages, never the
pool or the capacity."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import pytorch_mqa.ops as mqa_ops
from pytorch_mqa.bench import timing
from pytorch_mqa.bench.common import (budget_for, collapse_skips, plot_grid, max_err, measure, release,
                                      shapes_for, bhsd, mqa_providers, inputs_too_big)

SHAPES = {
    "cuda": dict(Hq=32, D=128, Hkv=(1, 8, 32), batch=(1, 16, 64), lengths=(1024, 4096, 16384), capacity=(1, 4, 8),
                 pages=(None, 16, 256)),
    "cuda_quick": dict(Hq=32, D=128, Hkv=(1, 8, 32), batch=(1, 64), lengths=(1024, 16384), capacity=(1, 8),
                       pages=(None, 16, 256)),
    "cpu": dict(Hq=8, D=64, Hkv=(1, 2, 8), batch=(1, 16, 64), lengths=(1024, 4096, 16384), capacity=(1, 4),
                pages=(None, 16, 256)),
    "cpu_quick": dict(Hq=8, D=64, Hkv=(1, 8), batch=(1, 16), lengths=(1024, 4096), capacity=(1,), pages=(None, 16)),
}
COLUMNS = [("Hkv", "Hkv"), ("B", "B"), ("L", "L"), ("S", "S"), ("page", "page"), ("provider", "provider"), ("ms", "ms"),
                  ("p20_ms", "p20"), ("p80_ms", "p80"), ("gbs", "GB/s"), ("pct_peak", "% peak")]


def _mqa_decode(name):
    def f(q, k_cache, v_cache, k, v, seqlens, L, block_table=None):
        return mqa_ops.attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                               block_table=block_table, backend=name)

    return f


def _sdpa_paged_decode(q, k_cache, v_cache, k, v, seqlens, L, block_table):
    P = k_cache.shape[1]
    k_cache[block_table[:, L // P], L % P] = k[:, 0]
    v_cache[block_table[:, L // P], L % P] = v[:, 0]
    live = block_table[:, : L // P + 1]  # the pages holding rows [0, L]
    kl = k_cache[live].flatten(1, 2)[:, : L + 1]
    vl = v_cache[live].flatten(1, 2)[:, : L + 1]
    out = F.scaled_dot_product_attention(bhsd(q), bhsd(kl), bhsd(vl), enable_gqa=True)
    return out.transpose(1, 2)


def paged_decode_bytes(cache_seqlens, Tq: int, Hq: int, Hkv: int, D: int, elt: int, page: int) -> float:
    """`timing.decode_bytes` (the live rows) plus the int32 table entries of the live pages."""
    table = sum(-(-(L + Tq) // page) for L in cache_seqlens) * 4
    return timing.decode_bytes(cache_seqlens, Tq, Hq, Hkv, D, elt) + table


def _inputs(B, S, L, Hq, Hkv, D, page, device, dtype, gen):
    """One buffer set: q, caches (contiguous, or a page pool), k, v, lengths, L (and the table)."""
    q = torch.randn(B, 1, Hq, D, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(B, 1, Hkv, D, device=device, dtype=dtype, generator=gen) for _ in "kv")
    # Lengths live on the device, as in a KVCache: no host transfer per call.
    seqlens = torch.full((B,), L, dtype=torch.int32, device=device)
    if page is None:
        kc, vc = (torch.randn(B, S, Hkv, D, device=device, dtype=dtype, generator=gen) for _ in "kv")
        return (q, kc, vc, k, v, seqlens, L)
    per_seq = -(-S // page)
    kc, vc = (torch.randn(B * per_seq, page, Hkv, D, device=device, dtype=dtype, generator=gen) for _ in "kv")
    perm = torch.randperm(B * per_seq, generator=torch.Generator().manual_seed(B * per_seq))
    table = perm.reshape(B, per_seq).to(device=device, dtype=torch.int32)
    return (q, kc, vc, k, v, seqlens, L, table)


def _sdpa_decode(q, k_cache, v_cache, k, v, seqlens, L):
    k_cache[:, L] = k[:, 0]
    v_cache[:, L] = v[:, 0]
    out = F.scaled_dot_product_attention(bhsd(q), bhsd(k_cache[:, : L + 1]), bhsd(v_cache[:, : L + 1]),
                                         enable_gqa=True)
    return out.transpose(1, 2)


def run(device, dtype, calib, quick, shapes=None, cuda_graph=False, **options) -> list[dict]:
    """Rows per (shape, provider); cuda_graph=True replays each timed call from a CUDA graph.

    Each case has B sequences holding L rows each; the call appends row L and attends L+1 rows.
    capacity 1: the cache has exactly L+1 rows (a provider that reads it whole is not penalised);
    capacity c > 1: S = c * L rows, of which L+1 are live."""
    shp = shapes_for(SHAPES, device, quick, shapes)
    Hq, D = shp["Hq"], shp["D"]
    budget = budget_for(device, quick, shp)
    backends, skipped = mqa_providers("attention_with_kv_cache", device)
    rows = [dict(suite="attention_with_kv_cache", op="attention_with_kv_cache", provider=f"mqa.{n}", case="all", ms=None, reason=r)
            for n, r in skipped]
    gen = torch.Generator(device=device).manual_seed(1)
    elt = torch.empty((), dtype=dtype).element_size()
    cases = [(Hkv, B, L, c, page) for Hkv in shp["Hkv"] for B in shp["batch"] for L in shp["lengths"]
             for c in shp.get("capacity", (1,)) for page in shp.get("pages", (None,))]
    for Hkv, B, L, cap, page in cases:
        S = L + 1 if cap == 1 else cap * L
        if page is not None:
            S = -(-S // page) * page  # whole pages
        set_bytes = 2 * B * S * Hkv * D * elt
        n_sets = timing.n_buffer_sets(set_bytes, device)
        reason = inputs_too_big(n_sets * set_bytes, device)
        if reason is not None:
            rows.append(dict(suite="attention_with_kv_cache", op="attention_with_kv_cache", provider="all", B=B, L=L, S=S,
                             Hkv=Hkv, page=page, ms=None, reason=reason))
            continue
        try:
            sets = [_inputs(B, S, L, Hq, Hkv, D, page, device, dtype, gen) for _ in range(n_sets)]
        except torch.OutOfMemoryError as exc:
            rows.append(dict(suite="attention_with_kv_cache", op="attention_with_kv_cache", provider="all", B=B, L=L, S=S,
                             Hkv=Hkv, page=page, ms=None,
                             reason=f"inputs do not fit: {str(exc).splitlines()[0][:120]}"))
            release(device)
            continue
        layout = "" if page is None else f" page{page}"
        base = dict(suite="attention_with_kv_cache", op="attention_with_kv_cache",
                    case=f"B{B} L{L} S{S} Hq{Hq} Hkv{Hkv} D{D}{layout}",
                    B=B, L=L, S=S, Tq=1, Hq=Hq, Hkv=Hkv, D=D, page=page, dtype=str(dtype).replace("torch.", ""),
                    buffer_sets=n_sets, cuda_graph=cuda_graph)
        if page is None:
            nbytes = timing.decode_bytes([L] * B, 1, Hq, Hkv, D, elt)
            baseline = ("sdpa+write", _sdpa_decode)
        else:
            nbytes = paged_decode_bytes([L] * B, 1, Hq, Hkv, D, elt, page)
            baseline = ("sdpa+gather", _sdpa_paged_decode)
        providers = [(f"mqa.{n}", _mqa_decode(n)) for n in backends] + [baseline]
        ref_out = None
        for name, fn in providers:
            row = dict(base, provider=name)
            if name == "mqa.reference":
                with torch.no_grad():
                    ref_out = fn(*sets[0])
            check = max_err(ref_out) if name != "mqa.reference" else None
            row.update(measure(fn, contextlib.nullcontext, sets, device, budget, check, cuda_graph))
            if row.get("ms"):
                row["gbs"] = nbytes / (row["ms"] * 1e-3) / 1e9
                row["pct_peak"] = 100 * row["gbs"] / calib["copy_gbs"]
            rows.append(row)
        del sets, ref_out
        release(device)
    return collapse_skips(rows, "attention_with_kv_cache", "attention_with_kv_cache")


def plot(rows, result, path):
    def capacity(r):
        S, L = r.get("S"), r.get("L")
        page = "" if r.get("page") is None else f" page{r['page']}"
        return page + ("" if S is None or L is None or S <= L + (r.get("page") or 1) else f" S={S // L}L")

    rows = [dict(r, provider=r["provider"] + capacity(r)) for r in rows if r.get("gbs")]
    plot_grid(rows, "Hkv", "B", "L", "gbs", "attention_with_kv_cache GB/s", "GB/s", "cache length L",
          path, result["environment"])
