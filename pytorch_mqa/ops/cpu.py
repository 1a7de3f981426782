"""The CPU kernels of both ops (what backend "reference" runs on CPU tensors), in Python.

Where the C++ CPU kernels of csrc/cpu/ are loaded (pytorch_mqa.ops.cpu_ext), the plain calls run
there instead, with the same kernel calls: `attention` without variants, non-causal or Tq == Tk
(csrc/cpu/attention.cpp, which also records the backward, calling `attention_backward` below where
`fused_differentiable_ok` says the fused backward alone is not it) and the plain decode step
(csrc/cpu/attention_with_kv_cache.cpp); every other call still runs here.

They call PyTorch's fused CPU attention, `aten._scaled_dot_product_flash_attention_for_cpu`
(blocked online softmax, GQA without expanding K/V, returns the logsumexp) and its backward,
wherever its semantics match the contract, and add what it lacks:

- bottom-right causal alignment. The kernel's `is_causal` is top-left. For Tq == Tk the two agree;
  for Tq > Tk the first Tq - Tk query rows see no key (zeros, lse = -inf) and the rest are a
  square top-left problem; for Tq < Tk the keys split into a block every query sees (non-causal)
  and a square top-left causal block, merged through their logsumexps. Either way the work is
  that of the causal problem itself, never a masked full one.
- the gradient through the LSE. The kernel's backward takes dS = P * (dP - rowsum(dO * O)); a
  nonzero dLSE adds P * dLSE. The backward then runs on inputs padded by one head-dim column (q, k,
  v: 0; dO: 1; O: -dLSE), so the kernel's own row sum carries the term exactly.
- decoding. The new rows are written into the caches in place (a slice copy when every sequence
  has the same length, one index_put otherwise), then the kernel reads the caches as strided
  views of the rows some sequence can see: no copy of K/V, no loop over sequences. For one query
  row the G query heads of a KV head become G query rows of one head (a free view), so each K/V
  row is read once per KV head instead of once per query head (or e times, when B * Hkv alone
  would leave threads idle: see `_expansion`). Ragged lengths use a float mask. The common
  step (one row, equal lengths) builds all its views with one as_strided call each
  (`_decode_step`): a small step is 50-100 us, of which each tensor call is about 1 us.
- parallelism of the backward: with fewer (batch, KV head) pairs than threads, K/V are expanded
  just enough to give every thread a task (`_expansion`); in float16/bfloat16 with G > 1 fully,
  so that dK/dV are summed over the query heads in float32.

Lengths are read on the host once per call, and the capacity check (DESIGN §4) happens there,
before anything is written. The oracle (`pytorch_mqa.reference`) is the readable definition the
tests compare these kernels against.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from pytorch_mqa.ops.validation import check_cache_capacity

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _bhsd(x):
    """(B, T, H, D) -> a (B, H, T, D) view; copied only if its last dim is not unit-stride."""
    x = x.transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()


def _empty_result(q):
    B, Tq, Hq, D = q.shape
    return q.new_zeros((B, Tq, Hq, D)), q.new_full((B, Hq, Tq), float("-inf"), dtype=torch.float32)


def lse_layout(B: int, Hq: int, Tq: int, like: torch.Tensor) -> torch.Tensor:
    """An empty float32 lse (B, Hq, Tq) laid out as the fused kernel lays its own out: a view of a
    (B, Tq, Hq) buffer. `attention`'s CPU kernels return this layout (no copy of the kernel's
    lse), and the op's fake declares it (library.py)."""
    return like.new_empty((B, Tq, Hq), dtype=torch.float32).transpose(1, 2)


def as_lse_layout(lse: torch.Tensor) -> torch.Tensor:
    """lse (B, Hq, Tq) in `lse_layout` (itself when it already is, else a copy)."""
    B, Hq, Tq = lse.shape
    if lse.stride() == (Tq * Hq, 1, Hq):
        return lse
    return lse_layout(B, Hq, Tq, lse).copy_(lse)


def _empty_attention(q):
    B, Tq, Hq, D = q.shape
    return q.new_zeros((B, Tq, Hq, D)), lse_layout(B, Hq, Tq, q).fill_(float("-inf"))


