"""The csrc op's variants (window, softcap, ALiBi) and cache indexing (paged caches, cache_batch_idx,
cache_leftpad) on a GPU, against pytorch_mqa.reference through tests/kernels/csrc_oracle.py
(DESIGN §5's rule; caches bit-exact, sentinel pages and slots included).

These call torch.ops.pytorch_mqa.attention_with_kv_cache_cuda directly, so they check the csrc op
whatever the dispatch routes. Marked `cuda`: skipped without a GPU. The same index math runs on the
CPU in tests/kernels/test_csrc_emulation.py.
"""

from __future__ import annotations

import csrc_oracle
import pytest
import torch
from helpers import DTYPES, KV_CACHE_SHAPES, assert_close, kv_cache_inputs

from pytorch_mqa.ops import build as _build


def _on(device, tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _cuda_op(q, kc, vc, k, v, seqlens, causal, scale, window=(-1, -1), softcap=0.0, alibi=None, table=None,
             bidx=None, pad=None):
    _build.load_extension()
    return torch.ops.pytorch_mqa.attention_with_kv_cache_cuda(
        q, kc, vc, k, v, seqlens, causal, scale, window[0], window[1], softcap, alibi, table, bidx, pad
    )


def _check_serving(inputs, dtype, causal, label, window=(-1, -1), softcap=0.0, alibi=None):
    """The csrc op against csrc_oracle.serving_reference (fp32 and low-precision), caches bit-exact."""
    q, kc, vc, k, v, seqlens, table, bidx, pad = inputs
    scale = q.shape[-1] ** -0.5
    kw = dict(window=window, softcap=softcap, alibi=alibi, block_table=table, batch_idx=bidx, leftpad=pad)
    f32 = [None if t is None else t.float() for t in (q, kc, vc, k, v)]
    ref32, lse32, _, _ = csrc_oracle.serving_reference(*f32, seqlens, causal, scale, **kw)
    ref_lp, lse_lp, kc_lp, vc_lp = csrc_oracle.serving_reference(q, kc, vc, k, v, seqlens, causal, scale, upcast=False,
                                                                 **kw)
    qd, kcd, vcd, kd, vd, sd, td, bd, pd, ad = _on("cuda", (q, kc, vc, k, v, seqlens, table, bidx, pad, alibi))
    out, lse = _cuda_op(qd, kcd, vcd, kd, vd, sd, causal, scale, window, softcap, ad, td, bd, pd)
    torch.cuda.synchronize()
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out.cpu(), ref32, ref_lp, dtype, "out", label)
    assert_close(lse.cpu(), lse32, lse_lp, dtype, "lse", label)
    assert torch.equal(kcd.cpu(), kc_lp) and torch.equal(vcd.cpu(), vc_lp), "cache contents differ from the oracle's"


# (B, Tq, S, Hq, Hkv, D, lengths): MQA with many splits, GQA Tq > 1 odd D, MHA, D = 128 and 256.
VARIANT_CASES = [
    (3, 1, 1000, 8, 1, 64, [0, 17, 990]),
    (2, 4, 200, 6, 2, 40, [0, 130]),
    (2, 3, 150, 4, 4, 32, [100, 147]),
    (2, 1, 2048, 16, 2, 128, [2000, 300]),
    (1, 2, 300, 4, 1, 256, [250]),
]
VARIANTS = {
    "window(0,0)": dict(window=(0, 0)),
    "window(1,0)": dict(window=(1, 0)),
    "window(70,3)": dict(window=(70, 3)),
    "window(5000,-1)": dict(window=(5000, -1)),
    "window(-1,2)": dict(window=(-1, 2)),
    "softcap(large logits)": dict(softcap=5.0, q_mul=8.0),
    "alibi(Hq)": dict(alibi="h"),
    "alibi(B,Hq)+window(40,-1)": dict(alibi="bh", window=(40, -1)),
    "softcap+alibi+window(16,16)": dict(softcap=2.0, alibi="h", window=(16, 16)),
}


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("variant", list(VARIANTS), ids=str)
@pytest.mark.parametrize("case", VARIANT_CASES, ids=str)
def test_variants_match_reference(case, variant, dtype, causal):
    opts = dict(VARIANTS[variant])
    q_mul = opts.pop("q_mul", 1.0)
    q, kc, vc, k, v, seqlens = kv_cache_inputs(case, dtype, seed=9)
    alibi = csrc_oracle.alibi_slopes(case[0], case[3], opts.pop("alibi", None))
    _check_serving(((q.float() * q_mul).to(dtype), kc, vc, k, v, seqlens, None, None, None), dtype, causal,
                   "cuda variants", alibi=alibi, **opts)


