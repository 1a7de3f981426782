"""What the op benchmarks share: providers, the measuring loop, CUDA-graph replay, skip rows, plots.

Providers, per case:
- `mqa.<backend>`: `pytorch_mqa.attention` / `attention_with_kv_cache` forced to each backend
  that `available_backends(device)` lists and `OP_BACKENDS` says implements the op;
- beside them, PyTorch's own kernels (see `bench/attention.py` and
  `bench/attention_with_kv_cache.py`).
A provider that cannot run a case gets a row with `ms = None` and the reason.
"""

from __future__ import annotations

import os
import warnings

import torch

from pytorch_mqa.bench import timing
from pytorch_mqa.core.devices import synchronize
from pytorch_mqa.core.plotting import new_figure, save_figure
from pytorch_mqa.ops.backends import BACKENDS, OP_BACKENDS, available_backends, unavailable_reason


def shapes_for(table: dict, device: torch.device, quick: bool, override: dict | None) -> dict:
    return override or table[device.type + ("_quick" if quick else "")]


def budget_for(device: torch.device, quick: bool, shp: dict) -> float:
    """Seconds of timed calls per case (after warm-up); a shapes override may set `budget_s`."""
    if "budget_s" in shp:
        return shp["budget_s"]
    if device.type == "cuda":
        return 0.1 if quick else 0.25
    return 0.15 if quick else 0.5


def mqa_providers(op: str, device: torch.device) -> tuple[list[str], list[tuple[str, str]]]:
    """(backends to time, [(backend, why not)]) for `op` on `device`."""
    have = available_backends(device.type)
    run, skip = [], []
    for name in BACKENDS:
        if name not in OP_BACKENDS[op]:
            skip.append((name, f"no {op} implementation (ops.OP_BACKENDS)"))
        elif name not in have:
            skip.append((name, unavailable_reason(name, device.type) or "not available"))
        elif name == "triton" and device.type == "cpu":
            skip.append((name, "Triton on CPU runs under its interpreter, a correctness tool: not timed"))
        else:
            run.append(name)
    return run, skip


def first_error(exc: BaseException, caught: list) -> str:
    """Why a provider refused a case: SDPA's first warning saying why a kernel was not used, if
    any (it gives the reason; the exception only says that no kernel was left), then the error."""
    first = str(exc).splitlines()[0].split(". ")[0] if str(exc) else ""
    msg = f"{type(exc).__name__}: {first}"
    for w in caught:
        text = str(w.message)
        if "not used because" in text or "requires" in text or "Expected" in text:
            return f"{text.splitlines()[0][:160]} ({msg})"
    if "No viable backend" in msg:
        return f"this SDPA backend has no kernel for the case on this device ({msg})"
    return msg


# A case's inputs may take at most this fraction of the memory available when it starts (the
# providers' own temporaries, e.g. a gathered copy of the live rows, need the rest).
MEMORY_FRACTION = 0.4


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors on `device`: the device's free memory on CUDA, the host's
    available physical memory otherwise."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def inputs_too_big(nbytes: int, device: torch.device) -> str | None:
    """Why a case whose inputs take `nbytes` is skipped, or None when it fits: a process killed
    for memory loses every result, so a case is refused before anything is allocated."""
    free = available_bytes(device)
    if nbytes <= MEMORY_FRACTION * free:
        return None
    return (f"inputs need {nbytes / 2**30:.1f} GiB, more than {MEMORY_FRACTION:.0%} of the "
            f"{free / 2**30:.1f} GiB available")


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure(fn, ctx_factory, sets, device, budget, check=None, cuda_graph=False) -> dict:
    """Run once (and check), then time `fn` rotating over `sets`. Returns timing or a reason."""
    caught: list = []
    try:
        with ctx_factory(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn(*sets[0])
            synchronize(device)
            err = check(out) if check is not None else None
            del out
            call = graphed(fn, sets, device) if cuda_graph else timing.Rotating(fn, sets)
            result = timing.time_fn(call, device, budget)
        result["max_abs_err"] = err
        return result
    except Exception as exc:  # noqa: BLE001 -- a provider that fails (OOM, refusal, compile error) gets a row saying why
        release(device)
        return {"ms": None, "reason": first_error(exc, caught)}


def graphed(fn, sets, device):
    """One CUDA graph per buffer set, replayed in rotation."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for args in sets:
            fn(*args)
    torch.cuda.current_stream(device).wait_stream(side)
    graphs = []
    for args in sets:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(*args)
        graphs.append((g,))
    return timing.Rotating(lambda g: g.replay(), graphs)


def collapse_skips(rows: list[dict], suite: str, op: str) -> list[dict]:
    """A provider that refused every case for the same reason gets one `case="all"` row."""
    out, done = [], set()
    for r in rows:
        name = r["provider"]
        mine = [x for x in rows if x["provider"] == name and x.get("case") != "all"]
        if mine and all(x.get("ms") is None for x in mine) and len({x.get("reason") for x in mine}) == 1:
            if name not in done:
                done.add(name)
                out.append(dict(suite=suite, op=op, provider=name, case="all", ms=None,
                                reason=f"{mine[0].get('reason')} [all {len(mine)} cases]"))
            continue
        out.append(r)
    return out


def max_err(ref):
    if ref is None:
        return None
    return lambda out: float((out.float() - ref.float()).abs().max())


# --------------------------------------------------------------------------------------------
# attention


def bhsd(x):
    return x.transpose(1, 2)


def plot_grid(rows, row_key, col_key, x_key, y_key, title, ylabel, xlabel, path, env):
    rvals = sorted({r[row_key] for r in rows}, key=str)
    cvals = sorted({r[col_key] for r in rows}, key=str)
    fig, axes = new_figure(len(rvals), len(cvals), figsize=(4.2 * len(cvals), 3.2 * len(rvals)), squeeze=False)
    for i, rv in enumerate(rvals):
        for j, cv in enumerate(cvals):
            ax = axes[i][j]
            sub = [r for r in rows if r[row_key] == rv and r[col_key] == cv]
            for prov in sorted({r["provider"] for r in sub}):
                pts = sorted((r[x_key], r[y_key]) for r in sub if r["provider"] == prov)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{'' if row_key.startswith('_') else row_key + '='}{rv}  {col_key}={cv}", fontsize=9)
            ax.set_ylim(bottom=0)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title} — {env['device_name']}", fontsize=10)
    save_figure(fig, path)
