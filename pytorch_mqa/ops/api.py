"""The public functions `attention` and `attention_with_kv_cache`: validate once, fill defaults,
pick the backend, call the registered op (`torch.ops.pytorch_mqa.*`, which does not validate
again)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pytorch_mqa.ops.backends import OP_BACKENDS, resolve_backend, unavailable_reason
from pytorch_mqa.ops.library import attention_op, attention_with_kv_cache_op
from pytorch_mqa.ops.validation import validate_attention, validate_kv_cache


def _pick_backend(op: str, backend: str, device: torch.device) -> str:
    name = resolve_backend(op, backend, device.type)
    if name not in OP_BACKENDS[op]:
        raise ValueError(f"backend: expected one of {OP_BACKENDS[op]} for {op}, got {name!r}")
    if backend == "auto" and device.type == "cuda" and unavailable_reason(name, "cuda") is not None:
        name = "triton" if unavailable_reason("triton", "cuda") is None else "reference"
    return name


def attention(q, k, v, *, causal: bool = False, scale: float | None = None, return_lse: bool = False, backend: str = "auto"):
    """Multi-query / grouped-query attention, differentiable in q, k, v.

    q: (B, Tq, Hq, D); k, v: (B, Tk, Hkv, D) with Hq % Hkv == 0 (Hkv = 1: MQA; Hkv = Hq: MHA).
    causal is bottom-right aligned (query i sees key j iff j <= i + Tk - Tq); scale defaults to
    1/sqrt(D). Returns out (B, Tq, Hq, D), plus lse (B, Hq, Tq) float32 if return_lse.
    """
    validate_attention(q, k, v, causal, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name = _pick_backend("attention", backend, q.device)
    out, lse = attention_op(q, k, v, causal, scale, name)
    return (out, lse) if return_lse else out


def attention_with_kv_cache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    *,
    cache_seqlens,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Append k/v (if given) to the caches at cache_seqlens, in place, then attend. Not differentiable.

    q: (B, Tq, Hq, D); k_cache, v_cache: (B, S, Hkv, D); k, v: (B, Tq, Hkv, D) or None;
    cache_seqlens: int32 (B,) tensor or int, the valid rows per sequence before this call (not
    advanced here). Sequence b attends keys [0, L_b + Tq) (or [0, L_b) without k/v).
    """
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, Tensor)):
        raise TypeError(
            f"cache_seqlens: expected an int32 tensor of shape (B,) or an int, got {type(cache_seqlens).__name__}"
        )
    if isinstance(cache_seqlens, int):
        if isinstance(q, Tensor) and q.dim() == 4:
            if cache_seqlens < 0:
                raise ValueError(f"cache_seqlens: expected a value >= 0, got {cache_seqlens}")
            cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32)
    validate_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name = _pick_backend("attention_with_kv_cache", backend, q.device)
    if torch.is_grad_enabled() and (
        q.requires_grad or k_cache.requires_grad or v_cache.requires_grad or (k is not None and (k.requires_grad or v.requires_grad))
    ):
        # Not differentiable: without grad mode the caches never join an autograd graph (the op
        # has no autograd kernel, and PyTorch's fallback would attach history to mutated inputs
        # when an input requires grad).
        with torch.no_grad():
            out, lse = attention_with_kv_cache_op(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, name)
    else:
        out, lse = attention_with_kv_cache_op(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, name)
    return (out, lse) if return_lse else out


__all__ = ["attention", "attention_with_kv_cache"]
