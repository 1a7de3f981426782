"""backend="triton" of `attention` with window_size, softcap and ALiBi: forward, LSE and the three
gradients against the float32 oracle with the DESIGN §5 rule (interpreter on CPU; `cuda` mark on a
GPU), on the shared case matrix (MHA, GQA, MQA)."""

import pytest
import torch
from helpers import ATTENTION_SHAPES, DTYPES, KV_CACHE_SHAPES, assert_close, attention_inputs, kv_cache_inputs

import pytorch_mqa
from pytorch_mqa import reference
from pytorch_mqa.ops.backends import unavailable_reason

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# (name, causal, window, softcap, alibi kind, logit multiplier)
VARIANTS = [
    ("win(0,0)", False, (0, 0), 0.0, None, 1.0),
    ("win(1,-1)+causal", True, (1, -1), 0.0, None, 1.0),
    ("win(>T)", False, (500, 500), 0.0, None, 1.0),
    ("softcap large logits", True, (-1, -1), 5.0, None, 4.0),
    ("alibi(H)+causal+win(3,-1)", True, (3, -1), 0.0, "h", 1.0),
    ("all", False, (4, 2), 2.0, "bh", 3.0),
]
SHAPES = [s for s in ATTENTION_SHAPES if s[1] * s[2] <= 130 * 130 and s != (1, 1, 130, 8, 1, 128)]


def _skip(device):
    if unavailable_reason("triton", device) is not None:
        pytest.skip(unavailable_reason("triton", device))


def _kw(variant, B, Hq, device):
    _, causal, window, softcap, alibi, _ = variant
    slopes = None
    if alibi:
        g = torch.Generator().manual_seed(B + Hq)
        slopes = (torch.rand((Hq,) if alibi == "h" else (B, Hq), generator=g) * 0.5 + 0.05).to(device)
    return dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes)


def _grads(fn, inputs, dout, wl):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out, lse = fn(*leaves)
    loss = (out.float() * dout.float()).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * wl).sum()
    return (out, lse) + torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_variants(shape, dtype, variant, device):
    _skip(device)
    q, k, v = attention_inputs(shape, dtype, seed=3, device=device, strided=shape[0] == 2)
    if variant[5] != 1.0:
        q = (q.float() * variant[5]).to(dtype)
    kw = _kw(variant, shape[0], shape[3], device)
    g = torch.Generator().manual_seed(4)
    dout = torch.randn(q.shape, generator=g).to(device=device, dtype=dtype)
    wl = torch.randn(shape[0], shape[3], shape[1], generator=g).to(device)
    got = _grads(lambda a, b, c: pytorch_mqa.attention(a, b, c, return_lse=True, backend="triton", **kw), (q, k, v), dout, wl)
    r32 = _grads(lambda a, b, c: reference.attention(a, b, c, **kw), (q.float(), k.float(), v.float()), dout, wl)
    rlp = _grads(lambda a, b, c: reference.attention(a, b, c, upcast=False, **kw), (q, k, v), dout, wl)
    label = f"triton variants {variant[0].split('+')[0].split('(')[0]}"
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), got, r32, rlp):
        assert_close(a, b, c, dtype, name, label)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_window_over_several_blocks(device):
    """Tq = Tk = 300 with a window of 9: several row and key blocks, most of them skipped."""
    _skip(device)
    q, k, v = attention_inputs((1, 300, 300, 2, 1, 16), torch.float32, seed=5, device=device)
    kw = dict(causal=True, window_size=(8, -1), alibi_slopes=torch.full((2,), 0.2, device=device))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device)
    wl = torch.zeros(1, 2, 300, device=device)
    got = _grads(lambda a, b, c: pytorch_mqa.attention(a, b, c, return_lse=True, backend="triton", **kw), (q, k, v), dout, wl)
    want = _grads(lambda a, b, c: reference.attention(a, b, c, **kw), (q, k, v), dout, wl)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert_close(a, b, b, torch.float32, name, "triton variants blocks")


