"""What the study measures on one trained model: held-out loss, sentence log-probabilities,
KV-cache bytes per token, generation speed with and without the cache, cached-vs-recomputed logits."""

from __future__ import annotations

from functools import partial

import torch

from pytorch_mqa.core.devices import synchronize
from pytorch_mqa.core.timing import time_round_robin
from pytorch_mqa.model import KVCache, generate
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
    prompt = tokenizer.encode(SAMPLE_PROMPT)
    n = min(n, model.config.block_size - len(prompt))
    ids = generate(model, [prompt], n, temperature=0.8, top_k=40, seed=seed, eos_id=tokenizer.eos_id)[0]
    return SAMPLE_PROMPT + tokenizer.decode([i for i in ids if i != tokenizer.eos_id])


__all__ = ["mean_logprob", "heldout_loss", "kv_bytes_per_token", "generation_checks", "sample_text", "SAMPLE_PROMPT"]
