"""`pytorch-mqa bench`: microbenchmarks of both ops and the end-to-end generation benchmark.

    pytorch-mqa bench [attention|decode|generate|all] [--quick] [--out DIR] [--plot]
                      [--device cuda|cpu] [--dtype bf16|fp16|fp32] [--cuda-graph]

Every run starts with a calibration (a large device copy and a large matmul) whose figures are
the peaks the percentages refer to. GPU timings use `triton.testing.do_bench` (median, p20, p80;
warm-up excluded; L2 flushed between calls), CPU timings `time.perf_counter` (median of repeats
after warm-up). Inputs are random and rotated among several buffer sets, so a call never finds
the previous call's inputs in cache. The suites live in `bench_ops.py` (attention, decode) and
`bench_generate.py` (generate); this file holds the timing, counting, calibration and output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Sequence

import torch

SUITES = ("attention", "decode", "generate")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Buffer sets are added until the rotated inputs exceed this many times the last-level cache.
ROTATE_CACHE_MULTIPLE = 4
MAX_BUFFER_SETS = 4
CPU_LLC_BYTES = 32 * 2**20  # used when the CPU cache size cannot be read


# --------------------------------------------------------------------------------------------
# Counting: what a call must compute or move, independent of how a backend does it.
# --------------------------------------------------------------------------------------------


def attention_flops(B: int, Hq: int, Tq: int, Tk: int, D: int, causal: bool, mode: str = "fwd") -> float:
    """FLOPs of attention: 4*B*Hq*Tq*Tk*D for the forward (QK^T and PV), half of it when causal;
    the backward counts 2.5x the forward, so mode="fwd_bwd" is 3.5x."""
    flops = 4.0 * B * Hq * Tq * Tk * D
    if causal:
        flops /= 2
    if mode == "fwd":
        return flops
    if mode == "fwd_bwd":
        return 3.5 * flops
    raise ValueError(f"mode: expected 'fwd' or 'fwd_bwd', got {mode!r}")


def decode_bytes(cache_seqlens: Sequence[int], Tq: int, Hq: int, Hkv: int, D: int, elt: int) -> float:
    """Bytes a decode call must move: the K/V rows each sequence attends (L_b + Tq rows of K and
    of V), plus reading q and the new k/v, and writing the output and the new k/v into the cache."""
    kv_read = sum(L + Tq for L in cache_seqlens) * Hkv * D * 2 * elt
    B = len(cache_seqlens)
    q_and_out = 2 * B * Tq * Hq * D * elt
    new_kv = 2 * (2 * B * Tq * Hkv * D * elt)  # read k, v and write them into the caches
    return float(kv_read + q_and_out + new_kv)


# --------------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------------


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    if len(times_ms) == 1:
        return times_ms[0], times_ms[0], times_ms[0]
    q = statistics.quantiles(times_ms, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(times_ms), q[1], q[7]


def time_cpu(fn: Callable[[], object], budget_s: float, min_reps: int = 3, max_reps: int = 50) -> dict:
    """Median (p20, p80) of `fn` in ms with time.perf_counter, after a warm-up call."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    med, p20, p80 = _quantiles(times)
    return {"ms": med, "p20_ms": p20, "p80_ms": p80, "min_ms": min(times), "reps": len(times)}


def time_cuda(fn: Callable[[], object], budget_s: float) -> dict:
    """Median (p20, p80) of `fn` in ms on the current CUDA stream.

    triton.testing.do_bench when Triton is installed (it flushes L2 between calls), otherwise
    CUDA events around each call after a warm-up of about a quarter of the budget.
    """
    rep_ms = max(20.0, budget_s * 1e3)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        med, p20, p80, low = do_bench(fn, warmup=rep_ms / 4, rep=rep_ms, quantiles=[0.5, 0.2, 0.8, 0.0])
        return {"ms": float(med), "p20_ms": float(p20), "p80_ms": float(p80), "min_ms": float(low), "reps": None}
    fn()
    torch.cuda.synchronize()
    t_end = time.perf_counter() + rep_ms / 4e3
    while time.perf_counter() < t_end:
        fn()
    torch.cuda.synchronize()
    times, start = [], time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < rep_ms / 1e3 and len(times) < 1000):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    med, p20, p80 = _quantiles(times)
    return {"ms": med, "p20_ms": p20, "p80_ms": p80, "min_ms": min(times), "reps": len(times)}


def time_fn(fn: Callable[[], object], device: torch.device, budget_s: float) -> dict:
    return time_cuda(fn, budget_s) if device.type == "cuda" else time_cpu(fn, budget_s)


def llc_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text)
    except (OSError, ValueError, KeyError):
        return CPU_LLC_BYTES


def n_buffer_sets(set_bytes: int, device: torch.device) -> int:
    """How many input sets to rotate so that together they exceed a few times the last-level cache."""
    want = ROTATE_CACHE_MULTIPLE * llc_bytes(device)
    return max(1, min(MAX_BUFFER_SETS, math.ceil(want / max(set_bytes, 1))))


