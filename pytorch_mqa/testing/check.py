"""Run the case matrix against any attention callable and report per case (DESIGN §5).

    report = check_attention(my_attention)                # fn(q, k, v, *, causal, scale)
    report = check_attention_with_kv_cache(my_decode)     # fn(q, k_cache, v_cache, k, v, *, cache_seqlens, causal, scale)
    print(report.table()); assert report.passed

The callables take the package's signatures and layout (BSHD, GQA without expanded K/V, causal
bottom-right aligned, `scale=None` meaning 1/sqrt(D)). With `lse=True` they are called with
`return_lse=True` and must return `(out, lse)`. Each result is compared with the reference in
float32, with the reference in the input dtype setting the tolerance. The cache op's caches sit
between guard regions of NaN sentinels: any write outside the cache, any change to a cache row
other than the appended ones, and any difference in the appended rows is reported.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from pytorch_mqa import reference
from pytorch_mqa.core.devices import resolve_device
from pytorch_mqa.ops import api
from pytorch_mqa.ops.backends import OP_BACKENDS, unavailable_reason
from pytorch_mqa.testing.cases import DTYPES, AttentionCase, KVCacheCase, attention_cases, kv_cache_cases, seeded
from pytorch_mqa.testing.report import CaseResult, Report
from pytorch_mqa.testing.tolerance import compare

GUARD_ROWS = 16  # cache rows' worth of sentinel elements before and after each cache


def _impl_name(fn) -> str:
    if isinstance(fn, functools.partial):
        return _impl_name(fn.func) + "(" + ", ".join(f"{k}={v!r}" for k, v in fn.keywords.items()) + ")"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _split_result(result, want_lse: bool, problems: list):
    """(out, lse) from what the callable returned; lse is None unless asked for."""
    if isinstance(result, (tuple, list)):
        if want_lse and len(result) < 2:
            problems.append(f"expected (out, lse) with return_lse=True, got a {type(result).__name__} of {len(result)}")
            return None, None
        return result[0], (result[1] if want_lse else None)
    if want_lse:
        problems.append(f"expected (out, lse) with return_lse=True, got {type(result).__name__}")
        return None, None
    return result, None


def _check_out(out, case_dtype, device, problems) -> bool:
    if not isinstance(out, torch.Tensor):
        problems.append(f"out: expected a torch.Tensor, got {type(out).__name__}")
        return False
    if out.dtype != case_dtype:
        problems.append(f"out: expected dtype {case_dtype} (the input dtype), got {out.dtype}")
    if out.device != device:
        problems.append(f"out: expected device {device} (the input device), got {out.device}")
    return True


def _unchanged(problems, **pairs) -> None:
    for name, (now, before) in pairs.items():
        if now is not None and not torch.equal(now, before):
            problems.append(f"{name}: modified in place (an input the op must only read)")


def _grads(f, q, k, v, dout):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = f(q, k, v)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return torch.autograd.grad(out, (q, k, v), dout)


def _run_attention_case(fn, case: AttentionCase, device, lse: bool, grad: bool) -> CaseResult:
    res = CaseResult(case.name, case.to_dict(), case.tags)
    q, k, v = case.inputs(device)
    saved = (q.clone(), k.clone(), v.clone())
    kwargs = {"causal": case.causal, "scale": case.scale}
    if lse:
        kwargs["return_lse"] = True
    try:
        out, got_lse = _split_result(fn(q, k, v, **kwargs), lse, res.problems)
    except Exception as e:  # the report names the case; the caller decides what a failure means
        res.problems.append(f"raised {type(e).__name__}: {e}")
        return res
    if out is None or not _check_out(out, case.dtype, q.device, res.problems):
        return res
    _unchanged(res.problems, q=(q, saved[0]), k=(k, saved[1]), v=(v, saved[2]))
    o32, l32 = reference.attention(q.float(), k.float(), v.float(), causal=case.causal, scale=case.scale)
    olp, llp = reference.attention(q, k, v, causal=case.causal, scale=case.scale, upcast=False)
    res.comparisons.append(compare(out, o32, olp, case.dtype, "out"))
    if lse:
        res.comparisons.append(compare(got_lse, l32, llp, case.dtype, "lse"))
    if grad:
        dout = torch.randn(q.shape, generator=seeded(case.seed + 1)).to(device=device, dtype=case.dtype)
        try:
            got = _grads(lambda a, b, c: fn(a, b, c, causal=case.causal, scale=case.scale), q, k, v, dout)
        except Exception as e:
            res.problems.append(f"backward raised {type(e).__name__}: {e}")
            return res
        r32 = _grads(lambda a, b, c: reference.attention(a, b, c, causal=case.causal, scale=case.scale),
                     q.float(), k.float(), v.float(), dout.float())
        rlp = _grads(lambda a, b, c: reference.attention(a, b, c, causal=case.causal, scale=case.scale, upcast=False),
                     q, k, v, dout)
        for name, g, a, b in zip(("dq", "dk", "dv"), got, r32, rlp):
            res.comparisons.append(compare(g, a, b, case.dtype, name))
    return res


def check_attention(
    fn: Callable,
    *,
    device=None,
    quick: bool = False,
    dtypes=DTYPES,
    cases: list[AttentionCase] | None = None,
    lse: bool = False,
    grad: bool = False,
    name: str | None = None,
    seed: int = 0,
) -> Report:
    """Run `fn(q, k, v, *, causal, scale[, return_lse])` over the attention matrix; return the Report.

    q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D) on `device` (default: cuda if present, else cpu).
    `lse=True` also checks the log-sum-exp, `grad=True` the gradients of q, k, v.
    """
    device = resolve_device(device)
    cases = attention_cases(quick=quick, dtypes=dtypes, seed=seed) if cases is None else cases
    report = Report("attention", name or _impl_name(fn), str(device))
    for case in cases:
        report.results.append(_run_attention_case(fn, case, device, lse, grad))
    return report


def _guarded_cache(like: torch.Tensor):
    """A contiguous cache shaped like `like` inside one buffer with NaN guard regions; (cache, buffer, guard)."""
    B, S, H, D = like.shape
    guard = GUARD_ROWS * H * D
    buf = torch.full((2 * guard + like.numel(),), float("nan"), dtype=like.dtype, device=like.device)
    cache = buf[guard : guard + like.numel()].view(B, S, H, D)
    cache.copy_(like)
    return cache, buf, guard


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _check_guards(name, buf, guard, problems) -> None:
    n_cache = buf.numel() - 2 * guard
    sentinel = _bits(torch.full((1,), float("nan"), dtype=buf.dtype, device=buf.device))
    for where, part in (("before", buf[:guard]), ("after", buf[guard + n_cache :])):
        changed = _bits(part) != sentinel
        if changed.any():
            first = int(changed.nonzero()[0])
            offset = first - guard if where == "before" else n_cache + first
            problems.append(f"{name}: {int(changed.sum())} elements written {where} the cache "
                            f"(first at element offset {offset} from the cache start)")


def _check_cache(name, got, want, lengths, Tq, with_new, problems) -> None:
    if torch.equal(got, want):
        return
    rows = (got != want).flatten(2).any(-1)  # (B, S)
    bad = rows.nonzero().tolist()
    appended = [(b, s) for b, s in bad if with_new and lengths[b] <= s < lengths[b] + Tq]
    stray = [(b, s) for b, s in bad if (b, s) not in appended]
    if appended:
        problems.append(f"{name}: {len(appended)} appended rows differ from k/v (first (b, row) {appended[:5]})")
    if stray:
        problems.append(f"{name}: {len(stray)} rows outside the appended range changed (first (b, row) {stray[:5]})")


def _run_kv_case(fn, case: KVCacheCase, device, lse: bool) -> CaseResult:
    res = CaseResult(case.name, case.to_dict(), case.tags)
    q, kc0, vc0, k, v, lens = case.inputs(device)
    lengths = [int(x) for x in lens.tolist()]
    want_k, want_v = kc0.clone(), vc0.clone()
    if case.with_new:
        for b, L in enumerate(lengths):
            want_k[b, L : L + case.Tq] = k[b]
            want_v[b, L : L + case.Tq] = v[b]
    new32 = (k.float(), v.float()) if case.with_new else (None, None)
    o32, l32 = reference.attention_with_kv_cache(q.float(), kc0.float().clone(), vc0.float().clone(), *new32, lens,
                                                 causal=case.causal, scale=case.scale)
    olp, llp = reference.attention_with_kv_cache(q, kc0.clone(), vc0.clone(), k, v, lens,
                                                 causal=case.causal, scale=case.scale, upcast=False)
    kc, kbuf, guard = _guarded_cache(kc0)
    vc, vbuf, _ = _guarded_cache(vc0)
    saved = (q.clone(), None if k is None else k.clone(), None if v is None else v.clone(), lens.clone())
    kwargs = {"cache_seqlens": lens, "causal": case.causal, "scale": case.scale}
    if lse:
        kwargs["return_lse"] = True
    try:
        out, got_lse = _split_result(fn(q, kc, vc, k, v, **kwargs), lse, res.problems)
    except Exception as e:
        res.problems.append(f"raised {type(e).__name__}: {e}")
        return res
    _check_guards("k_cache", kbuf, guard, res.problems)
    _check_guards("v_cache", vbuf, guard, res.problems)
    _check_cache("k_cache", kc, want_k, lengths, case.Tq, case.with_new, res.problems)
    _check_cache("v_cache", vc, want_v, lengths, case.Tq, case.with_new, res.problems)
    _unchanged(res.problems, q=(q, saved[0]), k=(k, saved[1]), v=(v, saved[2]), cache_seqlens=(lens, saved[3]))
    if out is None or not _check_out(out, case.dtype, q.device, res.problems):
        return res
    res.comparisons.append(compare(out, o32, olp, case.dtype, "out"))
    if lse:
        res.comparisons.append(compare(got_lse, l32, llp, case.dtype, "lse"))
    return res


def check_attention_with_kv_cache(
    fn: Callable,
    *,
    device=None,
    quick: bool = False,
    dtypes=DTYPES,
    cases: list[KVCacheCase] | None = None,
    lse: bool = False,
    name: str | None = None,
    seed: int = 0,
) -> Report:
    """Run `fn(q, k_cache, v_cache, k, v, *, cache_seqlens, causal, scale[, return_lse])` over the cache matrix.

    `fn` must write k/v (B, Tq, Hkv, D) into rows [L_b, L_b + Tq) of each cache in place and attend
    keys [0, L_b + Tq) (or [0, L_b) when k, v are None), bottom-right causal per sequence.
    """
    device = resolve_device(device)
    cases = kv_cache_cases(quick=quick, dtypes=dtypes, seed=seed) if cases is None else cases
    report = Report("attention_with_kv_cache", name or _impl_name(fn), str(device))
    for case in cases:
        report.results.append(_run_kv_case(fn, case, device, lse))
    return report


def backend_function(backend: str, op: str = "attention") -> Callable:
    """The package's public function `op` pinned to `backend` (what `check_backend` checks)."""
    if op not in OP_BACKENDS:
        raise ValueError(f"op: expected one of {tuple(OP_BACKENDS)}, got {op!r}")
    return functools.partial(getattr(api, op), backend=backend)


