"""`pytorch-mqa study`: MHA vs GQA vs MQA trained the same way on the same text, over several seeds.

Every variant has the same width and depth and differs only in its number of KV heads (plus an
optional MQA variant widened to MHA's parameter count). For each it measures validation
perplexity, the log-probability of every token of two sets of sentences (in-domain ones drawn
from the held-out split of the corpus actually used, or the user's own from --sentences, and a
fixed set of everyday-English control sentences), KV-cache bytes per token, generation speed with
and without the cache, and how far cached logits are from recomputed ones. A bigram model trained
by the same fit() on the same batches gives the perplexity floor. Writes report.md, results.json
and PNG plots to --out.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import asdict, replace

import torch

from pytorch_mqa.model import GPT, GPTConfig
from pytorch_mqa.model.bigram import BigramConfig, BigramLM
from pytorch_mqa.ops.backends import use_backend
from pytorch_mqa.study.metrics import (generation_checks, heldout_loss, heldout_sentences, kv_bytes_per_token,
                                      sample_text, sentence_scores)
from pytorch_mqa.study.report import CI_NAME, mean_ci, plot_loss_curves_by_variant, plot_perplexity, render_report
from pytorch_mqa.training.data import load_corpus
from pytorch_mqa.training.loop import LMBatches, TrainConfig, fit
from pytorch_mqa.training.tokenizers import get_tokenizer, load_tokenizer

# The control set: everyday English, scored by every variant whatever the corpus.
UNRELATED_SENTENCES = [
    "My grandmother grew tomatoes and basil in a sunny garden behind her house.",
    "The orchestra tuned their violins while the audience found their seats.",
    "We hiked along the ridge until the fog rolled in over the valley below.",
    "Fresh bread smells wonderful when it comes out of a hot oven in winter.",
    "The goalkeeper jumped to his left and caught the ball with both hands.",
    "Seagulls circled above the harbour as the fishing boats came home at dusk.",
]

PRESETS = {
    # Under two minutes on a 2-core CPU: characters, a tiny model, two seeds.
    "quick": dict(tokenizer="char", n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=16, max_steps=160,
                  lr=3e-3, warmup_steps=20, eval_interval=40, eval_iters=4, seeds=2, gen_tokens=48),
    # Under fifteen minutes on a 2-core CPU: a 1024-token BPE trained on the corpus, three seeds.
    "default": dict(tokenizer="bpe", vocab_size=1024, n_layer=3, n_head=4, n_embd=96, block_size=64, batch_size=16,
                    max_steps=500, lr=2e-3, warmup_steps=40, eval_interval=100, eval_iters=4, seeds=3, gen_tokens=48),
}
# Training settings every preset shares unless overridden (study --dropout/--weight-decay/--schedule).
TRAIN_DEFAULTS = dict(dropout=0.0, weight_decay=0.1, schedule="cosine", bigram_lr=0.1)
N_HELDOUT_SENTENCES = 6


def kv_variants(n_head: int, gqa_kv: int | None) -> list[tuple[str, int]]:
    """(name, n_kv_head) for MHA, GQA (a middle divisor of n_head unless given) and MQA."""
    divisors = [d for d in range(1, n_head + 1) if n_head % d == 0]
    if gqa_kv is None:
        gqa_kv = divisors[len(divisors) // 2]
    if n_head % gqa_kv:
        raise ValueError(f"n_kv_head: expected a divisor of n_head = {n_head}, got {gqa_kv}")
    out = [("MHA", n_head)]
    if 1 < gqa_kv < n_head:
        out.append(("GQA", gqa_kv))
    out.append(("MQA", 1))
    return out


def count_params(config) -> int:
    with torch.device("meta"):
        return GPT(config).num_params(non_embedding=False)


def matched_width(config, target: int) -> int:
    """The n_embd (a multiple of n_head) whose parameter count is closest to `target`."""
    
    best = None
    for n_embd in range(config.n_embd, 4 * config.n_embd + 1, config.n_head):
        n = count_params(replace(config, n_embd=n_embd))
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (n_embd, n)
        if n > target:
            break
    return best[0]


# ----------------------------------------------------------------------------------- measurements














def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# ---------------------------------------------------------------------------------------- the study


def _logprob(scores: list[dict]) -> float:
    """Mean log-probability per predicted token over all the sentences' tokens."""
    n = sum(len(x["logprobs"]) for x in scores)
    return sum(x["sum"] for x in scores) / max(n, 1)


