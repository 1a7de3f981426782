"""A GPT-2 style language model whose attention has any number of KV heads (MHA, GQA, MQA).

Read top to bottom: `GPTConfig`, `CausalSelfAttention`, `MLP`, `Block`, `GPT`. The architecture
is GPT-2's (pre-LayerNorm, learned positions, GELU(tanh) MLP, tied input/output embeddings);
the only change is that K and V have `n_kv_head` heads, each shared by `n_head // n_kv_head`
query heads. Attention goes through the package's ops, `attention` for prefill/training and
`attention_with_kv_cache` for cached decoding, so CUDA tensors run the kernels and CPU tensors the
reference. The config is in `model/config.py`; checkpoint loading and conversion in `model/checkpoints.py`.
"""

from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F

from pytorch_mqa.model import checkpoints
from pytorch_mqa.model.cache import KVCache
from pytorch_mqa.model.config import GPTConfig
from pytorch_mqa.model.loss import next_token_loss
from pytorch_mqa.ops import attention, attention_with_kv_cache, decode_one_row_functional


class CausalSelfAttention(nn.Module):
    """Causal attention with n_head query heads and n_kv_head key/value heads.

    One fused projection gives q (B, T, Hq, D), k and v (B, T, Hkv, D) as views (BSHD, the ops'
    layout, so nothing is transposed or copied). K/V are never repeated per query head.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        self.c_attn = nn.Linear(config.n_embd, q_dim + 2 * kv_dim, bias=config.bias)
        self.c_proj = nn.Linear(q_dim, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, k_cache=None, v_cache=None, cache_seqlens=None):
        """x (B, T, C) -> (B, T, C). With caches, appends this step's K/V and attends the prefix."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if k_cache is None:
            y = attention(q, k, v, causal=True)
        else:
            y = attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=True)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, -1)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, k_cache=None, v_cache=None, cache_seqlens=None):
        x = x + self.attn(self.ln_1(x), k_cache, v_cache, cache_seqlens)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embedding is left out by default (tied wte counts once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, *, cache: KVCache | None = None):
        """idx (B, T) token ids -> logits (B, T, V); with targets (B, T) -> (logits, loss).

        loss is the mean cross-entropy over targets != -100. With `cache`, token t of sequence b
        sits at position cache.lengths[b] + t: its K/V are appended to the cache, it attends the
        whole cached prefix, and the cache lengths advance by T once all layers have run.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx: expected a 2-D tensor (B, T) of token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        wte, wpe = self.transformer.wte, self.transformer.wpe
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"idx: expected at most block_size = {self.config.block_size} tokens, got T = {T}")
        else:
            if cache.batch_size != B:
                raise ValueError(f"cache: expected batch size {B} (idx.shape[0]), got {cache.batch_size}")
            if cache.n_layer != self.config.n_layer:
                raise ValueError(f"cache: expected {self.config.n_layer} layers, got {cache.n_layer}")
            cache.check_room(T)
            room = self.config.block_size - max(cache.lengths)
            if T > room:
                raise ValueError(
                    f"idx: positions past block_size = {self.config.block_size}: the cache holds "
                    f"{max(cache.lengths)} positions and T = {T} more were given"
                )
            logits = self.forward_cached(idx, cache.k, cache.v, cache.cache_seqlens)
            cache.advance(T)
            return logits if targets is None else (logits, next_token_loss(logits, targets))
        x = self.transformer.drop(wte(idx) + wpe(torch.arange(T, device=idx.device)))
        for block in self.transformer.h:
            x = block(x)
        ln_f = self.transformer.ln_f
        logits = F.linear(F.layer_norm(x, ln_f.normalized_shape, ln_f.weight, ln_f.bias, ln_f.eps), self.lm_head.weight)
        if targets is None:
            return logits
        return logits, next_token_loss(logits, targets)

    def forward_cached(self, idx, k_cache, v_cache, cache_seqlens):
        """The cached forward without checks and without advancing the lengths (forward does both).

        idx (B, T); k_cache, v_cache: a KVCache's (n_layer, B, S, Hkv, D) buffers; cache_seqlens
        its int32 (B,) lengths -> logits (B, T, V). Block.forward's math with the functional calls
        inlined: decoding runs one token at a time, so per-call overhead (module dispatch, dropout
        no-ops) is a large share of a step on CPU. No dropout: a cache is for inference. Nothing
        here reads a host-side length, so `torch.compile(fullgraph=True)` traces a decode step once.
        """
        B, T = idx.shape
        wte, wpe = self.transformer.wte, self.transformer.wpe
        # Positions come from the device lengths, so a captured decode step stays valid.
        pos = cache_seqlens[:, None] + torch.arange(T, device=idx.device, dtype=torch.int32)
        x = F.embedding(idx, wte.weight) + F.embedding(pos, wpe.weight)
        C = x.shape[-1]
        for i, block in enumerate(self.transformer.h):
            attn, mlp, ln_1, ln_2 = block.attn, block.mlp, block.ln_1, block.ln_2
            h = F.layer_norm(x, (C,), ln_1.weight, ln_1.bias, ln_1.eps)
            q, k, v = F.linear(h, attn.c_attn.weight, attn.c_attn.bias).split(attn.split, dim=-1)
            y = attention_with_kv_cache(
                q.view(B, T, attn.n_head, attn.head_dim),
                k_cache[i],
                v_cache[i],
                k.view(B, T, attn.n_kv_head, attn.head_dim),
                v.view(B, T, attn.n_kv_head, attn.head_dim),
                cache_seqlens=cache_seqlens,
                causal=True,
            )
            x = x + F.linear(y.view(B, T, C), attn.c_proj.weight, attn.c_proj.bias)
            h = F.layer_norm(x, (C,), ln_2.weight, ln_2.bias, ln_2.eps)
            h = F.gelu(F.linear(h, mlp.c_fc.weight, mlp.c_fc.bias), approximate="tanh")
            x = x + F.linear(h, mlp.c_proj.weight, mlp.c_proj.bias)
        ln_f = self.transformer.ln_f
        return F.linear(F.layer_norm(x, (C,), ln_f.weight, ln_f.bias, ln_f.eps), self.lm_head.weight)

    def decode_step(self, idx, k_cache, v_cache, cache_seqlens):
        """One decode step that leaves the cache untouched, for `torch.compile(fullgraph=True)`.

        idx (B, 1); k_cache, v_cache, cache_seqlens: a KVCache's buffers and lengths. Returns
        logits (B, V) and this step's keys and values, each (n_layer, B, 1, Hkv, D), for
        KVCache.append. Nothing reads a host-side length, so every step has the same graph.
        """
        B, T = idx.shape
        wte, wpe = self.transformer.wte, self.transformer.wpe
        x = F.embedding(idx, wte.weight) + F.embedding(cache_seqlens[:, None], wpe.weight)
        C = x.shape[-1]
        ks, vs = [], []
        for i, block in enumerate(self.transformer.h):
            attn, mlp, ln_1, ln_2 = block.attn, block.mlp, block.ln_1, block.ln_2
            h = F.layer_norm(x, (C,), ln_1.weight, ln_1.bias, ln_1.eps)
            q, k, v = F.linear(h, attn.c_attn.weight, attn.c_attn.bias).split(attn.split, dim=-1)
            k = k.view(B, T, attn.n_kv_head, attn.head_dim)
            v = v.view(B, T, attn.n_kv_head, attn.head_dim)
            q = q.view(B, T, attn.n_head, attn.head_dim)
            y = decode_one_row_functional(q, k_cache[i], v_cache[i], k, v, cache_seqlens)
            ks.append(k)
            vs.append(v)
            x = x + F.linear(y.view(B, T, C), attn.c_proj.weight, attn.c_proj.bias)
            h = F.layer_norm(x, (C,), ln_2.weight, ln_2.bias, ln_2.eps)
            h = F.gelu(F.linear(h, mlp.c_fc.weight, mlp.c_fc.bias), approximate="tanh")
            x = x + F.linear(h, mlp.c_proj.weight, mlp.c_proj.bias)
        ln_f = self.transformer.ln_f
        logits = F.linear(F.layer_norm(x[:, -1], (C,), ln_f.weight, ln_f.bias, ln_f.eps), self.lm_head.weight)
        return logits, torch.stack(ks), torch.stack(vs)

    # ---- checkpoints (see model/checkpoints.py) --------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, n_kv_head: int | None = None, n_head: int | None = None, dtype=None, device=None):
        """Load GPT-2 weights (Hugging Face directory or file, from-scratch layout, or save_pretrained).

        n_kv_head converts MHA weights to GQA/MQA by mean-pooling the K/V heads of each group.
        n_head is only needed for a bare weights file without config.json whose head dim is not 64.
        """
        return checkpoints.load_pretrained(cls, path, n_kv_head=n_kv_head, n_head=n_head, dtype=dtype, device=device)

    def save_pretrained(self, directory) -> None:
        """Write config.json and model.safetensors (lm_head is tied to wte and not stored)."""
        checkpoints.save_pretrained(self, directory)


__all__ = ["GPTConfig", "GPT", "Block", "CausalSelfAttention", "MLP"]