# (B, Tq, S wanted, Hq, Hkv, D, lengths, leftpad)
SERVING_CASES = [
    (3, 2, 160, 4, 2, 40, [0, 33, 150], [0, 5, 70]),
    (2, 1, 700, 8, 1, 64, [650, 1], [600, 1]),
    (2, 1, 4096, 16, 2, 128, [4000, 1000], [10, 999]),
]


@pytest.mark.cuda
@pytest.mark.parametrize("with_new", [True, False], ids=["append", "no_new"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("leftpad", [False, True], ids=["", "leftpad"])
@pytest.mark.parametrize("batch_idx", [False, True], ids=["", "batch_idx"])
@pytest.mark.parametrize("page_size", [16, 48, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", SERVING_CASES, ids=str)
def test_paged_cache_matches_reference(case, dtype, page_size, batch_idx, leftpad, causal, with_new):
    """Shuffled pages with sentinel pages no sequence points to: the whole pool is compared."""
    B, Tq, S, Hq, Hkv, D, lengths, pads = case
    rows = [B + 1 - b for b in range(B)] if batch_idx else None
    inputs = csrc_oracle.paged_inputs(B, Tq, S, Hq, Hkv, D, lengths, page_size, dtype, with_new=with_new,
                                      batch_rows=rows, leftpad=pads if leftpad else None, seed=page_size)
    _check_serving(inputs, dtype, causal, "cuda paged")


@pytest.mark.cuda
@pytest.mark.parametrize("window", [(-1, -1), (20, 0)], ids=["", "window(20,0)"])
@pytest.mark.parametrize("with_new", [True, False], ids=["append", "no_new"])
@pytest.mark.parametrize("leftpad", [False, True], ids=["", "leftpad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", SERVING_CASES, ids=str)
def test_cache_batch_idx_and_leftpad_match_reference(case, dtype, leftpad, with_new, window):
    B, Tq, S, Hq, Hkv, D, lengths, pads = case
    inputs = csrc_oracle.slot_inputs(B, Tq, S, Hq, Hkv, D, lengths, dtype, with_new=with_new,
                                     slots=[2 * b + 1 for b in range(B)], leftpad=pads if leftpad else None)
    _check_serving(inputs, dtype, True, "cuda batch_idx/leftpad", window=window)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_paged_leftpad_window_softcap_alibi_combined(dtype):
    B, Tq, S, Hq, Hkv, D, lengths, pads = SERVING_CASES[0]
    inputs = csrc_oracle.paged_inputs(B, Tq, S, Hq, Hkv, D, lengths, 16, dtype, leftpad=pads)
    _check_serving(inputs, dtype, True, "cuda paged variants", window=(9, 0), softcap=3.0,
                   alibi=csrc_oracle.alibi_slopes(B, Hq, "bh"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_out_of_range_indices_write_nothing_outside(dtype):
    """A table entry outside the pool, a negative one, and a cache_batch_idx outside the table:
    no fault (the launch is synchronised and checked), no write but to the valid pages."""
    B, Tq, S, Hq, Hkv, D = 2, 2, 64, 4, 2, 32
    q, kc, vc, k, v, seqlens, table, bidx, pad = csrc_oracle.paged_inputs(B, Tq, S, Hq, Hkv, D, [20, 40], 16, dtype,
                                                                         batch_rows=[0, 1])
    table[0, 1] = kc.shape[0] + 5
    table[1, 0] = -3
    before = kc.clone()
    qd, kcd, vcd, kd, vd, sd, td = _on("cuda", (q, kc, vc, k, v, seqlens, table))
    out, lse = _cuda_op(qd, kcd, vcd, kd, vd, sd, True, 0.2, table=td, bidx=torch.tensor([0, 1], dtype=torch.int32,
                                                                                           device="cuda"))
    torch.cuda.synchronize()
    changed = (kcd.cpu() != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == [int(table[1, 2])]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    out, lse = _cuda_op(qd, kcd, vcd, kd, vd, sd, True, 0.2, table=td, bidx=torch.tensor([5, 1], dtype=torch.int32,
                                                                                           device="cuda"))
    torch.cuda.synchronize()
    assert bool((out[0] == 0).all()) and bool(torch.isneginf(lse[0]).all())


@pytest.mark.cuda
def test_opcheck_with_every_feature():
    B, Tq, S, Hq, Hkv, D, lengths, pads = SERVING_CASES[0]
    q, kc, vc, k, v, seqlens, table, bidx, pad = _on("cuda", csrc_oracle.paged_inputs(
        B, Tq, S, Hq, Hkv, D, lengths, 16, torch.bfloat16, batch_rows=[3, 2, 1], leftpad=pads))
    alibi = csrc_oracle.alibi_slopes(B, Hq, "h").cuda()
    _build.load_extension()
    torch.library.opcheck(
        torch.ops.pytorch_mqa.attention_with_kv_cache_cuda.default,
        (q, kc, vc, k, v, seqlens, True, 0.125, 9, 0, 3.0, alibi, table, bidx, pad),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.cuda
def test_rejects_bad_feature_arguments_in_cpp():
    q, k_cache, v_cache, k, v, seqlens = _on("cuda", kv_cache_inputs(KV_CACHE_SHAPES[0], torch.float16))
    _build.load_extension()
    B, Hq = q.shape[0], q.shape[2]

    def call(**kw):
        return _cuda_op(q, k_cache, v_cache, k, v, seqlens, True, 0.125, **kw)

    with pytest.raises(RuntimeError, match="window_left: expected -1"):
        call(window=(-2, 0))
    with pytest.raises(RuntimeError, match="window_right: expected -1"):
        call(window=(0, -5))
    with pytest.raises(RuntimeError, match="softcap: expected a finite float >= 0"):
        call(softcap=-1.0)
    with pytest.raises(RuntimeError, match="alibi_slopes: expected dtype float32"):
        call(alibi=torch.ones(Hq, device="cuda", dtype=torch.float16))
    with pytest.raises(RuntimeError, match="alibi_slopes: expected shape"):
        call(alibi=torch.ones(Hq + 1, device="cuda"))
    with pytest.raises(RuntimeError, match="cache_leftpad: expected dtype int32"):
        call(pad=torch.zeros(B, device="cuda", dtype=torch.int64))
    with pytest.raises(RuntimeError, match="cache_batch_idx: expected shape"):
        call(bidx=torch.zeros(B + 1, device="cuda", dtype=torch.int32))
    pool = torch.zeros((8, 24, k_cache.shape[2], k_cache.shape[3]), device="cuda", dtype=torch.float16)
    table = torch.zeros((B, 2), device="cuda", dtype=torch.int32)
    with pytest.raises(RuntimeError, match="page_size .dim 1. a multiple of 16"):
        _cuda_op(q, pool, pool.clone(), k, v, seqlens, True, 0.125, table=table)
    pool = torch.zeros((8, 32, k_cache.shape[2], k_cache.shape[3]), device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="block_table: expected dtype int32"):
        _cuda_op(q, pool, pool.clone(), k, v, seqlens, True, 0.125, table=table.long())
    with pytest.raises(RuntimeError, match="block_table: expected shape"):
        _cuda_op(q, pool, pool.clone(), k, v, seqlens, True, 0.125, table=table[:1])
