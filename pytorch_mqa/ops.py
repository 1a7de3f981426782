"""The two custom ops, their fake impls, autograd, input validation and backend dispatch.

    torch.ops.pytorch_mqa.attention(q, k, v, causal, scale, backend) -> (out, lse)
    torch.ops.pytorch_mqa.attention_backward(dout, q, k, v, lse, delta, causal, scale, backend)
        -> (dq, dk, dv)
    torch.ops.pytorch_mqa.attention_with_kv_cache(q, k_cache!, v_cache!, k?, v?, cache_seqlens,
        causal, scale, backend) -> (out, lse)

`backend` reaching an op is already concrete ("reference", "triton" or "cuda"); the public
functions at the bottom resolve "auto" and PYTORCH_MQA_BACKEND, validate and fill defaults.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from pytorch_mqa import reference
from pytorch_mqa.reference import decode_one_row_functional  # noqa: F401  (used by model.decode_step)
from pytorch_mqa.backends import AUTO_CUDA_BACKEND, resolve_backend, unavailable_reason

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Which backends implement which op.
OP_BACKENDS = {
    "attention": ("reference", "triton"),
    "attention_with_kv_cache": ("reference", "triton", "cuda"),
}


# --------------------------------------------------------------------------------------------
# Validation (DESIGN §4): every message names the argument, the expected and the received value.
# --------------------------------------------------------------------------------------------


def _check_tensor(name: str, x, shape_doc: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {shape_doc}, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor {shape_doc}, got shape {tuple(x.shape)}")


def _check_same(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {x.device}")


def _check_q_and_kv(q: Tensor, k: Tensor, k_name: str) -> None:
    """Shared checks of q (B, Tq, Hq, D) against a K-like tensor (B, T, Hkv, D)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q: expected dtype in (float16, bfloat16, float32), got {q.dtype}")
    D = q.shape[3]
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected head dim D in 1..{MAX_HEAD_DIM}, got D={D}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{k_name}: expected batch size {q.shape[0]} (q.shape[0]), got {k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"{k_name}: expected head dim {D} (q.shape[3]), got {k.shape[3]}")
    Hq, Hkv = q.shape[2], k.shape[2]
    if Hkv < 1:
        raise ValueError(f"{k_name}: expected at least one KV head, got shape {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(
            f"q: expected the number of query heads to be a multiple of the KV heads "
            f"({k_name}.shape[2]={Hkv}), got Hq={Hq}"
        )


def _check_flags(causal, scale) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if scale is not None:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite float, got {scale}")


def validate_attention(q, k, v, causal=False, scale=None) -> None:
    _check_tensor("q", q, "(B, Tq, Hq, D)")
    _check_tensor("k", k, "(B, Tk, Hkv, D)")
    _check_tensor("v", v, "(B, Tk, Hkv, D)")
    _check_same("k", k, "q", q)
    _check_same("v", v, "q", q)
    _check_q_and_kv(q, k, "k")
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (the shape of k), got {tuple(v.shape)}")
    _check_flags(causal, scale)


def _host_lengths(cache_seqlens: Tensor) -> Optional[Tensor]:
    """The lengths if reading them costs no device sync (CPU tensor, not tracing), else None."""
    if cache_seqlens.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    return cache_seqlens


def validate_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal=True, scale=None) -> None:
    _check_tensor("q", q, "(B, Tq, Hq, D)")
    _check_tensor("k_cache", k_cache, "(B, S, Hkv, D)")
    _check_tensor("v_cache", v_cache, "(B, S, Hkv, D)")
    _check_same("k_cache", k_cache, "q", q)
    _check_same("v_cache", v_cache, "q", q)
    _check_q_and_kv(q, k_cache, "k_cache")
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache: expected shape {tuple(k_cache.shape)} (the shape of k_cache), got {tuple(v_cache.shape)}"
        )
    if (k is None) != (v is None):
        given, missing = ("k", "v") if v is None else ("v", "k")
        raise ValueError(f"{missing}: expected a tensor because {given} is given (pass both or neither), got None")
    B, Tq = q.shape[0], q.shape[1]
    S, Hkv, D = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    if k is not None:
        for name, x in (("k", k), ("v", v)):
            _check_tensor(name, x, "(B, Tq, Hkv, D)")
            _check_same(name, x, "q", q)
            if tuple(x.shape) != (B, Tq, Hkv, D):
                raise ValueError(f"{name}: expected shape {(B, Tq, Hkv, D)} (B, Tq, Hkv, D), got {tuple(x.shape)}")
    if not isinstance(cache_seqlens, Tensor):
        raise TypeError(f"cache_seqlens: expected an int32 tensor of shape ({B},) or an int, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens: expected dtype torch.int32, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens: expected shape ({B},) (one length per sequence), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device.type != "cpu" and cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens: expected device {q.device} or cpu, got {cache_seqlens.device}")
    _check_flags(causal, scale)
    L = _host_lengths(cache_seqlens)
    if L is not None and B > 0:
        lens = L.tolist()  # one host read (cheaper than two reductions for a decode step)
        lo = min(lens)
        if lo < 0:
            b = lens.index(lo)
            raise ValueError(f"cache_seqlens: expected values >= 0, got {lo} for sequence {b}")
        new = Tq if k is not None else 0
        hi = max(lens)
        if hi + new > S:
            b = lens.index(hi)
            raise ValueError(
                f"cache_seqlens: expected cache_seqlens[b] + Tq <= S = {S} (cache capacity), got "
                f"cache_seqlens[{b}] = {hi} with Tq = {new} new rows"
            )


# --------------------------------------------------------------------------------------------
# Backend dispatch (what the registered ops run).
# --------------------------------------------------------------------------------------------


