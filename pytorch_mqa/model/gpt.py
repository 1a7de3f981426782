"""A GPT-2 style language model whose attention has any number of KV heads (MHA, GQA, MQA).

Read top to bottom: `GPTConfig`, `CausalSelfAttention`, `MLP`, `Block`, `GPT`. The architecture
is GPT-2's (pre-LayerNorm, learned positions, GELU(tanh) MLP, tied input/output embeddings);
the only change is that K and V have `n_kv_head` heads, each shared by `n_head // n_kv_head`
query heads. `GPTConfig(pos_embedding="rope")` replaces the learned positions by rotary ones
(GPT-NeoX halves, as Llama): no wpe, q and k rotated by `reference.apply_rotary` without a cache
and by the op's fused rotary append with one. Attention goes through the package's ops, `attention` without a cache (training,
prefill) and `attention_with_kv_cache` with one (cached prefill, decoding), so CUDA tensors run
the kernels and CPU tensors the CPU path. Every mode runs the same `Block.forward`, through
`GPT.logits`; the compiled decode step of `generate(compile=True)` (model/decode.py) is that
body too. The config is in `model/config.py`; checkpoint loading and conversion in
`model/checkpoints.py`.
"""

from __future__ import annotations

import math
import torch
import torch.nn as nn

from pytorch_mqa import reference
from pytorch_mqa.model import checkpoints, export
from pytorch_mqa.model.cache import KVCache
from pytorch_mqa.model.config import GPTConfig
from pytorch_mqa.model.decode import column_major_, linear
from pytorch_mqa.model.loss import next_token_loss
from pytorch_mqa.model.rope import rope_tables
from pytorch_mqa.ops import attention, attention_varlen, attention_with_kv_cache