def _train_config(p: dict, seed: int, device, progress: bool, desc: str, **over) -> TrainConfig:
    kw = dict(max_steps=p["max_steps"], batch_size=p["batch_size"], lr=p["lr"], warmup_steps=p["warmup_steps"],
              eval_interval=p["eval_interval"], eval_iters=p["eval_iters"], schedule=p["schedule"],
              weight_decay=p["weight_decay"], seed=seed, device=device, progress=progress, desc=desc)
    return TrainConfig(**{**kw, **over})


def _train_one(job: dict, tokenizer, batches: LMBatches) -> dict:
    """Train one (variant, seed) and measure what depends on the weights; runs in a worker or in-process."""
    config, seed, p, device = job["config"], job["seed"], job["preset"], job["device"]
    torch.manual_seed(seed)
    model = GPT(config)
    history = fit(model, batches, _train_config(p, seed, device, job["progress"], f"{job['name']} seed {seed}"))
    val_loss = heldout_loss(model, batches.val, config.block_size, device)
    sentences = {k: sentence_scores(model, tokenizer, v, device) for k, v in job["sentences"].items()}
    run = {"seed": seed, "train_loss": history["eval"][-1]["train"], "val_loss": val_loss,
           "val_perplexity": math.exp(val_loss), "train_seconds": history["seconds"],
           "logprob_similar": _logprob(sentences["in_domain"]),
           "logprob_unrelated": _logprob(sentences["control"]),
           "sentences": sentences, "history": history}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()} if job["keep_weights"] else None
    return {"run": run, "state": state}


def train_bigram(p: dict, tokenizer, batches: LMBatches, sentences: dict, seeds: list[int], device,
                 progress: bool) -> dict:
    """The baseline row: a BigramLM trained by the same fit() on the same batches, one run per seed.

    Its own learning rate (p["bigram_lr"], no weight decay): a lookup table needs a far larger step
    than a transformer to converge in the same number of steps.
    """
    runs = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = BigramLM(BigramConfig(tokenizer.vocab_size, p["block_size"]))
        cfg = _train_config(p, seed, device, progress, f"bigram seed {seed}", lr=p["bigram_lr"], weight_decay=0.0)
        history = fit(model, batches, cfg)
        val_loss = heldout_loss(model, batches.val, p["block_size"], device)
        scores = {k: sentence_scores(model, tokenizer, v, device) for k, v in sentences.items()}
        runs.append({"seed": seed, "train_loss": history["eval"][-1]["train"], "val_loss": val_loss,
                     "val_perplexity": math.exp(val_loss), "train_seconds": history["seconds"],
                     "logprob_similar": _logprob(scores["in_domain"]), "logprob_unrelated": _logprob(scores["control"]),
                     "sentences": scores, "history": history})
    ppl = [r["val_perplexity"] for r in runs]
    ci = mean_ci(ppl)[1]
    return {"name": "bigram", "params": model.num_params(), "lr": p["bigram_lr"],
            "val_perplexity_mean": statistics.fmean(ppl), "val_perplexity_ci": None if math.isnan(ci) else ci,
            "val_loss_mean": statistics.fmean(r["val_loss"] for r in runs),
            "logprob_similar": statistics.fmean(r["logprob_similar"] for r in runs),
            "logprob_unrelated": statistics.fmean(r["logprob_unrelated"] for r in runs), "runs": runs}


_WORKER: dict = {}


