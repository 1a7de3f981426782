"""Count-free baselines trained like the GPT: a bigram and a unigram language model.

`BigramLM` is the char-level tutorial's first model: one table of logits per previous token
(`logits = table[idx]`), so the next token depends only on the current one. `order=1` gives a
unigram model: one logit vector for every position. Both map ids (B, T) to logits (B, T, V), take
`targets` like `GPT`, train with the same `fit()`, and generate with `generate()` (without a KV
cache: they have none). Their held-out perplexity is the floor a transformer has to beat.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from torch import nn

from pytorch_mqa.model.loss import next_token_loss

BIGRAM_FORMAT = "pytorch_mqa.BigramLM"


@dataclass
class BigramConfig:
    vocab_size: int  # tokens in the vocabulary
    block_size: int = 1 << 20  # the context it is fed in training windows (it reads only the last token)
    order: int = 2  # 2 = bigram (the previous token picks the logits), 1 = unigram (one logit vector)

    def __post_init__(self):
        for name in ("vocab_size", "block_size"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"BigramConfig.{name}: expected a positive int, got {val!r}")
        if self.order not in (1, 2):
            raise ValueError(f"BigramConfig.order: expected 1 (unigram) or 2 (bigram), got {self.order!r}")


class BigramLM(nn.Module):
    """logits[b, t] = table[idx[b, t]] (bigram) or a single learned vector (unigram)."""

    def __init__(self, config: BigramConfig):
        super().__init__()
        self.config = config
        rows = config.vocab_size if config.order == 2 else 1
        self.table = nn.Embedding(rows, config.vocab_size)
        nn.init.zeros_(self.table.weight)  # uniform predictions before training: loss ln(V) at step 0

    def num_params(self, non_embedding: bool = False) -> int:
        return self.table.weight.numel()

    def forward(self, idx, targets=None):
        if self.config.order == 2:
            logits = self.table(idx)
        else:
            logits = self.table.weight[0].expand(*idx.shape, -1)
        if targets is None:
            return logits
        return logits, next_token_loss(logits, targets)

    def save_pretrained(self, directory) -> None:
        """config.json (`"format": "pytorch_mqa.BigramLM"`) + model.safetensors."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"format": BIGRAM_FORMAT, **asdict(self.config)}, f, indent=1)
        save_file({"table.weight": self.table.weight.detach().cpu().contiguous()},
                  os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory, *, device=None) -> "BigramLM":
        from safetensors.torch import load_file

        cfg_path = os.path.join(directory, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict) or cfg.get("format") != BIGRAM_FORMAT:
            got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
            raise ValueError(f"{cfg_path}: expected a config.json with format {BIGRAM_FORMAT!r}, got {got!r}")
        model = cls(BigramConfig(**{k: v for k, v in cfg.items() if k != "format"}))
        model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
        return model.to(device) if device is not None else model


def is_bigram_checkpoint(directory: str) -> bool:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            return json.load(f).get("format") == BIGRAM_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


__all__ = ["BigramConfig", "BigramLM", "BIGRAM_FORMAT", "is_bigram_checkpoint"]