def _merge(o1, l1, o2, l2, dtype):
    """Combine two softmax-normalised partial results over disjoint key sets through their LSEs."""
    lse = torch.logaddexp(l1, l2, out=torch.empty_like(l1))  # l1's layout
    w1, w2 = torch.exp(l1 - lse).unsqueeze(-1), torch.exp(l2 - lse).unsqueeze(-1)
    return (o1.float() * w1 + o2.float() * w2).to(dtype), lse


def _attend(q, k, v, causal, scale):
    """Attention on (B, H, T, D) views with bottom-right causal alignment.

    Returns out (B, Hq, Tq, D) laid out as (B, Tq, Hq, D) in memory, and lse (B, Hq, Tq) laid
    out as (B, Tq, Hq) (`lse_layout`). Requires Tk >= 1.
    """
    Tq, Tk = q.shape[2], k.shape[2]
    if not causal or Tq == Tk:
        return _flash(q, k, v, 0.0, causal, scale=scale)
    if Tq > Tk:
        skip = Tq - Tk  # these rows see no key
        o, l = _flash(q[:, :, skip:], k, v, 0.0, True, scale=scale)
        B, Hq, _, D = q.shape
        out = q.new_zeros((B, Tq, Hq, D)).transpose(1, 2)
        out[:, :, skip:] = o
        lse = lse_layout(B, Hq, Tq, l).fill_(float("-inf"))
        lse[:, :, skip:] = l
        return out, lse
    n = Tk - Tq  # keys [0, n) are visible to every query; [n, Tk) form a square causal block
    o1, l1 = _flash(q, k[:, :, :n], v[:, :, :n], 0.0, False, scale=scale)
    o2, l2 = _flash(q, k[:, :, n:], v[:, :, n:], 0.0, True, scale=scale)
    return _merge(o1, l1, o2, l2, q.dtype)


def attention_forward(q, k, v, causal: bool, scale: float):
    """out (B, Tq, Hq, D) contiguous and lse (B, Hq, Tq) float32 in `lse_layout`, as
    `reference.attention`."""
    if q.numel() == 0 or k.shape[1] == 0:
        return _empty_attention(q)
    out, lse = _attend(_bhsd(q), _bhsd(k), _bhsd(v), causal, scale)
    return out.transpose(1, 2).contiguous(), lse


def fused_differentiable_ok(q, k, causal: bool) -> bool:
    """Whether `fused_differentiable` serves these inputs: not where this package's backward
    differs from the fused op's own, i.e. causal with Tq != Tk (bottom-right alignment), empty
    inputs, or a backward that `_kernel_backward` splits over threads or sums in float32 (e > 1)."""
    B, Tq, Hq, _ = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if (causal and Tq != Tk) or Tk == 0 or q.numel() == 0:
        return False
    return Hq == Hkv or (q.dtype == torch.float32 and _expansion(B, Hq, Hkv) == 1)


def fused_differentiable(q, k, v, causal: bool, scale: float):
    """`attention_forward`'s out from PyTorch's fused op itself, differentiable through PyTorch's
    own autograd formula for it (a C++ backward node, the same backward kernel call that
    `attention_backward` makes here), where `fused_differentiable_ok`. The fused op's lse has no
    gradient formula, so this serves only calls that do not return lse (the public function's
    eager path)."""
    out, _ = _flash(_bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, scale=scale)
    return out.transpose(1, 2)


def _expansion(B, Hq, Hkv):
    """Into how many parts e to split the G query heads of each KV head so that the kernel has a
    task per thread: e is the smallest divisor of G with B * Hkv * e >= threads (1 if there are
    enough tasks already). With fewer tasks than threads the kernel runs its one task inline and
    the BLAS calls inside it go multi-threaded, one parallel region per small matmul: MQA at B = 1
    on 2 threads was 3x slower in the backward, and on a loaded machine (every region waits for
    a descheduled thread) a decode step went from 0.06 ms to over 50 ms.

    The backward expands K/V e times (a copy of K/V and a sum of dK/dV over e); the one-row
    decode views its G query rows per KV head as e heads of G/e rows (no copy)."""
    G, threads = Hq // Hkv, torch.get_num_threads()
    if G == 1 or B * Hkv >= threads:
        return 1
    return next(e for e in range(2, G + 1) if G % e == 0 and (B * Hkv * e >= threads or e == G))


