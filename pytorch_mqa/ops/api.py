"""The public functions `attention` and `attention_with_kv_cache`: validate once, fill defaults,
pick the backend, call the registered op (`torch.ops.pytorch_mqa.*`, which does not validate
again)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pytorch_mqa.ops import cpu_ext
from pytorch_mqa.ops.backends import OP_BACKENDS, chosen_backend, resolve_backend, unavailable_reason
from pytorch_mqa.ops.cpu import fused_differentiable, fused_differentiable_ok
from pytorch_mqa.ops.dispatch import unsupported
from pytorch_mqa.ops.library import (
    AttentionFunction,
    AttentionVarlenFunction,
    attention_op,
    attention_varlen_op,
    attention_with_kv_cache_op,
)
from pytorch_mqa.ops.validation import (
    NO_WINDOW,
    attention_ok,
    no_variants,
    validate_varlen_pages,
    validate_attention,
    validate_kv_cache,
    validate_serving,
    validate_variants,
    validate_varlen,
)


def _pick_backend(op: str, backend: str, q: Tensor, variants: dict | None = None) -> str:
    """The concrete backend of a call on q's device. `variants` (the active variants and serving
    arguments, or None for the plain op) lets "auto" route around a backend that lacks one."""
    if backend == "reference":
        return "reference"  # every op, every device, every variant
    if backend == "auto" and q.is_cpu and chosen_backend() == "auto":
        return "reference"  # the CPU default (what resolve_backend answers), the common call
    device_type = q.device.type
    name = resolve_backend(op, backend, device_type)
    if name not in OP_BACKENDS[op]:
        raise ValueError(f"backend: expected one of {OP_BACKENDS[op]} for {op}, got {name!r}")
    if backend == "auto" and device_type == "cuda" and unavailable_reason(name, "cuda") is not None:
        name = "triton" if unavailable_reason("triton", "cuda") is None else "reference"
    if backend == "auto" and variants is not None and unsupported(name, variants, op):
        # auto routes around a backend that lacks a requested variant: Triton if it has them
        has_triton = unavailable_reason("triton", device_type) is None and device_type == "cuda"
        name = "triton" if has_triton and not unsupported("triton", variants, op) else "reference"
    return name


def _variant_dict(window_size, softcap, alibi_slopes, dropout_p) -> dict:
    return dict(window_size=tuple(window_size), softcap=float(softcap), alibi_slopes=alibi_slopes, dropout_p=float(dropout_p))


def _dropout_seed(dropout_p, generator):
    """An int64 CPU tensor drawn from `generator` (default: torch's global CPU generator), or None."""
    if dropout_p == 0:
        return None
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    return torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64)