class Rotating:
    """Calls fn(*inputs[i]) with i cycling over the buffer sets."""

    def __init__(self, fn: Callable, sets: list):
        self.fn, self.sets, self.i = fn, sets, 0

    def __call__(self):
        args = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return self.fn(*args)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Calibration: the measured peaks the percentages refer to.
# --------------------------------------------------------------------------------------------


def calibrate(device: torch.device, dtype: torch.dtype, quick: bool, sizes: dict | None = None) -> dict:
    """Copy bandwidth (bytes read + written per second) and matmul throughput on `device`.

    Each is the fastest of its timed repeats. GPU: a 1 GiB device-to-device copy and an 8192^3 matmul in `dtype` (bf16 by default).
    CPU: a 256 MiB memcpy and a float32 matmul of 2048^3 (1024^3 with quick; half-precision
    matmuls are not what the CPU reference path runs: it computes in float32).
    """
    budget = 0.3 if quick else 1.0
    if device.type == "cuda":
        copy_bytes, n, mm_dtype = 2**30, 8192, dtype
    else:
        copy_bytes, n, mm_dtype = 2**28, 1024 if quick else 2048, torch.float32
    if sizes:  # smaller sizes for smoke tests
        copy_bytes, n = sizes.get("copy_bytes", copy_bytes), sizes.get("matmul_n", n)
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), device, budget)
    src = dst = None  # free before the matmul
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    t_mm = time_fn(lambda: a @ b, device, budget)
    a = b = None
    # A peak is what the device can do: the fastest repeat, not the median.
    return {
        "copy_bytes": copy_bytes,
        "copy_ms": t_copy["min_ms"],
        "copy_median_ms": t_copy["ms"],
        "copy_gbs": 2 * copy_bytes / (t_copy["min_ms"] * 1e-3) / 1e9,
        "matmul_n": n,
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
        "matmul_ms": t_mm["min_ms"],
        "matmul_median_ms": t_mm["ms"],
        "matmul_tflops": 2 * n**3 / (t_mm["min_ms"] * 1e-3) / 1e12,
    }


# --------------------------------------------------------------------------------------------
# Environment, table, JSON, plots.
# --------------------------------------------------------------------------------------------


