"""Registration of the custom ops: schema -> kernel -> fake impl -> autograd, each a few lines.

    torch.ops.pytorch_mqa.attention(q, k, v, causal, scale, backend, *V, *DR) -> (out, lse)
    torch.ops.pytorch_mqa.attention_general(...)             the same schema: the Python dispatch
        and autograd, where the C++ CPU kernels of the op pass on what they do not cover
    torch.ops.pytorch_mqa.attention_backward(dout, q, k, v, lse, delta, causal, scale, backend,
        *V, *DR) -> (dq, dk, dv)                              delta form: Triton and the oracle
    torch.ops.pytorch_mqa.attention_backward_cpu(dout, q, k, v, out, lse, dlse?, causal, scale,
        *V, *DR) -> (dq, dk, dv)                              the CPU kernel's backward
    torch.ops.pytorch_mqa.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, causal, scale, backend, *V, *DR) -> (out, lse (Hq, total_q))
    torch.ops.pytorch_mqa.attention_varlen_backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, out, lse, dlse?, causal, scale, backend, *V, *DR) -> (dq, dk, dv)
    torch.ops.pytorch_mqa.attention_with_kv_cache(q, k_cache!, v_cache!, k?, v?, cache_seqlens,
        causal, scale, backend, *V, block_table?, cache_batch_idx?, cache_leftpad?, rotary_cos?,
        rotary_sin?, rotary_interleaved=True) -> (out, lse)
    torch.ops.pytorch_mqa.attention_with_kv_cache_general(...)  the same schema: the Python
        dispatch, where the C++ CPU kernel of the op passes on what it does not cover
    torch.ops.pytorch_mqa.attention_with_kv_cache_cuda(...)   the csrc/ kernel (CUDA only)

with the variants V = window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None and DR =
dropout_p=0.0, dropout_seed=None (an int64 one-element CPU tensor drawn by the public function),
defaulted so that the variants' absence is the plain op (DESIGN §3).

The schemas are defined with `torch.library.Library.define` and the kernels registered with
`Library.impl`, the layer `torch.library.custom_op` itself builds on: an eager call is one
dispatcher call into the kernel (a few microseconds) instead of the custom_op wrappers' tens to
hundreds. The mutation of k_cache / v_cache is declared in the schema (`Tensor(a!)`), so
torch.compile functionalizes the op and inductor writes the caches in place. The kernels do not
validate: `pytorch_mqa.ops.api` does, once per call; `backend` reaching an op is concrete.
"""

from __future__ import annotations

import torch

from pytorch_mqa.ops import dispatch
from pytorch_mqa.ops.cpu import lse_layout

_lib = torch.library.Library("pytorch_mqa", "FRAGMENT")

# One kernel for every device: it switches on the backend and the device (see dispatch.py).
_ANY_DEVICE = "CompositeExplicitAutograd"


def _fake_out_lse(q):
    B, Tq, Hq, D = q.shape
    return q.new_empty((B, Tq, Hq, D)), q.new_empty((B, Hq, Tq), dtype=torch.float32)


# ---- attention -------------------------------------------------------------------------------

_V = "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None"
_DR = "float dropout_p=0.0, Tensor? dropout_seed=None"

_ATTENTION_SCHEMA = f"(Tensor q, Tensor k, Tensor v, bool causal, float scale, str backend, {_V}, {_DR}) -> (Tensor, Tensor)"


def _fake_attention(q, k, v, causal, scale, backend, *variants, **kw):
    if backend == "reference" and q.device.type == "cpu":
        # The CPU kernels return the fused kernel's own lse layout (a (B, Tq, Hq) buffer).
        B, Tq, Hq, D = q.shape
        return q.new_empty((B, Tq, Hq, D)), lse_layout(B, Hq, Tq, q)
    return _fake_out_lse(q)


# The op, and the same schema under a second name, `_general`: what the C++ CPU kernels of the op
# (csrc/cpu/attention.cpp, registered for the CPU and AutogradCPU keys when
# pytorch_mqa.ops.cpu_ext loads them) pass every call on to that they do not cover themselves
# (another backend, a variant, causal with Tq != Tk, empty inputs). Its kernel is the op's Python
# dispatch and its autograd the one registered below, so such calls run exactly as without them.
for _name in ("attention", "attention_general"):
    _lib.define(_name + _ATTENTION_SCHEMA)
    _lib.impl(_name, dispatch.attention_forward, _ANY_DEVICE)
    torch.library.register_fake(f"pytorch_mqa::{_name}", _fake_attention, lib=_lib)


