"""What the registered ops run: one function per op and direction, switching on the backend.

`backend` reaching here is concrete ("reference", "triton" or "cuda") and the inputs are already
validated by the public functions (`pytorch_mqa.ops.api`). On CPU tensors "reference" runs the
CPU kernels of `pytorch_mqa.ops.cpu`; on other devices it runs the oracle itself. The Triton
launchers are imported when first used (Triton is optional); csrc is built and loaded on first use.
"""

from __future__ import annotations

import torch

from pytorch_mqa import reference
from pytorch_mqa.ops import build, cpu, cpu_ext, cpu_serving, cpu_variants
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


def _variants(window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=None) -> dict:
    """The variant arguments as the oracle's keywords."""
    return dict(window_size=(window_left, window_right), softcap=softcap, alibi_slopes=alibi_slopes,
                dropout_p=dropout_p, dropout_seed=dropout_seed)


def _active(var: dict) -> dict:
    """The variants that are not at their default (what a backend must support)."""
    active = {}
    if tuple(var["window_size"]) != (-1, -1):
        active["window_size"] = var["window_size"]
    if var["softcap"] > 0:
        active["softcap"] = var["softcap"]
    if var["alibi_slopes"] is not None:
        active["alibi_slopes"] = var["alibi_slopes"]
    if var.get("dropout_p", 0.0) > 0:
        active["dropout_p"] = var["dropout_p"]
    active.update(_serving_active(var))
    return active


SERVING_KEYS = ("block_table", "cache_batch_idx", "cache_leftpad", "rotary_cos", "rotary_sin", "rotary_interleaved")


def _serving_active(var: dict) -> dict:
    """The serving-cache arguments in use, as keywords (the rotary ones together, under one
    feature: "rotary")."""
    active = {name: var[name] for name in SERVING_KEYS[:3] if var.get(name) is not None}
    if var.get("rotary_cos") is not None:
        active.update(rotary_cos=var["rotary_cos"], rotary_sin=var["rotary_sin"],
                      rotary_interleaved=var.get("rotary_interleaved", True))
    return active


def _feature(name: str) -> str:
    return "rotary" if name.startswith("rotary_") else name


# What each kernel backend implements of the variants, per op.
# Feature names: window_size, softcap, alibi_slopes, dropout_p, block_table, cache_batch_idx,
# cache_leftpad, rotary. `auto` routes around a backend lacking a requested feature; forcing it raises.
KERNEL_VARIANTS = {
    ("triton", "attention"): ("window_size", "softcap", "alibi_slopes", "dropout_p"),
    ("triton", "attention_with_kv_cache"): (
        "window_size", "softcap", "alibi_slopes", "block_table", "cache_batch_idx", "cache_leftpad", "rotary",
    ),
    ("cuda", "attention_with_kv_cache"): (
        "window_size", "softcap", "alibi_slopes", "block_table", "cache_batch_idx", "cache_leftpad",
    ),
}


def unsupported(backend: str, var: dict, op: str = "attention") -> list:
    """The active variants `backend` does not implement for `op`."""
    if backend == "reference" or backend in USER_BACKENDS:
        return []
    have = KERNEL_VARIANTS.get((backend, op), ())
    return sorted({_feature(name) for name in _active(var)} - set(have))


def _kernel_args(var: dict) -> tuple:
    """(window_size, softcap, alibi_slopes, dropout_p, seed as a host int) for a kernel launcher."""
    seed = var["dropout_seed"]
    return (var["window_size"], var["softcap"], var["alibi_slopes"], var["dropout_p"],
            None if seed is None else int(seed))


def _require(backend: str, op: str, var: dict) -> None:
    missing = unsupported(backend, var, op)
    if missing:
        raise NotImplementedError(
            f"backend: {backend!r} does not implement {', '.join(missing)} for {op}; expected backend='reference' "
            f"(or 'auto', which routes around it), got {backend!r}"
        )


