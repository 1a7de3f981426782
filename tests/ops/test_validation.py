"""Every bad-input class raises ValueError/TypeError naming the argument (DESIGN §4)."""

import pytest
import torch

import pytorch_mqa


def _qkv(B=2, Tq=3, Tk=5, Hq=4, Hkv=2, D=8, dtype=torch.float32):
    return torch.randn(B, Tq, Hq, D, dtype=dtype), torch.randn(B, Tk, Hkv, D, dtype=dtype), torch.randn(B, Tk, Hkv, D, dtype=dtype)


def _cache(B=2, Tq=1, S=8, Hq=4, Hkv=2, D=8, dtype=torch.float32):
    q = torch.randn(B, Tq, Hq, D, dtype=dtype)
    kc, vc = torch.zeros(B, S, Hkv, D, dtype=dtype), torch.zeros(B, S, Hkv, D, dtype=dtype)
    k, v = torch.randn(B, Tq, Hkv, D, dtype=dtype), torch.randn(B, Tq, Hkv, D, dtype=dtype)
    return q, kc, vc, k, v


q, k, v = _qkv()
ATTENTION_BAD = [
    ("rank", lambda: pytorch_mqa.attention(q[0], k, v), ValueError, "q"),
    ("rank k", lambda: pytorch_mqa.attention(q, k[..., None], v), ValueError, "k"),
    ("not a tensor", lambda: pytorch_mqa.attention(q, k.tolist(), v), TypeError, "k"),
    ("batch", lambda: pytorch_mqa.attention(q, k[:1], v[:1]), ValueError, "k"),
    ("head dim", lambda: pytorch_mqa.attention(q, k[..., :4], v[..., :4]), ValueError, "k"),
    ("v shape", lambda: pytorch_mqa.attention(q, k, v[:, :4]), ValueError, "v"),
    ("head divisibility", lambda: pytorch_mqa.attention(*_qkv(Hq=5, Hkv=2)), ValueError, "q"),
    ("dtype mismatch", lambda: pytorch_mqa.attention(q, k.half(), v.half()), TypeError, "k"),
    ("dtype unsupported", lambda: pytorch_mqa.attention(*_qkv(dtype=torch.float64)), TypeError, "q"),
    ("int dtype", lambda: pytorch_mqa.attention(q.int(), k.int(), v.int()), TypeError, "q"),
    ("head dim too big", lambda: pytorch_mqa.attention(*_qkv(D=257)), ValueError, "q"),
    ("device", lambda: pytorch_mqa.attention(q, k.to("meta"), v.to("meta")), ValueError, "k"),
    ("causal type", lambda: pytorch_mqa.attention(q, k, v, causal=1), TypeError, "causal"),
    ("scale type", lambda: pytorch_mqa.attention(q, k, v, scale="x"), TypeError, "scale"),
    ("scale nan", lambda: pytorch_mqa.attention(q, k, v, scale=float("nan")), ValueError, "scale"),
    ("backend name", lambda: pytorch_mqa.attention(q, k, v, backend="fast"), ValueError, "backend"),
    ("backend for op", lambda: pytorch_mqa.attention(q, k, v, backend="cuda"), RuntimeError, "cuda"),
]


@pytest.mark.parametrize("name,call,exc,arg", ATTENTION_BAD, ids=[c[0] for c in ATTENTION_BAD])
def test_attention_bad_inputs(name, call, exc, arg):
    with pytest.raises(exc) as info:
        call()
    assert str(info.value).startswith(arg) or arg in str(info.value)


