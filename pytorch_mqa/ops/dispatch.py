"""What the registered ops run: one function per op and direction, switching on the backend.

`backend` reaching here is concrete ("reference", "triton" or "cuda") and the inputs are already
validated by the public functions (`pytorch_mqa.ops.api`). On CPU tensors "reference" runs the
CPU kernels of `pytorch_mqa.ops.cpu`; on other devices it runs the oracle itself. The Triton
launchers are imported when first used (Triton is optional); csrc is built and loaded on first use.
"""

from __future__ import annotations

import torch

from pytorch_mqa import reference
from pytorch_mqa.ops import build, cpu
from pytorch_mqa.ops.backends import USER_BACKENDS
from pytorch_mqa.ops.validation import check_cache_capacity


def _triton_attention():
    from pytorch_mqa.kernels import attention as kernel

    return kernel


def _triton_attention_with_kv_cache():
    from pytorch_mqa.kernels import attention_with_kv_cache as kernel

    return kernel


def _user_result(backend, op, result):
    """A registered backend's (out, lse), checked for form (the op's outputs must be new tensors)."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(t, torch.Tensor) for t in result)):
        raise RuntimeError(
            f"backend {backend!r}: expected {op}(..., return_lse=True) to return (out, lse), got {type(result).__name__}"
        )
    return tuple(result)


def attention_forward(q, k, v, causal, scale, backend):
    if backend == "reference" and q.device.type == "cpu":
        return cpu.attention_forward(q, k, v, causal, scale)
    if backend == "reference" or q.numel() == 0 or k.shape[1] == 0:
        return reference.attention(q, k, v, causal=causal, scale=scale)
    if backend in USER_BACKENDS:
        fn = USER_BACKENDS[backend]["attention"]
        return _user_result(backend, "attention", fn(q, k, v, causal=causal, scale=scale, return_lse=True))
    if backend == "triton":
        return _triton_attention().attention_forward(q, k, v, causal, scale)
    raise RuntimeError(f"backend: {backend!r} has no attention implementation")


def attention_backward(dout, q, k, v, lse, delta, causal, scale, backend):
    """The backward in delta form (delta = rowsum(dO * O) - dLSE), for the Triton kernel and the
    oracle. On CPU tensors the autograd of `attention` calls `attention_backward_cpu` instead."""
    if backend == "reference" or q.numel() == 0 or k.shape[1] == 0:
        return reference.attention_backward(dout, q, k, v, lse, delta, causal=causal, scale=scale)
    if backend in USER_BACKENDS:
        return USER_BACKENDS[backend]["attention_backward"](dout, q, k, v, lse, delta, causal, scale)
    if backend == "triton":
        return _triton_attention().attention_backward(dout, q, k, v, lse, delta, causal, scale)
    raise RuntimeError(f"backend: {backend!r} has no attention backward implementation")


def attention_with_kv_cache_forward(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, backend):
    if backend == "reference" and q.device.type == "cpu":
        return cpu.attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale)
    if cache_seqlens.device.type == "cpu":
        # Lengths on the host: check capacity here (one read) before anything is written.
        check_cache_capacity(cache_seqlens.tolist(), k_cache.shape[1], q.shape[1] if k is not None else 0)
    cache_seqlens = cache_seqlens.to(q.device, non_blocking=True)
    if backend == "reference" or q.shape[0] == 0 or q.shape[1] == 0:
        # Tq == 0 appends nothing and attends nothing: the reference returns empty results.
        return reference.attention_with_kv_cache(
            q, k_cache, v_cache, k, v, cache_seqlens, causal=causal, scale=scale
        )
    if backend in USER_BACKENDS:
        fn = USER_BACKENDS[backend]["attention_with_kv_cache"]
        return _user_result(backend, "attention_with_kv_cache", fn(
            q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=causal, scale=scale, return_lse=True))
    if backend == "triton":
        return _triton_attention_with_kv_cache().attention_with_kv_cache(
            q, k_cache, v_cache, k, v, cache_seqlens, causal, scale
        )
    if backend == "cuda":
        build.load_extension()
        return torch.ops.pytorch_mqa.attention_with_kv_cache_cuda(
            q, k_cache, v_cache, k, v, cache_seqlens, causal, scale
        )
    raise RuntimeError(f"backend: {backend!r} has no attention_with_kv_cache implementation")
