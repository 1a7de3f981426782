"""Hugging Face `transformers` drop-in: run a model's attention through `pytorch_mqa.attention`.

    from pytorch_mqa.model.hf import register_hf_attention
    register_hf_attention()  # once per process; registers the name "pytorch_mqa"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="pytorch_mqa")
    # or, for a model already built: model.set_attn_implementation("pytorch_mqa")

transformers calls the attention function with q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D); they
are viewed as BSHD (no copy) and K/V are never repeated per query head, so GPT-2 (MHA) and
Llama-style GQA/MQA models both run the fused op.

Masks. The name is registered with transformers' SDPA mask builder, so the function receives
either no mask (causal, no padding: transformers leaves it to `is_causal`) or a 4-D boolean mask
(B, 1, Tq, Tk). The op expresses exactly the causal pattern (bottom-right aligned), so a mask
equal to it runs the op with causal=True. Any other mask (padding, sliding windows, bias) and
attention dropout in training fall back to transformers' own SDPA implementation, with a warning
naming the reason; `strict=True` raises instead. `transformers` stays optional: it is imported
only when this module's functions are called.
"""

from __future__ import annotations

import warnings

import torch

from pytorch_mqa.ops import attention

NAME = "pytorch_mqa"


class UnsupportedMaskError(ValueError):
    """The attention mask is not one the fused op can express (padding, windows, bias)."""


def _causal_pattern(Tq: int, Tk: int, device) -> torch.Tensor:
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    return j <= i + (Tk - Tq)


def _mask_kind(mask: torch.Tensor, Tq: int, Tk: int) -> str | None:
    """'causal' or 'full' if the 4-D mask is one of those patterns for every batch row, else None."""
    visible = mask if mask.dtype == torch.bool else mask == 0
    if not mask.dtype == torch.bool and not torch.all((mask == 0) | (mask <= torch.finfo(mask.dtype).min / 2)):
        return None  # a float mask carrying a bias, not just visible / hidden
    if visible.shape[-2:] != (Tq, Tk):
        return None
    if bool(visible.all()):
        return "full"
    if bool((visible == _causal_pattern(Tq, Tk, mask.device)).all()):
        return "causal"
    return None


def pytorch_mqa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    strict: bool = False,
    **kwargs,
):
    """transformers attention function: q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) -> ((B, Tq, Hq, D), None)."""
    Tq, Tk = query.shape[2], key.shape[2]
    reason = None
    if dropout and dropout > 0.0:
        reason = f"attention dropout {dropout} (the fused op has none)"
    elif kwargs.get("softcap") is not None:
        reason = "logit softcapping"
    elif kwargs.get("position_bias") is not None:
        reason = "an additive position bias"
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if reason is None:
        if attention_mask is None:
            # As SDPA: with no mask, one query token sees every key; Tq > 1 is causal, and
            # Tk > Tq only happens when prefilling an empty static cache (keys past Tq are empty).
            if causal and Tq > 1 and Tk > Tq:
                key, value, Tk = key[:, :, :Tq], value[:, :, :Tq], Tq
        else:
            kind = _mask_kind(attention_mask, Tq, Tk)
            if kind is None:
                reason = "an attention mask that is not plain causal (padding, a window or a bias)"
            else:
                causal = kind == "causal"
    if reason is not None:
        if strict:
            raise UnsupportedMaskError(f"pytorch_mqa attention cannot express {reason}")
        warnings.warn(f"pytorch_mqa attention: falling back to SDPA for {reason}", stacklevel=2)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    out = attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=bool(causal), scale=scaling
    )
    return out, None


def register_hf_attention(name: str = NAME) -> str:
    """Register the function (and SDPA's mask builder) under `name` in transformers; returns name."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError(
            f"register_hf_attention needs transformers >= 4.48 with AttentionInterface (pip install transformers): {e}"
        ) from None
    AttentionInterface.register(name, pytorch_mqa_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


__all__ = ["register_hf_attention", "pytorch_mqa_attention_forward", "UnsupportedMaskError", "NAME"]