def _kernel_backward(do, q, k, v, out, lse, causal, scale):
    B, Hq, Hkv = q.shape[0], q.shape[1], k.shape[1]
    # In float16/bfloat16 the kernel sums dK/dV over the G query heads in the input dtype (twice
    # the oracle's low-precision error at G = 8): expand fully and sum in float32 instead.
    low = q.dtype != torch.float32
    e = Hq // Hkv if low else _expansion(B, Hq, Hkv)
    if e == 1:
        return _flash_backward(do, q, k, v, out, lse, 0.0, causal, scale=scale)
    dq, dk, dv = _flash_backward(
        do, q, k.repeat_interleave(e, dim=1), v.repeat_interleave(e, dim=1), out, lse, 0.0, causal, scale=scale
    )
    acc = torch.float32 if low else dk.dtype
    dk = dk.unflatten(1, (Hkv, e)).sum(2, dtype=acc).to(k.dtype)
    dv = dv.unflatten(1, (Hkv, e)).sum(2, dtype=acc).to(v.dtype)
    return dq, dk, dv


def _backward_bhsd(do, q, k, v, out, lse, causal, scale):
    """dq, dk, dv (BHSD) for the bottom-right causal problem, from the kernel's backward."""
    Tq, Tk = q.shape[2], k.shape[2]
    if not causal or Tq == Tk:
        return _kernel_backward(do, q, k, v, out, lse, causal, scale)
    if Tq > Tk:
        skip = Tq - Tk
        dq = torch.zeros_like(q)
        dq_s, dk, dv = _kernel_backward(
            do[:, :, skip:], q[:, :, skip:], k, v, out[:, :, skip:], lse[:, :, skip:], True, scale
        )
        dq[:, :, skip:] = dq_s
        return dq, dk, dv
    # P of each key block is exp(s - lse) with the full row's lse and delta = rowsum(dO * O) of
    # the full output, so each block's backward is exact for its keys; dq sums over the blocks.
    n = Tk - Tq
    dq1, dk1, dv1 = _kernel_backward(do, q, k[:, :, :n], v[:, :, :n], out, lse, False, scale)
    dq2, dk2, dv2 = _kernel_backward(do, q, k[:, :, n:], v[:, :, n:], out, lse, True, scale)
    return dq1 + dq2, torch.cat([dk1, dk2], dim=2), torch.cat([dv1, dv2], dim=2)


def _bshd_out(x):
    return x.transpose(1, 2).contiguous()


def attention_backward(dout, q, k, v, out, lse, dlse, causal: bool, scale: float):
    """dq, dk, dv (contiguous, input dtypes) of `attention_forward`, given dL/dout and dL/dlse.

    dlse (B, Hq, Tq) or None. Rows that saw no key have lse = -inf and get no gradient.
    """
    if q.numel() == 0 or k.shape[1] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if dlse is not None and bool(dlse.any()):
        return _backward_with_lse_grad(dout, q, k, v, out, lse, dlse, causal, scale)
    if lse.dtype != torch.float32:
        lse = lse.float()
    dq, dk, dv = _backward_bhsd(_bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse, causal, scale)
    return _bshd_out(dq), _bshd_out(dk), _bshd_out(dv)


def _backward_with_lse_grad(dout, q, k, v, out, lse, dlse, causal, scale):
    """One padded head-dim column makes the kernel's delta = rowsum(dO * O) - dLSE (see the module
    docstring). Computed in float32, so the dLSE term is not rounded to the input dtype."""
    dt = q.dtype
    qp, kp, vp = (F.pad(x.float(), (0, 1)) for x in (q, k, v))
    dop = F.pad(dout.float(), (0, 1), value=1.0)
    outp = torch.cat([out.float(), -dlse.float().transpose(1, 2).unsqueeze(-1)], dim=-1)
    lse = lse.float()
    dq, dk, dv = _backward_bhsd(_bhsd(dop), _bhsd(qp), _bhsd(kp), _bhsd(vp), _bhsd(outp), lse, causal, scale)
    return tuple(_bshd_out(g[..., :-1]).to(dt) for g in (dq, dk, dv))


# --------------------------------------------------------------------------------------------
# attention_with_kv_cache


def _append(cache, new, lens, uniform):
    """Write new (B, Tq, H, D) into cache rows [L_b, L_b + Tq) in place (lengths checked)."""
    if uniform:
        cache.narrow(1, lens[0], new.shape[1]).copy_(new)
        return
    B, Tq = new.shape[:2]
    pos = torch.tensor(lens, dtype=torch.long)[:, None] + torch.arange(Tq)[None, :]
    b_idx = torch.arange(B)[:, None].expand(B, Tq)
    cache.index_put_((b_idx, pos), new)