def _worker_init(tokenizer_dir: str, ids: torch.Tensor, batch_size: int, block_size: int, threads: int) -> None:
    torch.set_num_threads(threads)  # a worker process of its own: set for its lifetime
    _WORKER.update(tokenizer=load_tokenizer(tokenizer_dir), batches=LMBatches(ids, batch_size, block_size))


def _worker_run(job: dict) -> dict:
    with use_backend(job["backend"]):
        return _train_one(job, _WORKER["tokenizer"], _WORKER["batches"])


def _run_jobs(jobs: list[dict], tokenizer, batches: LMBatches, ids: torch.Tensor, n_workers: int):
    """Yields (job, result) as runs finish: in this process, or in `n_workers` spawned processes."""
    if n_workers <= 1:
        for job in jobs:
            yield job, _train_one(job, tokenizer, batches)
        return
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer.save(tok_dir)
        init_args = (tok_dir, ids, batches.batch_size, batches.block_size, torch.get_num_threads())
        with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_worker_init, initargs=init_args) as pool:
            futures = {pool.submit(_worker_run, {**job, "progress": False}): job for job in jobs}
            for fut in concurrent.futures.as_completed(futures):
                yield futures[fut], fut.result()


def run_study(p: dict, out_dir: str, *, corpus: str | None = None, device: str = "cpu", progress: bool = True,
              match_params: bool = False, gqa_kv: int | None = None, base_seed: int = 0, vocab_size=None,
              jobs: int = 1, backend: str = "auto", sentences: list[str] | None = None,
              sentences_source: str | None = None, tokenizer_dir: str | None = None,
              word_split: str = "whitespace") -> dict:
    """Train every variant for every seed with preset/params `p`, measure, and write the outputs.

    `jobs` > 1 trains that many runs at once in separate processes (CPU); speed and cache checks
    then run here, one model at a time, so no other training competes with them. `backend` is the
    attention backend of every model, in this process and in the workers. `sentences` replaces the
    in-domain sentences drawn from the held-out split (`sentences_source` names where they came
    from in the report).
    """
    p = {**TRAIN_DEFAULTS, **p}
    with use_backend(backend):
        return _run_study(p, out_dir, corpus, device, progress, match_params, gqa_kv, base_seed, vocab_size, jobs,
                          backend, sentences, sentences_source, tokenizer_dir, word_split)


