"""Writing a GPT in other projects' layouts: a Hugging Face GPT-2 directory, the from-scratch layout.

Both layouts are multi-head only (one K and one V head per query head). A GQA/MQA model is written
with each of its KV heads repeated for the query heads of its group, which computes exactly the
same attention (query head h reads KV head h // G either way), so the logits are the same; the
file is as large as an MHA model's. Written back by this package, the repeated heads load as MHA
(`n_kv_head=` converts them back without loss, since the heads of a group are identical).
"""

from __future__ import annotations

import json
import os

import torch

HF_FORMAT, SCRATCH_FORMAT = "hf", "scratch"


def _mha_qkv(model, i: int) -> tuple[torch.Tensor, ...]:
    """Layer i's (q, k, v) weights (C, C) and biases (C,) or None, with KV heads repeated to n_head."""
    cfg = model.config
    H, Hkv, D, C = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd
    attn = model.transformer.h[i].attn.c_attn
    split = (H * D, Hkv * D, Hkv * D)

    def expand(t):  # (Hkv * D, ...) -> (H * D, ...)
        return t.reshape(Hkv, D, *t.shape[1:]).repeat_interleave(H // Hkv, dim=0).reshape(H * D, *t.shape[1:])

    q, k, v = attn.weight.detach().split(split, dim=0)
    w = (q, expand(k), expand(v))
    if attn.bias is None:
        b = tuple(q.new_zeros(C) for _ in range(3))
    else:
        bq, bk, bv = attn.bias.detach().split(split)
        b = (bq, expand(bk), expand(bv))
    return w, b


def _bias(linear_or_norm, n: int, like: torch.Tensor) -> torch.Tensor:
    b = getattr(linear_or_norm, "bias", None)
    return like.new_zeros(n) if b is None else b.detach()


def _require_learned_positions(model, fmt: str) -> None:
    """Both export layouts are GPT-2's, with a learned position table (wpe / pos_emb)."""
    if model.config.pos_embedding != "learned":
        raise ValueError(
            f"format: {fmt!r} is a GPT-2 layout with learned positions, this model has "
            f"pos_embedding={model.config.pos_embedding!r}; expected format='pytorch_mqa'"
        )


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights under GPT2LMHeadModel's names (Conv1D weights stored (in, out))."""
    _require_learned_positions(model, HF_FORMAT)
    cfg, t = model.config, model.transformer
    C = cfg.n_embd
    w0 = t.wte.weight.detach()
    sd = {"transformer.wte.weight": w0, "transformer.wpe.weight": t.wpe.weight.detach()}
    for i, block in enumerate(t.h):
        p = f"transformer.h.{i}."
        (q, k, v), (bq, bk, bv) = _mha_qkv(model, i)
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = block.ln_1.weight.detach(), _bias(block.ln_1, C, w0)
        sd[p + "attn.c_attn.weight"] = torch.cat([q, k, v]).t()
        sd[p + "attn.c_attn.bias"] = torch.cat([bq, bk, bv])
        sd[p + "attn.c_proj.weight"] = block.attn.c_proj.weight.detach().t()
        sd[p + "attn.c_proj.bias"] = _bias(block.attn.c_proj, C, w0)
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = block.ln_2.weight.detach(), _bias(block.ln_2, C, w0)
        sd[p + "mlp.c_fc.weight"] = block.mlp.c_fc.weight.detach().t()
        sd[p + "mlp.c_fc.bias"] = _bias(block.mlp.c_fc, 4 * C, w0)
        sd[p + "mlp.c_proj.weight"] = block.mlp.c_proj.weight.detach().t()
        sd[p + "mlp.c_proj.bias"] = _bias(block.mlp.c_proj, C, w0)
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = t.ln_f.weight.detach(), _bias(t.ln_f, C, w0)
    if model.lm_head.weight is not t.wte.weight:
        sd["lm_head.weight"] = model.lm_head.weight.detach()
    return {k: v.contiguous().cpu() for k, v in sd.items()}


def hf_config(model) -> dict:
    """A GPT2Config as config.json: GPT-2's architecture at this model's shape."""
    cfg = model.config
    tied = model.lm_head.weight is model.transformer.wte.weight
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.attn_dropout, "initializer_range": 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": tied, "bos_token_id": cfg.vocab_size - 1, "eos_token_id": cfg.vocab_size - 1,
        "torch_dtype": str(model.transformer.wte.weight.dtype).replace("torch.", ""),
    }


def save_hf(model, directory: str) -> None:
    """A directory `transformers.GPT2LMHeadModel.from_pretrained` loads: config.json + model.safetensors."""
    from safetensors.torch import save_file

    sd = hf_state_dict(model)  # its checks run before anything is written
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(model), f, indent=2)
    save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def scratch_state_dict(model) -> dict[str, torch.Tensor]:
    """The from-scratch GPT-2 layout: tok_emb, pos_emb, trf_blocks.N.{att.W_query|W_key|W_value|out_proj,
    ff.layers.0|2, norm1|norm2.scale|shift}, final_norm, out_head (Linear weights (out, in))."""
    _require_learned_positions(model, SCRATCH_FORMAT)
    cfg, t = model.config, model.transformer
    C = cfg.n_embd
    w0 = t.wte.weight.detach()
    sd = {"tok_emb.weight": w0, "pos_emb.weight": t.wpe.weight.detach()}
    for i, block in enumerate(t.h):
        p = f"trf_blocks.{i}."
        (q, k, v), (bq, bk, bv) = _mha_qkv(model, i)
        for name, w, b in (("W_query", q, bq), ("W_key", k, bk), ("W_value", v, bv)):
            sd[f"{p}att.{name}.weight"], sd[f"{p}att.{name}.bias"] = w, b
        sd[p + "att.out_proj.weight"] = block.attn.c_proj.weight.detach()
        sd[p + "att.out_proj.bias"] = _bias(block.attn.c_proj, C, w0)
        sd[p + "ff.layers.0.weight"], sd[p + "ff.layers.0.bias"] = block.mlp.c_fc.weight.detach(), _bias(
            block.mlp.c_fc, 4 * C, w0)
        sd[p + "ff.layers.2.weight"], sd[p + "ff.layers.2.bias"] = block.mlp.c_proj.weight.detach(), _bias(
            block.mlp.c_proj, C, w0)
        sd[p + "norm1.scale"], sd[p + "norm1.shift"] = block.ln_1.weight.detach(), _bias(block.ln_1, C, w0)
        sd[p + "norm2.scale"], sd[p + "norm2.shift"] = block.ln_2.weight.detach(), _bias(block.ln_2, C, w0)
    sd["final_norm.scale"], sd["final_norm.shift"] = t.ln_f.weight.detach(), _bias(t.ln_f, C, w0)
    sd["out_head.weight"] = model.lm_head.weight.detach()  # the layout always stores its head
    return {k: v.contiguous().cpu().clone() for k, v in sd.items()}


def save_scratch(model, path: str) -> None:
    """The from-scratch layout as one torch.save file (a directory gets `model.pth`)."""
    sd = scratch_state_dict(model)  # its checks run before anything is written
    if os.path.isdir(path) or not os.path.splitext(path)[1]:
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, "model.pth")
    torch.save(sd, path)


__all__ = ["save_hf", "save_scratch", "hf_state_dict", "hf_config", "scratch_state_dict", "HF_FORMAT",
           "SCRATCH_FORMAT"]
