"""The study's Markdown report and perplexity plot, written from results.json-shaped data.

Every sentence that states a finding is chosen by comparing the measured numbers; nothing about
the outcome is fixed in advance. Seed-to-seed noise is read one way everywhere: each quantity is
the mean over seeds ± the half-width of its 95% Student t confidence interval, and two variants
are called different only when their intervals do not overlap.
"""

from __future__ import annotations

import math
import statistics

from pytorch_mqa.core.plotting import new_figure, save_figure

CI_LEVEL = 0.95
CI_NAME = "95% Student t confidence interval over seeds"
# t quantiles t_{0.975, df} for df = 1..30 (standard tables); beyond, 1.96 + 2.5 / df is within 0.002.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError(f"df: expected at least 1 degree of freedom, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.5 / df


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student t interval); the half-width is NaN for a single value."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, math.nan
    return m, t_quantile_975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def separated(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two (mean, half-width) intervals do not overlap (never, when either is unknown)."""
    (ma, ha), (mb, hb) = a, b
    if math.isnan(ha) or math.isnan(hb):
        return False
    return ma + ha < mb - hb or mb + hb < ma - ha


def _ci(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _half_width(v: dict) -> float:
    x = v.get("val_perplexity_ci")  # None (null in results.json) for a single seed
    return math.nan if x is None else x


def _ppl(v: dict) -> tuple[float, float]:
    return v["val_perplexity_mean"], _half_width(v)


def compare(name_a: str, a: tuple[float, float], name_b: str, b: tuple[float, float], lower_is_better=True) -> str:
    """One clause comparing two (mean, half-width) results by the rule above."""
    if math.isnan(a[1]) or math.isnan(b[1]):
        return (f"with one seed there is no interval, so {name_a} ({a[0]:.3f}) and {name_b} ({b[0]:.3f}) cannot be "
                "told apart")
    if not separated(a, b):
        return (f"{name_a} ({a[0]:.3f} ± {a[1]:.3f}) and {name_b} ({b[0]:.3f} ± {b[1]:.3f}) are not distinguishable: "
                "their intervals overlap")
    better = (a[0] < b[0]) == lower_is_better
    return (f"{name_a} ({a[0]:.3f} ± {a[1]:.3f}) is {'better' if better else 'worse'} than {name_b} "
            f"({b[0]:.3f} ± {b[1]:.3f}): the intervals do not overlap")


def _fmt_bytes(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n:.0f} B"


def summary_table(results: dict) -> str:
    """The main Markdown table: one row per variant."""
    head = ("| variant | KV heads | params | val perplexity (mean ± 95% CI) | log-prob in-domain | log-prob control "
            "| KV cache / token | tok/s cache | tok/s no cache | max abs logit diff | greedy agree |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    b = results.get("baseline")
    if b:
        ci = math.nan if b["val_perplexity_ci"] is None else b["val_perplexity_ci"]
        lines.append(f"| bigram (baseline) | none | {b['params']:,} | {b['val_perplexity_mean']:.3f} ± {_ci(ci)} | "
                     f"{b['logprob_similar']:.3f} | {b['logprob_unrelated']:.3f} | none | — | — | — | — |")
    for v in results["variants"]:
        lines.append(
            f"| {v['name']} | {v['n_kv_head']}/{v['n_head']} | {v['params']:,} | "
            f"{v['val_perplexity_mean']:.3f} ± {_ci(_half_width(v))} | "
            f"{v['logprob_similar']:.3f} | "
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
        seeds = len(mha["runs"])
        d = mqa["val_perplexity_mean"] - mha["val_perplexity_mean"]
        verdict = compare("MQA", _ppl(mqa), "MHA", _ppl(mha))
        if separated(_ppl(mqa), _ppl(mha)):
            verdict += f", so at this scale sharing one key/value head {'costs' if d > 0 else 'does not cost'} quality"
        out.append(
            f"**Quality.** Validation perplexity (lower is better; {seeds} seed{'s' if seeds != 1 else ''} each; "
            f"± is the half-width of the {CI_NAME}, and two variants are called different only when their intervals "
            f"do not overlap) is {mha['val_perplexity_mean']:.3f} for MHA and {mqa['val_perplexity_mean']:.3f} for "
            f"MQA, a difference of {abs(d):.3f} ({abs(d) / mha['val_perplexity_mean']:.1%}): {verdict}."
        )
        if "GQA" in v:
            g = v["GQA"]
            out.append(
                f"GQA with {g['n_kv_head']} key/value heads (a KV cache of {_fmt_bytes(g['kv_bytes_per_token'])} "
                f"per token): {compare('GQA', _ppl(g), 'MHA', _ppl(mha))}; {compare('GQA', _ppl(g), 'MQA', _ppl(mqa))}."
            )
        if "MQA-wide" in v:
            w = v["MQA-wide"]
            out.append(
                f"The widened MQA model (n_embd {w['n_embd']}, {w['params']:,} parameters, close to MHA's "
                f"{mha['params']:,}; KV cache {_fmt_bytes(w['kv_bytes_per_token'])} per token): "
                f"{compare('MQA-wide', _ppl(w), 'MQA', _ppl(mqa))}."
            )
        gap = val_below_train(results)
        if gap:
            out.append(gap)
    sent = results["study"].get("sentences", {})
    source = sent.get("in_domain_source", "held-out split")
    in_domain = ("in-domain sentences drawn from the held-out split of this corpus (text the models never trained on)"
                 if source == "held-out split" else f"the sentences of {source}")
    gaps = {x["name"]: mean_ci([r["logprob_similar"] - r["logprob_unrelated"] for r in x["runs"]])
            for x in results["variants"]}
    n_pos = sum(separated(g, (0.0, 0.0)) and g[0] > 0 for g in gaps.values())
    n_neg = sum(separated(g, (0.0, 0.0)) and g[0] < 0 for g in gaps.values())
    if n_pos == len(gaps):
        reading = ("every model finds them more predictable than the control sentences: they have picked up the style "
                   "and vocabulary of the corpus rather than English in general.")
    elif n_neg == len(gaps):
        reading = ("every model finds them less predictable than the control sentences, so by this measure they are not "
                   "closer to what the models learned than everyday English.")
    else:
        reading = (f"by that rule {n_pos} of {len(gaps)} variants clearly prefer them and {n_neg} clearly prefer the "
                   "control sentences; the rest cannot be told apart at this training length.")
    out.append(
        "**What the models learned.** The log-probability per token (in nats; closer to zero means the model "
        f"finds the text more predictable) of {in_domain}, minus that of the fixed everyday-English control sentences, "
        "is " + ", ".join(f"{g[0]:+.3f} ± {_ci(g[1])} ({n})" for n, g in gaps.items())
        + f"; it is above zero beyond its interval in {n_pos} of {len(gaps)} variants: " + reading
        + " Every sentence and the log-probability of each of its tokens are listed under *Scored sentences*."
        + _unknown_note(results)
    )
    b = results.get("baseline")
    if b:
        bci = math.nan if b["val_perplexity_ci"] is None else b["val_perplexity_ci"]
        below = [x["name"] for x in results["variants"]
                 if separated(_ppl(x), (b["val_perplexity_mean"], bci)) and x["val_perplexity_mean"] < b["val_perplexity_mean"]]
        out.append(
            f"**Against the bigram floor.** A bigram model (each token predicted from the one before it alone, "
            f"{b['params']:,} parameters, trained by the same loop on the same batches) reaches a validation perplexity of "
            f"{b['val_perplexity_mean']:.3f} ± {_ci(bci)}. "
            + (f"All {len(below)} transformer variants are below it beyond their intervals: they use more context than "
               "one token." if len(below) == len(results["variants"]) else
               f"{len(below)} of {len(results['variants'])} transformer variants ({', '.join(below) or 'none'}) are "
               "below it beyond their intervals; the others have not yet learned more than the previous token tells.")
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


def val_below_train(results: dict) -> str:
    """A paragraph explaining validation loss below training loss, for the variants where it happens."""
    low = [(x["name"], statistics.fmean(r["val_loss"] for r in x["runs"]),
            statistics.fmean(r["train_loss"] for r in x["runs"])) for x in results["variants"]]
    low = [t for t in low if t[1] < t[2]]
    if not low:
        return ""
    s = results["study"]
    dropout = s.get("base_config", {}).get("dropout", 0.0)
    drop = ("Dropout is 0 in these models, so it plays no part."
            if not dropout else
            f"Dropout ({dropout}) is on while training and off at evaluation: the per-step training losses of the "
            "loss curves are higher partly for that reason, but both numbers here are measured with it off.")
    return (
        "**Validation below training loss.** For " + ", ".join(f"{n} (val {a:.3f} vs train {b:.3f} nats)"
                                                               for n, a, b in low)
        + " the validation loss is the lower one. That is not leakage: the validation split is the last 10% of the "
        "corpus, different text from the training split, and can simply be easier to predict; the two are also "
        f"measured differently (training loss on {s['preset'].get('eval_iters', '?')} random batches of the training "
        "split at the last evaluation, validation loss on up to 256 fixed windows spread over the validation split). "
        + drop
    )


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
        f"mean nats per token over the in-domain sentences ({s.get('sentences', {}).get('in_domain_source', '?')}) and "
        "the control sentences (fixed everyday English), averaged over seeds; tokens/s (best of three timings) and "
        "logit differences come from each variant's first seed (greedy decoding, batch 1).",
        "",
        "![loss curves](loss_curves.png) ![perplexity](perplexity.png)",
        "",
        "## What the numbers show",
        "",
    ]
    for para in explain(results):
        lines += [para, ""]
    lines += scored_sentences(results)
    lines += ["## Samples", "", "Temperature 0.8, top-k 40, first seed of each variant.", ""]
    for v in results["variants"]:
        lines += [f"**{v['name']}**", "", "```", v["sample"], "```", ""]
    return "\n".join(lines)


def _unknown_note(results: dict) -> str:
    """A sentence on unknown tokens in the scored sentences, where there are any."""
    first = results["variants"][0]["runs"][0]["sentences"]
    counts = {k: (sum(x.get("unknown", 0) for x in v), sum(len(x["logprobs"]) for x in v)) for k, v in first.items()}
    if not any(u for u, _ in counts.values()):
        return ""
    parts = [f"{u} of the {n} scored {'in-domain' if k == 'in_domain' else 'control'} tokens" for k, (u, n) in
             counts.items() if u]
    return (" Of these, " + " and ".join(parts) + " are the tokenizer's unknown token, one frequent id that is easy to "
            "predict: it makes the sentences holding it look more predictable than their words are.")


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def scored_sentences(results: dict) -> list[str]:
    """Every scored sentence: mean log-prob per token for each variant (over seeds), and the first seed's
    log-probability of each token."""
    models = list(results["variants"]) + ([results["baseline"]] if results.get("baseline") else [])
    sent = results["study"].get("sentences", {})
    lines = ["## Scored sentences", "",
             "Log-probability (nats) per predicted token; the first token of a sentence has no prediction. "
             "Per-token values are the first seed's.", ""]
    for key, title in (("in_domain", f"In-domain ({sent.get('in_domain_source', '?')})"),
                       ("control", "Control (fixed everyday English)")):
        lines += [f"### {title}", ""]
        for i, text in enumerate(sent.get(key, [])):
            lines += [f"{i + 1}. \"{_md(text)}\"", "", "   | model | mean log-prob / token | per token (first seed) |",
                      "   |---|---|---|"]
            for m in models:
                runs = [r["sentences"][key][i] for r in m["runs"]]
                means = [r["mean"] for r in runs if r["mean"] is not None]
                mean = f"{statistics.fmean(means):.3f}" if means else "n/a"
                first = runs[0]
                toks = " ".join(f"`{_md(t)}` {lp:.2f}" for t, lp in zip(first["tokens"][1:], first["logprobs"]))
                lines.append(f"   | {m['name']} | {mean} | {toks} |")
            lines.append("")
    return lines


def plot_perplexity(results: dict, path: str) -> None:
    """Bar chart of validation perplexity per variant, error bars = 95% t interval over seeds, seeds as dots."""
    vs = results["variants"]
    fig, ax = new_figure(figsize=(5.5, 4))
    x = range(len(vs))
    errs = [0.0 if math.isnan(_half_width(v)) else _half_width(v) for v in vs]
    ax.bar(x, [v["val_perplexity_mean"] for v in vs], yerr=errs, capsize=6,
           color=[f"C{i}" for i in x], alpha=0.8)
    for i, v in enumerate(vs):
        ax.plot([i] * len(v["runs"]), [r["val_perplexity"] for r in v["runs"]], "k.", markersize=5)
    ax.set_xticks(list(x), [f"{v['name']}\n{v['n_kv_head']} KV head(s)" for v in vs])
    lo = min([r["val_perplexity"] for v in vs for r in v["runs"]] + [v["val_perplexity_mean"] - e for v, e in zip(vs, errs)])
    hi = max([r["val_perplexity"] for v in vs for r in v["runs"]] + [v["val_perplexity_mean"] + e for v, e in zip(vs, errs)])
    ax.set_ylim(max(0.0, lo - 0.5 * (hi - lo) - 0.05 * lo), hi + 0.5 * (hi - lo) + 0.02 * hi)
    ax.set_ylabel("validation perplexity")
    ax.set_title("validation perplexity (mean ± 95% t interval over seeds)")
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