def _cpu_forward(q, k, v, causal, scale, var):
    """The CPU kernels of `attention`; lse in `cpu.lse_layout`, as the op's fake declares."""
    if cpu_variants.has_variant(var["window_size"], var["softcap"], var["alibi_slopes"], var["dropout_p"]):
        out, lse = cpu_variants.attention_forward(q, k, v, causal, scale, *var.values())
        return out, cpu.as_lse_layout(lse)
    return cpu.attention_forward(q, k, v, causal, scale)


def attention_forward(q, k, v, causal, scale, backend, *variants, **kw):
    """The Python kernel of `attention` and `attention_general` (every device; for `attention` on
    CPU only until the C++ CPU kernels of csrc/cpu/ are registered, which the first CPU call
    triggers here: see ops/cpu_ext.py)."""
    if not variants and not kw and backend == "reference" and q.device.type == "cpu":
        cpu_ext.ensure_loaded_for(q.device)
        return cpu.attention_forward(q, k, v, causal, scale)  # the plain op on CPU: straight to the kernel
    var = _variants(*variants, **kw)
    if backend == "reference" and q.device.type == "cpu":
        return _cpu_forward(q, k, v, causal, scale, var)
    if backend == "reference" or q.numel() == 0 or k.shape[1] == 0:
        return reference.attention(q, k, v, causal=causal, scale=scale, **var)
    if backend in USER_BACKENDS:
        if "dropout_p" in _active(var):
            raise NotImplementedError(
                f"dropout_p: a registered backend ({backend!r}) cannot replay the dropout mask in the backward; "
                f"expected dropout_p=0 or backend='reference', got {var['dropout_p']}"
            )
        fn = USER_BACKENDS[backend]["attention"]
        return _user_result(backend, "attention", fn(q, k, v, causal=causal, scale=scale, return_lse=True, **_active(var)))
    _require(backend, "attention", var)
    if backend == "triton":
        return _triton_attention().attention_forward(q, k, v, causal, scale, *_kernel_args(var))
    raise RuntimeError(f"backend: {backend!r} has no attention implementation")


def attention_backward(dout, q, k, v, lse, delta, causal, scale, backend, *variants, **kw):
    """The backward in delta form (delta = rowsum(dO * O) - dLSE), for the Triton kernel and the
    oracle. On CPU tensors the autograd of `attention` calls `attention_backward_cpu` instead."""
    var = _variants(*variants, **kw)
    if backend == "reference" or q.numel() == 0 or k.shape[1] == 0:
        return reference.attention_backward(dout, q, k, v, lse, delta, causal=causal, scale=scale, **var)
    if backend in USER_BACKENDS:
        if _active(var):
            # A user backward takes the plain signature: the oracle computes the variants' gradient.
            return reference.attention_backward(dout, q, k, v, lse, delta, causal=causal, scale=scale, **var)
        return USER_BACKENDS[backend]["attention_backward"](dout, q, k, v, lse, delta, causal, scale)
    _require(backend, "attention", var)
    if backend == "triton":
        return _triton_attention().attention_backward(dout, q, k, v, lse, delta, causal, scale, *_kernel_args(var))
    raise RuntimeError(f"backend: {backend!r} has no attention backward implementation")


def attention_backward_cpu(dout, q, k, v, out, lse, dlse, causal, scale, *variants, **kw):
    if not variants and not kw:
        return cpu.attention_backward(dout, q, k, v, out, lse, dlse, causal, scale)
    return _cpu_backward(dout, q, k, v, out, lse, dlse, causal, scale, _variants(*variants, **kw))


def _cpu_backward(dout, q, k, v, out, lse, dlse, causal, scale, var):
    if cpu_variants.has_variant(var["window_size"], var["softcap"], var["alibi_slopes"], var["dropout_p"]):
        return cpu_variants.attention_backward(dout, q, k, v, out, lse, dlse, causal, scale, *var.values())
    return cpu.attention_backward(dout, q, k, v, out, lse, dlse, causal, scale)


