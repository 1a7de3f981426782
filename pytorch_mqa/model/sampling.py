"""Sampling helpers: tiny pure functions of logits (..., V), as in gpt-fast."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor




REPETITION_RULES = ("ctrl", "divide")


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float, rule: str = "ctrl") -> Tensor:
    """Penalise the tokens marked in `seen` (bool, same shape as logits).

    rule "ctrl" (the default; CTRL, Keskar et al. 2019, and Hugging Face's
    RepetitionPenaltyLogitsProcessor): a positive logit is divided by `penalty`, a negative one
    multiplied by it, so with penalty > 1 a seen token always becomes less likely.
    rule "divide": every seen logit is divided by `penalty` whatever its sign, the simpler rule of
    some tutorials; a seen token with a negative logit then becomes *more* likely.
    penalty = 1 changes nothing under either rule.
    """
    if penalty == 1.0:
        return logits
    if rule == "divide":
        return torch.where(seen, logits / penalty, logits)
    if rule != "ctrl":
        raise ValueError(f"rule: expected one of {REPETITION_RULES}, got {rule!r}")
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), set the rest to -inf."""
    k = min(int(k), logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p.

    A token is kept if the probability mass of the tokens strictly more likely than it is < p,
    so the most likely token is always kept.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """Temperature, then top-k, then top-p, then softmax (float32). temperature must be > 0."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.softmax(logits, dim=-1)


def sample(probs: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """One token id per row of probs (B, V) -> (B,)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None) -> Tensor:
    """logits (B, V) -> token ids (B,): argmax when temperature == 0, else sampled."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    return sample(logits_to_probs(logits, temperature, top_k, top_p), generator)


__all__ = ["REPETITION_RULES", "apply_repetition_penalty", "top_k_filter", "top_p_filter", "logits_to_probs", "sample", "next_token"]