def check_backend(backend: str, *, device=None, quick: bool = False, ops=None, dtypes=DTYPES, seed: int = 0) -> list[Report]:
    """Check the package's `backend` (built in or registered) on `device`, for every op it implements.

    The checks go through the public functions and the registered ops, with the LSE and (for
    `attention`) the gradients. Raises RuntimeError if the backend cannot run on this device.
    """
    device = resolve_device(device)
    reason = unavailable_reason(backend, device.type)
    if reason is not None:
        raise RuntimeError(f"backend: {backend!r} cannot run {device.type} tensors here: {reason}")
    ops = [op for op in OP_BACKENDS if backend in OP_BACKENDS[op]] if ops is None else list(ops)
    reports = []
    for op in ops:
        fn = backend_function(backend, op)
        if op == "attention":
            reports.append(check_attention(fn, device=device, quick=quick, dtypes=dtypes, lse=True, grad=True,
                                           name=f"backend={backend}", seed=seed))
        else:
            reports.append(check_attention_with_kv_cache(fn, device=device, quick=quick, dtypes=dtypes, lse=True,
                                                         name=f"backend={backend}", seed=seed))
    return reports


__all__ = ["check_attention", "check_attention_with_kv_cache", "check_backend", "backend_function", "GUARD_ROWS"]
