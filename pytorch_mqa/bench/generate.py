"""The end-to-end benchmark of `pytorch-mqa bench generate`: greedy generation tokens/s of a
GPT-2-shaped model with the KV cache, without it (the whole prefix recomputed each step), and
Hugging Face `transformers` GPT2LMHeadModel on the same weights when it is installed.

The weights are random: an HF `GPT2LMHeadModel` is built offline from a `GPT2Config`, written with
`save_pretrained`, and loaded into our GPT with `GPT.from_pretrained`, so both run the same
network. Without transformers our GPT is built from a GPTConfig and the HF row says why it is
missing. The greedy tokens of every provider are compared with the cached run's.

The CPU shape set is the small model the ratios are quoted for; both runs add rows at GPT-2
small's shape (cached, compiled and HF only: recomputing every prefix of a 124M model takes
minutes on two cores), 64 new tokens in the full run and 8 with --quick. Runs are timed round-robin by `pytorch_mqa.core.timing`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from functools import partial

import torch

from pytorch_mqa.core.devices import synchronize
from pytorch_mqa.core.plotting import new_figure, save_figure
from pytorch_mqa.core.timing import time_round_robin
from pytorch_mqa.model import GPT, GPTConfig, generate

# CPU: a small GPT-2 on two threads (plus GPT-2 small's shape in the full run); GPU: GPT-2 small
# (124M). `extra` names shape sets run after this one, on its threads; `uncached=False` leaves
# out the recomputing provider.
SHAPES = {
    "cpu": dict(n_layer=4, n_head=8, n_embd=256, vocab_size=4096, block_size=1024, prompt=16, new_tokens=256,
                repeats=3, threads=2, mqa_kv_heads=(1,), extra=("cpu_gpt2_small",)),
    # quick: 32 new tokens, since the uncached run costs the sum of all prefix lengths.
    "cpu_quick": dict(n_layer=4, n_head=8, n_embd=256, vocab_size=4096, block_size=1024, prompt=16, new_tokens=32,
                      repeats=3, threads=2, mqa_kv_heads=(1,), extra=("cpu_gpt2_small_quick",)),
    "cpu_gpt2_small": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024, prompt=16,
                           new_tokens=64, repeats=3, threads=2, mqa_kv_heads=(1,), uncached=False),
    # quick: GPT-2 small's shape with a few new tokens (each step streams its 0.5 GB of weights).
    "cpu_gpt2_small_quick": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024, prompt=16,
                                 new_tokens=8, repeats=2, threads=2, mqa_kv_heads=(), uncached=False),
    "cuda": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024, prompt=16, new_tokens=256,
                 repeats=3, threads=None, mqa_kv_heads=(4, 1)),
    "cuda_quick": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024, prompt=16,
                       new_tokens=256, repeats=1, threads=None, mqa_kv_heads=(1,)),
}

COLUMNS = [("model", "model"), ("provider", "provider"), ("n_kv_head", "n_kv_head"), ("new_tokens", "new tokens"),
           ("seconds", "s"), ("tokens_per_s", "tok/s"), ("same_tokens", "same tokens"),
           ("compile_seconds", "compile s")]


WARMUP_TOKENS = 8


def _build_models(shp: dict, device, dtype, workdir: str):
    """(our GPT, HF model or None, reason HF is missing or None) with the same random weights."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as exc:
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=shp["vocab_size"], block_size=shp["block_size"], n_layer=shp["n_layer"],
                        n_head=shp["n_head"], n_kv_head=shp["n_head"], n_embd=shp["n_embd"])
        ours = GPT(cfg).to(device=device, dtype=dtype).eval()
        ours.save_pretrained(workdir)
        return ours, None, f"transformers is not installed ({exc})"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # No BOS/EOS: greedy decoding then runs the full length with nothing masked.
    hf_cfg = GPT2Config(vocab_size=shp["vocab_size"], n_positions=shp["block_size"], n_embd=shp["n_embd"],
                        n_layer=shp["n_layer"], n_head=shp["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    hf.save_pretrained(workdir)
    hf = hf.to(device=device, dtype=dtype)
    ours = GPT.from_pretrained(workdir, dtype=dtype, device=device).eval()
    return ours, hf, None


def run(device, dtype, calib, quick, shapes=None, compile=False, **options) -> list[dict]:
    """Rows per provider; compile=True adds "mqa.compiled", generate(compile=True), whose one-time
    compilation (its first call) is timed apart as compile_seconds and left out of tok/s. The
    shape sets named in the set's `extra` follow, on its thread count."""
    shp = shapes or SHAPES[device.type + ("_quick" if quick else "")]
    rows = _run_shape(device, dtype, shp, compile)
    for name in shp.get("extra", ()):
        rows += _run_shape(device, dtype, dict(SHAPES[name], threads=shp.get("threads")), compile)
    return rows


def _run_shape(device, dtype, shp: dict, compile: bool) -> list[dict]:
    dtype = dtype if device.type == "cuda" else torch.float32  # the CPU path computes in float32
    old_threads = torch.get_num_threads()
    if device.type == "cpu" and shp.get("threads"):
        torch.set_num_threads(shp["threads"])
    base = dict(suite="generate", op="generate", model=f"{shp['n_layer']}x{shp['n_embd']}", n_layer=shp["n_layer"],
                n_head=shp["n_head"], n_embd=shp["n_embd"], vocab_size=shp["vocab_size"], prompt=shp["prompt"],
                new_tokens=shp["new_tokens"], batch=1, dtype=str(dtype).replace("torch.", ""),
                threads=torch.get_num_threads() if device.type == "cpu" else None)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as workdir, torch.inference_mode():
            ours, hf, hf_reason = _build_models(shp, device, dtype, workdir)
            gen = torch.Generator().manual_seed(0)
            prompt = torch.randint(0, shp["vocab_size"], (1, shp["prompt"]), generator=gen).to(device)
            n_new = shp["new_tokens"]

            def ours_fn(model, use_cache, compile=False):
                return lambda n: generate(model, prompt, n, temperature=0, use_cache=use_cache, compile=compile)[0]

            providers = [("mqa.cached", shp["n_head"], ours_fn(ours, True))]
            if shp.get("uncached", True):
                providers.append(("mqa.uncached", shp["n_head"], ours_fn(ours, False)))
            first_call = None
            if compile:
                # The graph is specialised to the cache shape, so the warm-up is a full-length run.
                providers.append(("mqa.compiled", shp["n_head"], ours_fn(ours, True, compile=True)))
                synchronize(device)
                t0 = time.perf_counter()
                providers[-1][2](n_new)
                synchronize(device)
                first_call = time.perf_counter() - t0
            for n_kv in shp.get("mqa_kv_heads", ()):
                if n_kv != shp["n_head"]:
                    # The same weights with K/V heads mean-pooled per group: the tokens differ.
                    conv = GPT.from_pretrained(workdir, n_kv_head=n_kv, dtype=dtype, device=device).eval()
                    providers.append(("mqa.cached", n_kv, ours_fn(conv, True)))
            if hf is not None:
                def hf_fn(n):
                    out = hf.generate(prompt, max_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
                    return out[0, prompt.shape[1]:].tolist()

                providers.append(("hf.transformers", shp["n_head"], hf_fn))
            else:
                rows.append(dict(base, provider="hf.transformers", n_kv_head=shp["n_head"], seconds=None,
                                 reason=hf_reason))
            reference_tokens = None
            timed = time_round_robin(
                [partial(fn, n_new) for _, _, fn in providers],
                shp["repeats"],
                warmups=[None if name == "mqa.compiled" else partial(fn, min(WARMUP_TOKENS, n_new))
                         for name, _, fn in providers],
                sync=partial(synchronize, device),
            )
            for (name, n_kv, _), (times, tokens) in zip(providers, timed):
                seconds = statistics.median(times)
                row = dict(base, provider=name, n_kv_head=n_kv, seconds=seconds, tokens_per_s=n_new / seconds,
                           best_seconds=min(times), repeats=len(times))
                if reference_tokens is None:
                    reference_tokens = tokens
                elif n_kv == shp["n_head"]:
                    row["same_tokens"] = tokens == reference_tokens
                if name == "mqa.compiled":
                    row["compile_seconds"] = first_call - seconds  # the first call less a timed run
                if name == "hf.transformers":
                    row["attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
                rows.append(row)
    finally:
        torch.set_num_threads(old_threads)
    _add_ratios(rows, shp["n_head"])
    return rows


def _add_ratios(rows: list[dict], n_head: int) -> None:
    """On the MHA cached row: cached/uncached and cached/HF tokens-per-second ratios."""
    by = {r["provider"]: r for r in rows if r.get("n_kv_head") == n_head and r.get("tokens_per_s")}
    cached = by.get("mqa.cached")
    if cached is None:
        return
    for key, other in (("x_vs_uncached", "mqa.uncached"), ("x_vs_hf", "hf.transformers")):
        if other in by:
            cached[key] = cached["tokens_per_s"] / by[other]["tokens_per_s"]
    compiled = by.get("mqa.compiled")
    if compiled is not None:
        for key, other in (("x_vs_uncached", "mqa.uncached"), ("x_vs_hf", "hf.transformers")):
            if other in by:
                compiled[key] = compiled["tokens_per_s"] / by[other]["tokens_per_s"]


def summary(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        name = f"{r.get('model', '')} {'compiled' if r['provider'] == 'mqa.compiled' else 'cached'}".strip()
        if "x_vs_uncached" in r:
            lines.append(f"{name} / uncached: {r['x_vs_uncached']:.2f}x")
        if "x_vs_hf" in r:
            lines.append(f"{name} / HF transformers: {r['x_vs_hf']:.2f}x")
        if r.get("compile_seconds") is not None:
            lines.append(f"{name}: compile (once, not in tok/s): {r['compile_seconds']:.1f} s")
    return "\n".join(lines)


def plot(rows, result, path):
    labels = [f"{r.get('model', '')} {r['provider']}\n(n_kv_head={r['n_kv_head']})" for r in rows]
    fig, ax = new_figure(figsize=(1.8 * len(rows) + 2, 3.5))
    ax.bar(labels, [r["tokens_per_s"] for r in rows])
    ax.set_ylabel("tokens/s")
    ax.set_title(f"greedy generation (model: layers x width), batch 1 — {result['environment']['device_name']}",
                 fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    save_figure(fig, path)
