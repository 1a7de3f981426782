"""The cache op's serving arguments on CPU tensors (what backend "reference" runs there):
paged caches (block_table), cache slots (cache_batch_idx), left padding (cache_leftpad) and
rotary in the append (DESIGN §3), on the CPU kernels of `pytorch_mqa.ops.cpu` and
`pytorch_mqa.ops.cpu_variants`.

One call: the lengths, slots, table and padding are read on the host once and the capacity is
checked before anything is written; rotary (`reference.apply_rotary`, the one rotary body) turns
new k and q; new k/v are written through the row map with one index_put each; then sequence b's
live rows [P_b, K_b) (P_b the left padding, K_b = L_b + Tq) are gathered left-aligned, row b of a
(B, W) block with W = max(K_b - P_b): only the pages holding live rows are read, and the rows of
that block past a sequence's own keys are zeroed, so stale or NaN contents of other pages never
reach the result. Counted from P_b, sequence b then has K_b - P_b keys with the diagonal of query
i at i + (K_b - P_b) - Tq, the same alignment as i + K_b - Tq in cache rows: the block is a plain
ragged cache, which the fused CPU kernels attend (causal, window, ALiBi and softcap included).
Contiguous caches without slots and with one padding for every sequence skip the gather: the
block is a view of the caches.
"""

from __future__ import annotations

import torch

from pytorch_mqa import reference
from pytorch_mqa.ops import cpu, cpu_variants
from pytorch_mqa.ops.validation import check_cache_capacity


def _empty(q):
    B, Tq, Hq, D = q.shape
    return q.new_zeros(q.shape), torch.full((B, Hq, Tq), float("-inf"))


def _rotate(q, k, lens_t, causal, window_size, srv):
    """New k at positions L_b + t; q at the same positions if causal or a window is set, else
    every q row at L_b (FlashAttention's rule)."""
    cos, sin, inter = srv["rotary_cos"], srv["rotary_sin"], srv.get("rotary_interleaved", True)
    if cos.shape[-1] == 0:
        return q, k
    per_token = causal or tuple(window_size) != (-1, -1)
    k = reference.apply_rotary(k, cos, sin, reference.rotary_positions(lens_t, k.shape[1], True), inter)
    q = reference.apply_rotary(q, cos, sin, reference.rotary_positions(lens_t, q.shape[1], per_token), inter)
    return q, k


def _physical(k_cache, rows, block_table, j):
    """(first, second) indices of logical rows j (B, n) of the sequences whose cache slot or
    table row is `rows` (B,); entries past a sequence's pages are clamped (never visible)."""
    if block_table is None:
        return rows[:, None].expand_as(j), j
    page = k_cache.shape[1]
    table = block_table.to(torch.long)[rows]
    return table.gather(1, j // page).clamp(0, k_cache.shape[0] - 1), j % page


def attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, var: dict, srv: dict):
    """Same contract as `reference.attention_with_kv_cache` with `var` (window_size, softcap,
    alibi_slopes) and `srv` (the active serving arguments)."""
    B, Tq, Hq, D = q.shape
    block_table, slots, leftpad = srv.get("block_table"), srv.get("cache_batch_idx"), srv.get("cache_leftpad")
    S = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    lens = cache_seqlens.tolist()  # the one host read of the lengths in this call
    new = Tq if k is not None else 0
    check_cache_capacity(lens, S, new)
    if B == 0 or Tq == 0:
        return _empty(q)
    lens_t = torch.tensor(lens, dtype=torch.long)
    rows = torch.arange(B) if slots is None else slots.to(torch.long)
    if k is not None:
        if srv.get("rotary_cos") is not None:
            q, k = _rotate(q, k, lens_t, causal, var["window_size"], srv)
        j = lens_t[:, None] + torch.arange(new)[None, :]
        first, second = _physical(k_cache, rows, block_table, j)
        k_cache.index_put_((first, second), k.to(k_cache.dtype))
        v_cache.index_put_((first, second), v.to(v_cache.dtype))
    pads = [0] * B if leftpad is None else leftpad.tolist()
    n_keys = [L + new - p for L, p in zip(lens, pads)]  # live keys per sequence, counted from P_b
    W = max(n_keys)
    if W <= 0:
        return _empty(q)
    ragged = min(n_keys) != W
    if block_table is None and slots is None and min(pads) == max(pads):
        kl, vl = k_cache.narrow(1, pads[0], W), v_cache.narrow(1, pads[0], W)  # views
    else:
        j = (torch.tensor(pads, dtype=torch.long)[:, None] + torch.arange(W)[None, :]).clamp(max=S - 1)
        first, second = _physical(k_cache, rows, block_table, j)
        kl, vl = k_cache[first, second], v_cache[first, second]
    if ragged:
        dead = (torch.arange(W)[None, :] >= torch.tensor(n_keys)[:, None])[..., None, None]
        kl, vl = kl.masked_fill(dead, 0), vl.masked_fill(dead, 0)
    key_lens = torch.tensor(n_keys, dtype=torch.int32)
    if cpu_variants.has_variant(var["window_size"], var["softcap"], var["alibi_slopes"], 0.0):
        return cpu_variants.attention_with_kv_cache(
            q, kl, vl, None, None, key_lens, causal, scale, var["window_size"], var["softcap"], var["alibi_slopes"]
        )
    return cpu.attention_with_kv_cache(q, kl, vl, None, None, key_lens, causal, scale)


__all__ = ["attention_with_kv_cache"]
