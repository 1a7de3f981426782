"""backend="triton" attention dropout: Philox counter masks (never stored). The mask is recovered
from a forward with one-hot V; then the statistics (keep rate, unbiasedness), determinism, and
the forward and all three gradients against float64 autograd math with that same mask."""

import math

import pytest
import torch
from helpers import randn, seeded

import pytorch_mqa
from pytorch_mqa.ops.backends import unavailable_reason

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _skip(device):
    if unavailable_reason("triton", device) is not None:
        pytest.skip(unavailable_reason("triton", device))


def _mask(B, Tq, Tk, Hq, Hkv, p, seed, device, causal=False):
    """keep / (1 - p) as (B, Hq, Tq, Tk), read off a forward with v[j] = e_j and q = 0 (P uniform)."""
    q = torch.zeros(B, Tq, Hq, Tk, device=device)
    k = torch.zeros(B, Tk, Hkv, Tk, device=device)
    v = torch.eye(Tk, device=device)[None, :, None, :].expand(B, Tk, Hkv, Tk).contiguous()
    out = pytorch_mqa.attention(q, k, v, causal=causal, dropout_p=p, generator=torch.Generator().manual_seed(seed),
                                backend="triton")
    return (out != 0).transpose(1, 2).double() / (1 - p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
def test_triton_dropout_statistics(heads, device):
    _skip(device)
    Hq, Hkv = heads
    B, Tq, Tk, p = 2, 24, 40, 0.3
    masks = [_mask(B, Tq, Tk, Hq, Hkv, p, s, device) for s in range(6)]
    keep = torch.stack(masks) > 0
    N = keep.numel()
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / N), rate
    mean_scale = torch.stack(masks).mean().item()  # E[keep / (1 - p)] = 1: unbiased
    assert abs(mean_scale - 1) < 5 * math.sqrt(p / (1 - p) / N), mean_scale
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(masks[0], _mask(B, Tq, Tk, Hq, Hkv, p, 0, device))  # deterministic per seed
    # Different heads and rows draw different masks (no counter reuse across the packed rows).
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1]) and not torch.equal(keep[0, 0, :, 0], keep[0, 0, :, 1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)], ids=["MHA", "GQA", "MQA"])
def test_triton_dropout_forward_backward_use_one_mask(heads, causal, device):
    _skip(device)
    Hq, Hkv = heads
    B, Tq, Tk, D, p, seed = 2, 19, 33, 16, 0.25, 5
    drop = _mask(B, Tq, Tk, Hq, Hkv, p, seed, device, causal)
    g = seeded(1)
    q, k, v = (randn(s, torch.float32, g, device) for s in ((B, Tq, Hq, D), (B, Tk, Hkv, D), (B, Tk, Hkv, D)))
    dout = randn((B, Tq, Hq, D), torch.float32, g, device)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = pytorch_mqa.attention(*leaves, causal=causal, dropout_p=p, generator=torch.Generator().manual_seed(seed),
                                backend="triton")
    got = (out,) + torch.autograd.grad(out, leaves, dout)

    ref = [x.double().requires_grad_(True) for x in (q, k, v)]
    G = Hq // Hkv
    s = torch.einsum("bqhd,bkhd->bhqk", ref[0], ref[1].repeat_interleave(G, dim=2)) / math.sqrt(D)
    if causal:
        i, j = torch.arange(Tq, device=device)[:, None], torch.arange(Tk, device=device)[None, :]
        s = s.masked_fill(j > i + Tk - Tq, float("-inf"))
    P = torch.softmax(s, -1) * drop
    want_out = torch.einsum("bhqk,bkhd->bqhd", P, ref[2].repeat_interleave(G, dim=2))
    want = (want_out,) + torch.autograd.grad(want_out, ref, dout.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-5, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_varlen_dropout_one_mask_forward_and_backward(device):
    """Packed sequences: two equal sequences draw different masks, and the gradient uses the
    forward's mask (checked against the batched kernel on each sequence with its mask)."""
    _skip(device)
    Hq, Hkv, T, p = 2, 1, 24, 0.3
    cu = torch.tensor([0, T, 2 * T], dtype=torch.int32, device=device)
    q = torch.zeros(2 * T, Hq, T, device=device)
    v = torch.eye(T, device=device)[:, None, :].expand(T, Hkv, T).repeat(2, 1, 1)
    out = pytorch_mqa.attention_varlen(q, q[:, :Hkv], v, cu, cu, T, T, dropout_p=p,
                                       generator=torch.Generator().manual_seed(3), backend="triton")
    keep = out != 0
    assert not torch.equal(keep[:T], keep[T:])  # no counter reuse across sequences
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / keep.numel())
    g = seeded(2)
    qr, kr, vr = (randn((2 * T, h, 16), torch.float32, g, device).requires_grad_(True) for h in (Hq, Hkv, Hkv))
    o = pytorch_mqa.attention_varlen(qr, kr, vr, cu, cu, T, T, dropout_p=p, generator=torch.Generator().manual_seed(3),
                                     backend="triton")
    dout = randn(o.shape, torch.float32, g, device)
    got = torch.autograd.grad(o, (qr, kr, vr), dout)
    ref = [x.detach().double().requires_grad_(True) for x in (qr, kr, vr)]
    outs = []
    for b in range(2):
        sl = slice(b * T, (b + 1) * T)
        s = torch.einsum("qhd,khd->hqk", ref[0][sl], ref[1][sl].expand(T, Hq, 16)) / 4.0
        P = torch.softmax(s, -1) * keep[sl].transpose(0, 1).double() / (1 - p)
        outs.append(torch.einsum("hqk,khd->qhd", P, ref[2][sl].expand(T, Hq, 16)))
    want_out = torch.cat(outs)
    want = torch.autograd.grad(want_out, ref, dout.double())
    torch.testing.assert_close(o.double(), want_out, rtol=0, atol=2e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-5)
