"""The benchmarks' measuring library: counting, timing, calibration and the run's environment.

Every run starts with a calibration (a large device copy and a large matmul) whose figures are
the peaks the percentages refer to. GPU timings use `triton.testing.do_bench` (median, p20, p80;
warm-up excluded; L2 flushed between calls), CPU timings `time.perf_counter` (median of repeats
after warm-up). Inputs are random and rotated among several buffer sets, so a call never finds
the previous call's inputs in cache. The suites live beside this module (`bench/ops.py`,
`bench/generate.py`); `bench/runner.py` runs them and `bench/report.py` formats the results.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Sequence

import torch

from pytorch_mqa.version import __version__
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
# Environment: what a result was measured on.
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
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "pytorch_mqa": __version__,
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
