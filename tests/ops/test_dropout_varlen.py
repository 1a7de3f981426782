"""Attention dropout (statistics, determinism, forward/backward agreement) and attention_varlen
(against the oracle with the DESIGN §5 rule, empty sequences, lengths off the block sizes)."""

import math

import pytest
import torch
from helpers import DTYPES, assert_close, randn, seeded

import pytorch_mqa
from pytorch_mqa import reference


def _one_hot_v(Tk, Hkv, D=None):
    """v (1, Tk, Hkv, Tk) with v[j] = e_j: out[i, :] is row i of the dropped P itself."""
    eye = torch.eye(Tk)
    return eye[None, :, None, :].expand(1, Tk, Hkv, Tk).contiguous()


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
def test_dropout_keep_rate_and_unbiased(p, heads):
    Hq, Hkv = heads
    Tq, Tk = 32, 48
    g = seeded(0)
    q = randn((1, Tq, Hq, Tk), torch.float32, g)
    k = randn((1, Tk, Hkv, Tk), torch.float32, g)
    v = _one_hot_v(Tk, Hkv)
    probs = pytorch_mqa.attention(q, k, v)  # undropped P, (1, Tq, Hq, Tk)
    gen = torch.Generator().manual_seed(1)
    n = 40
    kept, total = 0, torch.zeros_like(probs)
    for _ in range(n):
        out = pytorch_mqa.attention(q, k, v, dropout_p=p, generator=gen)
        keep = out != 0
        kept += int(keep.sum())
        # Kept entries are P / (1 - p) exactly (to rounding); dropped ones are 0.
        torch.testing.assert_close(out[keep], (probs / (1 - p))[keep], rtol=1e-5, atol=1e-6)
        total += out
    N = n * probs.numel()
    rate = kept / N
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / N), rate  # binomial, 5 sigma
    # Unbiased: the mean over masks approaches P; its standard error is P * sqrt(p / ((1-p) n)).
    se = probs * math.sqrt(p / ((1 - p) * n))
    z = ((total / n - probs).abs() / se.clamp_min(1e-12)).flatten()
    assert z.mean() < 1.2 and (z > 6).sum() == 0


def test_dropout_deterministic_for_a_generator_and_seed():
    g = seeded(3)
    q, k, v = randn((2, 9, 4, 16), torch.float32, g), randn((2, 11, 2, 16), torch.float32, g), randn((2, 11, 2, 16), torch.float32, g)
    a = pytorch_mqa.attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(7))
    b = pytorch_mqa.attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(7))
    c = pytorch_mqa.attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(8))
    torch.manual_seed(5)
    d = pytorch_mqa.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    e = pytorch_mqa.attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and torch.equal(d, e) and not torch.equal(a, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 1)], ids=["MHA", "GQA", "MQA"])
def test_dropout_backward_uses_the_forward_mask(dtype, heads):
    """The gradient against autograd through the oracle with the same seed (same mask), and,
    with one query row and one-hot V, dv is zero exactly where the forward dropped."""
    Hq, Hkv = heads
    g = seeded(11)
    B, Tq, Tk, D = 2, 13, 21, 24
    q, k, v = (randn(s, dtype, g) for s in ((B, Tq, Hq, D), (B, Tk, Hkv, D), (B, Tk, Hkv, D)))
    dout = randn((B, Tq, Hq, D), dtype, g)
    seed_gen = lambda: torch.Generator().manual_seed(42)  # noqa: E731
    seed = torch.randint(0, 2**62, (1,), generator=seed_gen(), dtype=torch.int64)
    kw = dict(causal=True, dropout_p=0.25)

    def grads(fn, *xs):
        xs = [x.detach().clone().requires_grad_(True) for x in xs]
        out = fn(*xs)
        return (out,) + torch.autograd.grad(out, xs, dout.to(out.dtype))

    got = grads(lambda a, b, c: pytorch_mqa.attention(a, b, c, generator=seed_gen(), **kw), q, k, v)
    r32 = grads(lambda a, b, c: reference.attention(a, b, c, dropout_seed=seed, **kw)[0], q.float(), k.float(), v.float())
    rlp = grads(lambda a, b, c: reference.attention(a, b, c, upcast=False, dropout_seed=seed, **kw)[0], q, k, v)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, r32, rlp):
        assert_close(a, b, c, dtype, name, "dropout")

    q1 = randn((1, 1, Hq, Tk), torch.float32, g)
    k1 = randn((1, Tk, Hkv, Tk), torch.float32, g)
    v1 = _one_hot_v(Tk, Hkv).requires_grad_(True)
    out = pytorch_mqa.attention(q1, k1, v1, dropout_p=0.5, generator=seed_gen())
    (dv,) = torch.autograd.grad(out, (v1,), torch.ones_like(out))
    # dv[j, h, :] = sum over the G query heads of head h of P_drop[g, j]: zero iff every one dropped j.
    G = Hq // Hkv
    dropped_all = (out[0, 0] == 0).reshape(Hkv, G, Tk).all(1)  # (Hkv, Tk)
    assert torch.equal(dv[0].abs().sum(-1).T == 0, dropped_all)