def attention(
    q, k, v, *, causal: bool = False, scale: float | None = None, window_size=NO_WINDOW, softcap: float = 0.0,
    alibi_slopes=None, dropout_p: float = 0.0, generator=None, return_lse: bool = False, backend: str = "auto",
):
    """Multi-query / grouped-query attention, differentiable in q, k, v.

    q: (B, Tq, Hq, D); k, v: (B, Tk, Hkv, D) with Hq % Hkv == 0 (Hkv = 1: MQA; Hkv = Hq: MHA).
    causal is bottom-right aligned (query i sees key j iff j <= i + Tk - Tq); scale defaults to
    1/sqrt(D). FlashAttention's variants (DESIGN §3): window_size=(left, right), -1 unbounded
    (query i sees key j iff i + Tk - Tq - left <= j <= i + Tk - Tq + right); softcap (score =
    softcap * tanh(score / softcap), 0 off); alibi_slopes float32 (Hq,) or (B, Hq) (adds
    -slope * |i + Tk - Tq - j|); dropout_p on the attention probabilities, with the mask's seed
    drawn from `generator` (default: torch's global generator, so torch.manual_seed fixes it).
    Returns out (B, Tq, Hq, D), plus lse (B, Hq, Tq) float32 if return_lse.
    """
    if not attention_ok(q, k, v, causal, scale):
        validate_attention(q, k, v, causal, scale)  # raises with the message
    if no_variants(window_size, softcap, alibi_slopes, dropout_p):
        variants, var_args = None, ()  # the plain op: its variant arguments at their defaults
    else:
        left, right = validate_variants(q, window_size, softcap, alibi_slopes, dropout_p, batch=q.shape[0],
                                        heads=q.shape[2])
        variants = _variant_dict(window_size, softcap, alibi_slopes, dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name = _pick_backend("attention", backend, q, variants)
    if variants is not None:
        var_args = (left, right, float(softcap), alibi_slopes, float(dropout_p), _dropout_seed(dropout_p, generator))
    if (name == "reference" and q.is_cpu and cpu_ext.ready()) or not _needs_grad(q, k, v):
        # With the C++ CPU kernels loaded, the op's autograd kernel records a backward in C++.
        out, lse = attention_op(q, k, v, causal, scale, name, *var_args)
    elif not return_lse and variants is None and name == "reference" and q.is_cpu and fused_differentiable_ok(
            q, k, causal):
        # The registered op does not run here; the profiler shows the call under its name.
        with torch.profiler.record_function("pytorch_mqa::attention"):
            return fused_differentiable(q, k, v, causal, scale)
    else:
        out, lse = AttentionFunction.apply(q, k, v, causal, scale, name, *var_args)
    return (out, lse) if return_lse else out


def _needs_grad(q, k, v) -> bool:
    """Whether an eager call must record the backward (asked only where the op's own C++
    autograd kernel does not record it: backend "reference" on CPU with csrc/cpu/ loaded): then
    the public functions call the op through its autograd.Function (library.AttentionFunction),
    which is cheaper per call than the op's registered autograd, or, for `attention` on CPU
    without the C++ kernels, in the plain case the fused kernel
    computes exactly and without lse, PyTorch's fused op with its own C++ autograd formula
    (`cpu.fused_differentiable`: the same kernels, no Python in the backward). Under
    torch.compile they call the op itself, whose registered autograd AOTAutograd traces."""
    return (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            and not torch.compiler.is_compiling())


def attention_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
    scale: float | None = None, window_size=NO_WINDOW, softcap: float = 0.0, alibi_slopes=None, dropout_p: float = 0.0,
    generator=None, block_table=None, return_lse: bool = False, backend: str = "auto",
):
    """Attention over packed sequences (FlashAttention's varlen layout), differentiable in q, k, v.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D); cu_seqlens_q, cu_seqlens_k: int32 (B + 1,)
    prefix sums (0 first, the totals last): sequence b is rows [cu_seqlens_q[b], cu_seqlens_q[b+1])
    of q and [cu_seqlens_k[b], cu_seqlens_k[b+1]) of k/v. max_seqlen_q/k are host ints (no device
    sync), at least the longest sequence. Every option is applied per sequence as in `attention`
    (alibi_slopes (B, Hq) gives row b to sequence b). Returns out (total_q, Hq, D), plus lse
    (Hq, total_q) float32 if return_lse.

    block_table (B, max_blocks) int32, as in `flash_attn_varlen_func`: k and v are page pools
    (num_blocks, page_size, Hkv, D) and key row j of sequence b, j < cu_seqlens_k[b+1] -
    cu_seqlens_k[b], is k[block_table[b, j // page_size], j % page_size]. The live rows are
    gathered into the packed layout (a copy, differentiable in the pools; the total is read from
    cu_seqlens_k, a device sync when it is on the GPU) and attended as above.
    """
    if block_table is not None:
        validate_varlen_pages(k, v, cu_seqlens_k, max_seqlen_k, block_table)
        k, v = _gather_pages(k, v, cu_seqlens_k, block_table)
    B = validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
    if no_variants(window_size, softcap, alibi_slopes, dropout_p):
        variants, var_args = None, ()
    else:
        left, right = validate_variants(q, window_size, softcap, alibi_slopes, dropout_p, batch=B, heads=q.shape[1])
        variants = _variant_dict(window_size, softcap, alibi_slopes, dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name = _pick_backend("attention", backend, q, variants)
    if backend == "auto" and name == "cuda":
        name = "triton" if unavailable_reason("triton", q.device.type) is None else "reference"
    if variants is not None:
        var_args = (left, right, float(softcap), alibi_slopes, float(dropout_p), _dropout_seed(dropout_p, generator))
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, name, *var_args)
    out, lse = AttentionVarlenFunction.apply(*args) if _needs_grad(q, k, v) else attention_varlen_op(*args)
    return (out, lse) if return_lse else out


