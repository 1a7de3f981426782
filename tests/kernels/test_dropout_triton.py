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