_lib.define(
    "attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor delta, bool causal, "
    f"float scale, str backend, {_V}, {_DR}) -> (Tensor, Tensor, Tensor)"
)
_lib.impl("attention_backward", dispatch.attention_backward, _ANY_DEVICE)


@torch.library.register_fake("pytorch_mqa::attention_backward", lib=_lib)
def _(dout, q, k, v, lse, delta, causal, scale, backend, *variants, **kw):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_lib.define(
    "attention_backward_cpu(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
    f"bool causal, float scale, {_V}, {_DR}) -> (Tensor, Tensor, Tensor)"
)
_lib.impl("attention_backward_cpu", dispatch.attention_backward_cpu, "CPU")


@torch.library.register_fake("pytorch_mqa::attention_backward_cpu", lib=_lib)
def _(dout, q, k, v, out, lse, dlse, causal, scale, *variants, **kw):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, causal, scale, backend = inputs[:6]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.variants = tuple(inputs[6:])  # window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed
    ctx.n_inputs = len(inputs)


def _attention_autograd(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    none = (None,) * (ctx.n_inputs - 3)
    if ctx.backend == "reference" and q.device.type == "cpu":
        # The CPU kernel's backward takes O and dLSE itself (it skips the dLSE term when it is 0).
        dq, dk, dv = torch.ops.pytorch_mqa.attention_backward_cpu.default(
            dout, q, k, v, out, lse, dlse, ctx.causal, ctx.scale, *ctx.variants
        )
        return (dq, dk, dv) + none
    # delta = rowsum(dO * O) - dLSE, laid out (B, Hq, Tq) like lse; see pytorch_mqa.reference.attention_backward.
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)
    if dlse is not None:
        delta = delta - dlse
    dq, dk, dv = torch.ops.pytorch_mqa.attention_backward.default(
        dout, q, k, v, lse, delta.contiguous(), ctx.causal, ctx.scale, ctx.backend, *ctx.variants
    )
    return (dq, dk, dv) + none


for _name in ("attention", "attention_general"):
    torch.library.register_autograd(
        f"pytorch_mqa::{_name}", _attention_autograd, setup_context=_attention_setup_context, lib=_lib
    )


def _function(op, setup_context, backward, name: str):
    """An autograd.Function over `op` with the op's own setup and backward (one body each).

    Its forward runs with grad mode off, so the op takes the no-grad path of its registered
    autograd; what this saves over that registered path is its per-call argument handling
    (`register_autograd`'s wrapper fills in every defaulted argument of the schema before
    `setup_context` sees them), tens of microseconds at small shapes. Gradients the loss does not
    use arrive as None (not materialised as zeros), which the backward bodies accept: the CPU
    backward then skips its dLSE test.
    """

    def forward(ctx, *inputs):
        ctx.set_materialize_grads(False)
        output = op(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward),
        "__doc__": f"{op}'s forward and its registered backward, as an autograd.Function (see `_function`).",
    })


# What the public function calls in eager mode when a gradient is needed (all 12 arguments
# positional, as the op takes them). Under torch.compile it calls the op, whose registered autograd
# AOTAutograd traces.
AttentionFunction = _function(
    torch.ops.pytorch_mqa.attention.default, _attention_setup_context, _attention_autograd, "AttentionFunction"
)

# ---- attention_varlen ------------------------------------------------------------------------

_VARLEN = "Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k"
_lib.define(f"attention_varlen({_VARLEN}, bool causal, float scale, str backend, {_V}, {_DR}) -> (Tensor, Tensor)")
_lib.impl("attention_varlen", dispatch.attention_varlen_forward, _ANY_DEVICE)


@torch.library.register_fake("pytorch_mqa::attention_varlen", lib=_lib)
def _(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend, *variants, **kw):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


