"""The correctness rule of DESIGN §5 as functions.

A result `got` is compared with `ref32`, the reference run in float32 on the same inputs. The
tolerance is relative to PyTorch's own low-precision error: with `ref_lp` the reference run in the
input dtype (`upcast=False`),

    max|got - ref32| <= 2 * max|ref_lp - ref32| + atol(dtype)        (FlashAttention's rule)

Infinities (the LSE of a query row that sees no key is -inf) must match exactly, and NaN never
passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

# atol(dtype) of the rule: a few ulps at magnitude 1.
ATOL = {torch.float32: 2e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3, torch.float64: 1e-12}


@dataclass
class Comparison:
    """One tensor against the reference: `error <= tolerance` passes; `ratio = error / tolerance`."""

    name: str
    error: float
    tolerance: float
    ratio: float
    passed: bool
    message: str = ""
    n_over: int = 0  # elements over the tolerance (or otherwise wrong: NaN, infinity, shape)
    first_over: list = field(default_factory=list)  # up to 5 indices of such elements

    def to_dict(self) -> dict:
        return asdict(self)


def atol(dtype: torch.dtype) -> float:
    """atol(dtype) of the DESIGN §5 rule."""
    if dtype not in ATOL:
        raise ValueError(f"dtype: expected one of {tuple(str(d) for d in ATOL)}, got {dtype}")
    return ATOL[dtype]


def tolerance(ref32: torch.Tensor, ref_lp: torch.Tensor, dtype: torch.dtype) -> float:
    """2 * max|ref_lp - ref32| + atol(dtype), over the entries where ref32 is finite."""
    r, lp = ref32.double(), ref_lp.double()
    keep = torch.isfinite(r)
    diff = (lp[keep] - r[keep]).abs()
    diff = torch.nan_to_num(diff, nan=float("inf"))
    low_precision_error = diff.max().item() if diff.numel() else 0.0
    return 2 * low_precision_error + atol(dtype)


def _fail(name: str, message: str, n: int = 0, first=None, error=float("inf"), tol=float("nan")) -> Comparison:
    return Comparison(name, error, tol, float("inf"), False, message, n, list(first or []))


def compare(got: torch.Tensor, ref32: torch.Tensor, ref_lp: torch.Tensor, dtype: torch.dtype, name: str = "out") -> Comparison:
    """Apply the rule to one tensor; never raises on a mismatch (the Comparison says what is wrong)."""
    if not isinstance(got, torch.Tensor):
        return _fail(name, f"{name}: expected a torch.Tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(ref32.shape):
        return _fail(name, f"{name}: expected shape {tuple(ref32.shape)}, got {tuple(got.shape)}")
    g = got.detach().to("cpu", torch.float64)
    r = ref32.detach().to("cpu", torch.float64)
    lp = ref_lp.detach().to("cpu", torch.float64)
    nan = torch.isnan(g)
    if nan.any():
        return _fail(name, f"{name}: {int(nan.sum())} NaN values, first at {nan.nonzero()[:5].tolist()}",
                     int(nan.sum()), nan.nonzero()[:5].tolist())
    ref_inf = torch.isinf(r)
    bad_inf = (torch.isinf(g) != ref_inf) | (ref_inf & (g != r))
    if bad_inf.any():
        idx = bad_inf.nonzero()[:5].tolist()
        return _fail(name, f"{name}: {int(bad_inf.sum())} entries differ in infinity from the reference "
                     f"(a row that sees no key has lse -inf and out 0), first at {idx}", int(bad_inf.sum()), idx)
    if torch.isnan(r).any() or torch.isnan(lp).any() or bool((torch.isinf(lp) != ref_inf).any()):
        return _fail(name, f"{name}: the float32 and low-precision references disagree in NaN/infinity "
                     f"(inputs with NaN or overflow?); the rule cannot be applied")
    tol = tolerance(r, lp, dtype)
    if g.numel() == 0 or bool(ref_inf.all()):
        return Comparison(name, 0.0, tol, 0.0, True)
    err_full = (g - r).abs().masked_fill(ref_inf, 0.0)
    error = err_full.max().item()
    ratio = error / tol
    if error <= tol:
        return Comparison(name, error, tol, ratio, True)
    over = err_full > tol
    first = over.nonzero()[:5].tolist()
    lp_err = (tol - atol(dtype)) / 2
    message = (
        f"{name} ({str(dtype).replace('torch.', '')}): max error {error:.3e} > tolerance {tol:.3e} "
        f"(2 x low-precision error {lp_err:.3e} + atol {atol(dtype):.0e}); "
        f"{int(over.sum())} of {g.numel()} elements over, first at {first}"
    )
    return Comparison(name, error, tol, ratio, False, message, int(over.sum()), first)


def assert_close(got, ref32, ref_lp, dtype, name: str = "out", record: dict | None = None, label: str = "") -> float:
    """Raise AssertionError unless `got` passes the rule; return error / tolerance.

    `record` (optional) keeps the worst ratio per `"{label} {name} {dtype}"`, as a test run's summary.
    """
    c = compare(got, ref32, ref_lp, dtype, name)
    if record is not None and c.passed:
        key = f"{label or 'unlabelled'} {name} {str(dtype).replace('torch.', '')}"
        if c.ratio > record.get(key, (-1.0, ""))[0]:
            record[key] = (c.ratio, f"max err {c.error:.2e}, bound {c.tolerance:.2e}")
    if not c.passed:
        raise AssertionError(c.message)
    return c.ratio


__all__ = ["ATOL", "Comparison", "atol", "tolerance", "compare", "assert_close"]