def append_new_rows(q, k_cache, v_cache, k, v, cache_seqlens):
    """The cache op's prologue on CPU: read the lengths once, check the capacity before anything
    is written, append k/v (if given) in place. Returns (lengths, min, max, new rows per sequence)."""
    lens = cache_seqlens.tolist()  # the one host read of the lengths in this call
    new = q.shape[1] if k is not None else 0
    lo, hi = check_cache_capacity(lens, k_cache.shape[1], new)
    if new and q.shape[0] > 0:
        _append(k_cache, k, lens, lo == hi)
        _append(v_cache, v, lens, lo == hi)
    return lens, lo, hi, new


def attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal: bool, scale: float):
    """The decoding op on CPU tensors: append k/v (if given) at cache_seqlens, then attend.

    Same contract as `reference.attention_with_kv_cache`; the caches are only read up to the
    longest visible prefix, and sequence b sees keys [0, L_b + Tq) (or [0, L_b)).
    """
    B, Tq, Hq, D = q.shape
    lens = cache_seqlens.tolist()  # the one host read of the lengths in this call
    new = Tq if k is not None else 0
    lo, hi = check_cache_capacity(lens, k_cache.shape[1], new)
    if lo == hi and Tq == 1 and B > 0 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1:
        return _decode_step(q, k_cache, v_cache, k, v, hi, scale)
    if new and B > 0:
        _append(k_cache, k, lens, lo == hi)
        _append(v_cache, v, lens, lo == hi)
    if B == 0 or Tq == 0:
        return _empty_result(q)
    n_keys = hi + new  # the longest visible prefix
    if n_keys == 0:
        return _empty_result(q)
    kc, vc = _prefix_bhsd(k_cache, n_keys), _prefix_bhsd(v_cache, n_keys)
    if lo == hi:
        if Tq == 1:
            return _one_row(q, kc, vc, scale, None)
        out, lse = _attend(_bhsd(q), kc, vc, causal, scale)
        return out.transpose(1, 2).contiguous(), lse.contiguous()
    return _ragged(q, kc, vc, [L + new for L in lens], causal, scale)


def _prefix_bhsd(cache, n):
    """Rows [0, n) of a (B, S, H, D) cache as a (B, H, n, D) view (a copy only if D is strided)."""
    x = cache.narrow(1, 0, n).transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()


