"""The variants' validation (DESIGN §4), registration (opcheck, torch.compile fullgraph) and the
routing of backends that lack a variant."""

import pytest
import torch
from helpers import attention_inputs, kv_cache_inputs

import pytorch_mqa
from pytorch_mqa.ops.backends import unavailable_reason

q, k, v = attention_inputs((2, 3, 5, 4, 2, 8), torch.float32, seed=1)
qc, kc, vc, kn, vn, lens = kv_cache_inputs((2, 1, 8, 4, 2, 8, [2, 3]), torch.float32)
cu = torch.tensor([0, 2, 3], dtype=torch.int32)
qv, kv_, vv = q[0], k[0, :3], v[0, :3]  # (3, Hq, D), (3, Hkv, D)


def _varlen(**kw):
    args = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=2, max_seqlen_k=2)
    args.update(kw)
    return pytorch_mqa.attention_varlen(qv, kv_, vv, args.pop("cu_seqlens_q"), args.pop("cu_seqlens_k"),
                                        args.pop("max_seqlen_q"), args.pop("max_seqlen_k"), **args)


BAD = [
    ("window < -1", lambda: pytorch_mqa.attention(q, k, v, window_size=(-2, 0)), ValueError, "window_size"),
    ("window not a pair", lambda: pytorch_mqa.attention(q, k, v, window_size=3), TypeError, "window_size"),
    ("window float", lambda: pytorch_mqa.attention(q, k, v, window_size=(1.5, 0)), TypeError, "window_size"),
    ("softcap < 0", lambda: pytorch_mqa.attention(q, k, v, softcap=-1.0), ValueError, "softcap"),
    ("softcap nan", lambda: pytorch_mqa.attention(q, k, v, softcap=float("nan")), ValueError, "softcap"),
    ("alibi dtype", lambda: pytorch_mqa.attention(q, k, v, alibi_slopes=torch.ones(4, dtype=torch.float16)), TypeError, "alibi_slopes"),
    ("alibi shape", lambda: pytorch_mqa.attention(q, k, v, alibi_slopes=torch.ones(2)), ValueError, "alibi_slopes"),
    ("alibi batch", lambda: pytorch_mqa.attention(q, k, v, alibi_slopes=torch.ones(3, 4)), ValueError, "alibi_slopes"),
    ("dropout 1", lambda: pytorch_mqa.attention(q, k, v, dropout_p=1.0), ValueError, "dropout_p"),
    ("dropout < 0", lambda: pytorch_mqa.attention(q, k, v, dropout_p=-0.1), ValueError, "dropout_p"),
    ("dropout generator", lambda: pytorch_mqa.attention(q, k, v, dropout_p=0.1, generator=3), TypeError, "generator"),
    ("cache dropout", lambda: pytorch_mqa.attention_with_kv_cache(qc, kc, vc, kn, vn, cache_seqlens=lens, dropout_p=0.1), ValueError, "dropout_p"),
    ("cache window", lambda: pytorch_mqa.attention_with_kv_cache(qc, kc, vc, kn, vn, cache_seqlens=lens, window_size=(0, -3)), ValueError, "window_size"),
    ("cache alibi", lambda: pytorch_mqa.attention_with_kv_cache(qc, kc, vc, kn, vn, cache_seqlens=lens, alibi_slopes=torch.ones(3, 4)), ValueError, "alibi_slopes"),
    ("cache capacity", lambda: pytorch_mqa.attention_with_kv_cache(qc, kc.clone(), vc.clone(), kn, vn, cache_seqlens=torch.tensor([7, 8], dtype=torch.int32), window_size=(2, 0)), ValueError, "cache_seqlens"),
    ("cu int64", lambda: _varlen(cu_seqlens_q=cu.long()), TypeError, "cu_seqlens_q"),
    ("cu not monotonic", lambda: _varlen(cu_seqlens_k=torch.tensor([0, 3, 2], dtype=torch.int32)), ValueError, "cu_seqlens_k"),
    ("cu wrong total", lambda: _varlen(cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    ("cu not from 0", lambda: _varlen(cu_seqlens_q=torch.tensor([1, 2, 3], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    ("cu sizes differ", lambda: _varlen(cu_seqlens_k=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "cu_seqlens_k"),
    ("max_seqlen short", lambda: _varlen(max_seqlen_q=1), ValueError, "max_seqlen_q"),
    ("max_seqlen tensor", lambda: _varlen(max_seqlen_k=torch.tensor(2)), TypeError, "max_seqlen_k"),
    ("varlen rank", lambda: pytorch_mqa.attention_varlen(q, k, v, cu, cu, 2, 2), ValueError, "q"),
    ("varlen alibi rows", lambda: _varlen(alibi_slopes=torch.ones(3, 4)), ValueError, "alibi_slopes"),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c[0])
def test_bad_inputs_raise_naming_the_argument(case):
    _, fn, exc, arg = case
    with pytest.raises(exc, match=arg):
        fn()


def test_triton_forced_with_a_variant_raises_and_auto_routes_around():
    if unavailable_reason("triton", "cpu") is not None:
        pytest.skip("Triton cannot run here")
    # The csrc decode kernel has window and softcap but not ALiBi (dispatch.KERNEL_VARIANTS).
    slopes = torch.rand(qc.shape[2])
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        pytorch_mqa.attention_with_kv_cache(qc, kc.clone(), vc.clone(), kn, vn, cache_seqlens=lens, alibi_slopes=slopes,
                                            backend="cuda") if unavailable_reason("cuda", "cuda") is None else (
            pytorch_mqa.ops.dispatch._require("cuda", "attention_with_kv_cache", {"softcap": 0.0, "window_size": (-1, -1),
                                                                                  "alibi_slopes": slopes}))
    with pytest.raises(NotImplementedError, match="attention_varlen"):
        _varlen(backend="cuda") if unavailable_reason("cuda", "cuda") is None else (
            pytorch_mqa.ops.dispatch.attention_varlen_forward(qv, kv_, vv, cu, cu, 2, 2, False, 0.3, "cuda"))


ALIBI = torch.rand(4)
OPCHECK = [
    ("window+causal", (True, 0.3, "reference", 2, 0, 0.0, None, 0.0, None)),
    ("softcap+alibi", (False, 0.3, "reference", -1, -1, 1.5, ALIBI, 0.0, None)),
    ("dropout", (True, 0.3, "reference", -1, 3, 0.0, None, 0.2, torch.tensor([123]))),
]


@pytest.mark.parametrize("args", OPCHECK, ids=lambda a: a[0])
def test_opcheck_attention_variants(args):
    qq = q.detach().clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.pytorch_mqa.attention.default, (qq, k, v) + args[1])


def test_opcheck_kv_cache_and_varlen_variants():
    torch.library.opcheck(
        torch.ops.pytorch_mqa.attention_with_kv_cache.default,
        (qc, kc.clone(), vc.clone(), kn, vn, lens, True, 0.3, "reference", 1, 0, 2.0, ALIBI),
    )
    qq = qv.detach().clone().requires_grad_(True)
    torch.library.opcheck(
        torch.ops.pytorch_mqa.attention_varlen.default,
        (qq, kv_, vv, cu, cu, 2, 2, True, 0.3, "reference", 1, 0, 2.0, ALIBI, 0.0, None),
    )


def test_compile_fullgraph_variants():
    torch._dynamo.reset()

    def step(q, k, v, qv, kv_, vv, qc, kc, vc, kn, vn, lens):
        a = pytorch_mqa.attention(q, k, v, causal=True, window_size=(2, 0), softcap=3.0, alibi_slopes=ALIBI)
        b = pytorch_mqa.attention_varlen(qv, kv_, vv, cu, cu, 2, 2, causal=True, window_size=(1, 0))
        c = pytorch_mqa.attention_with_kv_cache(qc, kc, vc, kn, vn, cache_seqlens=lens, window_size=(1, 0), softcap=2.0)
        return a.sum() + b.sum() + c.sum()

    qq, qvv = q.detach().clone().requires_grad_(True), qv.detach().clone().requires_grad_(True)
    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(qq, k, v, qvv, kv_, vv, qc, kc1, vc1, kn, vn, lens)
    want = step(qq, k, v, qvv, kv_, vv, qc, kc2, vc2, kn, vn, lens)
    torch.testing.assert_close(got, want)
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
    g1 = torch.autograd.grad(got, (qq, qvv))
    g2 = torch.autograd.grad(want, (qq, qvv))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
