"""The ops are real custom ops: opcheck passes, and they compile with fullgraph=True."""

import pytest
import torch
from helpers import attention_inputs, kv_cache_inputs

import pytorch_mqa
from pytorch_mqa import available_backends


def _cpu_backends():
    return [b for b in available_backends("cpu") if b != "cuda"]


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_attention(backend, causal):
    q, k, v = attention_inputs((2, 5, 7, 4, 2, 16), torch.float32, seed=1)
    q.requires_grad_(True)
    torch.library.opcheck(torch.ops.pytorch_mqa.attention.default, (q, k, v, causal, 0.25, backend))


@pytest.mark.parametrize("backend", _cpu_backends())
def test_opcheck_attention_backward(backend):
    q, k, v = attention_inputs((1, 5, 7, 4, 2, 16), torch.float32, seed=2)
    out, lse = torch.ops.pytorch_mqa.attention(q, k, v, True, 0.25, backend)
    dout = torch.randn_like(out)
    delta = (dout * out).sum(-1).transpose(1, 2).contiguous()
    torch.library.opcheck(
        torch.ops.pytorch_mqa.attention_backward.default, (dout, q, k, v, lse, delta, True, 0.25, backend)
    )


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("with_new", [True, False])
def test_opcheck_kv_cache(backend, with_new):
    q, kc, vc, k, v, lens = kv_cache_inputs((2, 1, 32, 4, 1, 16, [3, 9]), torch.float32, with_new=with_new)
    torch.library.opcheck(
        torch.ops.pytorch_mqa.attention_with_kv_cache.default, (q, kc, vc, k, v, lens, True, 0.25, backend)
    )


@pytest.mark.parametrize("backend", _cpu_backends())
def test_compile_fullgraph(backend):
    torch._dynamo.reset()

    def step(q, k, v, q1, kc, vc, k1, v1, lens):
        out = pytorch_mqa.attention(q, k, v, causal=True, backend=backend)
        dec = pytorch_mqa.attention_with_kv_cache(q1, kc, vc, k1, v1, cache_seqlens=lens, backend=backend)
        return out.sum() + dec.sum()

    q, k, v = attention_inputs((1, 6, 6, 4, 2, 16), torch.float32, seed=3)
    q.requires_grad_(True)
    q1, kc, vc, k1, v1, lens = kv_cache_inputs((1, 1, 16, 4, 2, 16, [5]), torch.float32, seed=4)
    kc_e, vc_e = kc.clone(), vc.clone()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, q1, kc, vc, k1, v1, lens)
    want = step(q.detach(), k, v, q1, kc_e, vc_e, k1, v1, lens)
    torch.testing.assert_close(got, want)
    assert torch.equal(kc, kc_e) and torch.equal(vc, vc_e)  # the mutation happened exactly once
    got.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("with_dlse", [False, True])
@pytest.mark.parametrize("shape", [(1, 5, 7, 4, 2, 16), (2, 6, 3, 4, 1, 8)], ids=str)
def test_opcheck_attention_backward_cpu(with_dlse, shape):
    q, k, v = attention_inputs(shape, torch.float32, seed=5)
    out, lse = torch.ops.pytorch_mqa.attention(q, k, v, True, 0.25, "reference")
    gen = torch.Generator().manual_seed(6)
    dout = torch.randn(out.shape, generator=gen)
    dlse = torch.randn(lse.shape, generator=gen) if with_dlse else None
    torch.library.opcheck(
        torch.ops.pytorch_mqa.attention_backward_cpu.default, (dout, q, k, v, out, lse, dlse, True, 0.25)
    )


def test_compile_fullgraph_with_auto_backend():
    # backend="auto" reads a context variable and the environment: a constant to dynamo, no break.
    torch._dynamo.reset()
    q1, kc, vc, k1, v1, lens = kv_cache_inputs((2, 1, 16, 4, 2, 16, [5, 9]), torch.float32, seed=4)
    kc_e, vc_e = kc.clone(), vc.clone()

    def step(q1, kc, vc, k1, v1, lens):
        out = pytorch_mqa.attention(q1, kc, vc)
        return out.sum() + pytorch_mqa.attention_with_kv_cache(q1, kc, vc, k1, v1, cache_seqlens=lens).sum()

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q1, kc, vc, k1, v1, lens)
    want = step(q1, kc_e, vc_e, k1, v1, lens)
    torch.testing.assert_close(got, want)
    assert torch.equal(kc, kc_e)