# ---- varlen ------------------------------------------------------------------------------------

# (lengths_q, lengths_k, Hq, Hkv, D): empty sequences, lengths not multiples of 16/32/64/128.
VARLEN = [
    ([5, 0, 17, 1], [5, 3, 17, 9], 4, 1, 32),  # MQA, an empty query sequence
    ([33, 7], [65, 0], 8, 2, 40),  # GQA, an empty key sequence (its rows see nothing)
    ([130, 1, 20], [130, 129, 19], 4, 4, 64),  # MHA, beyond one 128 block; Tq > Tk
    ([0, 0], [0, 0], 2, 1, 16),  # nothing at all
]
VARLEN_OPTIONS = [
    ("full", dict()),
    ("causal", dict(causal=True)),
    ("window+alibi(B,H)+causal", dict(causal=True, window_size=(6, 0), alibi="bh")),
    ("softcap+win(1,1)", dict(softcap=1.5, window_size=(1, 1))),
]


def _varlen_inputs(lq, lk, Hq, Hkv, D, dtype, seed):
    g = seeded(seed)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)  # noqa: E731
    q = randn((sum(lq), Hq, D), dtype, g)
    k, v = randn((sum(lk), Hkv, D), dtype, g), randn((sum(lk), Hkv, D), dtype, g)
    return q, k, v, cu(lq), cu(lk)


def _opts(opts, B, Hq):
    opts = dict(opts)
    if opts.pop("alibi", None):
        opts["alibi_slopes"] = torch.rand(B, Hq, generator=seeded(B)) * 0.3
    return opts


@pytest.mark.parametrize("opts", VARLEN_OPTIONS, ids=lambda o: o[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", VARLEN, ids=str)
def test_varlen_against_oracle(case, dtype, opts):
    lq, lk, Hq, Hkv, D = case
    q, k, v, cq, ck = _varlen_inputs(lq, lk, Hq, Hkv, D, dtype, seed=len(lq))
    kw = _opts(opts[1], len(lq), Hq)
    dout = randn(q.shape, dtype, seeded(9))

    def run(fn, *xs):
        xs = [x.detach().clone().requires_grad_(True) for x in xs]
        out, lse = fn(*xs)
        grads = torch.autograd.grad(out, xs, dout.to(out.dtype)) if out.numel() else [torch.zeros_like(x) for x in xs]
        return (out, lse) + tuple(grads)

    got = run(lambda a, b, c: pytorch_mqa.attention_varlen(a, b, c, cq, ck, max(lq), max(lk), return_lse=True, **kw), q, k, v)
    assert got[0].shape == q.shape and got[1].shape == (Hq, q.shape[0]) and got[1].dtype == torch.float32
    r32 = run(lambda a, b, c: reference.attention_varlen(a, b, c, cq, ck, **kw), q.float(), k.float(), v.float())
    rlp = run(lambda a, b, c: reference.attention_varlen(a, b, c, cq, ck, upcast=False, **kw), q, k, v)
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), got, r32, rlp):
        assert_close(a, b, c, dtype, name, f"varlen {opts[0].split('+')[0]}")


def test_varlen_equals_per_sequence_attention():
    q, k, v, cq, ck = _varlen_inputs([5, 9], [7, 9], 4, 2, 16, torch.float32, seed=1)
    out = pytorch_mqa.attention_varlen(q, k, v, cq, ck, 9, 9, causal=True, window_size=(3, 0))
    for (q0, q1), (k0, k1) in zip(((0, 5), (5, 14)), ((0, 7), (7, 16))):
        want = pytorch_mqa.attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=True, window_size=(3, 0))
        torch.testing.assert_close(out[q0:q1], want[0])


def test_varlen_dropout_deterministic_and_differentiable():
    q, k, v, cq, ck = _varlen_inputs([6, 10], [6, 10], 4, 1, 16, torch.float32, seed=2)
    q.requires_grad_(True)
    a = pytorch_mqa.attention_varlen(q, k, v, cq, ck, 10, 10, dropout_p=0.2, generator=torch.Generator().manual_seed(1))
    b = pytorch_mqa.attention_varlen(q, k, v, cq, ck, 10, 10, dropout_p=0.2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    a.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