def _gather_pages(k, v, cu_seqlens_k, block_table):
    """The packed (total_k, Hkv, D) rows of paged k, v: row t of sequence b (offset j = t -
    cu_seqlens_k[b]) is pool row block_table[b, j // page_size] * page_size + j % page_size."""
    page, dev = k.shape[1], k.device
    cu = cu_seqlens_k.to(device=dev, dtype=torch.long)
    t = torch.arange(int(cu[-1]), device=dev)
    b = torch.searchsorted(cu, t, right=True) - 1
    j = t - cu[b]
    rows = block_table.to(device=dev, dtype=torch.long)[b, j // page] * page + j % page
    return k.flatten(0, 1)[rows], v.flatten(0, 1)[rows]


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
    window_size=NO_WINDOW,
    softcap: float = 0.0,
    alibi_slopes=None,
    dropout_p: float = 0.0,
    block_table=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    rotary_cos=None,
    rotary_sin=None,
    rotary_interleaved: bool = True,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Append k/v (if given) to the caches at cache_seqlens, in place, then attend. Not differentiable.

    FlashAttention's `flash_attn_with_kvcache` (DESIGN §3). q: (B, Tq, Hq, D); k, v: (B, Tn, Hkv, D)
    or None (usually Tn = Tq; another Tn runs on the reference backend); cache_seqlens: int32 (B,) tensor or int, the rows per sequence before this call,
    left padding included (not advanced here). Sequence b attends its live keys
    [cache_leftpad[b], cache_seqlens[b] + Tn) (without k/v: up to cache_seqlens[b]).

    - caches: k_cache, v_cache (B, S, Hkv, D); with cache_batch_idx int32 (B,), (B_cache, S, Hkv, D)
      and sequence b uses slot cache_batch_idx[b]; with block_table int32 (B, max_blocks), paged
      (num_blocks, page_size, Hkv, D), page_size a multiple of 16, and logical row j of sequence b
      is k_cache[block_table[b, j // page_size], j % page_size] (with cache_batch_idx too, table
      row cache_batch_idx[b]); new rows are written through the table, no other page is touched.
    - cache_leftpad int32 (B,): rows [0, cache_leftpad[b]) of sequence b are padding (ignored).
    - rotary_cos, rotary_sin (S_ro, rotary_dim / 2) (needs k): new k is rotated at positions
      cache_seqlens[b] + t before it is written; q at the same positions if causal or a window is
      set, else every q row at cache_seqlens[b]. rotary_interleaved: GPT-J pairs (2i, 2i+1), else
      GPT-NeoX halves (i, i + rotary_dim / 2).
    - window_size, softcap and alibi_slopes as in `attention`, bottom-right aligned per sequence
      (Tk = cache_seqlens[b] + Tq, the padding counted, as in FlashAttention); dropout_p must be 0.
    """
    if not isinstance(cache_seqlens, Tensor):
        if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, int):
            raise TypeError(
                f"cache_seqlens: expected an int32 tensor of shape (B,) or an int, got {type(cache_seqlens).__name__}"
            )
        if isinstance(q, Tensor) and q.dim() == 4:
            if cache_seqlens < 0:
                raise ValueError(f"cache_seqlens: expected a value >= 0, got {cache_seqlens}")
            cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32)
    serving = not (
        block_table is None and cache_batch_idx is None and cache_leftpad is None and rotary_cos is None
        and rotary_sin is None
    )
    # The plain decode step (every layer, every token) passes here in one kv_cache_ok.
    validate_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale,
                      indexed=serving and (block_table is not None or cache_batch_idx is not None))
    plain = no_variants(window_size, softcap, alibi_slopes, dropout_p)
    left, right = -1, -1
    if not plain:
        left, right = validate_variants(
            q, window_size, softcap, alibi_slopes, dropout_p, batch=q.shape[0], heads=q.shape[2], cache_op=True
        )
    if serving:
        validate_serving(q, k_cache, k, cache_seqlens, causal, (left, right), block_table, cache_batch_idx,
                         cache_leftpad, rotary_cos, rotary_sin, rotary_interleaved)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if plain and not serving:
        # The decode step of generation (every layer, every token): the op's own arguments only.
        name = _pick_backend("attention_with_kv_cache", backend, q)
        var_args = ()
    else:
        variants = _variant_dict(window_size, softcap, alibi_slopes, 0.0)
        variants.update(block_table=block_table, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                        rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved)
        name = _pick_backend("attention_with_kv_cache", backend, q, variants)
        var_args = () if plain else (left, right, float(softcap), alibi_slopes)
        if serving:
            var_args = (left, right, float(softcap), alibi_slopes, block_table, cache_batch_idx, cache_leftpad,
                        rotary_cos, rotary_sin, bool(rotary_interleaved))
    if name in ("triton", "cuda") and backend == "auto" and k is not None and k.shape[1] != q.shape[1]:
        name = "reference"  # the kernels append Tq new rows; another count runs the reference
    if torch.is_grad_enabled() and (
        q.requires_grad or k_cache.requires_grad or v_cache.requires_grad or (k is not None and (k.requires_grad or v.requires_grad))
    ):
        # Not differentiable: without grad mode the caches never join an autograd graph (the op
        # has no autograd kernel, and PyTorch's fallback would attach history to mutated inputs
        # when an input requires grad).
        with torch.no_grad():
            out, lse = attention_with_kv_cache_op(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, name, *var_args)
    else:
        out, lse = attention_with_kv_cache_op(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, name, *var_args)
    return (out, lse) if return_lse else out


__all__ = ["attention", "attention_with_kv_cache", "attention_varlen"]
