"""window_size, softcap, alibi_slopes on both ops, on the reference backend (the CPU kernels),
against the float32 oracle with the DESIGN §5 rule, over the shared case matrix (MHA, GQA, MQA)."""

import pytest
import torch
from helpers import ATTENTION_SHAPES, DTYPES, KV_CACHE_SHAPES, assert_close, attention_inputs, kv_cache_inputs

import pytorch_mqa
from pytorch_mqa import reference


def _alibi(kind, B, Hq):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(B * 100 + Hq)
    shape = (Hq,) if kind == "h" else (B, Hq)
    return torch.rand(shape, generator=g) * 0.5 + 0.05


# (name, causal, window_size, softcap, alibi kind, logit multiplier). Windows 0, 1 and larger than
# any T in the matrix; softcap with large logits (q scaled up); ALiBi with causal and window.
VARIANTS = [
    ("win(0,0)", False, (0, 0), 0.0, None, 1.0),
    ("win(1,1)", False, (1, 1), 0.0, None, 1.0),
    ("win(1,-1)+causal", True, (1, -1), 0.0, None, 1.0),
    ("win(-1,2)", False, (-1, 2), 0.0, None, 1.0),
    ("win(>T)+causal", True, (500, 500), 0.0, None, 1.0),
    ("softcap", False, (-1, -1), 0.7, None, 1.0),
    ("softcap large logits+causal", True, (-1, -1), 5.0, None, 8.0),
    ("alibi(H)+causal+win(3,-1)", True, (3, -1), 0.0, "h", 1.0),
    ("alibi(B,H)", False, (-1, -1), 0.0, "bh", 1.0),
    ("all", True, (4, 0), 2.0, "h", 3.0),
]
# The backward's large-logit case scales q by 4, not 8: at 8 the float32 gradients reach |dk| ~ 16,
# where the rule's float32 bound (atol 2e-5, ref_lp = ref32) is below float32 rounding of the
# oracle itself (8e-6 against float64).
BACKWARD_VARIANTS = [VARIANTS[i] for i in (1, 2, 7, 9)] + [("softcap large logits+causal", True, (-1, -1), 5.0, None, 4.0)]


def _kw(variant, B, Hq):
    name, causal, window, softcap, alibi, _ = variant
    return dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=_alibi(alibi, B, Hq))


def _inputs(shape, dtype, variant, seed):
    q, k, v = attention_inputs(shape, dtype, seed=seed, strided=shape[0] == 2)
    if variant[5] != 1.0:
        q = (q.float() * variant[5]).to(dtype)
    return q, k, v


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
def test_attention_forward(shape, dtype, variant):
    q, k, v = _inputs(shape, dtype, variant, seed=hash(shape) % 997)
    kw = _kw(variant, shape[0], shape[3])
    out, lse = pytorch_mqa.attention(q, k, v, return_lse=True, backend="reference", **kw)
    o32, l32 = reference.attention(q.float(), k.float(), v.float(), **kw)
    olp, llp = reference.attention(q, k, v, upcast=False, **kw)
    label = f"variants {variant[0].split('+')[0].split('(')[0]}"
    assert_close(out, o32, olp, dtype, "out", label)
    assert_close(lse, l32, llp, dtype, "lse", label)


def _grads(fn, q, k, v, dout, wl):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.float() * dout.float()).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * wl).sum()
    return torch.autograd.grad(loss, (q, k, v))


