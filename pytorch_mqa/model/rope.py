"""Rotary position embedding (RoPE) tables for `GPTConfig(pos_embedding="rope")`.

Only the cos/sin tables live here; the rotation itself is `pytorch_mqa.reference.apply_rotary`
(prefill and training) or the fused rotary append of `attention_with_kv_cache` (cached prefill
and decode), so there is one rotary formula in the package. The layout is GPT-NeoX's
(non-interleaved, as Llama): channel i pairs with channel i + D/2, at frequency
`theta ** (-2i / D)` (Su et al., 2021, "RoFormer", eq. 15).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_tables(seq_len: int, dim: int, theta: float = 10000.0, *, device=None) -> tuple[Tensor, Tensor]:
    """(cos, sin), each float32 (seq_len, dim // 2): row p holds cos/sin(p * theta ** (-2i / dim)).

    The angles are computed in float64 and rounded once, so the tables do not drift with the
    position as a float32 product would.
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len: expected an int >= 1, got {seq_len!r}")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 2 or dim % 2:
        raise ValueError(f"dim: expected an even int >= 2, got {dim!r}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 1.0:
        raise ValueError(f"theta: expected a number > 1, got {theta!r}")
    inv_freq = float(theta) ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    angles = torch.arange(seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


__all__ = ["rope_tables"]
