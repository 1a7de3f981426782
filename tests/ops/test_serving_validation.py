"""The serving-cache arguments' bad inputs raise naming the argument, the expected and the
received value (DESIGN §4); values are checked only when they are on the host."""

import pytest
import torch

import pytorch_mqa

B, Tq, Hq, Hkv, D, P = 2, 2, 4, 2, 16, 16
I32 = torch.int32


def _paged(nb=6, page=P, max_blocks=2, lens=(3, 10), new=True):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, Tq, Hq, D, generator=gen)
    kc, vc = torch.zeros(nb, page, Hkv, D), torch.zeros(nb, page, Hkv, D)
    k, v = (torch.randn(B, Tq, Hkv, D, generator=gen) for _ in range(2)) if new else (None, None)
    bt = torch.arange(B * max_blocks, dtype=I32).reshape(B, max_blocks) % nb
    return q, kc, vc, k, v, torch.tensor(lens, dtype=I32), bt


def _call(q, kc, vc, k, v, lens, **kw):
    return pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens, **kw)


q, kc, vc, k, v, lens, bt = _paged()
qs, kcs, vcs = q, torch.zeros(4, 32, Hkv, D), torch.zeros(4, 32, Hkv, D)  # 4 slots for cache_batch_idx
cos, sin = torch.randn(32, 4), torch.randn(32, 4)
i32 = lambda *x: torch.tensor(x, dtype=I32)  # noqa: E731

BAD = [
    # block_table
    ("table not a tensor", lambda: _call(q, kc, vc, k, v, lens, block_table=bt.tolist()), TypeError, "block_table", "list"),
    ("table dtype", lambda: _call(q, kc, vc, k, v, lens, block_table=bt.long()), TypeError, "block_table", "int64"),
    ("table rank", lambda: _call(q, kc, vc, k, v, lens, block_table=bt.flatten()), ValueError, "block_table", "(4,)"),
    ("table rows", lambda: _call(q, kc, vc, k, v, lens, block_table=bt[:1]), ValueError, "block_table", "(1, 2)"),
    ("table device", lambda: _call(q, kc, vc, k, v, lens, block_table=bt.to("meta")), ValueError, "block_table", "meta"),
    ("page index high", lambda: _call(q, kc, vc, k, v, lens, block_table=i32([0, 1], [6, 2])), ValueError,
     "block_table", "= 6"),
    ("page index negative", lambda: _call(q, kc, vc, k, v, lens, block_table=i32([-1, 1], [2, 3])), ValueError,
     "block_table", "= -1"),
    ("page size", lambda: _call(*_paged(page=24)[:6], block_table=bt), ValueError, "k_cache", "page_size = 24"),
    ("paged v shape", lambda: _call(q, kc, vc[:, :, :1], k, v, lens, block_table=bt), ValueError, "v_cache", "shape"),
    ("paged head dim", lambda: _call(q, kc[..., :8], vc[..., :8], k, v, lens, block_table=bt), ValueError, "k_cache",
     "head dim"),
    ("capacity through table", lambda: _call(*_paged(lens=(3, 31))[:6], block_table=bt), ValueError, "cache_seqlens",
     "block_table.shape[1] * page_size"),
    # cache_batch_idx
    ("slots dtype", lambda: _call(qs, kcs, vcs, k, v, lens, cache_batch_idx=torch.tensor([0, 1])), TypeError,
     "cache_batch_idx", "int64"),
    ("slots shape", lambda: _call(qs, kcs, vcs, k, v, lens, cache_batch_idx=i32(0, 1, 2)), ValueError,
     "cache_batch_idx", "(3,)"),
    ("slot range", lambda: _call(qs, kcs, vcs, k, v, lens, cache_batch_idx=i32(3, 4)), ValueError, "cache_batch_idx",
     "got 4 for sequence 1"),
    ("slot negative", lambda: _call(qs, kcs, vcs, k, v, lens, cache_batch_idx=i32(-1, 0)), ValueError,
     "cache_batch_idx", "-1"),
    ("duplicate slots", lambda: _call(qs, kcs, vcs, k, v, lens, cache_batch_idx=i32(2, 2)), ValueError,
     "cache_batch_idx", "slot 2"),
    ("slots and table rows", lambda: _call(q, kc, vc, k, v, lens, block_table=bt, cache_batch_idx=i32(0, 2)),
     ValueError, "cache_batch_idx", "[0, 2)"),
    ("contiguous batch", lambda: _call(qs, kcs, vcs, k, v, lens), ValueError, "k_cache", "batch size 2"),
    # cache_leftpad
    ("leftpad dtype", lambda: _call(qs, kcs[:2], vcs[:2], k, v, lens, cache_leftpad=torch.tensor([0.0, 1.0])),
     TypeError, "cache_leftpad", "float32"),
    ("leftpad shape", lambda: _call(qs, kcs[:2], vcs[:2], k, v, lens, cache_leftpad=i32(0)), ValueError,
     "cache_leftpad", "(1,)"),
    ("leftpad > seqlens", lambda: _call(qs, kcs[:2], vcs[:2], k, v, lens, cache_leftpad=i32(4, 0)), ValueError,
     "cache_leftpad", "cache_leftpad[0] = 4 with cache_seqlens[0] = 3"),
    ("leftpad negative", lambda: _call(qs, kcs[:2], vcs[:2], k, v, lens, cache_leftpad=i32(0, -2)), ValueError,
     "cache_leftpad", "-2"),
    # rotary
    ("cos without sin", lambda: _call(qs, kcs[:2], vcs[:2], k, v, lens, rotary_cos=cos), ValueError, "rotary_sin",
     "None"),
    ("rotary rank", lambda: _call(qs, kcs[:2], vcs[:2], k, v, lens, rotary_cos=cos[0], rotary_sin=sin[0]),
     ValueError, "rotary_cos", "(4,)"),
    ("rotary shapes differ", lambda: _call(qs, kcs[:2], vcs[:2], k, v, lens, rotary_cos=cos, rotary_sin=sin[:, :2]),
     ValueError, "rotary_sin", "(32, 2)"),
    ("rotary_dim > D", lambda: _call(qs, kcs[:2], vcs[:2], k, v, lens, rotary_cos=torch.randn(32, 9),
                                     rotary_sin=torch.randn(32, 9)), ValueError, "rotary_cos", "rotary_dim = 18"),
    ("rotary dtype", lambda: _call(qs, kcs[:2], vcs[:2], k, v, lens, rotary_cos=cos.double(), rotary_sin=sin.double()),
     TypeError, "rotary_cos", "float64"),
    ("rotary device", lambda: _call(qs, kcs[:2], vcs[:2], k, v, lens, rotary_cos=cos.to("meta"),
                                    rotary_sin=sin.to("meta")), ValueError, "rotary_cos", "meta"),
    ("rotary without k", lambda: _call(qs, kcs[:2], vcs[:2], None, None, lens, rotary_cos=cos, rotary_sin=sin),
     ValueError, "k", "None"),
    ("rotary too short", lambda: _call(qs, kcs[:2], vcs[:2], k, v, lens, rotary_cos=cos[:11], rotary_sin=sin[:11]),
     ValueError, "rotary_cos", "at least 12 rows"),
    ("rotary_interleaved type", lambda: _call(qs, kcs[:2], vcs[:2], k, v, lens, rotary_cos=cos, rotary_sin=sin,
                                              rotary_interleaved=1), TypeError, "rotary_interleaved", "int"),
]


