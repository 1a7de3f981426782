"""FlashAttention 2's Python interface, mapped onto pytorch_mqa's public functions.

Only argument names and return conventions are translated here; every number comes from
`pytorch_mqa.attention`, `pytorch_mqa.attention_varlen` or `pytorch_mqa.attention_with_kv_cache`,
run on the backend named by the environment variable PYTORCH_MQA_FA_BACKEND ("reference" if unset).

The translation, exactly:
- softmax_scale -> scale; window_size (two ints, or a 2-element tensor as the tests pass it)
  -> ints; causal, softcap, alibi_slopes, dropout_p pass through. deterministic and num_splits
  are accepted and ignored (the package chooses its own split; its backward is deterministic).
- Packed layouts (qkv, kv) are unbound along their stacking dimension: views, so gradients flow
  back into the packed tensor.
- Dropout: the mask's seed comes from a torch.Generator seeded from torch's global generator,
  so torch.manual_seed fixes it. With return_attn_probs and dropout_p > 0 the third result
  (S_dmask) is built from further calls of the same public function on the same q, k and the
  same seed, with an identity V (one output column per key, D keys per call): without dropout
  that gives P, with it P * keep / (1 - p). S_dmask is P divided by its row maximum, negated
  where the package dropped the entry. FlashAttention's tests rebuild P from it with their own
  log-sum-exp over one key block (`_get_block_size_n` returns a block that covers every key)
  and use its sign as the dropout mask of their reference, so the mask, the kept probabilities
  and the 1 / (1 - p) scaling they check are the package's. This holds for any backend whose
  mask depends only on the seed and the (sequence, head, query, key) position, as both the
  oracle's and the Triton kernels' masks do.
- flash_attn_with_kvcache: FlashAttention's causal default (False) is passed explicitly (the
  package defaults to True). k/v with fewer rows than q (seqlen_new < seqlen_q) are appended by
  a first call of the same op on the first seqlen_new rows of q (its output is discarded), then
  q attends through a second call without new rows at cache_seqlens + seqlen_new; with rotary
  in that case q is rotated by the package's `pytorch_mqa.reference.apply_rotary` at
  FlashAttention's positions before the second call. Arguments the installed package does not
  have (block_table, cache_batch_idx, cache_leftpad, rotary_cos/sin) skip the test, naming them.
- Input errors: the package raises ValueError/TypeError naming the argument; FlashAttention
  raises RuntimeError. The package's error is re-raised as RuntimeError with its own message.
  A NotImplementedError (a feature the forced backend lacks) skips the test with its message.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

import pytorch_mqa

USE_TRITON_ROCM = False


def _backend() -> str:
    return os.environ.get("PYTORCH_MQA_FA_BACKEND", "reference")


def _get_block_size_n(device, head_dim, is_dropout, is_causal):
    """One key block covering every key (S_dmask is normalised by the row maximum over all keys)."""
    return 1 << 30


def round_multiple(x, m):
    return (x + m - 1) // m * m


def _window(window_size):
    return int(window_size[0]), int(window_size[1])


def _new_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


def _gen(seed):
    return None if seed is None else torch.Generator().manual_seed(seed)


def _as_runtime_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as e:  # a feature the forced backend lacks: reported as a skip, with the reason
        pytest.skip(f"unsupported by pytorch_mqa backend {_backend()!r}: {e}")
    except (ValueError, TypeError) as e:
        raise RuntimeError(str(e)) from e


def _s_dmask(p, p_drop):
    """FlashAttention's S_dmask convention from the package's undropped and dropped probabilities."""
    pmax = p.amax(dim=-1, keepdim=True)
    s = p / torch.where(pmax > 0, pmax, torch.ones_like(pmax))
    return torch.where((p_drop == 0) & (p > 0), -s, s)


def _eye_columns(rel, j0, D, like):
    """V rows (N, D): row n is one-hot at column rel[n] - j0 when 0 <= rel[n] - j0 < D, else zero."""
    col = rel - j0
    v = torch.zeros(rel.shape[0], D, dtype=like.dtype)
    ok = (col >= 0) & (col < D)
    v[torch.nonzero(ok).flatten(), col[ok]] = 1
    return v


# ---- fixed-length attention ----------------------------------------------------------------------


def _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs):
    seed = _new_seed() if dropout_p > 0 else None
    kw = dict(causal=bool(causal), scale=softmax_scale, window_size=_window(window_size), softcap=float(softcap),
              alibi_slopes=alibi_slopes, backend=_backend())
    out, lse = _as_runtime_error(pytorch_mqa.attention, q, k, v, dropout_p=float(dropout_p), generator=_gen(seed),
                                 return_lse=True, **kw)
    if not return_attn_probs:
        return out
    s_dmask = None
    if dropout_p > 0:
        B, Tq, Hq, D = q.shape
        Tk, Hkv = k.shape[1], k.shape[2]
        p = torch.zeros(B, Hq, round_multiple(Tq, 128), round_multiple(Tk, 128))
        p_drop = torch.zeros_like(p)
        rel = torch.arange(Tk)
        with torch.no_grad():
            qd, kd = q.detach(), k.detach()
            for j0 in range(0, Tk, D):
                eye = _eye_columns(rel, j0, D, q)[None, :, None, :].expand(B, Tk, Hkv, D).contiguous()
                n = min(D, Tk - j0)
                o = pytorch_mqa.attention(qd, kd, eye, **kw)
                od = pytorch_mqa.attention(qd, kd, eye, dropout_p=float(dropout_p), generator=_gen(seed), **kw)
                p[:, :, :Tq, j0:j0 + n] = o[..., :n].float().permute(0, 2, 1, 3)
                p_drop[:, :, :Tq, j0:j0 + n] = od[..., :n].float().permute(0, 2, 1, 3)
        s_dmask = _s_dmask(p, p_drop).to(q.dtype)
    return out, lse, s_dmask


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                             alibi_slopes=None, deterministic=False, return_attn_probs=False):
    k, v = kv.unbind(dim=2)
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                              alibi_slopes=None, deterministic=False, return_attn_probs=False):
    q, k, v = qkv.unbind(dim=2)
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)


# ---- varlen --------------------------------------------------------------------------------------


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
            return_attn_probs, block_table=None):
    seed = _new_seed() if dropout_p > 0 else None
    kw = dict(causal=bool(causal), scale=softmax_scale, window_size=_window(window_size), softcap=float(softcap),
              alibi_slopes=alibi_slopes, backend=_backend())
    if block_table is not None:  # paged K/V (FlashAttention returns no attention probabilities here)
        out, lse = _as_runtime_error(pytorch_mqa.attention_varlen, q, k, v, cu_q, cu_k, int(max_q), int(max_k),
                                     dropout_p=float(dropout_p), generator=_gen(seed), block_table=block_table,
                                     return_lse=True, **kw)
        return (out, lse, None) if return_attn_probs else out
    out, lse = _as_runtime_error(pytorch_mqa.attention_varlen, q, k, v, cu_q, cu_k, int(max_q), int(max_k),
                                 dropout_p=float(dropout_p), generator=_gen(seed), return_lse=True, **kw)
    if not return_attn_probs:
        return out
    s_dmask = None
    if dropout_p > 0:
        Hq, D = q.shape[1], q.shape[2]
        Hkv, total_k = k.shape[1], k.shape[0]
        cq, ck = cu_q.tolist(), cu_k.tolist()
        B = len(cq) - 1
        starts = torch.repeat_interleave(torch.tensor(ck[:-1]), torch.tensor([ck[b + 1] - ck[b] for b in range(B)]))
        rel = torch.arange(total_k) - starts  # key index within its own sequence
        p = torch.zeros(B, Hq, round_multiple(max_q, 128), round_multiple(max_k, 128))
        p_drop = torch.zeros_like(p)
        with torch.no_grad():
            qd, kd = q.detach(), k.detach()
            for j0 in range(0, max(max_k, 1), D):
                eye = _eye_columns(rel, j0, D, q)[:, None, :].expand(total_k, Hkv, D).contiguous()
                n = min(D, max_k - j0)
                o = pytorch_mqa.attention_varlen(qd, kd, eye, cu_q, cu_k, int(max_q), int(max_k), **kw)
                od = pytorch_mqa.attention_varlen(qd, kd, eye, cu_q, cu_k, int(max_q), int(max_k),
                                                  dropout_p=float(dropout_p), generator=_gen(seed), **kw)
                for b in range(B):
                    rows = slice(cq[b], cq[b + 1])
                    tq = cq[b + 1] - cq[b]
                    p[b, :, :tq, j0:j0 + n] = o[rows, :, :n].float().permute(1, 0, 2)
                    p_drop[b, :, :tq, j0:j0 + n] = od[rows, :, :n].float().permute(1, 0, 2)
        s_dmask = _s_dmask(p, p_drop).to(q.dtype)
    return out, lse, s_dmask


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, return_attn_probs, block_table)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    k, v = kv.unbind(dim=1)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    q, k, v = qkv.unbind(dim=1)
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, return_attn_probs)


# ---- KV cache ------------------------------------------------------------------------------------

_SERVING_ARGS = ("block_table", "cache_batch_idx", "cache_leftpad", "rotary_cos")


def _cache_params():
    return set(inspect.signature(pytorch_mqa.attention_with_kv_cache).parameters)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    given = dict(block_table=block_table, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                 rotary_cos=rotary_cos)
    have = _cache_params()
    missing = [name for name in _SERVING_ARGS if given[name] is not None and name not in have]
    if missing:
        pytest.skip(f"unsupported by pytorch_mqa: attention_with_kv_cache({', '.join(missing)}=...)")
    B, Tq = q.shape[0], q.shape[1]
    if cache_seqlens is None:
        cache_seqlens = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    window = _window(window_size)
    kw = dict(causal=bool(causal), scale=softmax_scale, window_size=window, softcap=float(softcap),
              alibi_slopes=alibi_slopes, backend=_backend())
    for name in ("block_table", "cache_batch_idx", "cache_leftpad"):
        if given[name] is not None:
            kw[name] = given[name]
    rotary = {}
    if rotary_cos is not None:
        rotary = dict(rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=bool(rotary_interleaved))
    call = pytorch_mqa.attention_with_kv_cache
    if k is not None and k.shape[1] != Tq:
        t_new = k.shape[1]
        # append: the first t_new rows of q stand in for a query block of t_new rows (output discarded)
        _as_runtime_error(call, q[:, :t_new].contiguous(), k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                          **kw, **rotary)
        q_att = q
        if rotary:
            from pytorch_mqa.reference import apply_rotary

            pos = cache_seqlens.to(torch.long)[:, None]
            if causal or window != (-1, -1):
                pos = pos + torch.arange(Tq)[None, :]
            else:
                pos = pos.expand(B, Tq)
            q_att = apply_rotary(q, rotary_cos, rotary_sin, pos, bool(rotary_interleaved))
        out, lse = _as_runtime_error(call, q_att, k_cache, v_cache, cache_seqlens=cache_seqlens + t_new,
                                     return_lse=True, **kw)
    else:
        out, lse = _as_runtime_error(call, q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, return_lse=True,
                                     **kw, **rotary)
    return (out, lse) if return_softmax_lse else out