@pytest.mark.parametrize("variant", BACKWARD_VARIANTS, ids=lambda v: v[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES[:7] + ATTENTION_SHAPES[8:], ids=str)
def test_attention_backward(shape, dtype, variant):
    q, k, v = _inputs(shape, dtype, variant, seed=5)
    kw = _kw(variant, shape[0], shape[3])
    g = torch.Generator().manual_seed(6)
    dout = torch.randn(q.shape, generator=g).to(dtype)
    wl = torch.randn(shape[0], shape[3], shape[1], generator=g)  # a gradient through the LSE too
    got = _grads(lambda a, b, c: pytorch_mqa.attention(a, b, c, return_lse=True, backend="reference", **kw), q, k, v, dout, wl)
    r32 = _grads(lambda a, b, c: reference.attention(a, b, c, **kw), q.float(), k.float(), v.float(), dout, wl)
    rlp = _grads(lambda a, b, c: reference.attention(a, b, c, upcast=False, **kw), q, k, v, dout, wl)
    label = f"variants backward {variant[0].split('+')[0].split('(')[0]}"
    for name, a, b, c in zip(("dq", "dk", "dv"), got, r32, rlp):
        assert a.dtype == dtype
        assert_close(a, b, c, dtype, name, label)


def test_softcap_gradient_is_the_derivative():
    """The analytic softcap backward against autograd through plain tanh math (float64)."""
    q, k, v = (x.double().requires_grad_(True) for x in attention_inputs((1, 6, 9, 4, 2, 8), torch.float32, seed=3))
    out, _ = reference.attention(q, k, v, causal=True, softcap=0.3, window_size=(2, -1))
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), dout)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2)) * 8**-0.5
    s = 0.3 * torch.tanh(s / 0.3)
    i, j = torch.arange(6)[:, None], torch.arange(9)[None, :]
    s = s.masked_fill(~((j <= i + 3) & (j >= i + 3 - 2)), float("-inf"))
    manual = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.repeat_interleave(2, dim=2))
    torch.testing.assert_close(out, manual)
    got = torch.autograd.grad(manual, (q, k, v), dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_window_rows_with_no_key():
    """Tq > Tk with window (0, 0): the first rows see no key: zeros, lse = -inf, no gradient."""
    q, k, v = (x.requires_grad_(True) for x in attention_inputs((1, 6, 3, 2, 1, 8), torch.float32, seed=2))
    out, lse = pytorch_mqa.attention(q, k, v, window_size=(0, 0), return_lse=True)
    assert torch.all(out[:, :3] == 0) and torch.all(torch.isneginf(lse[:, :, :3]))
    assert torch.isfinite(lse[:, :, 3:]).all()
    out.sum().backward()
    assert torch.all(q.grad[:, :3] == 0) and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("variant", [VARIANTS[i] for i in (0, 2, 6, 7, 9)], ids=lambda v: v[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row", KV_CACHE_SHAPES, ids=str)
def test_kv_cache(row, dtype, variant):
    q, kc, vc, k, v, lens = kv_cache_inputs(row, dtype, seed=4)
    if variant[5] != 1.0:
        q = (q.float() * variant[5]).to(dtype)
    kw = _kw(variant, row[0], row[3])
    kc32, vc32 = kc.float(), vc.float()
    kclp, vclp = kc.clone(), vc.clone()
    out, lse = pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens, return_lse=True, backend="reference", **kw)
    o32, l32 = reference.attention_with_kv_cache(q.float(), kc32, vc32, k.float(), v.float(), lens, **kw)
    olp, llp = reference.attention_with_kv_cache(q, kclp, vclp, k, v, lens, upcast=False, **kw)
    assert torch.equal(kc, kclp) and torch.equal(vc, vclp)
    label = f"variants kv_cache {variant[0].split('+')[0].split('(')[0]}"
    assert_close(out, o32, olp, dtype, "out", label)
    assert_close(lse, l32, llp, dtype, "lse", label)


def test_kv_cache_window_is_per_sequence():
    """Sequence b's window ends at its own last key L_b + Tq - 1."""
    q, kc, vc, k, v, lens = kv_cache_inputs((2, 1, 20, 2, 1, 8, [5, 12]), torch.float32, seed=1)
    out = pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens, window_size=(2, 0))
    for b, L in enumerate((5, 12)):
        keys = slice(L + 1 - 3, L + 1)
        want = pytorch_mqa.attention(q[b : b + 1], kc[b : b + 1, keys], vc[b : b + 1, keys])
        torch.testing.assert_close(out[b : b + 1], want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", [dict(window_size=(7, 3)), dict(causal=True, window_size=(20, -1), alibi_slopes=torch.full((4,), 0.1))],
                         ids=["win(7,3)", "causal+win(20,-1)+alibi"])
def test_window_over_several_query_blocks(dtype, opts):
    """Tq = 260, Tk = 300: three 128-row blocks, each over only the keys its rows can see."""
    q, k, v = attention_inputs((1, 260, 300, 4, 1, 32), dtype, seed=8)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    wl = torch.zeros(1, 4, 260)
    got = _grads(lambda a, b, c: pytorch_mqa.attention(a, b, c, return_lse=True, **opts), q, k, v, dout, wl)
    r32 = _grads(lambda a, b, c: reference.attention(a, b, c, **opts), q.float(), k.float(), v.float(), dout, wl)
    rlp = _grads(lambda a, b, c: reference.attention(a, b, c, upcast=False, **opts), q, k, v, dout, wl)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, r32, rlp):
        assert_close(a, b, c, dtype, name, "variants blocks")
    out = pytorch_mqa.attention(q, k, v, **opts)
    assert_close(out, reference.attention(q.float(), k.float(), v.float(), **opts)[0],
                 reference.attention(q, k, v, upcast=False, **opts)[0], dtype, "out", "variants blocks")
