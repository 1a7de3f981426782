"""The next-token loss, the one place every layer computes it (training, evaluation, the study)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this id are not predicted (prompt tokens, padding)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in float32: logits (..., V), targets (...) -> (...).

    Positions whose target is IGNORE_INDEX give 0.
    """
    V = logits.size(-1)
    nll = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(targets.shape)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the targets != IGNORE_INDEX: their mean (0, not NaN, when none is left)
    or, with reduction="sum", their sum."""
    total = token_nll(logits, targets).sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


__all__ = ["IGNORE_INDEX", "token_nll", "next_token_loss"]