cq, ckc, cvc, ck, cv = _cache()
I32 = torch.int32
CACHE_BAD = [
    ("q rank", lambda: pytorch_mqa.attention_with_kv_cache(cq[0], ckc, cvc, ck, cv, cache_seqlens=0), ValueError, "q"),
    ("cache rank", lambda: pytorch_mqa.attention_with_kv_cache(cq, ckc[0], cvc, ck, cv, cache_seqlens=0), ValueError, "k_cache"),
    ("cache shapes", lambda: pytorch_mqa.attention_with_kv_cache(cq, ckc, cvc[:, :4], ck, cv, cache_seqlens=0), ValueError, "v_cache"),
    ("cache batch", lambda: pytorch_mqa.attention_with_kv_cache(cq, ckc[:1], cvc[:1], ck, cv, cache_seqlens=0), ValueError, "k_cache"),
    ("cache dtype", lambda: pytorch_mqa.attention_with_kv_cache(cq, ckc.half(), cvc.half(), ck, cv, cache_seqlens=0), TypeError, "k_cache"),
    ("head divisibility", lambda: pytorch_mqa.attention_with_kv_cache(*_cache(Hq=3), cache_seqlens=0), ValueError, "q"),
    ("k without v", lambda: pytorch_mqa.attention_with_kv_cache(cq, ckc, cvc, ck, None, cache_seqlens=0), ValueError, "v"),
    ("v without k", lambda: pytorch_mqa.attention_with_kv_cache(cq, ckc, cvc, None, cv, cache_seqlens=0), ValueError, "k"),
    ("k shape", lambda: pytorch_mqa.attention_with_kv_cache(cq, ckc, cvc, ck[:, :, :1], cv, cache_seqlens=0), ValueError, "k"),
    ("k dtype", lambda: pytorch_mqa.attention_with_kv_cache(cq, ckc, cvc, ck.half(), cv, cache_seqlens=0), TypeError, "k"),
    ("seqlens dtype", lambda: pytorch_mqa.attention_with_kv_cache(cq, ckc, cvc, ck, cv, cache_seqlens=torch.zeros(2, dtype=torch.int64)), TypeError, "cache_seqlens"),
    ("seqlens float", lambda: pytorch_mqa.attention_with_kv_cache(cq, ckc, cvc, ck, cv, cache_seqlens=1.0), TypeError, "cache_seqlens"),
    ("seqlens shape", lambda: pytorch_mqa.attention_with_kv_cache(cq, ckc, cvc, ck, cv, cache_seqlens=torch.zeros(3, dtype=I32)), ValueError, "cache_seqlens"),
    ("seqlens 2-D", lambda: pytorch_mqa.attention_with_kv_cache(cq, ckc, cvc, ck, cv, cache_seqlens=torch.zeros(2, 1, dtype=I32)), ValueError, "cache_seqlens"),
    ("seqlens negative", lambda: pytorch_mqa.attention_with_kv_cache(cq, ckc, cvc, ck, cv, cache_seqlens=torch.tensor([0, -1], dtype=I32)), ValueError, "cache_seqlens"),
    ("seqlens negative int", lambda: pytorch_mqa.attention_with_kv_cache(cq, ckc, cvc, ck, cv, cache_seqlens=-2), ValueError, "cache_seqlens"),
    ("overflow", lambda: pytorch_mqa.attention_with_kv_cache(cq, ckc, cvc, ck, cv, cache_seqlens=torch.tensor([0, 8], dtype=I32)), ValueError, "cache_seqlens"),
    ("overflow without new", lambda: pytorch_mqa.attention_with_kv_cache(cq, ckc, cvc, cache_seqlens=9), ValueError, "cache_seqlens"),
    ("overflow Tq", lambda: pytorch_mqa.attention_with_kv_cache(*_cache(Tq=4), cache_seqlens=5), ValueError, "cache_seqlens"),
    ("zero-length cache with new rows", lambda: pytorch_mqa.attention_with_kv_cache(*_cache(S=0), cache_seqlens=0), ValueError, "cache_seqlens"),
]


@pytest.mark.parametrize("name,call,exc,arg", CACHE_BAD, ids=[c[0] for c in CACHE_BAD])
def test_kv_cache_bad_inputs(name, call, exc, arg):
    kc_before = ckc.clone()
    with pytest.raises(exc) as info:
        call()
    assert str(info.value).startswith(arg), str(info.value)
    assert torch.equal(ckc, kc_before), "a rejected call must not touch the cache"


def test_messages_name_expected_and_received():
    with pytest.raises(ValueError) as info:
        pytorch_mqa.attention(*_qkv(Hq=5, Hkv=2))
    assert "Hq=5" in str(info.value) and "2" in str(info.value)
    with pytest.raises(ValueError) as info:
        pytorch_mqa.attention_with_kv_cache(cq, ckc, cvc, ck, cv, cache_seqlens=torch.tensor([0, 8], dtype=I32))
    msg = str(info.value)
    assert "S = 8" in msg and "cache_seqlens[1] = 8" in msg


def test_overflow_exactly_full_is_allowed():
    q, kc, vc, k, v = _cache(Tq=2, S=8)
    pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=6)
    assert torch.equal(kc[:, 6:], k)