@pytest.mark.parametrize("name,fn,exc,arg,received", BAD, ids=[b[0] for b in BAD])
def test_bad_serving_input(name, fn, exc, arg, received):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert msg.startswith(arg + ":") or f"{arg}:" in msg, msg
    assert "expected" in msg and received in msg, msg


def test_nothing_written_when_a_check_fails():
    q, kc, vc, k, v, lens, _ = _paged(lens=(3, 31))
    bt = torch.arange(4, dtype=I32).reshape(2, 2)
    with pytest.raises(ValueError):
        _call(q, kc, vc, k, v, lens, block_table=bt)
    assert torch.all(kc == 0) and torch.all(vc == 0)


def test_table_entries_past_the_used_pages_are_not_checked():
    # Pages no row of [leftpad, L + Tq) lives in may hold anything (e.g. -1 in an engine's table).
    q, kc, vc, k, v, lens, _ = _paged(max_blocks=4, lens=(3, 10))
    bt = i32([0, -1, -1, 99], [1, -7, 6, 6])
    out = _call(q, kc, vc, k, v, lens, block_table=bt)
    assert torch.isfinite(out).all()


def test_duplicate_slots_without_new_rows_are_allowed():
    kcs2 = torch.randn(4, 32, Hkv, D)
    out = _call(qs, kcs2, kcs2, None, None, lens, cache_batch_idx=i32(1, 1))  # both read slot 1
    want = pytorch_mqa.attention_with_kv_cache(qs, kcs2[[1, 1]], kcs2[[1, 1]], cache_seqlens=lens)
    torch.testing.assert_close(out, want)


def test_device_values_are_not_read():
    # Index tensors on a device with no data (meta) pass the shape checks and are never read.
    q, kc, vc, k, v, lens, bt = (x.to("meta") if x is not None else None for x in _paged())
    from pytorch_mqa.ops.validation import validate_serving

    S = validate_serving(q, kc, k, lens, True, (-1, -1), bt, None, i32(0, 0).to("meta"))
    assert S == 2 * P
