"""Registration of the custom ops: schema -> fake impl -> autograd, each a few lines.

    torch.ops.pytorch_mqa.attention(q, k, v, causal, scale, backend) -> (out, lse)
    torch.ops.pytorch_mqa.attention_backward(dout, q, k, v, lse, delta, causal, scale, backend)
        -> (dq, dk, dv)
    torch.ops.pytorch_mqa.attention_with_kv_cache(q, k_cache!, v_cache!, k?, v?, cache_seqlens,
        causal, scale, backend) -> (out, lse)
    torch.ops.pytorch_mqa.attention_with_kv_cache_cuda(...)   the csrc/ kernel (CUDA only)

`backend` reaching an op is already concrete; `pytorch_mqa.ops.api` resolves "auto", validates
and fills defaults.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pytorch_mqa.ops import dispatch
from pytorch_mqa.ops.validation import validate_attention, validate_kv_cache


@torch.library.custom_op("pytorch_mqa::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    validate_attention(q, k, v, causal, scale)
    return dispatch.attention_forward(q, k, v, causal, scale, backend)


@attention_op.register_fake
def _(q, k, v, causal, scale, backend):
    B, Tq, Hq, D = q.shape
    return q.new_empty((B, Tq, Hq, D)), q.new_empty((B, Hq, Tq), dtype=torch.float32)


@torch.library.custom_op("pytorch_mqa::attention_backward", mutates_args=())
def _attention_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, causal: bool, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return dispatch.attention_backward(dout, q, k, v, lse, delta, causal, scale, backend)


@_attention_backward_op.register_fake
def _(dout, q, k, v, lse, delta, causal, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend


def _attention_autograd(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    # delta = rowsum(dO * O) - dLSE, laid out (B, Hq, Tq) like lse; see pytorch_mqa.reference.attention_backward.
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)
    if dlse is not None:
        delta = delta - dlse
    dq, dk, dv = _attention_backward_op(
        dout, q, k, v, lse, delta.contiguous(), ctx.causal, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None, None


attention_op.register_autograd(_attention_autograd, setup_context=_attention_setup_context)


@torch.library.custom_op("pytorch_mqa::attention_with_kv_cache", mutates_args=("k_cache", "v_cache"))
def attention_with_kv_cache_op(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor],
    v: Optional[Tensor],
    cache_seqlens: Tensor,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    validate_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale)
    return dispatch.attention_with_kv_cache_forward(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, backend)


@attention_with_kv_cache_op.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, backend):
    B, Tq, Hq, D = q.shape
    return q.new_empty((B, Tq, Hq, D)), q.new_empty((B, Hq, Tq), dtype=torch.float32)


# The csrc/ kernel's op. Its schema is defined here, once, at import (no compile); the CUDA kernel
# is registered by csrc/bindings.cpp when pytorch_mqa.ops.build.load_extension() loads the library.
torch.library.define(
    "pytorch_mqa::attention_with_kv_cache_cuda",
    "(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor cache_seqlens, "
    "bool causal, float scale) -> (Tensor, Tensor)",
)


@torch.library.register_fake("pytorch_mqa::attention_with_kv_cache_cuda")
def _(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale):
    B, Tq, Hq, D = q.shape
    return q.new_empty((B, Tq, Hq, D)), q.new_empty((B, Hq, Tq), dtype=torch.float32)
