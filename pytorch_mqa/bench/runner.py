"""Running benchmark suites: calibrate once, run each registered suite, collect one result dict."""

from __future__ import annotations

import os
import time
from typing import Sequence

import torch

from pytorch_mqa.bench import timing
from pytorch_mqa.bench.report import format_table
from pytorch_mqa.bench.suites import ALIASES, SUITES
from pytorch_mqa.core.dtypes import dtype_name
from pytorch_mqa.core.threads import torch_threads


def run_bench(suites: Sequence[str], device: torch.device, dtype: torch.dtype, quick: bool,
              cuda_graph: bool = False, shapes: dict | None = None, log=print, threads: int | None = None,
              compile: bool = False) -> dict:
    """Calibrate, run the suites and return the result dict (what the JSON file holds).

    `shapes` overrides the default shape sets per suite (each suite's SHAPES) and, under
    "calibration", the calibration sizes (`copy_bytes`, `matmul_n`). `threads` sets the CPU
    threads of every suite, generation included (which otherwise uses its shape set's count)."""
    suites = [ALIASES.get(s, s) for s in suites]
    for s in suites:
        if s not in SUITES:
            raise ValueError(f"suite: expected one of {tuple(SUITES)}, got {s!r}")
    shapes = dict(shapes or {})
    if threads is not None and device.type == "cpu":
        gen_shapes = dict(shapes.get("generate") or SUITES["generate"].module.SHAPES["cpu_quick" if quick else "cpu"])
        shapes["generate"] = dict(gen_shapes, threads=threads)
    with torch_threads(threads if device.type == "cpu" else None):
        return _run_suites(suites, device, dtype, quick, shapes, log, cuda_graph=cuda_graph, compile=compile)


def _run_suites(suites, device, dtype, quick, shapes, log, **options) -> dict:
    env = timing.environment(device)
    log(f"pytorch-mqa bench on {env['device_name']}  torch {env['torch']}  triton {env['triton'] or '-'}  "
        f"dtype {dtype_name(dtype)}{'  (quick)' if quick else ''}")
    if device.type == "cpu":
        log("CPU run: the package's CPU path and PyTorch's CPU kernels, timed with time.perf_counter")
    calib = timing.calibrate(device, dtype, quick, shapes.get("calibration"))
    log(f"calibration: copy {calib['copy_gbs']:.1f} GB/s (read+write), "
        f"{calib['matmul_dtype']} matmul {calib['matmul_tflops']:.3f} TFLOP/s")
    if env["load_average_1min"] is not None and device.type == "cpu":
        log(f"load average {env['load_average_1min']:.1f} on {env['cpu_count']} CPUs at start")
    result = {"environment": env, "dtype": dtype_name(dtype), "quick": quick,
              "cuda_graph": options.get("cuda_graph", False), "calibration": calib, "rows": []}
    for name in suites:
        suite = SUITES[name]
        t0 = time.perf_counter()
        rows = suite.module.run(device, dtype, calib, quick, shapes.get(name), **options)
        result["rows"].extend(rows)
        result.setdefault("suite_seconds", {})[name] = round(time.perf_counter() - t0, 2)
        if hasattr(os, "getloadavg"):
            result.setdefault("load_average_1min_after", {})[name] = os.getloadavg()[0]
        log(f"\n== {name} ({result['suite_seconds'][name]:.1f} s) ==\n{format_table(rows, suite.columns)}")
        text = suite.summary(rows) if suite.summary else ""
        if text:
            log(text)
    return result


__all__ = ["run_bench"]