def _decode_step(q, k_cache, v_cache, k, v, L, scale):
    """The common decoding step: Tq = 1, every sequence at length L, caches unit-stride in D.

    The same work as `_append` + `_one_row`, in fewer tensor calls (each costs about a
    microsecond of Python and dispatcher, and a small decode step is only 50-100 us): the new
    rows are written through one as_strided view per cache, and the cache prefix and the grouped
    query are one as_strided view each. All are views of the callers' tensors, with their own
    strides and offsets."""
    B, _, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if k is not None:
        ks, vs = k_cache.stride(), v_cache.stride()
        k_cache.as_strided(k.shape, ks, k_cache.storage_offset() + L * ks[1]).copy_(k)
        v_cache.as_strided(v.shape, vs, v_cache.storage_offset() + L * vs[1]).copy_(v)
        L += 1
    if L == 0:
        return _empty_result(q)
    ks, vs = k_cache.stride(), v_cache.stride()
    kc = k_cache.as_strided((B, Hkv, L, D), (ks[0], ks[2], ks[1], 1), k_cache.storage_offset())
    vc = v_cache.as_strided((B, Hkv, L, D), (vs[0], vs[2], vs[1], 1), v_cache.storage_offset())
    G = Hq // Hkv
    e = _expansion(B, Hq, Hkv)
    qs = q.stride()
    if qs[3] != 1:
        q, qs = q.contiguous(), (Hq * D, Hq * D, D, 1)
    if Hkv == 1 and e > 1:
        # MQA split over threads: head i takes query heads i, i + e, ... The kernel lays its
        # output out as (rows, heads), which is query-head order: out and lse are views.
        qg = q.as_strided((B, e, G // e, D), (qs[0], qs[2], e * qs[2], 1), q.storage_offset())
        out, lse = _flash(qg, kc, vc, 0.0, False, scale=scale)
        return out.transpose(1, 2).reshape(B, 1, Hq, D), lse.transpose(1, 2).reshape(B, Hq, 1)
    r = G // e  # query rows per kernel head; query head h * r + i is row i of kernel head h
    qg = q.as_strided((B, Hkv * e, r, D), (qs[0], r * qs[2], qs[2], 1), q.storage_offset())
    out, lse = _flash(qg, kc, vc, 0.0, False, scale=scale)
    # (B, Hkv * e, r, D) laid out as (B, r, Hkv * e, D): a view when r == 1 (MHA) or Hkv * e == 1.
    return out.reshape(B, 1, Hq, D), lse.reshape(B, Hq, 1)


def _one_row(q, kc, vc, scale, mask):
    """Tq = 1: the G query heads of each KV head attend as G rows of one head (a view of q), or
    as e heads of G/e rows when B * Hkv alone would leave threads idle (see `_expansion`); the
    kernel maps query head h' to KV head h' // e, so K/V are still not expanded."""
    B, _, Hq, D = q.shape
    Hkv = kc.shape[1]
    e = _expansion(B, Hq, Hkv)
    if Hkv == 1 and e > 1:
        # MQA: head i takes query heads i, i + e, ...; the kernel lays its output out as (rows,
        # heads), which is then query-head order already: no copy of out or lse.
        qg = q.reshape(B, Hq // e, e, D).transpose(1, 2)
        if qg.stride(-1) != 1:
            qg = qg.contiguous()
        out, lse = _flash(qg, kc, vc, 0.0, False, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(B, 1, Hq, D), lse.transpose(1, 2).reshape(B, Hq, 1)
    qg = q.reshape(B, Hkv * e, Hq // (Hkv * e), D)  # a view: Tq = 1, so (Hq) splits into (Hkv*e, G/e)
    if qg.stride(-1) != 1:
        qg = qg.contiguous()
    out, lse = _flash(qg, kc, vc, 0.0, False, attn_mask=mask, scale=scale)
    return out.reshape(B, 1, Hq, D), lse.reshape(B, Hq, 1)


def _ragged(q, kc, vc, key_lens, causal, scale):
    """Sequences of different lengths: one call over the longest prefix with an additive mask
    (0 where visible, -inf elsewhere); rows that see no key are set to zeros and lse = -inf."""
    B, Tq, Hq, D = q.shape
    n_keys = kc.shape[2]
    Lk = torch.tensor(key_lens, dtype=torch.long)
    j = torch.arange(n_keys)
    if Tq == 1 or not causal:
        visible = (j[None, :] < Lk[:, None])[:, None, :]  # (B, 1, n_keys)
        empty = (Lk == 0)[:, None].expand(B, Tq)  # (B, Tq)
    else:
        i = torch.arange(Tq)
        last = i[None, :] + (Lk[:, None] - Tq)  # (B, Tq): the last key row i may see
        visible = j[None, None, :] <= last[:, :, None]
        empty = last < 0
    mask = torch.zeros(visible.shape, dtype=q.dtype).masked_fill_(~visible, float("-inf"))[:, None]
    if Tq == 1:
        out, lse = _one_row(q, kc, vc, scale, mask)  # mask (B, 1, 1, n_keys) broadcasts over heads
    else:
        out, lse = _flash(_bhsd(q), kc, vc, 0.0, False, attn_mask=mask, scale=scale)
        out, lse = out.transpose(1, 2), lse
    if bool(empty.any()):
        out = out.masked_fill(empty[:, :, None, None], 0.0)
        lse = lse.masked_fill(empty[:, None, :], float("-inf"))
    out, lse = out.contiguous(), lse.contiguous()
    bad = out.isnan().flatten(1).any(1)
    if bool(bad.any()):
        # The mask adds -inf to a score, it cannot skip a row: NaN or inf stored past a
        # sequence's length (stale cache contents) reaches the masked call. Such sequences are
        # recomputed on their own live rows (a NaN in the live rows comes back as NaN).
        for b in bad.nonzero().flatten().tolist():
            n = key_lens[b]
            if n > 0:
                o, l = _attend(_bhsd(q[b:b + 1]), kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], causal, scale)
                out[b], lse[b] = o.transpose(1, 2)[0], l[0]
    return out, lse


__all__ = [
    "attention_forward", "attention_backward", "attention_with_kv_cache", "append_new_rows", "lse_layout", "as_lse_layout",
    "fused_differentiable", "fused_differentiable_ok",
]
