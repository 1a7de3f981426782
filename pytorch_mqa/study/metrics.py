"""What the study measures on one trained model: held-out loss, sentence log-probabilities,
KV-cache bytes per token, generation speed with and without the cache, cached-vs-recomputed logits."""

from __future__ import annotations

import re
import warnings
from functools import partial

import torch

from pytorch_mqa.core.devices import synchronize
from pytorch_mqa.core.timing import time_round_robin
from pytorch_mqa.model import KVCache, generate
from pytorch_mqa.model.generation import ContextCropWarning
from pytorch_mqa.model.loss import next_token_loss, token_nll

SAMPLE_PROMPT = "The "


@torch.no_grad()
def mean_logprob(model, tokenizer, sentences: list[str], device) -> float:
    """Mean log-probability (nats) per predicted token, over all tokens after the first of each sentence."""
    model.eval()
    total, count = 0.0, 0
    for s in sentences:
        ids = tokenizer.encode(s)[: model.config.block_size + 1]
        x = torch.tensor([ids], device=device)
        total -= token_nll(model(x[:, :-1]), x[:, 1:]).sum().item()
        count += len(ids) - 1
    return total / max(count, 1)


@torch.no_grad()
def sentence_scores(model, tokenizer, sentences: list[str], device) -> list[dict]:
    """Per sentence: its tokens (as text), the log-probability (nats) of each token after the first,
    their sum and mean, and how many of the scored tokens are the tokenizer's unknown token (an unknown
    word or character is one frequent id, easy to predict, so it flatters a sentence full of them).
    A sentence longer than the context is scored on its first block_size + 1 tokens."""
    model.eval()
    out = []
    unk = getattr(tokenizer, "unk_id", None)
    for s in sentences:
        ids = tokenizer.encode(s)[: model.config.block_size + 1]
        n_unk = 0 if unk is None else sum(i == unk for i in ids[1:])
        if len(ids) < 2:
            out.append({"text": s, "tokens": [tokenizer.decode([i]) for i in ids], "logprobs": [], "sum": 0.0,
                        "mean": None, "unknown": 0})
            continue
        x = torch.tensor([ids], device=device)
        lp = (-token_nll(model(x[:, :-1]), x[:, 1:]))[0].tolist()
        out.append({"text": s, "tokens": [tokenizer.decode([i]) for i in ids], "logprobs": lp, "sum": sum(lp),
                    "mean": sum(lp) / len(lp), "unknown": n_unk})
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n|\n(?=[A-Z][A-Za-z ]*:)")


def heldout_sentences(tokenizer, val: torch.Tensor, n: int, block_size: int, min_chars: int = 24,
                      max_chars: int = 160) -> list[str]:
    """Up to `n` sentences of the held-out (validation) text, spread evenly over it.

    The validation ids are decoded back to text and cut at sentence ends and blank lines; pieces of
    `min_chars`..`max_chars` characters that round-trip through the tokenizer with no unknown token
    are candidates (those that fit the context, block_size + 1 tokens, first), and `n` of them are
    taken at even intervals. Line breaks inside a piece become spaces. Deterministic for a given
    corpus and tokenizer. A sentence longer than the context is scored on its first tokens
    (sentence_scores).
    """
    text = tokenizer.decode(val.tolist())
    pieces = [" ".join(p.split()) for p in _SENTENCE_END.split(text)]
    unk = getattr(tokenizer, "unk_id", None)
    fits, longer = [], []
    for p in pieces[1:-1]:  # the first and last may be cut mid-sentence by the split
        if not min_chars <= len(p) <= max_chars:
            continue
        ids = tokenizer.encode(p)
        if len(ids) >= 2 and (unk is None or unk not in ids) and tokenizer.decode(ids) == p:
            (fits if len(ids) <= block_size + 1 else longer).append(p)
    cands = fits if len(fits) >= n else fits + longer
    if len(cands) <= n:
        return cands
    step = len(cands) / n
    return [cands[int(i * step + step / 2)] for i in range(n)]