# ---- varlen: sequence b is rows [cu_q[b], cu_q[b+1]) of q and [cu_k[b], cu_k[b+1]) of k/v ------


def _per_sequence(var, b):
    """The variants of sequence b: its row of a (B, Hq) alibi_slopes, its dropout seed."""
    var = dict(var)
    a = var["alibi_slopes"]
    if a is not None and a.dim() == 2:
        var["alibi_slopes"] = a[b]
    if var["dropout_seed"] is not None:
        var["dropout_seed"] = int(var["dropout_seed"]) + 1000003 * b  # as reference.attention_varlen
    return var


def attention_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend, *variants, **kw):
    var = _variants(*variants, **kw)
    if backend == "reference" and q.device.type == "cpu":
        # The CPU kernel: one fused call per sequence (the lengths are host data here).
        out = q.new_zeros(q.shape)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32)
        for b, (q0, q1, k0, k1) in enumerate(zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:])):
            if q1 > q0:
                o, l = _cpu_forward(q[q0:q1][None], k[k0:k1][None], v[k0:k1][None], causal, scale, _per_sequence(var, b))
                out[q0:q1], lse[:, q0:q1] = o[0], l[0]
        return out, lse
    if backend == "reference" or backend in USER_BACKENDS or q.numel() == 0:
        return reference.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, scale=scale, **var)
    if backend == "triton":
        # One launch over every sequence: the kernels read the offsets from cu_seqlens.
        vl = (cu_q.to(q.device), cu_k.to(q.device), max_q, max_k)
        out, lse = _triton_attention().attention_forward(
            q[None], k[None], v[None], causal, scale, *_kernel_args(var), varlen=vl
        )
        return out[0], lse[0]
    raise NotImplementedError(
        f"backend: {backend!r} does not implement attention_varlen; expected backend='reference' "
        f"or 'triton' (or 'auto', which routes around it), got {backend!r}"
    )


def attention_varlen_backward(dout, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, dlse, causal, scale, backend, *variants, **kw):
    var = _variants(*variants, **kw)
    if backend == "reference" and q.device.type == "cpu":
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for b, (q0, q1, k0, k1) in enumerate(zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:])):
            if q1 > q0 and k1 > k0:
                dl = None if dlse is None else dlse[:, q0:q1][None]
                # In float32: the fused kernel's float16/bfloat16 backward rounds dS to the input
                # dtype, which put a packed bfloat16 MQA case just over the §5 bound.
                f = lambda x: x.float()  # noqa: E731
                g = _cpu_backward(
                    f(dout[q0:q1][None]), f(q[q0:q1][None]), f(k[k0:k1][None]), f(v[k0:k1][None]),
                    f(out[q0:q1][None]), lse[:, q0:q1][None], dl, causal, scale, _per_sequence(var, b)
                )
                dq[q0:q1], dk[k0:k1], dv[k0:k1] = g[0][0], g[1][0], g[2][0]
        return dq, dk, dv
    delta = (dout.float() * out.float()).sum(-1).transpose(0, 1)  # (Hq, total_q)
    if dlse is not None:
        delta = delta - dlse
    if backend == "triton" and q.numel() > 0 and k.shape[0] > 0:
        vl = (cu_q.to(q.device), cu_k.to(q.device), max_q, max_k)
        dq, dk, dv = _triton_attention().attention_backward(
            dout[None], q[None], k[None], v[None], lse[None], delta[None].contiguous(), causal, scale,
            *_kernel_args(var), varlen=vl,
        )
        return dq[0], dk[0], dv[0]
    return reference.attention_varlen_backward(dout, q, k, v, cu_q, cu_k, lse, delta, causal=causal, scale=scale, **var)


def _cache_capacity(k_cache, block_table) -> int:
    return k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]


def attention_with_kv_cache_forward(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, backend, *rest, **kw):
    """The Python kernel of the cache op (every device; on CPU only until the C++ CPU kernel of
    csrc/cpu/ is registered, which the first CPU call triggers here: see ops/cpu_ext.py)."""
    if backend == "reference":
        cpu_ext.ensure_loaded_for(q.device)
    return attention_with_kv_cache_general(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, backend, *rest, **kw)


