"""KVCache: shapes, host/device lengths, views, overflow, reset; cached forward == full forward."""

import pytest
import torch

from model_helpers import tiny_gpt
from pytorch_mqa import KVCache


def test_shapes_and_for_model():
    model = tiny_gpt(n_kv_head=2)
    cache = KVCache.for_model(model, batch_size=3, max_seqlen=20)
    assert len(cache.k) == len(cache.v) == 2 and cache.n_layer == 2
    k0, v0 = cache.layer(0)
    assert k0.shape == v0.shape == (3, 20, 2, 8) and k0.is_contiguous() and k0 is cache.k[0] and v0 is cache.v[0]
    # One buffer per layer, none a view of another (an in-graph write then stays in place).
    bases = {t.untyped_storage().data_ptr() for t in cache.k + cache.v}
    assert len(bases) == 4
    assert cache.nbytes == 2 * 2 * 3 * 20 * 2 * 8 * 4
    assert "n_layer=2" in repr(cache) and "lengths=[0, 0, 0]" in repr(cache)
    assert cache.cache_seqlens.dtype == torch.int32 and cache.cache_seqlens.tolist() == [0, 0, 0]
    assert cache.lengths == [0, 0, 0]
    with pytest.raises(ValueError, match="max_seqlen"):
        KVCache.for_model(model, batch_size=1, max_seqlen=65)  # block_size is 64
    with pytest.raises(ValueError, match="batch_size"):
        KVCache(2, 0, 8, 1, 4)


def test_advance_reset_and_views():
    cache = KVCache(1, 3, 10, 1, 4)
    cache.advance(4)
    view = cache.rows(1, 2)
    view.advance(3)
    assert cache.lengths == [4, 7, 4] and cache.cache_seqlens.tolist() == [4, 7, 4]
    assert view.lengths == [7] and view.k[0].shape == (1, 10, 1, 4) and view.batch_size == 1
    view.layer(0)[0].fill_(1.0)  # the view shares storage with the parent
    assert cache.k[0][1].eq(1.0).all() and cache.k[0][0].eq(0.0).all()
    view.reset()
    assert cache.lengths == [4, 0, 4] and cache.cache_seqlens.tolist() == [4, 0, 4]
    cache.reset()
    assert cache.lengths == [0, 0, 0] and cache.cache_seqlens.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="rows"):
        cache.rows(2, 2)


def test_overflow_raises_before_writing():
    model = tiny_gpt(n_kv_head=1)
    cache = KVCache.for_model(model, batch_size=2, max_seqlen=8)
    model(torch.randint(0, 97, (2, 6)), cache=cache)
    before = [t.clone() for t in cache.k + cache.v]
    with pytest.raises(ValueError, match=r"KVCache overflow: sequence 0 holds 6 of 8 rows and 3 more"):
        model(torch.randint(0, 97, (2, 3)), cache=cache)
    assert cache.lengths == [6, 6] and cache.cache_seqlens.tolist() == [6, 6]
    assert all(torch.equal(t, b) for t, b in zip(cache.k + cache.v, before))  # nothing was written
    model(torch.randint(0, 97, (2, 2)), cache=cache)  # exactly full is fine
    assert cache.lengths == [8, 8]
    with pytest.raises(ValueError, match="overflow"):
        cache.advance(1)


def test_cache_wrong_batch_or_layers():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="batch size"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=KVCache.for_model(model, 3))
    with pytest.raises(ValueError, match="layers"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=KVCache(5, 1, 8, 2, 8))


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_chunked_cached_forward_equals_full_forward(n_kv_head):
    model = tiny_gpt(n_kv_head)
    idx = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    full = model(idx)
    cache = KVCache.for_model(model, 2, max_seqlen=16)
    parts = [model(idx[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 13))]
    assert cache.lengths == [13, 13] and cache.cache_seqlens.tolist() == [13, 13]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)


def test_ragged_rows_prefill_then_joint_decode():
    """Sequences of different lengths in one cache: positions come from each sequence's length."""
    model = tiny_gpt(2)
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 4))
    cache = KVCache.for_model(model, 2, max_seqlen=12)
    model(a[:, :-1], cache=cache.rows(0, 1))
    model(b[:, :-1], cache=cache.rows(1, 2))
    assert cache.lengths == [8, 3]
    step = model(torch.cat([a[:, -1:], b[:, -1:]]), cache=cache)
    assert cache.lengths == [9, 4]
    torch.testing.assert_close(step[0, -1], model(a)[0, -1], rtol=0, atol=1e-5)
    torch.testing.assert_close(step[1, -1], model(b)[0, -1], rtol=0, atol=1e-5)


def test_block_size_limit_with_cache():
    model = tiny_gpt(block_size=8)
    cache = KVCache(2, 1, 16, 2, 8)  # larger than the model's positions
    model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("with_new", [True, False])
