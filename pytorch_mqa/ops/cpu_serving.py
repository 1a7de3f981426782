"""The cache op's serving arguments on CPU tensors (what backend "reference" runs there):
paged caches (block_table), cache slots (cache_batch_idx), left padding (cache_leftpad) and
rotary in the append (DESIGN §3).

The lengths are read on the host once and the capacity checked before anything is written.
"""

from __future__ import annotations

from pytorch_mqa import reference
from pytorch_mqa.ops.validation import check_cache_capacity


def attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, var: dict, srv: dict):
    """Same contract as `reference.attention_with_kv_cache` with `var` (window_size, softcap,
    alibi_slopes) and `srv` (the active serving arguments)."""
    block_table = srv.get("block_table")
    S = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    check_cache_capacity(cache_seqlens.tolist(), S, q.shape[1] if k is not None else 0)
    return reference.attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal=causal, scale=scale,
                                             **var, **srv)


__all__ = ["attention_with_kv_cache"]