class Linear(nn.Linear):
    """nn.Linear whose one-row float32 CPU product inside a compiled decode step is a multiply and
    a row sum, fused by inductor into one pass over the weight (model/decode.py's `linear`)."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def _dropout(module: nn.Dropout, x):
    """`module(x)`, skipped where it is the identity (evaluation, or p = 0): a decode step then
    pays no module call for its nine dropouts."""
    return module(x) if module.training and module.p > 0 else x


def _decode_layout_after_load(model, incompatible_keys) -> None:
    """load_state_dict's post hook (a module-level function, so a pickled GPT keeps it)."""
    model.use_decode_layout()


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
        self.c_attn = Linear(config.n_embd, q_dim + 2 * kv_dim, bias=config.bias)
        self.c_proj = Linear(q_dim, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attn_dropout = config.attn_dropout  # on the attention probabilities, training mode only

    def forward(self, x, k_cache=None, v_cache=None, cache_seqlens=None, backend: str = "auto", rope=None,
                block_table=None, *, cu_seqlens=None, max_seqlen=None):
        """x (B, T, C) -> (B, T, C). With caches, appends this step's K/V and attends the prefix.
        With cu_seqlens (B = 1, packed documents): causal attention within each document only,
        through `attention_varlen`.

        backend goes to the op ("auto": the ops' choice; a compiled step passes a concrete one).
        Attention dropout (config.attn_dropout) applies in training mode only, never with a cache.
        rope: None (learned positions) or (cos, sin, positions): without a cache q and k are rotated
        at positions (B, T); with one the op rotates them in its append (positions unused).
        block_table: a paged cache's (B, max_blocks) int32 table (k_cache, v_cache are its pools)."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if k_cache is None and rope is not None:
            cos, sin, pos = rope
            q = reference.apply_rotary(q, cos, sin, pos, False)
            k = reference.apply_rotary(k, cos, sin, pos, False)
        if cu_seqlens is not None:
            p = self.attn_dropout if self.training else 0.0
            y = attention_varlen(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                                 dropout_p=p, backend=backend)
        elif k_cache is None:
            p = self.attn_dropout if self.training else 0.0
            y = attention(q, k, v, causal=True, dropout_p=p, backend=backend)
        else:
            extra = {}
            if rope is not None:
                extra.update(rotary_cos=rope[0], rotary_sin=rope[1], rotary_interleaved=False)
            if block_table is not None:
                extra["block_table"] = block_table
            y = attention_with_kv_cache(
                q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=True, backend=backend, **extra
            )
        return _dropout(self.resid_dropout, self.c_proj(y.reshape(B, T, -1)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return _dropout(self.dropout, self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, k_cache=None, v_cache=None, cache_seqlens=None, backend: str = "auto", rope=None,
                block_table=None, *, cu_seqlens=None, max_seqlen=None):
        x = x + self.attn(self.ln_1(x), k_cache, v_cache, cache_seqlens, backend, rope, block_table,
                          cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.rope = config.pos_embedding == "rope"
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if not self.rope:
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        )
        self.transformer = nn.ModuleDict(modules)
        if self.rope:
            self.init_rope()
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.use_decode_layout()
        self.register_load_state_dict_post_hook(_decode_layout_after_load)

    def use_decode_layout(self) -> int:
        """Lay out the weight of every product (each Linear, so also the tied token embedding)
        column-major, the layout a one-row product reads fastest (model/decode.py's
        `column_major_`); shapes, values and state dicts are unchanged. Runs when the model is
        built and after every `load_state_dict` (which with assign=True puts the loaded tensors
        in place); call it again after assigning a new weight tensor yourself. Returns how many
        weights were re-laid out."""
        return column_major_(m.weight for m in self.modules() if isinstance(m, nn.Linear))

    def init_rope(self) -> None:
        """(Re)compute the rotary tables `rope_cos`, `rope_sin` (block_size, head_dim // 2) on the
        embedding's device: float32 buffers (`.to(dtype)` casts them with the weights), not saved in
        checkpoints (they follow from the config).
        A model built on the meta device and loaded with assign=True calls this for real tables."""
        cfg = self.config
        device = self.transformer.wte.weight.device
        cos, sin = rope_tables(cfg.block_size, cfg.head_dim, cfg.rope_theta, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

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
        return n - self.transformer.wpe.weight.numel() if non_embedding and not self.rope else n

    def forward(self, idx, targets=None, *, cache: KVCache | None = None, cu_seqlens=None,
                max_seqlen: int | None = None):
        """idx (B, T) token ids -> logits (B, T, V); with targets (B, T) -> (logits, loss).

        loss is the mean cross-entropy over targets != -100. With `cache`, token t of sequence b
        sits at position cache.lengths[b] + t: its K/V are appended to the cache, it attends the
        whole cached prefix, and the cache lengths advance by T once all layers have run. The
        checks read only host-side values; the computation is `logits`.

        Packed documents (padding-free training and prefill, FlashAttention's varlen layout):
        idx (total,) or (1, total) holds the documents one after another and cu_seqlens, int32
        (N + 1,), their boundaries (0, len_0, len_0 + len_1, ..., total; see
        pytorch_mqa.training.data.pack_documents). Each document is causal on its own: no token
        attends across a boundary and positions restart at 0 in every document, so logits (idx's
        shape + (V,)) and the per-token losses are those of running each document alone; targets
        have idx's shape. max_seqlen is a host int >= the longest document (<= block_size); None
        reads it from cu_seqlens (a device sync on a GPU). Not combined with `cache`.
        """
        if cu_seqlens is not None:
            return self._forward_packed(idx, targets, cache, cu_seqlens, max_seqlen)
        if idx.dim() != 2:
            raise ValueError(f"idx: expected a 2-D tensor (B, T) of token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"idx: expected at most block_size = {self.config.block_size} tokens, got T = {T}")
            logits = self.logits(idx)
        else:
            if cache.batch_size != B:
                raise ValueError(f"cache: expected batch size {B} (idx.shape[0]), got {cache.batch_size}")
            if cache.n_layer != self.config.n_layer:
                raise ValueError(f"cache: expected {self.config.n_layer} layers, got {cache.n_layer}")
            cache.check_room(T)
            held = max(cache.lengths)
            if T > self.config.block_size - held:
                raise ValueError(
                    f"idx: positions past block_size = {self.config.block_size}: the cache holds "
                    f"{held} positions and T = {T} more were given"
                )
            cache.allocate(T)  # a paged cache takes the pages these rows land in (before the op writes)
            logits = self.logits(idx, cache.k, cache.v, cache.cache_seqlens, block_table=cache.block_table)
            cache.advance(T)
        return logits if targets is None else (logits, next_token_loss(logits, targets))

    def _forward_packed(self, idx, targets, cache, cu_seqlens, max_seqlen):
        if cache is not None:
            raise ValueError("cache: expected None with cu_seqlens (packed documents run without a cache), "
                             f"got {type(cache).__name__}")
        if not (idx.dim() == 1 or (idx.dim() == 2 and idx.shape[0] == 1)):
            raise ValueError(f"idx: expected shape (total,) or (1, total) with cu_seqlens, got {tuple(idx.shape)}")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            got = f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) \
                else type(cu_seqlens).__name__
            raise ValueError(f"cu_seqlens: expected an int32 tensor of shape (N + 1,), got {got}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets: expected shape {tuple(idx.shape)} (the shape of idx), got {tuple(targets.shape)}")
        if max_seqlen is None:
            max_seqlen = int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"max_seqlen: expected a host int >= 0, got {max_seqlen!r}")
        if max_seqlen > self.config.block_size:
            raise ValueError(f"max_seqlen: expected at most block_size = {self.config.block_size} (positions restart "
                             f"in each document), got {max_seqlen}")
        logits = self.logits(idx.reshape(1, -1), cu_seqlens=cu_seqlens.to(idx.device), max_seqlen=max_seqlen)
        logits = logits.view(*idx.shape, -1)
        return logits if targets is None else (logits, next_token_loss(logits, targets))

    def logits(self, idx, k_caches=None, v_caches=None, cache_seqlens=None, backend: str = "auto", block_table=None,
               *, cu_seqlens=None, max_seqlen=None):
        """The one body of every mode (training, prefill, cached prefill, decode step): no checks,
        and the cache lengths are not advanced (`forward` does both).

        idx (B, T) -> logits (B, T, V). Without caches: positions 0..T-1, causal attention over
        idx. With k_caches, v_caches (one (B, S, Hkv, D) buffer per layer, a KVCache's `k`, `v`)
        and cache_seqlens (its int32 (B,) lengths): positions start at each sequence's length,
        every layer appends its K/V in place and attends the cached prefix. Nothing here reads a
        host-side length, so `torch.compile(fullgraph=True)` traces a decode step once. backend
        goes to every attention call; under torch.compile pass a concrete one (resolving "auto"
        reads host-side state, see pytorch_mqa.ops.backends.resolve_backend). block_table: a paged
        KVCache's table (k_caches, v_caches are then its per-layer page pools). With rope, the
        rotary tables go to every layer: rotated here without a cache, in the op's append with one.

        Packed: idx (1, total), cu_seqlens int32 (N + 1,) on idx's device and max_seqlen (host int)
        as in `forward`; positions restart at each document (no host read, so this compiles too).
        """
        B, T = idx.shape
        tr = self.transformer
        if cu_seqlens is not None:
            t = torch.arange(T, device=idx.device, dtype=torch.int32)
            doc = torch.searchsorted(cu_seqlens, t, right=True) - 1  # the document each token belongs to
            pos = (t - cu_seqlens[doc]).long()
        elif cache_seqlens is None:
            pos = torch.arange(T, device=idx.device)
        elif T == 1:
            pos = cache_seqlens[:, None]
        else:
            pos = cache_seqlens[:, None] + torch.arange(T, device=idx.device, dtype=cache_seqlens.dtype)
        rope = None
        if self.rope:
            x = _dropout(tr.drop, tr.wte(idx))
            rope = (self.rope_cos, self.rope_sin, None if cache_seqlens is not None else pos.expand(B, T))
        else:
            x = _dropout(tr.drop, tr.wte(idx) + tr.wpe(pos))
        if k_caches is None:
            for block in tr.h:
                x = block(x, backend=backend, rope=rope, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        else:
            for block, k_cache, v_cache in zip(tr.h, k_caches, v_caches):
                x = block(x, k_cache, v_cache, cache_seqlens, backend, rope, block_table)
        return self.lm_head(tr.ln_f(x))

    # ---- checkpoints (see model/checkpoints.py) --------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, n_kv_head: int | None = None, n_head: int | None = None, dtype=None, device=None):
        """Load GPT-2 weights (Hugging Face directory or file, from-scratch layout, or save_pretrained).

        n_kv_head converts MHA weights to GQA/MQA by mean-pooling the K/V heads of each group.
        n_head is only needed for a bare weights file without config.json whose head dim is not 64.
        """
        return checkpoints.load_pretrained(cls, path, n_kv_head=n_kv_head, n_head=n_head, dtype=dtype, device=device)

    def save_pretrained(self, directory, format: str = "pytorch_mqa") -> None:
        """Write the model to `directory`.

        format "pytorch_mqa" (the default): config.json + model.safetensors, read back by
        from_pretrained (a tied lm_head is not stored, an untied one is). "hf": a Hugging Face GPT-2
        directory that transformers.GPT2LMHeadModel.from_pretrained loads with the same logits
        (GQA/MQA written with repeated KV heads). "scratch": the from-scratch tutorial's layout
        (tok_emb, trf_blocks, out_head), one torch.save file `model.pth` in `directory`. The last
        two have learned positions only (a rope model is saved as "pytorch_mqa").
        """
        if format == "pytorch_mqa":
            checkpoints.save_pretrained(self, directory)
        elif format == export.HF_FORMAT:
            export.save_hf(self, directory)
        elif format == export.SCRATCH_FORMAT:
            export.save_scratch(self, directory)
        else:
            raise ValueError(f"format: expected 'pytorch_mqa', 'hf' or 'scratch', got {format!r}")


__all__ = ["GPTConfig", "GPT", "Block", "CausalSelfAttention", "MLP", "Linear"]