@pytest.mark.parametrize("case", range(6))
def test_cpu_fast_path_equals_reference_and_dispatched_op(case, with_new):
    """The eager CPU call of attention_with_kv_cache (host lengths: slice append, mask-free one-row
    attention, no custom-op dispatch) gives the general reference's results, as does the op."""
    from helpers import KV_CACHE_SHAPES, kv_cache_inputs

    from pytorch_mqa import attention_with_kv_cache, reference

    q, kc, vc, k, v, L = kv_cache_inputs(KV_CACHE_SHAPES[case], torch.float32, seed=case, with_new=with_new)
    kc2, vc2, kc3, vc3 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    out, lse = attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=L, return_lse=True)
    ref_out, ref_lse = reference.attention_with_kv_cache(q, kc2, vc2, k, v, L)
    op_out, op_lse = torch.ops.pytorch_mqa.attention_with_kv_cache(q, kc3, vc3, k, v, L, True, q.shape[-1] ** -0.5, "reference")
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2) and torch.equal(kc, kc3)
    for got, want in ((out, ref_out), (lse, ref_lse), (op_out, ref_out), (op_lse, ref_lse)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cache_never_joins_the_autograd_graph():
    """With grad enabled the cached forward still leaves the cache buffers untracked by autograd."""
    model = tiny_gpt(2)
    cache = KVCache.for_model(model, 1, max_seqlen=8)
    logits = model(torch.tensor([[1, 2, 3]]), cache=cache)
    assert logits.requires_grad and not any(t.requires_grad for t in cache.k + cache.v)
    with torch.no_grad():
        model(torch.tensor([[4]]), cache=cache)
    assert not any(t.requires_grad for t in cache.k + cache.v) and cache.lengths == [4]


# ---- paged mode ----------------------------------------------------------------------------------


def test_paged_shapes_and_validation():
    model = tiny_gpt(n_kv_head=2)
    cache = KVCache.for_model(model, batch_size=3, max_seqlen=40, page_size=16, num_pages=5)
    assert cache.paged and cache.page_size == 16 and cache.num_pages == 5 and cache.num_free_pages == 5
    assert cache.k[0].shape == cache.v[0].shape == (5, 16, 2, 8) and len(cache.k) == 2
    assert cache.block_table.shape == (3, 3) and cache.block_table.dtype == torch.int32
    assert cache.batch_size == 3 and cache.max_seqlen == 40 and cache.lengths == [0, 0, 0]
    assert "page_size=16, num_pages=5, free_pages=5" in repr(cache)
    assert KVCache(1, 2, 40, 1, 4, page_size=32).num_pages == 4  # default: every sequence can reach S
    assert KVCache(1, 2, 40, 1, 4).block_table is None and not KVCache(1, 2, 40, 1, 4).paged
    with pytest.raises(ValueError, match="page_size: expected a positive multiple of 16 .*, got 24"):
        KVCache(1, 2, 40, 1, 4, page_size=24)
    with pytest.raises(ValueError, match="num_pages: expected None without page_size"):
        KVCache(1, 2, 40, 1, 4, num_pages=3)
    with pytest.raises(ValueError, match="num_pages: expected an int >= 1, got 0"):
        KVCache(1, 2, 40, 1, 4, page_size=16, num_pages=0)
    with pytest.raises(ValueError, match="select: expected a paged KVCache"):
        KVCache(1, 2, 40, 1, 4).select([0])


def test_paged_allocate_on_append_free_and_exhaustion():
    cache = KVCache(1, 3, 64, 1, 4, page_size=16, num_pages=6)
    cache.rows(0, 1).allocate(17)  # two pages for rows 0..16
    cache.rows(0, 1).advance(17)
    cache.select([2]).allocate(5)
    cache.select([2]).advance(5)
    assert cache.pages(0) == [0, 1] and cache.pages(2) == [2] and cache.pages(1) == []
    assert cache.lengths == [17, 0, 5] and cache.cache_seqlens.tolist() == [17, 0, 5]
    assert cache.block_table[0, :2].tolist() == [0, 1] and cache.block_table[2, 0].item() == 2
    assert cache.num_free_pages == 3
    cache.select([0, 2]).allocate(15)  # 17 + 15 = 32 rows: no new page; 5 + 15 = 20: one more
    assert cache.pages(0) == [0, 1] and cache.pages(2) == [2, 3] and cache.num_free_pages == 2
    # Exhaustion: all or nothing, with the counts in the message.
    before = (cache.block_table.clone(), cache.num_free_pages, cache.pages(0), cache.pages(1))
    with pytest.raises(ValueError, match=r"page pool exhausted: appending 40 rows to sequences \[0, 1\] needs 5 more pages of 16 rows, got 2 free of num_pages = 6"):
        cache.select([0, 1]).allocate(40)
    assert torch.equal(cache.block_table, before[0]) and cache.num_free_pages == before[1]
    assert (cache.pages(0), cache.pages(1)) == before[2:]
    # free returns the pages (the lowest ids go out first again) and zeroes the length and table row.
    cache.free(0)
    assert cache.pages(0) == [] and cache.lengths == [0, 0, 5] and cache.num_free_pages == 4
    assert cache.block_table[0].tolist() == [0, 0, 0, 0] and cache.cache_seqlens.tolist() == [0, 0, 5]
    cache.rows(1, 2).allocate(33)
    assert cache.pages(1) == [0, 1, 4]
    cache.reset()
    assert cache.num_free_pages == 6 and cache.lengths == [0, 0, 0]
    with pytest.raises(ValueError, match=r"b: expected a sequence index in \[0, 3\), got 3"):
        cache.free(3)
    with pytest.raises(ValueError, match="slots: expected distinct sequence indices"):
        cache.select([1, 1])


def test_select_view_advances_the_root():
    cache = KVCache(1, 4, 32, 1, 4, page_size=16)
    view = cache.select([3, 1])
    view.allocate(3)
    view.advance(3)
    assert view.lengths == [3, 3] and view.cache_seqlens.tolist() == [3, 3]
    assert cache.lengths == [0, 3, 0, 3] and cache.cache_seqlens.tolist() == [0, 3, 0, 3]
    assert view.block_table.tolist() == [cache.block_table[3].tolist(), cache.block_table[1].tolist()]
    view.free(0)  # its own index 0: root sequence 3
    assert cache.lengths == [0, 3, 0, 0] and view.lengths == [0, 3] and cache.pages(3) == []


def _ragged_decode(model, cache, prompts, steps):
    """Prefill each prompt into its own sequence, then greedy-decode all together; tokens per step."""
    last = []
    for b, p in enumerate(prompts):
        view = cache.select([b]) if cache.paged else cache.rows(b, b + 1)
        last.append(model(torch.tensor([p]), cache=view)[0, -1])
    tok = torch.stack(last).argmax(-1)
    out = [tok.tolist()]
    for _ in range(steps):
        tok = model(tok[:, None], cache=cache)[:, -1].argmax(-1)
        out.append(tok.tolist())
    return out


@pytest.mark.parametrize("page_size", [16, 32])
def test_paged_equals_contiguous(page_size):
    model = tiny_gpt(2)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 20, 11)]
    contiguous = _ragged_decode(model, KVCache.for_model(model, 3, 48), prompts, 20)
    paged = KVCache.for_model(model, 3, 48, page_size=page_size, num_pages=7)
    assert _ragged_decode(model, paged, prompts, 20) == contiguous
    assert paged.lengths == [23, 40, 31]
    assert [len(paged.pages(b)) for b in range(3)] == [-(-n // page_size) for n in (23, 40, 31)]


def test_paged_sentinel_pages_untouched():
    """Pages no sequence points to are never written: never-used pages keep their sentinel, and a
    freed page keeps its contents until it is handed out again."""
    model = tiny_gpt(2)
    cache = KVCache.for_model(model, 3, 48, page_size=16, num_pages=12)
    for t in cache.k + cache.v:
        t.fill_(777.0)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 18, 2)]
    _ragged_decode(model, cache, prompts, 6)
    held = {p for b in range(3) for p in cache.pages(b)}
    assert len(held) == 1 + 2 + 1
    for p in set(range(12)) - held:
        assert all(t[p].eq(777.0).all() for t in cache.k + cache.v), f"page {p} was written"
    freed = cache.pages(1)
    snapshot = {p: [t[p].clone() for t in cache.k + cache.v] for p in freed}
    cache.free(1)
    tok = torch.tensor([[1], [2]])
    for _ in range(5):  # rows 11..15 and 8..12: no new page needed
        view = cache.select([0, 2])
        tok = model(tok, cache=view)[:, -1:].argmax(-1)
    assert cache.lengths == [16, 0, 13] and cache.num_free_pages == 10
    for p in freed:
        assert all(torch.equal(t[p], s) for t, s in zip(cache.k + cache.v, snapshot[p])), f"freed page {p} was written"
    for p in set(range(12)) - held:
        assert all(t[p].eq(777.0).all() for t in cache.k + cache.v), f"page {p} was written"


def test_paged_pool_exhaustion_in_the_model_writes_nothing():
    model = tiny_gpt(2)
    cache = KVCache.for_model(model, 2, 48, page_size=16, num_pages=2)
    model(torch.zeros(2, 10, dtype=torch.long), cache=cache)
    before = [t.clone() for t in cache.k + cache.v]
    with pytest.raises(ValueError, match="page pool exhausted"):
        model(torch.zeros(2, 10, dtype=torch.long), cache=cache)
    assert cache.lengths == [10, 10] and cache.num_free_pages == 0
    assert all(torch.equal(t, b) for t, b in zip(cache.k + cache.v, before))
