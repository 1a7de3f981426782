"""The study's Markdown report and perplexity plot, written from results.json-shaped data.

Every sentence that states a finding is chosen by comparing the measured numbers; nothing about
the outcome is fixed in advance.
"""

from __future__ import annotations

from pytorch_mqa.core.plotting import new_figure, save_figure


def _fmt_bytes(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n:.0f} B"


def summary_table(results: dict) -> str:
    """The main Markdown table: one row per variant."""
    head = ("| variant | KV heads | params | val perplexity (mean ± std) | log-prob similar | log-prob unrelated "
            "| KV cache / token | tok/s cache | tok/s no cache | max abs logit diff | greedy agree |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v in results["variants"]:
        lines.append(
            f"| {v['name']} | {v['n_kv_head']}/{v['n_head']} | {v['params']:,} | "
            f"{v['val_perplexity_mean']:.3f} ± {v['val_perplexity_std']:.3f} | {v['logprob_similar']:.3f} | "
            f"{v['logprob_unrelated']:.3f} | {_fmt_bytes(v['kv_bytes_per_token'])} | {v['tokens_per_s_cache']:.1f} | "
            f"{v['tokens_per_s_no_cache']:.1f} | {v['max_abs_logit_diff']:.2e} | "
            f"{'yes' if v['greedy_tokens_agree'] else 'NO'} |"
        )
    return "\n".join(lines)


def _by_name(results: dict) -> dict:
    return {v["name"]: v for v in results["variants"]}


def explain(results: dict) -> list[str]:
    """Plain-language paragraphs whose conclusions are computed from the numbers."""
    v = _by_name(results)
    mha, mqa = v.get("MHA"), v.get("MQA")
    out = []
    out.append(
        "**What multi-query attention is.** In standard multi-head attention (MHA) every query head has its "
        "own key and value head. Grouped-query attention (GQA) lets groups of query heads share one key/value "
        "head, and multi-query attention (MQA) goes all the way: every query head reads the same single key "
        "and value head. The queries stay as expressive as before; only the keys and values are shared."
    )
    out.append(
        "**What a KV cache is.** When a model generates text one token at a time, each new token attends to all "
        "earlier tokens. Without a cache, the keys and values of the whole prefix are recomputed at every step. "
        "A KV cache stores them once, so each step only computes the new token's keys and values. The cache "
        "grows with every token, and its size per token is proportional to the number of key/value heads, "
        "which is exactly what MQA and GQA shrink."
    )
    if mha and mqa:
        ratio = mha["kv_bytes_per_token"] / mqa["kv_bytes_per_token"]
        out.append(
            f"**Memory.** Here each token takes {_fmt_bytes(mha['kv_bytes_per_token'])} of KV cache with MHA and "
            f"{_fmt_bytes(mqa['kv_bytes_per_token'])} with MQA ({ratio:.1f}x less; values stored as "
            f"{mqa['kv_dtype'].replace('torch.', '')}). MQA also has {mha['params'] - mqa['params']:,} fewer "
            f"parameters ({mqa['params']:,} vs {mha['params']:,}), because its key/value projections are smaller."
        )
        d = mqa["val_perplexity_mean"] - mha["val_perplexity_mean"]
        spread = mqa["val_perplexity_std"] + mha["val_perplexity_std"]
        seeds = len(mha["runs"])
        direction = "higher (worse)" if d > 0 else "lower (better)"
        if seeds < 2:
            verdict = "With a single seed there is no estimate of seed-to-seed noise, so the difference is not conclusive."
        elif abs(d) <= spread:
            verdict = (f"That is within the seed-to-seed spread (the two standard deviations add up to {spread:.3f}), "
                       "so at this scale the runs cannot tell the two apart.")
        else:
            verdict = (f"That is larger than the seed-to-seed spread (the two standard deviations add up to "
                       f"{spread:.3f}), so at this scale sharing one key/value head "
                       f"{'costs' if d > 0 else 'does not cost'} quality.")
        out.append(
            f"**Quality.** Validation perplexity (lower is better; {seeds} seed{'s' if seeds != 1 else ''} each) is "
            f"{mha['val_perplexity_mean']:.3f} for MHA and {mqa['val_perplexity_mean']:.3f} for MQA: MQA is "
            f"{abs(d):.3f} ({abs(d) / mha['val_perplexity_mean']:.1%}) {direction}. {verdict}"
        )
        if "GQA" in v:
            g = v["GQA"]
            lo, hi = sorted([mha["val_perplexity_mean"], mqa["val_perplexity_mean"]])
            x = g["val_perplexity_mean"]
            where = "between MHA and MQA" if lo <= x <= hi else ("below both" if x < lo else "above both")
            out.append(
                f"GQA with {g['n_kv_head']} key/value heads reaches {x:.3f} ({where}; its seed-to-seed standard "
                f"deviation is {g['val_perplexity_std']:.3f}), with a KV cache of "
                f"{_fmt_bytes(g['kv_bytes_per_token'])} per token."
            )
        if "MQA-wide" in v:
            w = v["MQA-wide"]
            better = w["val_perplexity_mean"] < mqa["val_perplexity_mean"]
            out.append(
                f"The widened MQA model (n_embd {w['n_embd']}, {w['params']:,} parameters, close to MHA's "
                f"{mha['params']:,}) reaches {w['val_perplexity_mean']:.3f}, "
                f"{'better' if better else 'no better'} than plain MQA; its KV cache per token is "
                f"{_fmt_bytes(w['kv_bytes_per_token'])}."
            )
    gaps = [x["logprob_similar"] - x["logprob_unrelated"] for x in results["variants"]]
    n_pos = sum(g > 0 for g in gaps)
    out.append(
        f"**What the models learned.** The log-probability per token (in nats; closer to zero means the model "
        f"finds the text more predictable) is higher for sentences like the training text than for unrelated "
        f"sentences in {n_pos} of {len(gaps)} variants (gap {min(gaps):+.3f} to {max(gaps):+.3f} nats per token): "
        + ("the models have picked up the style and vocabulary of the corpus rather than English in general."
           if n_pos == len(gaps) else "the models have not clearly specialised to the corpus at this training length.")
    )
    speedups = {x["name"]: x["tokens_per_s_cache"] / x["tokens_per_s_no_cache"] for x in results["variants"]}
    faster = [n for n, s in speedups.items() if s > 1]
    gen = results["study"]["generation"]
    out.append(
        f"**Speed.** Generating {gen['new_tokens']} tokens after a {gen['prompt_tokens']}-token prompt on "
        f"{results['study']['device']}, the cache changes throughput by "
        + ", ".join(f"{s:.2f}x ({n})" for n, s in speedups.items())
        + (". The cache is faster for every variant, because each step processes one token instead of the whole prefix."
           if len(faster) == len(speedups) else
           ". The cache is not faster for every variant here: with sequences this short and a model this small, "
           "the fixed cost of each decoding call outweighs the recomputation the cache saves. Recomputation grows "
           "with the length of the prefix while a cached step does not, so longer sequences favour the cache.")
    )
    worst = max(x["max_abs_logit_diff"] for x in results["variants"])
    scale = max(x["logit_scale"] for x in results["variants"])
    agree = sum(bool(x["greedy_tokens_agree"]) for x in results["variants"])
    out.append(
        f"**Correctness of the cache.** The largest difference between logits computed through the cache and "
        f"by recomputing the whole sequence is {worst:.2e} (logits are up to {scale:.1f} in size), and greedy "
        f"decoding picks the same tokens with and without the cache for {agree} of {len(results['variants'])} "
        "variants."
    )
    return out


def render_report(results: dict) -> str:
    s = results["study"]
    p = s["preset"]
    lines = [
        "# MHA vs GQA vs MQA",
        "",
        f"Corpus: {s['corpus']} ({s['corpus_tokens']:,} tokens with the {s['tokenizer']} tokenizer, vocabulary "
        f"{s['vocab_size']}; {s['train_tokens']:,} train / {s['val_tokens']:,} validation). Models: "
        f"{p['n_layer']} layers, {p['n_head']} query heads, width {p['n_embd']}, context {p['block_size']}; "
        f"{p['max_steps']} steps of batch {p['batch_size']}, {p['seeds']} seed(s) per variant, on {s['device']} "
        f"(torch {s['torch']}, {s['threads']} thread(s)). Wall time {s['wall_seconds']:.0f} s.",
        "",
        summary_table(results),
        "",
        "Validation perplexity is exp of the mean next-token loss over the same held-out windows (up to 256 "
        "windows of the context length spread over the last 10% of the corpus) for every model. Log-probabilities are "
        "mean nats per token over two fixed lists of sentences; tokens/s (best of three timings) and logit "
        "differences come from each variant's first seed (greedy decoding, batch 1).",
        "",
        "![loss curves](loss_curves.png) ![perplexity](perplexity.png)",
        "",
        "## What the numbers show",
        "",
    ]
    for para in explain(results):
        lines += [para, ""]
    lines += ["## Samples", "", "Temperature 0.8, top-k 40, first seed of each variant.", ""]
    for v in results["variants"]:
        lines += [f"**{v['name']}**", "", "```", v["sample"], "```", ""]
    return "\n".join(lines)


def plot_perplexity(results: dict, path: str) -> None:
    """Bar chart of validation perplexity per variant, error bars = std over seeds, seeds as dots."""
    vs = results["variants"]
    fig, ax = new_figure(figsize=(5.5, 4))
    x = range(len(vs))
    ax.bar(x, [v["val_perplexity_mean"] for v in vs], yerr=[v["val_perplexity_std"] for v in vs], capsize=6,
           color=[f"C{i}" for i in x], alpha=0.8)
    for i, v in enumerate(vs):
        ax.plot([i] * len(v["runs"]), [r["val_perplexity"] for r in v["runs"]], "k.", markersize=5)
    ax.set_xticks(list(x), [f"{v['name']}\n{v['n_kv_head']} KV head(s)" for v in vs])
    lo = min(r["val_perplexity"] for v in vs for r in v["runs"])
    hi = max(r["val_perplexity"] for v in vs for r in v["runs"])
    ax.set_ylim(max(0.0, lo - 0.5 * (hi - lo) - 0.05 * lo), hi + 0.5 * (hi - lo) + 0.02 * hi)
    ax.set_ylabel("validation perplexity")
    ax.set_title("validation perplexity (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def _smooth(xs: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_loss_curves_by_variant(results: dict, path: str) -> None:
    """Training loss (moving average, solid) and periodic validation loss (dots), one colour per variant."""
    fig, ax = new_figure(figsize=(7, 4.5))
    for i, v in enumerate(results["variants"]):
        color = f"C{i % 10}"
        for j, r in enumerate(v["runs"]):
            h = r["history"]
            window = max(1, len(h["loss"]) // 25)
            ax.plot(h["step"], _smooth(h["loss"], window), color=color, linewidth=1, alpha=0.8,
                    label=f"{v['name']} train" if j == 0 else None)
            steps = [e["step"] for e in h["eval"]]
            ax.plot(steps, [e["val"] for e in h["eval"]], ":", marker="o", markersize=3, color=color, linewidth=1,
                    label=f"{v['name']} val" if j == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"loss per variant ({len(results['variants'][0]['runs'])} seeds each)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