def _run_study(p, out_dir, corpus, device, progress, match_params, gqa_kv, base_seed, vocab_size, jobs, backend,
               own_sentences, sentences_source, tokenizer_dir, word_split):
    t_start = time.perf_counter()
    text = load_corpus(corpus)
    tokenizer = get_tokenizer(p["tokenizer"], text if p["tokenizer"] != "gpt2" else None,
                              vocab_size=vocab_size or p.get("vocab_size"), path=tokenizer_dir, word_split=word_split)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    batches = LMBatches(ids, p["batch_size"], p["block_size"], source=corpus or "corpus")
    if own_sentences is not None:
        in_domain, in_domain_source = list(own_sentences), sentences_source or "given sentences"
    else:
        in_domain = heldout_sentences(tokenizer, batches.val, N_HELDOUT_SENTENCES, p["block_size"])
        in_domain_source = "held-out split"
        if not in_domain:
            raise ValueError(f"corpus: found no sentence of 24..160 characters in the held-out split of "
                             f"{corpus or 'the embedded corpus'} ({len(batches.val)} tokens); pass --sentences FILE")
    sentences = {"in_domain": in_domain, "control": list(UNRELATED_SENTENCES)}
    base = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=p["block_size"], n_layer=p["n_layer"],
                     n_head=p["n_head"], n_kv_head=p["n_head"], n_embd=p["n_embd"], dropout=p["dropout"])
    variants = [(name, replace(base, n_kv_head=kv)) for name, kv in kv_variants(p["n_head"], gqa_kv)]
    if match_params:
        wide = replace(base, n_kv_head=1)
        wide = replace(wide, n_embd=matched_width(wide, count_params(base)))
        variants.append(("MQA-wide", wide))

    job_list = [{"name": name, "config": config, "seed": base_seed + s, "preset": p, "device": device,
                 "progress": progress and jobs <= 1, "keep_weights": s == 0, "backend": backend,
                 "sentences": sentences}
                for name, config in variants for s in range(p["seeds"])]
    done: dict[tuple[str, int], dict] = {}
    for job, result in _run_jobs(job_list, tokenizer, batches, ids, jobs if device == "cpu" else 1):
        done[job["name"], job["seed"]] = result
        r = result["run"]
        print(f"{job['name']:<8} seed {job['seed']}: val loss {r['val_loss']:.4f}  ppl {r['val_perplexity']:.3f}  "
              f"(trained in {r['train_seconds']:.1f} s)", flush=True)

    seeds = [base_seed + s for s in range(p["seeds"])]
    baseline = train_bigram(p, tokenizer, batches, sentences, seeds, device, progress and jobs <= 1)
    r = baseline
    print(f"bigram   baseline: val loss {r['val_loss_mean']:.4f}  ppl {r['val_perplexity_mean']:.3f}", flush=True)

    # Speed and cache checks stay inside the context (prompt + new tokens - 1 <= block_size: no crop).
    prompt = batches.val[: min(16, p["block_size"] // 2)].tolist()
    gen_tokens = min(p["gen_tokens"], p["block_size"] - len(prompt) + 1)
    results = []
    for name, config in variants:
        runs = [done[name, base_seed + s]["run"] for s in range(p["seeds"])]
        model = GPT(config)
        model.load_state_dict(done[name, base_seed]["state"])
        model.to(device)
        # Speed and cache checks do not depend on the seed: measured on the first seed's model.
        first = generation_checks(model, prompt, gen_tokens, device)
        first["sample"] = sample_text(model, tokenizer, p["gen_tokens"] * 2, base_seed)
        runs[0].update(first)
        ppl = _mean_std([r["val_perplexity"] for r in runs])
        ci = mean_ci([r["val_perplexity"] for r in runs])[1]
        ci = None if math.isnan(ci) else ci  # results.json stays strict JSON
        results.append({
            "name": name, "n_kv_head": config.n_kv_head, "n_head": config.n_head, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "params": model.num_params(non_embedding=False),
            "val_perplexity_mean": ppl[0], "val_perplexity_std": ppl[1], "val_perplexity_ci": ci,
            "val_loss_mean": statistics.fmean(r["val_loss"] for r in runs),
            "logprob_similar": statistics.fmean(r["logprob_similar"] for r in runs),
            "logprob_unrelated": statistics.fmean(r["logprob_unrelated"] for r in runs),
            "kv_bytes_per_token": kv_bytes_per_token(model), "kv_dtype": str(model.transformer.wte.weight.dtype),
            **first, "runs": runs,
        })

    info = {"preset": p, "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "corpus": corpus or "embedded: pydoc_data.topics (Python language reference)",
            "corpus_tokens": len(ids), "train_tokens": len(batches.train), "val_tokens": len(batches.val),
            "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(), "jobs": jobs,
            "generation": {"prompt_tokens": len(prompt), "new_tokens": gen_tokens, "batch": 1},
            "sentences": {"in_domain_source": in_domain_source, "in_domain": in_domain,
                          "control_source": "fixed everyday-English sentences", "control": sentences["control"]},
            "base_config": asdict(base), "interval": CI_NAME, "wall_seconds": time.perf_counter() - t_start}
    results_all = {"study": info, "variants": results, "baseline": baseline}
    write_outputs(results_all, out_dir)
    return results_all


def write_outputs(results: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    plot_loss_curves_by_variant(results, os.path.join(out_dir, "loss_curves.png"))
    plot_perplexity(results, os.path.join(out_dir, "perplexity.png"))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(render_report(results))