_lib.define(
    f"attention_varlen_backward(Tensor dout, {_VARLEN}, Tensor out, Tensor lse, Tensor? dlse, bool causal, "
    f"float scale, str backend, {_V}, {_DR}) -> (Tensor, Tensor, Tensor)"
)
_lib.impl("attention_varlen_backward", dispatch.attention_varlen_backward, _ANY_DEVICE)


@torch.library.register_fake("pytorch_mqa::attention_varlen_backward", lib=_lib)
def _(dout, q, k, v, *rest, **kw):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k = inputs[:5]
    out, lse = output
    ctx.save_for_backward(q, k, v, cu_q, cu_k, out, lse)
    ctx.rest = tuple(inputs[5:])  # max_seqlen_q, max_seqlen_k, causal, scale, backend, variants
    ctx.n_inputs = len(inputs)


def _varlen_autograd(ctx, dout, dlse):
    q, k, v, cu_q, cu_k, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    max_q, max_k, causal, scale, backend = ctx.rest[:5]
    dq, dk, dv = torch.ops.pytorch_mqa.attention_varlen_backward.default(
        dout, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, dlse, causal, scale, backend, *ctx.rest[5:]
    )
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)


torch.library.register_autograd(
    "pytorch_mqa::attention_varlen", _varlen_autograd, setup_context=_varlen_setup_context, lib=_lib
)

AttentionVarlenFunction = _function(
    torch.ops.pytorch_mqa.attention_varlen.default, _varlen_setup_context, _varlen_autograd, "AttentionVarlenFunction"
)

# ---- attention_with_kv_cache -----------------------------------------------------------------

# The serving caches (DESIGN §3): paged caches through block_table, cache slots, left padding,
# rotary in the append; all defaulted, so their absence is the plain op.
_SERVING = (
    "Tensor? block_table=None, Tensor? cache_batch_idx=None, Tensor? cache_leftpad=None, "
    "Tensor? rotary_cos=None, Tensor? rotary_sin=None, bool rotary_interleaved=True"
)
_KV_CACHE_SCHEMA = (
    "(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor cache_seqlens, bool causal, "
    f"float scale, str backend, {_V}, {_SERVING}) -> (Tensor, Tensor)"
)


def _fake_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, backend, *variants, **kw):
    return _fake_out_lse(q)


# The op, and the same schema under a second name, `_general`: what the C++ CPU kernel of the op
# (csrc/cpu/, registered for the CPU key when pytorch_mqa.ops.cpu_ext loads it) passes every call
# on to that it does not cover itself (another backend, variants, serving arguments, long query
# blocks). Its kernel is the op's Python dispatch, so such calls run exactly as without the C++ kernel.
for _name, _kernel in (("attention_with_kv_cache", dispatch.attention_with_kv_cache_forward),
                       ("attention_with_kv_cache_general", dispatch.attention_with_kv_cache_general)):
    _lib.define(_name + _KV_CACHE_SCHEMA)
    _lib.impl(_name, _kernel, _ANY_DEVICE)
    torch.library.register_fake(f"pytorch_mqa::{_name}", _fake_kv_cache, lib=_lib)


# The csrc/ kernel's op. Its schema is defined here, once, at import (no compile); the CUDA kernel
# is registered by csrc/bindings.cpp when pytorch_mqa.ops.build.load_extension() loads the library.
# Variants: window_left / window_right, softcap, alibi_slopes; cache indexing: block_table (paged
# caches), cache_batch_idx, cache_leftpad (SERVING_API.md). No rotary in csrc.
_lib.define(
    "attention_with_kv_cache_cuda(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, "
    f"Tensor cache_seqlens, bool causal, float scale, {_V}, Tensor? block_table=None, "
    "Tensor? cache_batch_idx=None, Tensor? cache_leftpad=None) -> (Tensor, Tensor)"
)


@torch.library.register_fake("pytorch_mqa::attention_with_kv_cache_cuda", lib=_lib)
def _(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, *variants, **kw):
    return _fake_out_lse(q)


attention_op = torch.ops.pytorch_mqa.attention.default
attention_with_kv_cache_op = torch.ops.pytorch_mqa.attention_with_kv_cache.default
attention_varlen_op = torch.ops.pytorch_mqa.attention_varlen.default

__all__ = [
    "attention_op", "attention_with_kv_cache_op", "attention_varlen_op", "AttentionFunction", "AttentionVarlenFunction",
]
