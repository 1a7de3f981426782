"""attention_varlen with block_table (FlashAttention's paged varlen): k and v are page pools and
each sequence's key rows are found through its block table row; equal to the packed call on the
same rows, gradients into the pools included, pages no sequence uses never read."""

import pytest
import torch

import pytorch_mqa

HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA


def _paged(k_packed, cu_k, page, n_pages, gen):
    """Scatter packed (total_k, Hkv, D) rows into a NaN-filled pool of n_pages pages through a
    random (permuted) block table."""
    lens = cu_k.diff().tolist()
    max_blocks = max(1, max(-(-n // page) for n in lens))
    perm = torch.randperm(n_pages, generator=gen)
    table = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    pool = torch.full((n_pages, page) + k_packed.shape[1:], float("nan"), dtype=k_packed.dtype)
    used = 0
    for b, n in enumerate(lens):
        for c in range(-(-n // page)):
            table[b, c] = perm[used]
            used += 1
        for j in range(n):
            pool[table[b, j // page], j % page] = k_packed[int(cu_k[b]) + j]
    return pool, table


@pytest.mark.parametrize("Hq,Hkv", HEADS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("page", [16, 32])
def test_paged_varlen_equals_packed(Hq, Hkv, causal, page):
    gen = torch.Generator().manual_seed(Hq * 10 + Hkv + page)
    lens_q, lens_k = [3, 0, 17, 5], [20, 0, 33, 5]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    D = 16
    q = torch.randn(sum(lens_q), Hq, D, generator=gen, requires_grad=True)
    k = torch.randn(sum(lens_k), Hkv, D, generator=gen)
    v = torch.randn(sum(lens_k), Hkv, D, generator=gen)
    kp, table = _paged(k, cu_k, page, 8, gen)
    vp = torch.full_like(kp, float("nan"))
    for b, n in enumerate(lens_k):  # v in the same pages as k
        for j in range(n):
            vp[table[b, j // page], j % page] = v[int(cu_k[b]) + j]
    kp.requires_grad_(True)
    vp.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    want = pytorch_mqa.attention_varlen(q, k, v, cu_q, cu_k, 17, 33, causal=causal)
    got = pytorch_mqa.attention_varlen(q, kp, vp, cu_q, cu_k, 17, 33, causal=causal, block_table=table)
    torch.testing.assert_close(got, want)
    assert not got.isnan().any()
    dout = torch.randn_like(want)
    gq, gk, gv = torch.autograd.grad(want, (q, k, v), dout)
    pq, pk, pv = torch.autograd.grad(got, (q, kp, vp), dout)
    torch.testing.assert_close(pq, gq)
    rows = [(int(table[b, j // page]), j % page, int(cu_k[b]) + j) for b, n in enumerate(lens_k) for j in range(n)]
    for p, r, t in rows:
        torch.testing.assert_close(pk[p, r], gk[t])
        torch.testing.assert_close(pv[p, r], gv[t])
    live = torch.zeros(kp.shape[:2], dtype=torch.bool)
    for p, r, _ in rows:
        live[p, r] = True
    assert (pk[~live] == 0).all() and (pv[~live] == 0).all()  # rows no sequence uses get no gradient


def test_paged_varlen_errors():
    q = torch.randn(4, 2, 16)
    pool = torch.randn(3, 16, 1, 16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    table = torch.tensor([[0]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"k: expected page_size \(k.shape\[1\]\) a positive multiple of 16, got 8"):
        pytorch_mqa.attention_varlen(q, pool[:, :8], pool[:, :8], cu, cu, 4, 4, block_table=table)
    with pytest.raises(TypeError, match="block_table: expected dtype torch.int32, got torch.int64"):
        pytorch_mqa.attention_varlen(q, pool, pool, cu, cu, 4, 4, block_table=table.long())
    with pytest.raises(ValueError, match=r"block_table: expected shape \(1, max_blocks\)"):
        pytorch_mqa.attention_varlen(q, pool, pool, cu, cu, 4, 4, block_table=table.expand(2, 1))
    with pytest.raises(ValueError, match=r"max_seqlen_k: expected at most block_table.shape\[1\] \* page_size = 16"):
        pytorch_mqa.attention_varlen(q, pool, pool, cu, torch.tensor([0, 20], dtype=torch.int32), 4, 20, block_table=table)
    with pytest.raises(ValueError, match=r"block_table: expected page indices in \[0, 3\) .* got block_table\[0, 0\] = 7"):
        pytorch_mqa.attention_varlen(q, pool, pool, cu, cu, 4, 4, block_table=torch.tensor([[7]], dtype=torch.int32))
    with pytest.raises(ValueError, match="k: expected a 4-D page pool"):
        pytorch_mqa.attention_varlen(q, pool[0], pool[0], cu, cu, 4, 4, block_table=table)
