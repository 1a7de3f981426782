"""apply_rotary_emb with FlashAttention's signature, written independently of pytorch_mqa (it builds
the expected values of FlashAttention's kvcache test): float32 math, one rounding to x's dtype."""

from __future__ import annotations

import torch


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """x (B, S, H, D); cos, sin (S_ro, rotary_dim / 2); row t of sequence b is rotated at position
    seqlen_offsets[b] + t (an int offset: the same for all). Positions >= S_ro use cos 1, sin 0.
    interleaved: pairs (2i, 2i + 1) (GPT-J); else (i, i + rotary_dim / 2) (GPT-NeoX)."""
    if cu_seqlens is not None:
        raise NotImplementedError("apply_rotary_emb: cu_seqlens is not needed by the tests this stand-in serves")
    B, S = x.shape[0], x.shape[1]
    half = cos.shape[1]
    rd = 2 * half
    if isinstance(seqlen_offsets, torch.Tensor):
        off = seqlen_offsets.to(device=x.device, dtype=torch.long).reshape(B, 1)
    else:
        off = torch.full((B, 1), int(seqlen_offsets), dtype=torch.long, device=x.device)
    pos = off + torch.arange(S, device=x.device)[None, :]  # (B, S)
    inside = pos < cos.shape[0]
    idx = pos.clamp(max=cos.shape[0] - 1)
    c = torch.where(inside[..., None], cos.float()[idx], torch.ones((), device=x.device))[:, :, None, :]
    s = torch.where(inside[..., None], sin.float()[idx], torch.zeros((), device=x.device))[:, :, None, :]
    xr = x[..., :rd].float()
    if interleaved:
        x0, x1 = xr[..., 0::2], xr[..., 1::2]
        o = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    else:
        x0, x1 = xr[..., :half], xr[..., half:]
        o = torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    out = torch.cat((o.to(x.dtype), x[..., rd:]), dim=-1)
    if inplace:
        x.copy_(out)
        return x
    return out


__all__ = ["apply_rotary_emb"]
