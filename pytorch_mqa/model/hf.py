"""Hugging Face `transformers` drop-in: run a model's attention through the package's ops.

    from pytorch_mqa.model.hf import register_hf_attention
    register_hf_attention()  # once per process; registers the name "pytorch_mqa"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="pytorch_mqa")
    # or, for a model already built: model.set_attn_implementation("pytorch_mqa")

transformers calls the attention function with q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D); they
are viewed as BSHD (no copy) and K/V are never repeated per query head, so GPT-2 (MHA) and
Llama-style GQA/MQA models both run the fused op. The model's `scaling`, its `sliding_window`
(Mistral-style: query i sees keys i - window + 1 .. i, the op's window_size=(window - 1, -1)),
its logit `softcap` (Gemma-2) and its attention dropout in training (`dropout`) go to the op.

Masks. The name is registered with transformers' SDPA mask builder, so the function receives
either no mask (causal, no padding: transformers leaves it to `is_causal`) or a 4-D boolean mask
(B, 1, Tq, Tk) (an additive float mask of 0 / large negative values is read the same way). The
mask is read once per forward (every layer gets the same tensor) and matched against what the
ops express: attention among each row's visible keys (the keys some query sees: padding
removed), full or causal (bottom-right aligned among those keys, as the ops are), with the
sliding window if the model has one. Query rows that see no key (left padding) or see exactly
what the row before them sees (right padding in a causal model) are padding. Without padding
the batch runs `pytorch_mqa.attention`; with padding (left or right, in prefill or in the cached
steps of `generate`) it runs `pytorch_mqa.attention_varlen` on the unpadded rows (cu_seqlens from
the mask) and the output is re-padded, padding query rows holding zeros. A mask that is none of
these (a bias, a chunked or custom pattern) or an additive position bias / attention sinks fall
back to transformers' own SDPA implementation, with a warning naming the reason; `strict=True`
raises instead. `transformers` stays optional: it is imported only when this module's functions
are called.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pytorch_mqa.ops import attention, attention_varlen

NAME = "pytorch_mqa"


class UnsupportedMaskError(ValueError):
    """The attention mask is not one the fused op can express (a bias, a chunked or custom pattern)."""


@dataclass
class MaskLayout:
    """A 4-D mask read as attention among each row's visible keys: which rows of q and k/v take
    part (q_rows (B, Tq), kv_rows (B, Tk) bool), causal or not, and whether anything is padding."""

    causal: bool
    q_rows: torch.Tensor
    kv_rows: torch.Tensor
    padded: bool
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0


def _visible(mask: torch.Tensor, B: int, Tq: int, Tk: int) -> torch.Tensor | None:
    """The mask as a boolean (B, Tq, Tk), or None if it is not one (a float bias, another shape)."""
    if mask.dim() != 4 or mask.shape[-2:] != (Tq, Tk) or mask.shape[1] != 1 or mask.shape[0] not in (1, B):
        return None
    if mask.dtype != torch.bool:
        if not torch.all((mask == 0) | (mask <= torch.finfo(mask.dtype).min / 2)):
            return None  # a float mask carrying a bias, not just visible / hidden
        mask = mask == 0
    return mask[:, 0].expand(B, Tq, Tk)


def _match(vis: torch.Tensor, causal: bool, left: int) -> MaskLayout | None:
    """The layout if `vis` is (causal or full, windowed if left >= 0) attention among each row's
    visible keys, padding query rows aside; else None."""
    kv_rows = vis.any(1)
    seen = vis.sum(2)
    q_rows = seen > 0
    if causal:  # a right-padded query sees what the query before it sees; a real one sees itself too
        same = torch.zeros_like(q_rows)
        same[:, 1:] = (vis[:, 1:] == vis[:, :-1]).all(-1)
        q_rows &= ~same
    nq, nk = q_rows.sum(1), kv_rows.sum(1)
    q_rank, k_rank = q_rows.cumsum(1) - 1, kv_rows.cumsum(1) - 1
    diag = (q_rank + (nk - nq)[:, None])[:, :, None]  # the key rank each query is aligned to
    expected = kv_rows[:, None, :].expand_as(vis)
    if causal:
        expected = expected & (k_rank[:, None, :] <= diag)
    if left >= 0:
        expected = expected & (k_rank[:, None, :] >= diag - left)
    if bool(((expected != vis) & q_rows[:, :, None]).any()):
        return None
    padded = not (bool(q_rows.all()) and bool(kv_rows.all()))
    layout = MaskLayout(causal, q_rows, kv_rows, padded)
    if padded:
        layout.cu_seqlens_q = F.pad(nq.cumsum(0), (1, 0)).to(torch.int32)
        layout.cu_seqlens_k = F.pad(nk.cumsum(0), (1, 0)).to(torch.int32)
        layout.max_seqlen_q, layout.max_seqlen_k = int(nq.max()), int(nk.max())
    return layout


_last: list = [None, None, None]  # (weakref to the last mask, its key, its layout): one analysis per forward


def mask_layout(mask: torch.Tensor, B: int, Tq: int, Tk: int, causal: bool, left: int = -1) -> MaskLayout | None:
    """How the ops run under a 4-D attention mask (see the module docstring), or None if they cannot.

    The full reading is tried first (it covers a single query), then the causal one if `causal`."""
    key = (tuple(mask.shape), mask.dtype, mask.device, B, Tq, Tk, causal, left)
    ref, last_key, layout = _last
    if ref is not None and ref() is mask and last_key == key:
        return layout
    vis = _visible(mask, B, Tq, Tk)
    layout = None
    if vis is not None:
        layout = _match(vis, False, left)
        if layout is None and causal:
            layout = _match(vis, True, left)
    _last[:] = [weakref.ref(mask), key, layout]
    return layout


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
    B, Tq, Tk = query.shape[0], query.shape[2], key.shape[2]
    sliding_window = kwargs.get("sliding_window")
    left = int(sliding_window) - 1 if sliding_window else -1
    softcap = float(kwargs.get("softcap") or 0.0)
    reason = None
    if kwargs.get("position_bias") is not None:
        reason = "an additive position bias"
    elif kwargs.get("s_aux") is not None:
        reason = "attention sinks (s_aux)"
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    layout = None
    if reason is None:
        if attention_mask is None:
            # As SDPA: with no mask, one query token sees every key; Tq > 1 is causal, and
            # Tk > Tq only happens when prefilling an empty static cache (keys past Tq are empty).
            causal = bool(causal) and Tq > 1
            if causal and Tk > Tq:
                key, value, Tk = key[:, :, :Tq], value[:, :, :Tq], Tq
        else:
            layout = mask_layout(attention_mask, B, Tq, Tk, bool(causal), left)
            if layout is None:
                reason = "an attention mask that is not causal or full attention with padding (a bias, a chunked or custom pattern)"
            else:
                causal = layout.causal
    if reason is not None:
        if strict:
            raise UnsupportedMaskError(f"pytorch_mqa attention cannot express {reason}")
        warnings.warn(f"pytorch_mqa attention: falling back to SDPA for {reason}", stacklevel=2)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    options = dict(causal=bool(causal), scale=scaling, window_size=(left, -1), softcap=softcap,
                   dropout_p=float(dropout or 0.0))
    if layout is None or not layout.padded:
        return attention(q, k, v, **options), None
    # Unpad (the rows that take part, sequence after sequence), run varlen, re-pad with zeros.
    out = attention_varlen(q[layout.q_rows], k[layout.kv_rows], v[layout.kv_rows], layout.cu_seqlens_q,
                           layout.cu_seqlens_k, layout.max_seqlen_q, layout.max_seqlen_k, **options)
    full = q.new_zeros(q.shape)
    full[layout.q_rows] = out
    return full, None


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


__all__ = ["register_hf_attention", "pytorch_mqa_attention_forward", "mask_layout", "MaskLayout",
           "UnsupportedMaskError", "NAME"]