def read_sentences(path: str) -> list[str]:
    """One sentence per line of a UTF-8 file; blank lines are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: expected a UTF-8 text file of sentences, got invalid UTF-8 at byte {e.start}") from None
    sentences = [s for s in lines if s]
    if not sentences:
        raise ValueError(f"{path}: expected one sentence per line, got no non-blank line")
    return sentences


@torch.no_grad()
def heldout_loss(model, val: torch.Tensor, block_size: int, device, max_windows: int = 256, batch: int = 32) -> float:
    """Mean next-token loss over the same validation windows for every model.

    Up to `max_windows` non-overlapping windows, spread evenly over the whole validation split.
    """
    model.eval()
    n = min(max_windows, (len(val) - 1) // block_size)
    if n < 1:
        raise ValueError(f"val: expected more than block_size = {block_size} validation tokens, got {len(val)}")
    stride = (len(val) - 1) // n
    total, count = 0.0, 0
    for i in range(0, n, batch):
        starts = torch.arange(i, min(n, i + batch)) * stride
        windows = val[starts[:, None] + torch.arange(block_size + 1)].to(device)
        total += next_token_loss(model(windows[:, :-1]), windows[:, 1:], reduction="sum").item()
        count += windows[:, 1:].numel()
    return total / count


def kv_bytes_per_token(model) -> int:
    """Bytes one token occupies in a KVCache for `model` (all layers, K and V), from a real cache."""
    return KVCache.for_model(model, 1, 1).nbytes


def _greedy(model, prompt: list[int], n: int, use_cache: bool) -> list[int]:
    return generate(model, [prompt], n, temperature=0, use_cache=use_cache)[0]


@torch.no_grad()
def generation_checks(model, prompt: list[int], new_tokens: int, device, repeats: int = 3) -> dict:
    """Greedy generation with and without the cache: tokens/s (best of `repeats`, taken
    round-robin by the benchmarks' timer), token agreement, and the largest difference between
    cached and recomputed logits."""
    model.eval()
    dev = torch.device(device)
    modes = (True, False)  # use_cache
    timed = time_round_robin(
        [partial(_greedy, model, prompt, new_tokens, use_cache) for use_cache in modes],
        repeats,
        warmups=[partial(_greedy, model, prompt, 2, use_cache) for use_cache in modes],
        sync=partial(synchronize, dev),
    )
    (t_cache, tokens_cache), (t_none, tokens_none) = timed
    out = {"tokens_per_s_cache": new_tokens / min(t_cache), "tokens_per_s_no_cache": new_tokens / min(t_none)}
    tokens = {True: tokens_cache, False: tokens_none}
    out["greedy_tokens_agree"] = tokens[True] == tokens[False]
    # Logits for the same sequence: one full forward vs prefill + one token at a time through the cache.
    seq = torch.tensor([prompt + tokens[True]], device=device)[:, : model.config.block_size]
    full = model(seq).float()
    cache = KVCache.for_model(model, 1, seq.shape[1])
    P = len(prompt)
    steps = [model(seq[:, :P], cache=cache)]
    for t in range(P, seq.shape[1]):
        steps.append(model(seq[:, t : t + 1], cache=cache))
    cached = torch.cat(steps, dim=1).float()
    out["max_abs_logit_diff"] = (full - cached).abs().max().item()
    out["logit_scale"] = full.abs().max().item()
    return out


@torch.no_grad()
def sample_text(model, tokenizer, n: int, seed: int) -> str:
    """`n` sampled tokens after SAMPLE_PROMPT; past the context, the oldest tokens drop out of it."""
    prompt = tokenizer.encode(SAMPLE_PROMPT)
    with warnings.catch_warnings():  # cropping is expected here: the report says how long samples are
        warnings.simplefilter("ignore", ContextCropWarning)
        ids = generate(model, [prompt], n, temperature=0.8, top_k=40, seed=seed, eos_id=tokenizer.eos_id)[0]
    return SAMPLE_PROMPT + tokenizer.decode([i for i in ids if i != tokenizer.eos_id])


__all__ = ["sentence_scores", "heldout_sentences", "read_sentences", "mean_logprob", "heldout_loss",
           "kv_bytes_per_token", "generation_checks", "sample_text", "SAMPLE_PROMPT"]
