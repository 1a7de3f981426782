"""Tiny GPTs for the model, cache and generation tests (random weights, no downloads)."""

from __future__ import annotations

import torch

from pytorch_mqa import GPT, GPTConfig


def tiny_config(n_kv_head=2, **kw) -> GPTConfig:
    fields = dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32)
    fields.update(kw)
    return GPTConfig(**fields)


def tiny_gpt(n_kv_head=2, seed=0, std=0.3, **kw) -> GPT:
    """A GPT whose weights are drawn wider than GPT-2's init (std 0.02), so greedy decoding does
    not just repeat its input: its next-token choices depend on the whole prefix."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(n_kv_head, **kw))
    with torch.no_grad():
        randomize_(model, std)
    return model.eval()


def randomize_(model, std=0.3) -> None:
    """Redraw every parameter: weights N(0, std), LayerNorm scales 1 + N(0, 0.1), shifts N(0, 0.1).

    LayerNorms get distinct values too, so a mapping that swapped two of them would show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and any(s in name for s in ("ln", "norm")):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            else:
                p.normal_(0.0, std)


def tiny_hf_gpt2(seed=0, n_head=4, **kw):
    """A random-weight Hugging Face GPT2LMHeadModel built offline (no downloads)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    fields = dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=n_head, bos_token_id=None, eos_token_id=None)
    fields.update(kw)
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(**fields)).eval()
    randomize_(hf)
    return hf


def to_scratch_layout(model) -> dict:
    """A GPT's weights renamed into the from-scratch GPT-2 layout (tok_emb, trf_blocks, ...)."""
    sd = model.state_dict()
    C = model.config.n_embd
    out = {"tok_emb.weight": sd["transformer.wte.weight"], "pos_emb.weight": sd["transformer.wpe.weight"]}
    for i in range(model.config.n_layer):
        s, d = f"transformer.h.{i}.", f"trf_blocks.{i}."
        for name, w in zip(("W_query", "W_key", "W_value"), sd[s + "attn.c_attn.weight"].split(C)):
            out[f"{d}att.{name}.weight"] = w.clone()
        for name, b in zip(("W_query", "W_key", "W_value"), sd[s + "attn.c_attn.bias"].split(C)):
            out[f"{d}att.{name}.bias"] = b.clone()
        T = model.config.block_size
        out[d + "att.mask"] = torch.triu(torch.ones(T, T), diagonal=1)
        pairs = (("attn.c_proj", "att.out_proj"), ("mlp.c_fc", "ff.layers.0"), ("mlp.c_proj", "ff.layers.2"))
        for src, dst in pairs:
            out[d + dst + ".weight"] = sd[s + src + ".weight"]
            out[d + dst + ".bias"] = sd[s + src + ".bias"]
        for src, dst in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[d + dst + ".scale"] = sd[s + src + ".weight"]
            out[d + dst + ".shift"] = sd[s + src + ".bias"]
    out["final_norm.scale"] = sd["transformer.ln_f.weight"]
    out["final_norm.shift"] = sd["transformer.ln_f.bias"]
    out["out_head.weight"] = sd["transformer.wte.weight"].clone()
    return {k: v.contiguous() for k, v in out.items()}