def git_revision() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU: {platform.processor() or platform.machine()} ({cpu_model()}), {torch.get_num_threads()} threads"
    import pytorch_mqa

    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "pytorch_mqa": pytorch_mqa.__version__,
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # Other processes on the machine skew CPU figures; the 1-minute load says how busy it was.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown model"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return f"{value:g}"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Aligned text table; columns are (row key, header). A skipped row shows its reason."""
    cells = [[h for _, h in columns] + ["note"]]
    for r in rows:
        note = r.get("reason") or ""
        if r.get("max_abs_err") is not None:
            note = f"err {r['max_abs_err']:.1e}" + (f"; {note}" if note else "")
        cells.append([_fmt(r.get(k)) for k, _ in columns] + [note[:90]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i < len(row) - 1 else c for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """The same table in Markdown, for BENCHMARKS.md."""
    head = [h for _, h in columns] + ["note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        note = r.get("reason") or ""
        if r.get("max_abs_err") is not None:
            note = f"err {r['max_abs_err']:.1e}" + (f"; {note}" if note else "")
        lines.append("| " + " | ".join([_fmt(r.get(k)) for k, _ in columns] + [note]) + " |")
    return "\n".join(lines)


def markdown_report(result: dict) -> str:
    """The run's environment, calibration and tables in Markdown."""
    from pytorch_mqa import bench_generate, bench_ops

    env, cal = result["environment"], result["calibration"]
    lines = [f"Device: {env['device_name']}; torch {env['torch']}, triton {env['triton'] or '-'}, "
             f"git {env['git_revision'] or '-'}, {env['time_utc']}; dtype {result['dtype']}"
             f"{'; --quick' if result['quick'] else ''}; 1-minute load average at start "
             f"{env['load_average_1min'] or 0:.1f} on {env['cpu_count']} CPUs.", "",
             f"Calibration: copy {cal['copy_gbs']:.2f} GB/s (bytes read + written, {cal['copy_bytes'] >> 20} MiB), "
             f"{cal['matmul_dtype']} matmul {cal['matmul_tflops']:.4f} TFLOP/s ({cal['matmul_n']}^3).", ""]
    columns = {"attention": bench_ops.ATTENTION_COLUMNS, "decode": bench_ops.DECODE_COLUMNS,
               "generate": bench_generate.GENERATE_COLUMNS}
    for suite, secs in result.get("suite_seconds", {}).items():
        rows = [r for r in result["rows"] if r["suite"] == suite]
        lines += [f"### {suite} ({secs:.0f} s)", "", markdown_table(rows, columns[suite]), ""]
        if suite == "generate" and bench_generate.summary(rows):
            lines += [bench_generate.summary(rows).replace("\n", "  \n"), ""]
    return "\n".join(lines)


def write_plots(result: dict, out_dir: str) -> list[str]:
    """One PNG per suite that ran (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from pytorch_mqa import bench_generate, bench_ops

    paths = []
    for suite, plot in (("attention", bench_ops.plot_attention), ("decode", bench_ops.plot_decode),
                        ("generate", bench_generate.plot_generate)):
        rows = [r for r in result["rows"] if r["suite"] == suite and (r.get("ms") or r.get("tokens_per_s"))]
        if rows:
            path = os.path.join(out_dir, f"bench_{suite}.png")
            plot(rows, result, path)
            paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", nargs="?", default="all", choices=SUITES + ("all",),
                        help="which benchmark to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="small shape set (about two minutes on a 2-core CPU)")
    parser.add_argument("--out", default="runs/bench", help="output directory for the JSON and plots (default: runs/bench)")
    parser.add_argument("--plot", action="store_true", help="also write PNG charts (needs matplotlib)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="attention/decode dtype (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--cuda-graph", action="store_true", help="decode: capture each timed call in a CUDA graph")
    parser.add_argument("--compile", action="store_true",
                        help="generate: also time generate(compile=True) (compile seconds reported apart)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: torch threads for every suite (default: torch's choice; generate uses 2)")


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: expected a device this machine has, got cuda (torch.cuda.is_available() is False)")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"--device: expected cuda or cpu, got {name!r}")
    return device


def run_bench(suites: Sequence[str], device: torch.device, dtype: torch.dtype, quick: bool,
              cuda_graph: bool = False, shapes: dict | None = None, log=print, threads: int | None = None,
              compile: bool = False) -> dict:
    """Calibrate, run the suites and return the result dict (what the JSON file holds).

    `shapes` overrides the default shape lists per suite (see bench_ops / bench_generate) and,
    under "calibration", the calibration sizes (`copy_bytes`, `matmul_n`)."""
    from pytorch_mqa import bench_generate

    shapes = dict(shapes or {})
    old_threads = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
        gen_shapes = dict(shapes.get("generate") or bench_generate.GENERATE_SHAPES["cpu_quick" if quick else "cpu"])
        shapes["generate"] = dict(gen_shapes, threads=threads)
    try:
        return _run_suites(suites, device, dtype, quick, cuda_graph, shapes, log, compile)
    finally:
        torch.set_num_threads(old_threads)


def _run_suites(suites, device, dtype, quick, cuda_graph, shapes, log, compile=False) -> dict:
    from pytorch_mqa import bench_generate, bench_ops

    env = environment(device)
    log(f"pytorch-mqa bench on {env['device_name']}  torch {env['torch']}  triton {env['triton'] or '-'}  "
        f"dtype {str(dtype).replace('torch.', '')}{'  (quick)' if quick else ''}")
    if device.type == "cpu":
        log("CPU run: the reference path and PyTorch's CPU kernels, timed with time.perf_counter")
    calib = calibrate(device, dtype, quick, shapes.get("calibration"))
    log(f"calibration: copy {calib['copy_gbs']:.1f} GB/s (read+write), "
        f"{calib['matmul_dtype']} matmul {calib['matmul_tflops']:.3f} TFLOP/s")
    if env["load_average_1min"] is not None and device.type == "cpu":
        log(f"load average {env['load_average_1min']:.1f} on {env['cpu_count']} CPUs at start")
    result = {"environment": env, "dtype": str(dtype).replace("torch.", ""), "quick": quick,
              "cuda_graph": cuda_graph, "calibration": calib, "rows": []}
    for suite in suites:
        t0 = time.perf_counter()
        if suite == "attention":
            rows = bench_ops.run_attention(device, dtype, calib, quick, shapes.get("attention"))
            table = format_table(rows, bench_ops.ATTENTION_COLUMNS)
        elif suite == "decode":
            rows = bench_ops.run_decode(device, dtype, calib, quick, cuda_graph, shapes.get("decode"))
            table = format_table(rows, bench_ops.DECODE_COLUMNS)
        else:
            gen_dtype = dtype if device.type == "cuda" else torch.float32
            rows = bench_generate.run_generate(device, quick, shapes.get("generate"), gen_dtype, compile)
            table = format_table(rows, bench_generate.GENERATE_COLUMNS)
        result["rows"].extend(rows)
        result.setdefault("suite_seconds", {})[suite] = round(time.perf_counter() - t0, 2)
        if hasattr(os, "getloadavg"):
            result.setdefault("load_average_1min_after", {})[suite] = os.getloadavg()[0]
        log(f"\n== {suite} ({result['suite_seconds'][suite]:.1f} s) ==\n{table}")
        if suite == "generate":
            summary = bench_generate.summary(rows)
            if summary:
                log(summary)
    return result


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit("--cuda-graph: expected a CUDA device, got cpu")
    suites = SUITES if args.suite == "all" else (args.suite,)
    start = time.perf_counter()
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads: expected a positive number, got {args.threads}")
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
