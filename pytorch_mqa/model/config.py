"""GPTConfig: the model's shape, one commented field per line (nanoGPT's style)."""

from __future__ import annotations

from dataclasses import dataclass


POS_EMBEDDINGS = ("learned", "rope")


@dataclass
class GPTConfig:
    vocab_size: int  # tokens in the vocabulary (GPT-2: 50257)
    block_size: int  # maximum sequence length (number of positions: learned rows or rotary table rows)
    n_layer: int  # transformer blocks
    n_head: int  # query heads per attention layer
    n_kv_head: int  # key/value heads: 1 = MQA, n_head = MHA, a divisor in between = GQA
    n_embd: int  # model width; head dim is n_embd // n_head
    dropout: float = 0.0  # dropout on embeddings and residual branches (not on attention probs)
    bias: bool = True  # biases in Linear and LayerNorm layers (GPT-2: True)
    tie_embeddings: bool = True  # output head = token embedding (GPT-2: True; the from-scratch tutorial's out_head: False)
    attn_dropout: float = 0.0  # dropout on the attention probabilities, in training mode only (nanoGPT's attn_dropout)
    pos_embedding: str = "learned"  # "learned": GPT-2's wpe table; "rope": rotary q/k (GPT-NeoX halves, as Llama), no wpe
    rope_theta: float = 10000.0  # rotary base: frequency i is rope_theta ** (-2i / head_dim) (used with "rope")

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"GPTConfig.{name}: expected a positive int, got {val!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd: expected a multiple of n_head = {self.n_head}, got {self.n_embd}")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"GPTConfig.n_kv_head: expected a divisor of n_head = {self.n_head}, got {self.n_kv_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout: expected a float in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.attn_dropout < 1.0:
            raise ValueError(f"GPTConfig.attn_dropout: expected a float in [0, 1), got {self.attn_dropout!r}")
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise ValueError(f"GPTConfig.pos_embedding: expected one of {POS_EMBEDDINGS}, got {self.pos_embedding!r}")
        theta = self.rope_theta
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 1.0:
            raise ValueError(f"GPTConfig.rope_theta: expected a number > 1, got {theta!r}")
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ValueError(
                f"GPTConfig.n_embd: pos_embedding='rope' rotates pairs of channels, so head_dim = n_embd // n_head "
                f"must be even, got {self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


__all__ = ["GPTConfig", "POS_EMBEDDINGS"]
