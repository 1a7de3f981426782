"""`pytorch_mqa.attention` on the reference backend: the case matrix, LSE, gradients."""

import pytest
import torch
from helpers import ATTENTION_SHAPES, DTYPES, assert_close, attention_inputs

import pytorch_mqa
from pytorch_mqa import reference


def _refs(q, k, v, causal, dtype):
    """ref32: fp32 reference; ref_lp: the reference computed in the input dtype (upcast=False)."""
    ref32 = reference.attention(q.float(), k.float(), v.float(), causal=causal)
    ref_lp = reference.attention(q, k, v, causal=causal, upcast=False)
    return ref32, ref_lp


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_lse(shape, dtype, causal):
    q, k, v = attention_inputs(shape, dtype, seed=hash(shape) % 1000, strided=shape[0] == 2)
    out, lse = pytorch_mqa.attention(q, k, v, causal=causal, return_lse=True, backend="reference")
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32
    (o32, l32), (olp, llp) = _refs(q, k, v, causal, dtype)
    assert_close(out, o32, olp, dtype, "out", "reference attention")
    assert_close(lse, l32, llp, dtype, "lse", "reference attention")


def _grads(fn, q, k, v, dout):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    fn(q, k, v).backward(dout)
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("shape", ATTENTION_SHAPES[:7], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(shape, dtype):
    causal = shape[1] != shape[2]
    q, k, v = attention_inputs(shape, dtype, seed=7)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    got = _grads(lambda a, b, c: pytorch_mqa.attention(a, b, c, causal=causal, backend="reference"), q, k, v, dout)
    ref32 = _grads(lambda a, b, c: reference.attention(a, b, c, causal=causal)[0], q.float(), k.float(), v.float(), dout.float())
    ref_lp = _grads(lambda a, b, c: reference.attention(a, b, c, causal=causal, upcast=False)[0], q, k, v, dout)
    for name, g, r32, rlp in zip(("dq", "dk", "dv"), got, ref32, ref_lp):
        assert g.dtype == dtype
        assert_close(g, r32, rlp, dtype, name, "reference attention")


def test_lse_gradient_flows():
    # The op's autograd (delta = rowsum(dO*O) - dLSE) against autograd through the reference.
    q, k, v = attention_inputs((1, 5, 7, 4, 2, 8), torch.float32, seed=9)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    w = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(1))

    def f(q, k, v):
        out, lse = pytorch_mqa.attention(q, k, v, causal=True, scale=0.25, return_lse=True)
        return out.sum() + (lse * w).sum()

    def g(q, k, v):
        out, lse = reference.attention(q, k, v, causal=True, scale=0.25)
        return out.sum() + (lse * w).sum()

    got = torch.autograd.grad(f(q, k, v), (q, k, v))
    want = torch.autograd.grad(g(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_scale_default_and_explicit():
    q, k, v = attention_inputs((1, 4, 4, 2, 1, 16), torch.float32, seed=11)
    a = pytorch_mqa.attention(q, k, v)
    b = pytorch_mqa.attention(q, k, v, scale=0.25)  # 1/sqrt(16)
    c = pytorch_mqa.attention(q, k, v, scale=0.1)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_matches_sdpa():
    q, k, v = attention_inputs((2, 9, 13, 8, 2, 16), torch.float32, seed=12)
    out = pytorch_mqa.attention(q, k, v, causal=True)
    mask = torch.ones(9, 13, dtype=torch.bool).tril(13 - 9)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 4, 4, 2, 1, 8), (2, 0, 4, 2, 1, 8), (2, 3, 0, 2, 1, 8)], ids=str)
def test_empty_inputs(shape):
    q, k, v = attention_inputs(shape, torch.float32)
    q.requires_grad_(True)
    out, lse = pytorch_mqa.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == q.shape and lse.shape == (shape[0], shape[3], shape[1])
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_nan_input_does_not_crash():
    q, k, v = attention_inputs((1, 3, 3, 2, 1, 8), torch.float32)
    k[0, 1, 0, 0] = float("nan")
    out = pytorch_mqa.attention(q, k, v)
    assert out.shape == q.shape