def _triton_kernels(name: str):
    import importlib

    return importlib.import_module(f"pytorch_mqa.kernels.{name}")


def _attention_forward(q, k, v, causal, scale, backend):
    if backend == "reference" or q.numel() == 0 or k.shape[1] == 0:
        return reference.attention(q, k, v, causal=causal, scale=scale)
    if backend == "triton":
        return _triton_kernels("attention").attention_forward(q, k, v, causal, scale)
    raise RuntimeError(f"backend: {backend!r} has no attention implementation")


def _attention_backward(dout, q, k, v, lse, delta, causal, scale, backend):
    if backend == "reference" or q.numel() == 0 or k.shape[1] == 0:
        return reference.attention_backward(dout, q, k, v, lse, delta, causal=causal, scale=scale)
    if backend == "triton":
        return _triton_kernels("attention").attention_backward(dout, q, k, v, lse, delta, causal, scale)
    raise RuntimeError(f"backend: {backend!r} has no attention backward implementation")


def _kv_cache_forward(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, backend):
    if backend == "reference" and q.device.type == "cpu" and q.shape[0] > 0 and q.shape[1] > 0:
        L = _host_lengths(cache_seqlens)
        if L is not None:
            return reference.attention_with_kv_cache_host(q, k_cache, v_cache, k, v, L.tolist(), causal, scale)
    cache_seqlens = cache_seqlens.to(q.device, non_blocking=True)
    if backend == "reference" or q.shape[0] == 0 or q.shape[1] == 0:
        # Tq == 0 appends nothing and attends nothing: the reference returns empty results.
        return reference.attention_with_kv_cache(
            q, k_cache, v_cache, k, v, cache_seqlens, causal=causal, scale=scale
        )
    if backend == "triton":
        return _triton_kernels("attention_with_kv_cache").attention_with_kv_cache(
            q, k_cache, v_cache, k, v, cache_seqlens, causal, scale
        )
    if backend == "cuda":
        from pytorch_mqa import _build

        _build.load_extension()
        return torch.ops.pytorch_mqa.attention_with_kv_cache_cuda(
            q, k_cache, v_cache, k, v, cache_seqlens, causal, scale
        )
    raise RuntimeError(f"backend: {backend!r} has no attention_with_kv_cache implementation")


# --------------------------------------------------------------------------------------------
# Registration: custom op -> fake impl -> autograd.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("pytorch_mqa::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    validate_attention(q, k, v, causal, scale)
    return _attention_forward(q, k, v, causal, scale, backend)


@_attention_op.register_fake
def _(q, k, v, causal, scale, backend):
    B, Tq, Hq, D = q.shape
    return q.new_empty((B, Tq, Hq, D)), q.new_empty((B, Hq, Tq), dtype=torch.float32)


@torch.library.custom_op("pytorch_mqa::attention_backward", mutates_args=())
def _attention_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, causal: bool, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _attention_backward(dout, q, k, v, lse, delta, causal, scale, backend)


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
    # delta = rowsum(dO * O) - dLSE, laid out (B, Hq, Tq) like lse; see reference.attention_backward.
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)
    if dlse is not None:
        delta = delta - dlse
    dq, dk, dv = _attention_backward_op(
        dout, q, k, v, lse, delta.contiguous(), ctx.causal, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None, None


_attention_op.register_autograd(_attention_autograd, setup_context=_attention_setup_context)


@torch.library.custom_op("pytorch_mqa::attention_with_kv_cache", mutates_args=("k_cache", "v_cache"))
def _kv_cache_op(
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
    return _kv_cache_forward(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, backend)


@_kv_cache_op.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, backend):
    B, Tq, Hq, D = q.shape
    return q.new_empty((B, Tq, Hq, D)), q.new_empty((B, Hq, Tq), dtype=torch.float32)


# The csrc/ kernel's op. Its schema is defined here, once, at import (no compile); the CUDA kernel
# is registered by csrc/bindings.cpp when pytorch_mqa._build.load_extension() loads the library.
torch.library.define(
    "pytorch_mqa::attention_with_kv_cache_cuda",
    "(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor cache_seqlens, "
    "bool causal, float scale) -> (Tensor, Tensor)",
)


@torch.library.register_fake("pytorch_mqa::attention_with_kv_cache_cuda")
def _(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale):
    B, Tq, Hq, D = q.shape
    return q.new_empty((B, Tq, Hq, D)), q.new_empty((B, Hq, Tq), dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Public functions.
# --------------------------------------------------------------------------------------------


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
    out, lse = _attention_op(q, k, v, causal, scale, name)
    return (out, lse) if return_lse else out


def _plain_eager_cpu(*tensors) -> bool:
    """True when every tensor is a plain CPU Tensor that autograd does not track, outside
    compile, tracing and dispatch modes (where the registered op must be seen)."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not Tensor or t.device.type != "cpu" or (grad and t.requires_grad)):
            return False
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return not (torch._C._is_torch_function_mode_enabled() and torch.overrides._get_current_function_mode_stack())


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
    if name == "reference" and _plain_eager_cpu(q, k_cache, v_cache, k, v, cache_seqlens):
        # Eager CPU decode calls the op's CPU kernel directly: the custom-op dispatch layers
        # (autograd, ADInplaceOrView, defaults, a second validation) cost ~0.2 ms per call here,
        # as much as the attention itself. Compiled, traced or mode-wrapped calls keep the op.
        out, lse = _kv_cache_forward(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, name)
    else:
        out, lse = _kv_cache_op(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, name)
    return (out, lse) if return_lse else out


__all__ = ["attention", "attention_with_kv_cache", "validate_attention", "validate_kv_cache", "AUTO_CUDA_BACKEND"]