def attention_with_kv_cache_general(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, backend, window_left=-1,
                                    window_right=-1, softcap=0.0, alibi_slopes=None, block_table=None,
                                    cache_batch_idx=None, cache_leftpad=None, rotary_cos=None, rotary_sin=None,
                                    rotary_interleaved=True):
    """Every form of the cache op: plain, with window / softcap / ALiBi (var), and with paged
    caches, cache slots, left padding, rotary or new k/v of another length than q (srv, DESIGN §3).
    On CPU tensors "reference" runs the CPU kernels (which read the lengths once and check the
    capacity themselves); elsewhere the capacity is checked here when the lengths are on the host,
    then the Triton or csrc kernel runs where it has the requested features, else the oracle."""
    other_len = k is not None and k.shape[1] != q.shape[1]
    cpu_ref = backend == "reference" and q.device.type == "cpu"
    if (cpu_ref and block_table is None and cache_batch_idx is None and cache_leftpad is None and rotary_cos is None
            and alibi_slopes is None and softcap == 0 and window_left == -1 and window_right == -1 and not other_len):
        # The plain op on CPU (a decode step per layer): straight to the kernel.
        return cpu.attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale)
    var = dict(window_size=(window_left, window_right), softcap=softcap, alibi_slopes=alibi_slopes)
    srv = _serving_active(dict(block_table=block_table, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                               rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved))
    if cpu_ref:
        if srv or other_len:
            return cpu_serving.attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, var, srv)
        return cpu_variants.attention_with_kv_cache(
            q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, var["window_size"], var["softcap"], var["alibi_slopes"]
        )
    new = 0 if k is None else k.shape[1]
    if backend in ("triton", "cuda"):
        _require(backend, "attention_with_kv_cache", dict(var, **srv))
        if other_len:
            raise NotImplementedError(
                f"k: backend {backend!r} appends new k/v of Tq = {q.shape[1]} rows; expected that many rows, "
                f"backend='reference' (or 'auto', which routes around it), got k with {new} rows"
            )
    if cache_seqlens.device.type == "cpu":
        # Lengths on the host: check capacity here (one read) before anything is written.
        check_cache_capacity(cache_seqlens.tolist(), _cache_capacity(k_cache, srv.get("block_table")), new)
    cache_seqlens = cache_seqlens.to(q.device, non_blocking=True)
    srv = {name: (x.to(q.device) if name in SERVING_KEYS[:3] else x) for name, x in srv.items()}
    if backend == "reference" or q.shape[0] == 0 or q.shape[1] == 0:
        # Tq == 0 appends nothing and attends nothing: the reference returns empty results.
        return reference.attention_with_kv_cache(
            q, k_cache, v_cache, k, v, cache_seqlens, causal=causal, scale=scale, **var, **srv
        )
    if backend in USER_BACKENDS:
        fn = USER_BACKENDS[backend]["attention_with_kv_cache"]
        return _user_result(backend, "attention_with_kv_cache", fn(
            q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=causal, scale=scale, return_lse=True,
            **_active(var), **srv))
    if backend == "triton":
        return _triton_attention_with_kv_cache().attention_with_kv_cache(
            q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, None,
            var["window_size"], var["softcap"], var["alibi_slopes"], **srv,
        )
    if backend == "cuda":
        return _cuda_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, var, srv)
    raise RuntimeError(f"backend: {backend!r} has no attention_with_kv_cache implementation")


def _cuda_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, var, srv):
    """The csrc op with its variant and serving arguments (no rotary: see KERNEL_VARIANTS)."""
    build.load_extension()
    left, right = var["window_size"]
    return torch.ops.pytorch_mqa.attention_with_kv_cache_cuda(
        q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, left, right, var["softcap"], var["alibi_slopes"],
        srv.get("block_table"), srv.get("cache_batch_idx"), srv.get("cache_leftpad"),
    )
