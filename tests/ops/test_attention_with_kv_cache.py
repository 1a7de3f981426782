"""`pytorch_mqa.attention_with_kv_cache` on the reference backend: matrix, cache writes, guards."""

import pytest
import torch
from helpers import DTYPES, KV_CACHE_SHAPES, assert_close, kv_cache_inputs

import pytorch_mqa
from pytorch_mqa import reference


def _expected(q, kc, vc, k, v, lens, causal):
    """ref32 / ref_lp outputs and the expected caches after the call."""
    kc32, vc32 = kc.float().clone(), vc.float().clone()
    k32 = None if k is None else k.float()
    v32 = None if v is None else v.float()
    ref32 = reference.attention_with_kv_cache(q.float(), kc32, vc32, k32, v32, lens, causal=causal)
    kcl, vcl = kc.clone(), vc.clone()
    ref_lp = reference.attention_with_kv_cache(q, kcl, vcl, k, v, lens, causal=causal, upcast=False)
    return ref32, ref_lp, kcl, vcl


@pytest.mark.parametrize("case", KV_CACHE_SHAPES, ids=lambda c: str(c[:6]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_new", [True, False])
def test_matrix(case, dtype, with_new):
    q, kc, vc, k, v, lens = kv_cache_inputs(case, dtype, seed=3, with_new=with_new)
    causal = case[1] > 1
    (o32, l32), (olp, llp), kc_want, vc_want = _expected(q, kc, vc, k, v, lens, causal)
    out, lse = pytorch_mqa.attention_with_kv_cache(
        q, kc, vc, k, v, cache_seqlens=lens, causal=causal, return_lse=True, backend="reference"
    )
    assert torch.equal(kc, kc_want) and torch.equal(vc, vc_want)
    assert_close(out, o32, olp, dtype, "out", "reference kv_cache")
    assert_close(lse, l32, llp, dtype, "lse", "reference kv_cache")


def test_equals_attention_on_the_valid_prefix():
    # Decoding one sequence must equal plain attention over its first L+Tq cache rows.
    q, kc, vc, k, v, lens = kv_cache_inputs((1, 3, 40, 8, 2, 16, [21]), torch.float32, seed=4)
    out = pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens)
    want = pytorch_mqa.attention(q, kc[:, :24], vc[:, :24], causal=True)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_int_cache_seqlens():
    q, kc, vc, k, v, _ = kv_cache_inputs((2, 1, 16, 4, 1, 8, [5, 5]), torch.float32, seed=5)
    kc2, vc2 = kc.clone(), vc.clone()
    a = pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=5)
    b = pytorch_mqa.attention_with_kv_cache(q, kc2, vc2, k, v, cache_seqlens=torch.tensor([5, 5], dtype=torch.int32))
    assert torch.equal(a, b) and torch.equal(kc, kc2)


def test_does_not_advance_cache_seqlens():
    q, kc, vc, k, v, lens = kv_cache_inputs((2, 1, 16, 4, 1, 8, [5, 0]), torch.float32)
    before = lens.clone()
    pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens)
    assert torch.equal(lens, before)


@pytest.mark.parametrize("lengths", [[0, 3, 9], [9, 9, 9], [0, 0, 0]])
def test_guard_region(lengths):
    """The cache is a view into a sentinel-filled buffer: only rows [L_b, L_b + Tq) may change."""
    B, Tq, S, H, D = 3, 3, 12, 2, 8
    pad = 4
    kbuf = torch.full((B, S + 2 * pad, H + 1, D + 3), 123.0)
    vbuf = kbuf.clone()
    kc, vc = kbuf[:, pad : pad + S, :H, :D], vbuf[:, pad : pad + S, :H, :D]
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(B, Tq, 4, D, generator=gen)
    k, v = torch.randn(B, Tq, H, D, generator=gen), torch.randn(B, Tq, H, D, generator=gen)
    kwant, vwant = kbuf.clone(), vbuf.clone()
    for b, L in enumerate(lengths):
        kwant[b, pad + L : pad + L + Tq, :H, :D] = k[b]
        vwant[b, pad + L : pad + L + Tq, :H, :D] = v[b]
    pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=torch.tensor(lengths, dtype=torch.int32))
    assert torch.equal(kbuf, kwant) and torch.equal(vbuf, vwant)


def test_zero_length_cache_without_new_rows():
    q = torch.randn(2, 1, 4, 8)
    kc = torch.empty(2, 0, 2, 8)
    out, lse = pytorch_mqa.attention_with_kv_cache(q, kc, kc.clone(), cache_seqlens=0, return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("B,Tq", [(0, 1), (2, 0)])
def test_empty_batch_or_query(B, Tq):
    q = torch.randn(B, Tq, 4, 8)
    kc, vc = torch.zeros(B, 6, 2, 8), torch.zeros(B, 6, 2, 8)
    k, v = torch.randn(B, Tq, 2, 8), torch.randn(B, Tq, 2, 8)
    out = pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=torch.zeros(B, dtype=torch.int32))
    assert out.shape == q.shape and torch.all(kc == 0)


def test_huge_cache_is_not_read_past_the_longest_sequence():
    # S is large but lengths are short: the CPU path reads only the rows a sequence can see.
    S = 1 << 20
    kc = torch.zeros(1, S, 1, 8).expand(1, S, 1, 8)  # no real memory behind it
    vc = kc
    q = torch.randn(1, 1, 2, 8)
    out = pytorch_mqa.attention_with_kv_cache(q, kc, vc, cache_seqlens=3)
    assert out.shape == q.shape and torch.isfinite(out).all()
