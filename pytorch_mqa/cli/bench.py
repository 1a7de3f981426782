"""`pytorch-mqa bench`: microbenchmarks of both ops and the end-to-end generation benchmark.

    pytorch-mqa bench [attention|attention_with_kv_cache|generate|all] [--quick] [--out DIR] [--plot]
                      [--device cuda|cpu] [--dtype bf16|fp16|fp32] [--cuda-graph] [--compile]

`decode` is accepted as the earlier name of `attention_with_kv_cache`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from pytorch_mqa.bench.report import markdown_report, write_plots
from pytorch_mqa.cli.common import UserError
from pytorch_mqa.bench.runner import run_bench
from pytorch_mqa.bench.suites import ALIASES, SUITES
from pytorch_mqa.core.devices import resolve_device
from pytorch_mqa.core.dtypes import DTYPE_CHOICES, as_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", nargs="?", default="all", choices=tuple(SUITES) + tuple(ALIASES) + ("all",),
                        help="which benchmark to run")
    parser.add_argument("--quick", action="store_true", help="small shape set (about two minutes on a 2-core CPU)")
    parser.add_argument("--out", default="runs/bench", help="output directory for the JSON and plots")
    parser.add_argument("--plot", action="store_true", help="also write PNG charts (needs matplotlib)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                        help="attention/decode dtype (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--cuda-graph", action="store_true", help="decode: capture each timed call in a CUDA graph")
    parser.add_argument("--compile", action="store_true",
                        help="generate: also time generate(compile=True) (compile seconds reported apart)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: torch threads for every suite (default: torch's choice; generate uses 2)")


def run(args: argparse.Namespace) -> int:
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as err:
        raise UserError("--device", str(err).split(": ", 1)[-1]) from None
    dtype = as_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.cuda_graph and device.type != "cuda":
        raise UserError("--cuda-graph", "expected a CUDA device, got cpu")
    suites = tuple(SUITES) if args.suite == "all" else (args.suite,)
    start = time.perf_counter()
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads", f"expected a positive number, got {args.threads}")
    result = run_bench(suites, device, dtype, args.quick, args.cuda_graph, threads=args.threads,
                       compile=args.compile)
    result["total_seconds"] = round(time.perf_counter() - start, 2)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    md = os.path.join(args.out, "bench.md")
    with open(md, "w") as f:
        f.write(markdown_report(result))
    print(f"\nwrote {path} and {md}  ({result['total_seconds']:.1f} s in all)")
    if args.plot:
        for p in write_plots(result, args.out):
            print(f"wrote {p}")
    return 0
