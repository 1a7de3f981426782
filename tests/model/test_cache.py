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
