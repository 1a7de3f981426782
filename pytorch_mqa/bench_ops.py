"""The op microbenchmarks of `pytorch-mqa bench`: `attention` (prefill/training) and `decode`
(`attention_with_kv_cache`, Tq = 1), every pytorch_mqa backend beside PyTorch's own kernels.

Providers, per case:
- `mqa.<backend>`: `pytorch_mqa.attention` / `attention_with_kv_cache` forced to each backend
  that `available_backends(device)` lists and `ops.OP_BACKENDS` says implements the op;
- attention: `sdpa.<BACKEND>`: `F.scaled_dot_product_attention(..., enable_gqa=True)` with one SDPA
  backend forced at a time through `torch.nn.attention.sdpa_kernel`; `flex`: compiled
  FlexAttention (GPU only);
- decode: `sdpa+write`: what users do without the package, `k_cache[:, L] = k` then SDPA over
  the first L+1 rows.
A provider that cannot run a case gets a row with `ms = None` and the reason.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

from pytorch_mqa import bench
from pytorch_mqa.backends import BACKENDS, available_backends, unavailable_reason
from pytorch_mqa.ops import OP_BACKENDS

# Default shapes. GPU: the usual FlashAttention benchmark (bf16, D=128, 32 query heads, batch
# chosen so B*T = 16k tokens). CPU: the same structure, small enough for two cores.
ATTENTION_SHAPES = {
    "cuda": dict(Hq=32, D=128, Hkv=(32, 8, 1), seqlens=(1024, 2048, 4096, 8192), tokens=16384),
    "cuda_quick": dict(Hq=32, D=128, Hkv=(32, 8, 1), seqlens=(1024, 4096), tokens=16384),
    "cpu": dict(Hq=8, D=64, Hkv=(8, 2, 1), seqlens=(256, 512, 1024), tokens=1024),
    "cpu_quick": dict(Hq=8, D=64, Hkv=(8, 1), seqlens=(256,), tokens=256),
}
DECODE_SHAPES = {
    "cuda": dict(Hq=32, D=128, Hkv=(1, 8, 32), batch=(1, 16, 64), lengths=(1024, 4096, 16384)),
    "cuda_quick": dict(Hq=32, D=128, Hkv=(1, 8, 32), batch=(1, 64), lengths=(1024, 16384)),
    "cpu": dict(Hq=8, D=64, Hkv=(1, 2, 8), batch=(1, 16, 64), lengths=(1024, 4096, 16384)),
    "cpu_quick": dict(Hq=8, D=64, Hkv=(1, 8), batch=(1, 16), lengths=(1024, 4096)),
}
SDPA_BACKENDS = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
MODES = ("fwd", "fwd_bwd")

ATTENTION_COLUMNS = [("Hkv", "Hkv"), ("B", "B"), ("Tq", "T"), ("causal", "causal"), ("mode", "mode"),
                     ("provider", "provider"), ("ms", "ms"), ("p20_ms", "p20"), ("p80_ms", "p80"),
                     ("tflops", "TFLOP/s"), ("pct_peak", "% peak")]
DECODE_COLUMNS = [("Hkv", "Hkv"), ("B", "B"), ("L", "L"), ("provider", "provider"), ("ms", "ms"),
                  ("p20_ms", "p20"), ("p80_ms", "p80"), ("gbs", "GB/s"), ("pct_peak", "% peak")]


def _shapes(table: dict, device: torch.device, quick: bool, override: dict | None) -> dict:
    return override or table[device.type + ("_quick" if quick else "")]


def _budget(device: torch.device, quick: bool, shp: dict) -> float:
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


def _first_error(exc: BaseException, caught: list) -> str:
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


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _measure(fn, ctx_factory, sets, device, budget, check=None, cuda_graph=False) -> dict:
    """Run once (and check), then time `fn` rotating over `sets`. Returns timing or a reason."""
    caught: list = []
    try:
        with ctx_factory(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn(*sets[0])
            bench.synchronize(device)
            err = check(out) if check is not None else None
            del out
            call = _graphed(fn, sets, device) if cuda_graph else bench.Rotating(fn, sets)
            timing = bench.time_fn(call, device, budget)
        timing["max_abs_err"] = err
        return timing
    except Exception as exc:  # noqa: BLE001 -- a provider that fails (OOM, refusal, compile error) gets a row saying why
        _release(device)
        return {"ms": None, "reason": _first_error(exc, caught)}


def _graphed(fn, sets, device):
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
    return bench.Rotating(lambda g: g.replay(), graphs)


def _collapse_skips(rows: list[dict], suite: str, op: str) -> list[dict]:
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


def _max_err(ref):
    if ref is None:
        return None
    return lambda out: float((out.float() - ref.float()).abs().max())


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


def _bhsd(x):
    return x.transpose(1, 2)


def _sdpa(causal):
    def f(q, k, v):
        out = F.scaled_dot_product_attention(_bhsd(q), _bhsd(k), _bhsd(v), is_causal=causal, enable_gqa=True)
        return out.transpose(1, 2)

    return f


def _mqa(name, causal):
    import pytorch_mqa

    return lambda q, k, v: pytorch_mqa.attention(q, k, v, causal=causal, backend=name)


def _flex(causal, T, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Every case is a new static shape; a fresh dynamo cache keeps the recompile limit from
    # silently sending later cases to the eager (unfused) path.
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    mask = None
    if causal:
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=device)

    def f(q, k, v):
        return compiled(_bhsd(q), _bhsd(k), _bhsd(v), block_mask=mask, enable_gqa=True).transpose(1, 2)

    return f


def _with_backward(fwd):
    def f(q, k, v, dout):
        return torch.autograd.grad(fwd(q, k, v), (q, k, v), dout)

    return f


def _reference_too_big(device, B, Hq, T, mode) -> str | None:
    """The reference materialises (B, Hq, T, T) float32 scores and a few temporaries."""
    if device.type != "cuda":
        return None
    need = (4 if mode == "fwd" else 7) * B * Hq * T * T * 4
    free = torch.cuda.mem_get_info(device)[0]
    if need > 0.7 * free:
        return f"reference would need about {need / 2**30:.0f} GiB of scores, {free / 2**30:.0f} GiB free"
    return None


def run_attention(device, dtype, calib, quick, shapes=None) -> list[dict]:
    shp = _shapes(ATTENTION_SHAPES, device, quick, shapes)
    Hq, D = shp["Hq"], shp["D"]
    budget = _budget(device, quick, shp)
    backends, skipped = mqa_providers("attention", device)
    rows = [dict(suite="attention", op="attention", provider=f"mqa.{n}", case="all", ms=None, reason=r)
            for n, r in skipped]
    if device.type != "cuda":
        rows.append(dict(suite="attention", op="attention", provider="flex", case="all", ms=None,
                         reason="FlexAttention is benchmarked on GPU only (compiled Triton kernels)"))
    gen = torch.Generator(device=device).manual_seed(0)
    for Hkv in shp["Hkv"]:
        for T in shp["seqlens"]:
            B = max(1, shp["tokens"] // T)
            elt = torch.empty((), dtype=dtype).element_size()
            set_bytes = (2 * B * T * Hq * D + 2 * B * T * Hkv * D) * elt
            n_sets = bench.n_buffer_sets(set_bytes, device)
            for causal in (False, True):
                for mode in MODES:
                    grad = mode == "fwd_bwd"
                    sets = []
                    for _ in range(n_sets):
                        q, k, v, do = (torch.randn(B, T, h, D, device=device, dtype=dtype, generator=gen)
                                       for h in (Hq, Hkv, Hkv, Hq))
                        sets.append((q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad))
                                    + ((do,) if grad else ()))
                    base = dict(suite="attention", op="attention", case=f"B{B} T{T} Hq{Hq} Hkv{Hkv} D{D}",
                                B=B, Tq=T, Tk=T, Hq=Hq, Hkv=Hkv, D=D, dtype=str(dtype).replace("torch.", ""),
                                causal=causal, mode=mode, buffer_sets=n_sets)
                    flops = bench.attention_flops(B, Hq, T, T, D, causal, mode)
                    providers = [(f"mqa.{n}", _mqa(n, causal), contextlib.nullcontext) for n in backends]
                    for sb in SDPA_BACKENDS:
                        backend = getattr(torch.nn.attention.SDPBackend, sb)
                        providers.append((f"sdpa.{sb}", _sdpa(causal),
                                          lambda b=backend: torch.nn.attention.sdpa_kernel([b])))
                    if device.type == "cuda":
                        providers.append(("flex", None, contextlib.nullcontext))
                    ref_out = None
                    for name, fwd, ctx in providers:
                        row = dict(base, provider=name)
                        too_big = _reference_too_big(device, B, Hq, T, mode) if name == "mqa.reference" else None
                        if too_big:
                            rows.append(dict(row, ms=None, reason=too_big))
                            continue
                        if name == "flex":
                            try:
                                fwd = _flex(causal, T, device)
                            except Exception as exc:  # noqa: BLE001 -- recorded: FlexAttention may be absent
                                rows.append(dict(row, ms=None, reason=f"{type(exc).__name__}: {exc}"[:200]))
                                continue
                        fn = _with_backward(fwd) if grad else fwd
                        check = _max_err(ref_out) if not grad and name != "mqa.reference" else None
                        if name == "mqa.reference" and not grad:
                            with torch.no_grad():
                                ref_out = fwd(*sets[0][:3])
                        row.update(_measure(fn, ctx, sets, device, budget, check))
                        if row.get("ms"):
                            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                            row["pct_peak"] = 100 * row["tflops"] / calib["matmul_tflops"]
                        rows.append(row)
                    del sets, ref_out
                    _release(device)
    return _collapse_skips(rows, "attention", "attention")


# --------------------------------------------------------------------------------------------
# decode: attention_with_kv_cache, Tq = 1
# --------------------------------------------------------------------------------------------


def _mqa_decode(name):
    import pytorch_mqa

    def f(q, k_cache, v_cache, k, v, seqlens, L):
        return pytorch_mqa.attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, backend=name)

    return f


def _sdpa_decode(q, k_cache, v_cache, k, v, seqlens, L):
    k_cache[:, L] = k[:, 0]
    v_cache[:, L] = v[:, 0]
    out = F.scaled_dot_product_attention(_bhsd(q), _bhsd(k_cache[:, : L + 1]), _bhsd(v_cache[:, : L + 1]),
                                         enable_gqa=True)
    return out.transpose(1, 2)


def run_decode(device, dtype, calib, quick, cuda_graph=False, shapes=None) -> list[dict]:
    """Each case has B sequences holding L rows each; the call appends row L and attends L+1 rows.
    The cache is allocated with exactly L+1 rows, so a provider that reads it whole is not penalised."""
    shp = _shapes(DECODE_SHAPES, device, quick, shapes)
    Hq, D = shp["Hq"], shp["D"]
    budget = _budget(device, quick, shp)
    backends, skipped = mqa_providers("attention_with_kv_cache", device)
    rows = [dict(suite="decode", op="attention_with_kv_cache", provider=f"mqa.{n}", case="all", ms=None, reason=r)
            for n, r in skipped]
    gen = torch.Generator(device=device).manual_seed(1)
    elt = torch.empty((), dtype=dtype).element_size()
    for Hkv in shp["Hkv"]:
        for B in shp["batch"]:
            for L in shp["lengths"]:
                S = L + 1
                set_bytes = 2 * B * S * Hkv * D * elt
                n_sets = bench.n_buffer_sets(set_bytes, device)
                try:
                    sets = []
                    for _ in range(n_sets):
                        q = torch.randn(B, 1, Hq, D, device=device, dtype=dtype, generator=gen)
                        kc, vc = (torch.randn(B, S, Hkv, D, device=device, dtype=dtype, generator=gen) for _ in "kv")
                        k, v = (torch.randn(B, 1, Hkv, D, device=device, dtype=dtype, generator=gen) for _ in "kv")
                        # Lengths live on the device, as in a KVCache: no host transfer per call.
                        seqlens = torch.full((B,), L, dtype=torch.int32, device=device)
                        sets.append((q, kc, vc, k, v, seqlens, L))
                except torch.OutOfMemoryError as exc:
                    rows.append(dict(suite="decode", op="attention_with_kv_cache", provider="all", B=B, L=L, Hkv=Hkv,
                                     ms=None, reason=f"inputs do not fit: {str(exc).splitlines()[0][:120]}"))
                    _release(device)
                    continue
                base = dict(suite="decode", op="attention_with_kv_cache", case=f"B{B} L{L} Hq{Hq} Hkv{Hkv} D{D}",
                            B=B, L=L, Tq=1, Hq=Hq, Hkv=Hkv, D=D, dtype=str(dtype).replace("torch.", ""),
                            buffer_sets=n_sets, cuda_graph=cuda_graph)
                nbytes = bench.decode_bytes([L] * B, 1, Hq, Hkv, D, elt)
                providers = [(f"mqa.{n}", _mqa_decode(n)) for n in backends] + [("sdpa+write", _sdpa_decode)]
                ref_out = None
                for name, fn in providers:
                    row = dict(base, provider=name)
                    if name == "mqa.reference":
                        with torch.no_grad():
                            ref_out = fn(*sets[0])
                    check = _max_err(ref_out) if name != "mqa.reference" else None
                    row.update(_measure(fn, contextlib.nullcontext, sets, device, budget, check, cuda_graph))
                    if row.get("ms"):
                        row["gbs"] = nbytes / (row["ms"] * 1e-3) / 1e9
                        row["pct_peak"] = 100 * row["gbs"] / calib["copy_gbs"]
                    rows.append(row)
                del sets, ref_out
                _release(device)
    return _collapse_skips(rows, "decode", "attention_with_kv_cache")


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def _grid(rows, row_key, col_key, x_key, y_key, title, ylabel, xlabel, path, env):
    import matplotlib.pyplot as plt

    rvals = sorted({r[row_key] for r in rows}, key=str)
    cvals = sorted({r[col_key] for r in rows}, key=str)
    fig, axes = plt.subplots(len(rvals), len(cvals), figsize=(4.2 * len(cvals), 3.2 * len(rvals)), squeeze=False)
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention(rows, result, path):
    for r in rows:
        r["_panel"] = f"{r['mode']}{' causal' if r['causal'] else ''}"
    _grid(rows, "_panel", "Hkv", "Tq", "tflops", "attention TFLOP/s", "TFLOP/s", "sequence length",
          path, result["environment"])
    for r in rows:
        del r["_panel"]


def plot_decode(rows, result, path):
    _grid(rows, "Hkv", "B", "L", "gbs", "attention_with_kv_cache GB/s", "GB/s", "cache length L",
          path, result["environment"])