DECODE_VARIANTS = [VARIANTS[i] for i in (0, 1, 3, 4, 5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("variant", DECODE_VARIANTS, ids=lambda v: v[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row", KV_CACHE_SHAPES, ids=str)
def test_triton_decode_variants(row, dtype, variant, num_splits, device):
    """The decode kernel (fused append, live-length splits) with each sequence's own offset."""
    _skip(device)
    from pytorch_mqa.kernels import attention_with_kv_cache as kernel

    q, kc, vc, kn, vn, lens = kv_cache_inputs(row, dtype, seed=6, device=device)
    if variant[5] != 1.0:
        q = (q.float() * variant[5]).to(dtype)
    kw = _kw(variant, row[0], row[3], device)
    causal = kw.pop("causal")
    kc32, vc32, kclp, vclp = kc.float(), vc.float(), kc.clone(), vc.clone()
    out, lse = kernel.attention_with_kv_cache(q, kc, vc, kn, vn, lens, causal, row[5] ** -0.5, num_splits, **kw)
    o32, l32 = reference.attention_with_kv_cache(q.float(), kc32, vc32, kn.float(), vn.float(), lens, causal=causal, **kw)
    olp, llp = reference.attention_with_kv_cache(q, kclp, vclp, kn, vn, lens, causal=causal, upcast=False, **kw)
    assert torch.equal(kc, kclp) and torch.equal(vc, vclp)
    label = f"triton decode variants {variant[0].split('+')[0].split('(')[0]}"
    assert_close(out, o32, olp, dtype, "out", label)
    assert_close(lse, l32, llp, dtype, "lse", label)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_decode_variants_through_the_op(device):
    _skip(device)
    q, kc, vc, kn, vn, lens = kv_cache_inputs(KV_CACHE_SHAPES[0], torch.float32, seed=7, device=device)
    kc2, vc2 = kc.clone(), vc.clone()
    kw = dict(window_size=(8, 0), softcap=3.0, alibi_slopes=torch.full((8,), 0.1, device=device))
    got = pytorch_mqa.attention_with_kv_cache(q, kc, vc, kn, vn, cache_seqlens=lens, backend="triton", **kw)
    want = pytorch_mqa.attention_with_kv_cache(q, kc2, vc2, kn, vn, cache_seqlens=lens, backend="reference", **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(kc, kc2)


# (lengths_q, lengths_k, Hq, Hkv, D): empty sequences, lengths not multiples of any block size.
VARLEN = [
    ([5, 0, 17, 1], [5, 3, 17, 9], 4, 1, 32),  # MQA
    ([33, 7], [65, 0], 8, 2, 40),  # GQA, a sequence with no key
    ([130, 1, 20], [130, 129, 19], 4, 4, 16),  # MHA, beyond one block
]
VARLEN_OPTIONS = [
    ("full", dict()),
    ("causal", dict(causal=True)),
    ("window+alibi(B,H)+causal", dict(causal=True, window_size=(6, 0), alibi="bh")),
    ("softcap+win(1,1)", dict(softcap=1.5, window_size=(1, 1))),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", VARLEN_OPTIONS, ids=lambda o: o[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", VARLEN, ids=str)
def test_triton_varlen(case, dtype, opts, device):
    """attention_varlen on Triton: one launch per kernel over all sequences."""
    _skip(device)
    lq, lk, Hq, Hkv, D = case
    g = torch.Generator().manual_seed(len(lq))
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)  # noqa: E731
    cq, ck = cu(lq), cu(lk)
    q = torch.randn(sum(lq), Hq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(sum(lk), Hkv, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(sum(lk), Hkv, D, generator=g).to(device=device, dtype=dtype)
    kw = dict(opts[1])
    if kw.pop("alibi", None):
        kw["alibi_slopes"] = (torch.rand(len(lq), Hq, generator=g) * 0.3).to(device)
    dout = torch.randn(q.shape, generator=g).to(device=device, dtype=dtype)
    wl = torch.zeros(Hq, q.shape[0], device=device)

    def run(fn, *xs):
        leaves = [x.detach().clone().requires_grad_(True) for x in xs]
        out, lse = fn(*leaves)
        loss = (out.float() * dout.float()).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * wl).sum()
        return (out, lse) + torch.autograd.grad(loss, leaves)

    got = run(lambda a, b, c: pytorch_mqa.attention_varlen(a, b, c, cq, ck, max(lq), max(lk), return_lse=True,
                                                           backend="triton", **kw), q, k, v)
    r32 = run(lambda a, b, c: reference.attention_varlen(a, b, c, cq, ck, **kw), q.float(), k.float(), v.float())
    rlp = run(lambda a, b, c: reference.attention_varlen(a, b, c, cq, ck, upcast=False, **kw), q, k, v)
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), got, r32, rlp):
        assert_close(a, b, c, dtype, name, f"triton varlen {opts[0].split('+')[0]}")
