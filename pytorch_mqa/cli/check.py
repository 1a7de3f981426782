"""`pytorch-mqa check`: run the correctness kit (pytorch_mqa.testing) on a kernel or a backend.

    pytorch-mqa check --impl mypkg.kernels:my_attention [--op attention] [--device cuda] [--quick]
    pytorch-mqa check --backend triton          # the package's own kernels on this machine

Prints one table row per case (error, tolerance, ratio), the failing cases with their shapes,
writes the report as JSON, and exits 1 if any case fails (2 if the check cannot run).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys

from pytorch_mqa.core.devices import resolve_device
from pytorch_mqa.core.dtypes import DTYPE_CHOICES, as_dtype
from pytorch_mqa.ops.backends import OP_BACKENDS, unavailable_reason
from pytorch_mqa.testing import DTYPES, Report, check_attention, check_attention_with_kv_cache, check_backend
from pytorch_mqa.testing.backends import load_backend_plugins

OPS = tuple(OP_BACKENDS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--impl", metavar="MODULE:FUNCTION",
                      help="a callable with the op's signature: module.path:name or path/to/file.py:name")
    what.add_argument("--backend", help="a backend of the package (reference, triton, cuda, or a registered one)")
    parser.add_argument("--op", choices=OPS, default=None,
                        help="the op --impl implements (None: attention); with --backend, check only this op (None: every op)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... or auto (cuda if available)")
    parser.add_argument("--quick", action="store_true", help="a smaller matrix (every feature once, short sequences)")
    parser.add_argument("--dtype", action="append", choices=DTYPE_CHOICES, default=None,
                        help="check only this dtype (repeatable; None: float32, float16 and bfloat16)")
    parser.add_argument("--lse", action="store_true",
                        help="--impl returns (out, lse) when called with return_lse=True: check the lse too")
    parser.add_argument("--grad", action="store_true", help="--impl attention: also check dq, dk, dv (autograd)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first, e.g. one that calls pytorch_mqa.register_backend (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the case matrix's inputs")
    parser.add_argument("--out", default="runs/check", help="directory for the JSON report")
    parser.add_argument("--failures-only", action="store_true", help="print only the failing cases' rows")


def load_callable(spec: str):
    """'pkg.module:name' or 'path/to/file.py:name' (name may be dotted) -> the object."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--impl: expected MODULE:FUNCTION (e.g. mypkg.kernels:attention), got {spec!r}")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise ValueError(f"--impl: expected an existing Python file, got {module_name!r}")
        name = "pytorch_mqa_check_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(module_name))[0])
        file_spec = importlib.util.spec_from_file_location(name, module_name)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
    else:
        if importlib.util.find_spec(module_name.partition(".")[0]) is None and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` would: modules in the current directory
        module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--impl: expected {module_name} to define {attr!r}, got no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--impl: expected a callable, got {type(obj).__name__} for {spec!r}")
    return obj


def _print_report(report: Report, out_dir: str, failures_only: bool) -> str:
    print(f"\n== {report.impl}: {report.op} on {report.device} ==")
    print(report.table(failures_only=failures_only))
    if report.failures:
        print("\nfailing cases:")
        print(report.failure_details())
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", report.impl).strip("_")[:80]
    path = report.write_json(os.path.join(out_dir, f"check_{tag}_{report.op}.json"))
    print(f"\n{report.summary()}\nreport: {path}")
    return path


def run(args: argparse.Namespace) -> int:
    load_backend_plugins()
    for module in args.imports:
        importlib.import_module(module)
    dtypes = tuple(as_dtype(d) for d in args.dtype) if args.dtype else DTYPES
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        print(f"pytorch-mqa check: {e}", file=sys.stderr)
        return 2
    if args.backend is not None:
        reason = unavailable_reason(args.backend, device.type) if _known(args.backend) else (
            f"expected one of {tuple(b for op in OPS for b in OP_BACKENDS[op])}, got {args.backend!r}")
        if reason is not None:
            print(f"pytorch-mqa check: backend {args.backend!r} cannot run on {device.type}: {reason}", file=sys.stderr)
            return 2
        ops = [args.op] if args.op else [op for op in OPS if args.backend in OP_BACKENDS[op]]
        if args.op and args.backend not in OP_BACKENDS[args.op]:
            print(f"pytorch-mqa check: --op: backend {args.backend!r} implements {[o for o in OPS if args.backend in OP_BACKENDS[o]]}, "
                  f"got {args.op!r}", file=sys.stderr)
            return 2
        reports = check_backend(args.backend, device=device, quick=args.quick, ops=ops, dtypes=dtypes, seed=args.seed)
    else:
        try:
            fn = load_callable(args.impl)
        except (ValueError, ImportError) as e:
            print(f"pytorch-mqa check: {e}", file=sys.stderr)
            return 2
        op = args.op or "attention"
        if op == "attention":
            reports = [check_attention(fn, device=device, quick=args.quick, dtypes=dtypes, lse=args.lse,
                                       grad=args.grad, name=args.impl, seed=args.seed)]
        else:
            if args.grad:
                print("pytorch-mqa check: --grad: expected --op attention (the cache op is not differentiable), "
                      f"got --op {op}", file=sys.stderr)
                return 2
            reports = [check_attention_with_kv_cache(fn, device=device, quick=args.quick, dtypes=dtypes,
                                                     lse=args.lse, name=args.impl, seed=args.seed)]
    for report in reports:
        _print_report(report, args.out, args.failures_only)
    return 0 if all(r.passed for r in reports) else 1


def _known(backend: str) -> bool:
    return any(backend in OP_BACKENDS[op] for op in OPS)


__all__ = ["add_arguments", "run", "load_callable"]
