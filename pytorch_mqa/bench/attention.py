"""`bench attention`: `pytorch_mqa.attention` (prefill/training, forward and forward+backward) on
every backend, beside `F.scaled_dot_product_attention` with each SDPA backend forced in turn and
compiled FlexAttention (GPU only); plus a sliding-window and a varlen (packed) case on the
package's backends."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import pytorch_mqa.ops as mqa_ops
from pytorch_mqa.bench import timing
from pytorch_mqa.bench.common import (budget_for, collapse_skips, plot_grid, max_err, measure, release,
                                      shapes_for, bhsd, mqa_providers)

# Default shapes. GPU: the usual FlashAttention benchmark (bf16, D=128, 32 query heads, batch
# chosen so B*T = 16k tokens). CPU: the same structure, small enough for two cores.
SHAPES = {
    "cuda": dict(Hq=32, D=128, Hkv=(32, 8, 1), seqlens=(1024, 2048, 4096, 8192), tokens=16384),
    "cuda_quick": dict(Hq=32, D=128, Hkv=(32, 8, 1), seqlens=(1024, 4096), tokens=16384),
    "cpu": dict(Hq=8, D=64, Hkv=(8, 2, 1), seqlens=(256, 512, 1024), tokens=1024),
    "cpu_quick": dict(Hq=8, D=64, Hkv=(8, 1), seqlens=(256,), tokens=256),
}
SDPA_BACKENDS = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
MODES = ("fwd", "fwd_bwd")

COLUMNS = [("Hkv", "Hkv"), ("B", "B"), ("Tq", "T"), ("causal", "causal"), ("mode", "mode"),
                     ("provider", "provider"), ("ms", "ms"), ("p20_ms", "p20"), ("p80_ms", "p80"),
                     ("tflops", "TFLOP/s"), ("pct_peak", "% peak")]


def _sdpa(causal):
    def f(q, k, v):
        out = F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v), is_causal=causal, enable_gqa=True)
        return out.transpose(1, 2)

    return f


def _mqa(name, causal):
    return lambda q, k, v: mqa_ops.attention(q, k, v, causal=causal, backend=name)


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
        return compiled(bhsd(q), bhsd(k), bhsd(v), block_mask=mask, enable_gqa=True).transpose(1, 2)

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


def run(device, dtype, calib, quick, shapes=None, **options) -> list[dict]:
    """Rows per (shape, provider); `options` are the other suites' switches (unused here)."""
    shp = shapes_for(SHAPES, device, quick, shapes)
    Hq, D = shp["Hq"], shp["D"]
    budget = budget_for(device, quick, shp)
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
            n_sets = timing.n_buffer_sets(set_bytes, device)
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
                    flops = timing.attention_flops(B, Hq, T, T, D, causal, mode)
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
                        check = max_err(ref_out) if not grad and name != "mqa.reference" else None
                        if name == "mqa.reference" and not grad:
                            with torch.no_grad():
                                ref_out = fwd(*sets[0][:3])
                        row.update(measure(fn, ctx, sets, device, budget, check))
                        if row.get("ms"):
                            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                            row["pct_peak"] = 100 * row["tflops"] / calib["matmul_tflops"]
                        rows.append(row)
                    del sets, ref_out
                    release(device)
    rows += _variant_cases(device, dtype, shp, backends, budget, gen, calib)
    return collapse_skips(rows, "attention", "attention")


# The variant cases: a Mistral-style sliding window, and packed (varlen) sequences of mixed lengths.
WINDOW = 256


def _variant_cases(device, dtype, shp, backends, budget, gen, calib) -> list[dict]:
    """One sliding-window (causal, window (WINDOW, 0)) and one varlen case (lengths T, T/2, T/4,
    ... packed, causal) at the longest sequence length and the first Hkv, fwd and fwd_bwd, on
    every mqa backend. FLOPs count only the visible keys (the window's, each sequence's own)."""
    Hq, D, Hkv, T = shp["Hq"], shp["D"], shp["Hkv"][0], max(shp["seqlens"])
    B = max(1, shp["tokens"] // T)
    lens = [max(1, T >> i) + 3 for i in range(4)]  # not multiples of any block size
    rows = []
    for case in ("window", "varlen"):
        for mode in MODES:
            grad = mode == "fwd_bwd"
            if case == "window":
                shapes = [(B, T, h, D) for h in (Hq, Hkv, Hkv, Hq)]
                visible = sum(min(i + 1, WINDOW + 1) for i in range(T))
                flops = 4.0 * B * Hq * visible * D * (3.5 if grad else 1.0)
                label = f"B{B} T{T} Hq{Hq} Hkv{Hkv} D{D} window({WINDOW},0)"
            else:
                shapes = [(sum(lens), h, D) for h in (Hq, Hkv, Hkv, Hq)]
                flops = sum(4.0 * Hq * n * (n + 1) / 2 * D for n in lens) * (3.5 if grad else 1.0)
                label = f"varlen {'+'.join(map(str, lens))} Hq{Hq} Hkv{Hkv} D{D}"
            q, k, v, do = (torch.randn(sh, device=device, dtype=dtype, generator=gen) for sh in shapes)
            sets = [(q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad)) + ((do,) if grad else ())]
            cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
            for name in backends:
                if case == "window":
                    fwd = (lambda n: lambda a, b, c: mqa_ops.attention(a, b, c, causal=True, window_size=(WINDOW, 0),
                                                                      backend=n))(name)
                else:
                    fwd = (lambda n: lambda a, b, c: mqa_ops.attention_varlen(a, b, c, cu, cu, max(lens), max(lens),
                                                                             causal=True, backend=n))(name)
                row = dict(suite="attention", op="attention", case=label, B=B, Tq=T, Tk=T, Hq=Hq, Hkv=Hkv, D=D,
                           dtype=str(dtype).replace("torch.", ""), causal=True, mode=mode, provider=f"mqa.{name}",
                           variant=case, buffer_sets=1)
                row.update(measure(_with_backward(fwd) if grad else fwd, contextlib.nullcontext, sets, device, budget))
                if row.get("ms"):
                    row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                    row["pct_peak"] = 100 * row["tflops"] / calib["matmul_tflops"]
                rows.append(row)
            del sets
            release(device)
    return rows


def plot(rows, result, path):
    rows = [r for r in rows if "variant" not in r]  # the plot is the dense grid; variant cases are in the table
    for r in rows:
        r["_panel"] = f"{r['mode']}{' causal' if r['causal'] else ''}"
    plot_grid(rows, "_panel", "Hkv", "Tq", "tflops", "attention TFLOP/s", "TFLOP/s", "sequence length",
          path, result["environment"])
    for r in rows:
        del r["_panel"]
