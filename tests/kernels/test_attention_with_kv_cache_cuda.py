"""attention_with_kv_cache on the `cuda` backend (csrc/) against the reference (DESIGN §5).

The tests marked `cuda` need a GPU (they are skipped without one) and build the extension on first
use; `scripts/sanitize_cuda.sh` runs them under compute-sanitizer.
"""

from __future__ import annotations

import csrc_oracle
import pytest
import torch
from helpers import DTYPES, KV_CACHE_SHAPES, assert_close, kv_cache_inputs, randn, seeded

import pytorch_mqa
from pytorch_mqa import reference
from pytorch_mqa.ops import build as _build

# Beyond the shared matrix: the general head-dim paths (D not 64/128, D = 256, D not a multiple of
# the 16-byte vector), G*Tq > 16 (several row chunks), G = 32, and caches long enough for many splits.
# (B, Tq, S, Hq, Hkv, D, lengths)
EXTRA_SHAPES = [
    (2, 1, 100, 4, 2, 256, [37, 99]),  # largest D (general path)
    (1, 2, 70, 2, 1, 7, [3]),  # D = 7: element loads, no vectors
    (2, 1, 512, 32, 1, 64, [300, 511]),  # G = 32: two row chunks
    (2, 5, 4096, 8, 1, 128, [1283, 4091]),  # 16 splits, 3 row chunks, lengths across split edges
    (1, 1, 2048, 8, 2, 96, [1537]),  # general path with splits
]


def _on(device, tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _reference(q, k_cache, v_cache, k, v, seqlens, causal, lowp):
    """Reference on CPU copies: (out, lse, k_cache, v_cache); fp32 math unless lowp."""
    q, kc, vc, k, v, seqlens = (None if t is None else t.detach().cpu().clone() for t in (q, k_cache, v_cache, k, v, seqlens))
    if not lowp:
        q, kc, vc = q.float(), kc.float(), vc.float()
        k, v = (None if t is None else t.float() for t in (k, v))
    out, lse = reference.attention_with_kv_cache(q, kc, vc, k, v, seqlens, causal=causal, upcast=not lowp)
    return out, lse, kc, vc


def _check_case(case, dtype, with_new, causal, seed=0, label="cuda"):
    q, k_cache, v_cache, k, v, seqlens = kv_cache_inputs(case, dtype, seed=seed, with_new=with_new)
    ref32, lse32, kc32, vc32 = _reference(q, k_cache, v_cache, k, v, seqlens, causal, lowp=False)
    ref_lp, lse_lp, kc_lp, vc_lp = _reference(q, k_cache, v_cache, k, v, seqlens, causal, lowp=True)
    q, k_cache, v_cache, k, v, seqlens = _on("cuda", (q, k_cache, v_cache, k, v, seqlens))
    out, lse = pytorch_mqa.attention_with_kv_cache(
        q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=causal, return_lse=True, backend="cuda"
    )
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out.cpu(), ref32, ref_lp, dtype, "out", label)
    assert_close(lse.cpu(), lse32, lse_lp, dtype, "lse", label)
    # The append is a copy: bit-exact against the reference's cache.
    assert torch.equal(k_cache.cpu(), kc_lp) and torch.equal(v_cache.cpu(), vc_lp)


# ------------------------------------------------------------------------------------------
# Without a GPU
# ------------------------------------------------------------------------------------------


def test_cuda_backend_on_cpu_tensors_says_it_needs_cuda():
    q, k_cache, v_cache, k, v, seqlens = kv_cache_inputs(KV_CACHE_SHAPES[0], torch.float32)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        pytorch_mqa.attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, backend="cuda")


def test_cuda_op_schema_declares_the_cache_mutation():
    schema = torch.ops.pytorch_mqa.attention_with_kv_cache_cuda.default._schema
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written == ["k_cache", "v_cache"]
    assert [a.name for a in schema.arguments] == [
        "q", "k_cache", "v_cache", "k", "v", "cache_seqlens", "causal", "scale", "window_left", "window_right",
        "softcap", "alibi_slopes", "block_table", "cache_batch_idx", "cache_leftpad",
    ]
    defaults = {a.name: a.default_value for a in schema.arguments[8:]}
    assert defaults == {"window_left": -1, "window_right": -1, "softcap": 0.0, "alibi_slopes": None,
                        "block_table": None, "cache_batch_idx": None, "cache_leftpad": None}


def test_auto_backend_on_cuda_stays_triton_for_decoding():
    from pytorch_mqa.ops.backends import AUTO_CUDA_BACKEND

    assert AUTO_CUDA_BACKEND["attention_with_kv_cache"] == "triton"


# ------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("with_new", [True, False], ids=["append", "no_append"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", KV_CACHE_SHAPES + EXTRA_SHAPES, ids=str)
def test_matches_reference(case, dtype, with_new, causal):
    _check_case(case, dtype, with_new, causal)


# Preallocated caches: capacity S >= 4 x most live lengths, ragged lengths 0, 1, S - 1, S - Tq;
# G 1 to 32; Tq 1 to 4 (live-length splits; new rows straddling a split edge at L = 62).
PREALLOCATED = [
    (5, 1, 2048, 8, 1, 128, [0, 1, 2047, 300, 63]),
    (5, 2, 192, 4, 4, 64, [0, 1, 191, 190, 33]),
    (4, 3, 640, 32, 1, 128, [0, 1, 639, 637]),
    (5, 4, 200, 6, 3, 40, [0, 1, 199, 196, 62]),
    (2, 1, 8192, 16, 2, 96, [1000, 8191]),
]


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("with_new", [True, False], ids=["append", "no_append"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", PREALLOCATED, ids=str)
def test_preallocated_caches(case, dtype, with_new, causal):
    _check_case(case, dtype, with_new, causal, label="cuda preallocated")


def _views(base_shape, view, dtype, gen):
    """The same view of one random buffer on CPU and on CUDA: (cpu_view, cuda_view)."""
    base = randn(base_shape, dtype, gen)
    return view(base), view(base.cuda())


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["padded_rows", "unit_stride_broken", "fused_qkv"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_strided_inputs(layout, dtype):
    """Non-contiguous q/k/v/caches: aligned padded rows (vector loads), a non-unit last stride
    (element loads), and q/k/v sliced out of one fused projection."""
    B, Tq, S, Hq, Hkv, D = 2, 3, 150, 4, 2, 64
    gen = seeded(3)
    lens = torch.tensor([17, 147], dtype=torch.int32)
    if layout == "padded_rows":
        kc, kc_dev = _views((B, S, Hkv + 1, D + 16), lambda t: t[:, :, 1:, :D], dtype, gen)
        vc, vc_dev = _views((B, S, Hkv + 1, D + 16), lambda t: t[:, :, 1:, :D], dtype, gen)
    else:
        kc, kc_dev = _views((B, S, Hkv, D, 2), lambda t: t[..., 0], dtype, gen)
        vc, vc_dev = _views((B, S, Hkv, D, 2), lambda t: t[..., 1], dtype, gen)
    if layout == "fused_qkv":
        shape = (B, Tq, Hq + 2 * Hkv + 1, D)
        base = randn(shape, dtype, gen)
        q, k, v = base[:, :, :Hq], base[:, :, Hq : Hq + Hkv], base[:, :, Hq + Hkv : Hq + 2 * Hkv]
        dev = base.cuda()
        qd, kd, vd = dev[:, :, :Hq], dev[:, :, Hq : Hq + Hkv], dev[:, :, Hq + Hkv : Hq + 2 * Hkv]
    else:
        q, qd = _views((B, Hq, Tq, D), lambda t: t.transpose(1, 2), dtype, gen)
        k, kd = _views((B, Tq, Hkv, D), lambda t: t, dtype, gen)
        v, vd = _views((B, Tq, Hkv, D), lambda t: t, dtype, gen)
    assert not kc_dev.is_contiguous() and not qd.is_contiguous()
    ref32, lse32, _, _ = _reference(q, kc, vc, k, v, lens, True, lowp=False)
    ref_lp, lse_lp, kc_lp, vc_lp = _reference(q, kc, vc, k, v, lens, True, lowp=True)
    out, lse = pytorch_mqa.attention_with_kv_cache(
        qd, kc_dev, vc_dev, kd, vd, cache_seqlens=lens.cuda(), return_lse=True, backend="cuda"
    )
    assert_close(out.cpu(), ref32, ref_lp, dtype, "out", "cuda strided")
    assert_close(lse.cpu(), lse32, lse_lp, dtype, "lse", "cuda strided")
    assert torch.equal(kc_dev.cpu(), kc_lp) and torch.equal(vc_dev.cpu(), vc_lp)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("D", [64, 40, 7])
def test_guard_region(dtype, D):
    """Caches are views into a sentinel-filled buffer. Only rows [L_b, L_b + Tq) ∩ [0, S) of the
    view change; device lengths that overflow S (or are negative) write nothing outside."""
    B, Tq, S, Hq, Hkv = 5, 3, 40, 4, 2
    sentinel = 7.0
    lens = torch.tensor([0, 11, S - 1, S + 5, -2], dtype=torch.int32)  # S-1: 2 rows overflow; S+5: all
    gen = seeded(5)
    q = randn((B, Tq, Hq, D), dtype, gen)
    k = randn((B, Tq, Hkv, D), dtype, gen)
    v = randn((B, Tq, Hkv, D), dtype, gen)
    bufs = [torch.full((B, S + 6, Hkv + 1, D + 8), sentinel, dtype=dtype, device="cuda") for _ in range(2)]
    caches = [buf[:, 3 : 3 + S, :Hkv, :D] for buf in bufs]
    for c in caches:
        c.copy_(randn(c.shape, dtype, gen).cuda())
    before = [buf.clone() for buf in bufs]
    ref32, lse32, kc_ref, vc_ref = _reference(q, caches[0], caches[1], k, v, lens, True, lowp=False)
    ref_lp, lse_lp, kc_lp, vc_lp = _reference(q, caches[0], caches[1], k, v, lens, True, lowp=True)

    out, lse = pytorch_mqa.attention_with_kv_cache(
        q.cuda(), caches[0], caches[1], k.cuda(), v.cuda(), cache_seqlens=lens.cuda(), return_lse=True, backend="cuda"
    )
    torch.cuda.synchronize()
    assert_close(out.cpu(), ref32, ref_lp, dtype, "out", "cuda guard")
    assert_close(lse.cpu(), lse32, lse_lp, dtype, "lse", "cuda guard")
    for buf, old, new_rows, ref_cache in zip(bufs, before, (k, v), (kc_lp, vc_lp)):
        outside = torch.ones(buf.shape, dtype=torch.bool, device="cuda")
        outside[:, 3 : 3 + S, :Hkv, :D] = False
        assert torch.equal(buf[outside], old[outside]), "a write landed outside the cache view"
        view, old_view = buf[:, 3 : 3 + S, :Hkv, :D].cpu(), old[:, 3 : 3 + S, :Hkv, :D].cpu()
        for b, L in enumerate(lens.tolist()):
            lo, hi = max(L, 0), min(L + Tq, S)
            keep = torch.ones(S, dtype=torch.bool)
            keep[lo:hi] = False
            assert torch.equal(view[b, keep], old_view[b, keep]), f"sequence {b} (L={L}): a row outside [L, L+Tq) changed"
            if hi > lo:
                assert torch.equal(view[b, lo:hi], new_rows[b, lo - L : hi - L])
        assert torch.equal(view, ref_cache)


@pytest.mark.cuda
def test_cuda_graph_capture():
    """The op captures into a CUDA graph and replays correctly for new lengths and new inputs."""
    case = (2, 1, 700, 8, 2, 128, [0, 0])
    dtype = torch.float16
    q, k_cache, v_cache, k, v, seqlens = _on("cuda", kv_cache_inputs(case, dtype, seed=7))
    pristine = (k_cache.clone(), v_cache.clone())

    def step():
        return pytorch_mqa.attention_with_kv_cache(
            q, k_cache, v_cache, k, v, cache_seqlens=seqlens, return_lse=True, backend="cuda"
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # builds/loads the extension and warms up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()

    for i, lengths in enumerate(([5, 699], [640, 1], [0, 300])):
        k_cache.copy_(pristine[0])
        v_cache.copy_(pristine[1])
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        gen = seeded(100 + i)
        q.copy_(randn(q.shape, dtype, gen).cuda())
        k.copy_(randn(k.shape, dtype, gen).cuda())
        v.copy_(randn(v.shape, dtype, gen).cuda())
        ref32, lse32, kc_ref, vc_ref = _reference(q, pristine[0], pristine[1], k, v, seqlens, True, lowp=False)
        ref_lp, lse_lp, kc_lp, vc_lp = _reference(q, pristine[0], pristine[1], k, v, seqlens, True, lowp=True)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out.cpu(), ref32, ref_lp, dtype, "out", "cuda graph")
        assert_close(lse.cpu(), lse32, lse_lp, dtype, "lse", "cuda graph")
        assert torch.equal(k_cache.cpu(), kc_lp) and torch.equal(v_cache.cpu(), vc_lp)


@pytest.mark.cuda
@pytest.mark.parametrize("with_new", [True, False], ids=["append", "no_append"])
def test_opcheck(with_new):
    q, k_cache, v_cache, k, v, seqlens = _on("cuda", kv_cache_inputs(KV_CACHE_SHAPES[1], torch.bfloat16, with_new=with_new))
    _build.load_extension()
    torch.library.opcheck(
        torch.ops.pytorch_mqa.attention_with_kv_cache_cuda.default,
        (q, k_cache, v_cache, k, v, seqlens, True, 0.125),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.cuda
def test_rejects_bad_arguments_in_cpp():
    """The C++ launcher checks its own arguments (the op can be called directly)."""
    q, k_cache, v_cache, k, v, seqlens = _on("cuda", kv_cache_inputs(KV_CACHE_SHAPES[0], torch.float16))
    _build.load_extension()
    op = torch.ops.pytorch_mqa.attention_with_kv_cache_cuda
    with pytest.raises(RuntimeError, match="cache_seqlens: expected dtype int32"):
        op(q, k_cache, v_cache, k, v, seqlens.long(), True, 0.125)
    with pytest.raises(RuntimeError, match="k_cache: expected dtype"):
        op(q, k_cache.float(), v_cache, k, v, seqlens, True, 0.125)
    with pytest.raises(RuntimeError, match="cache_seqlens: expected device"):
        op(q, k_cache, v_cache, k, v, seqlens.cpu(), True, 0.125)


# ------------------------------------------------------------------------------------------
# Emulation (no GPU): the CUDA-core kernel's index math, ported line for line to PyTorch, against the
# reference. It checks the algorithm (split and tile ranges, new-row sourcing and write-back,
# masking, -inf handling, LSE-weighted combine), not the CUDA code itself.
# ------------------------------------------------------------------------------------------

_LOG2E, _LN2 = 1.4426950408889634, 0.6931471805599453
_ROWS_PER_BLOCK, _MAX_SPLITS, _SPLIT_ALIGN, _WAVES, _SMEM_BUDGET = 16, 1024, 64, 2, 46 * 1024


def _ceil_div(a, b):
    return -(-a // b)


def _block_n(D, dtype):
    """kv_cache::block_n_for(TileConfig<T, D_MAX>::kRowBytes) for the launcher's D_MAX choice."""
    d_max = D if D in (64, 128) else (128 if D < 128 else 256)
    row_bytes = d_max * torch.tensor([], dtype=dtype).element_size()
    n = 64
    while n > 8 and (
        _ROWS_PER_BLOCK * row_bytes + 2 * n * (row_bytes + 16) + _ROWS_PER_BLOCK * (n + 1) * 4 + 3 * _ROWS_PER_BLOCK * 4
        > _SMEM_BUDGET
    ):
        n //= 2
    return n


def _choose_splits(blocks, S, sms):
    """decode::choose_splits: about two blocks per SM, at most one split per _SPLIT_ALIGN cache rows."""
    return max(1, min(_ceil_div(_WAVES * sms, max(blocks, 1)), _ceil_div(S, _SPLIT_ALIGN), _MAX_SPLITS))


def _split_range(split, Lk, num_splits, begin=0):
    """decode::split_range / active_splits: the work span [begin, Lk) in equal slices of _SPLIT_ALIGN multiples."""
    n = Lk - begin
    chunk = max(_ceil_div(_ceil_div(n, num_splits), _SPLIT_ALIGN) * _SPLIT_ALIGN, _SPLIT_ALIGN)
    return begin + split * chunk, min(begin + split * chunk + chunk, Lk), max(_ceil_div(n, chunk), 1)


def _row_bounds(t, Lk, Tq, lo, key_end, causal, window):
    """decode::row_bounds for a tensor of query positions t: (lo, hi, diag)."""
    diag = t + Lk - Tq
    hi = torch.full_like(diag, key_end - 1)
    if causal:
        hi = torch.minimum(hi, diag)
    if window[1] >= 0:
        hi = torch.minimum(hi, diag + window[1])
    low = torch.full_like(diag, lo)
    if window[0] >= 0:
        low = torch.maximum(low, diag - window[0])
    return low, hi, diag


def _emulate(q, k_cache, v_cache, k, v, seqlens, causal, scale, sms, window=(-1, -1), softcap=0.0, alibi=None,
             table=None, bidx=None, pad=None):
    """The CUDA-core kernel; with window / softcap / alibi / pad its VARIANT instantiation, with a
    block table its paged addressing (one offset per key row of a tile), with bidx its slots."""
    B, Tq, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    S = table.shape[1] * k_cache.shape[1] if table is not None else k_cache.shape[1]
    variant = window != (-1, -1) or softcap > 0 or alibi is not None or pad is not None
    n_slots = table.shape[0] if table is not None else k_cache.shape[0]

    def cache_rows(slot, j):  # cache_row_offset as (page or slot, row) index tensors; page -1: none
        if table is None:
            return torch.full_like(j, slot), j
        page = table[slot, j // k_cache.shape[1]].long()
        page = torch.where((page >= 0) & (page < k_cache.shape[0]), page, torch.full_like(page, -1))
        return page, j % k_cache.shape[1]

    G, R = Hq // Hkv, _ROWS_PER_BLOCK
    BLOCK_N = _block_n(D, q.dtype)
    rows = G * Tq
    row_chunks = _ceil_div(rows, R)
    num_splits = _choose_splits(B * Hkv * row_chunks, S, sms)
    o_part = torch.zeros(num_splits, B, Hq, Tq, D)
    lse_part = torch.full((num_splits, B, Hq, Tq), float("-inf"))
    inf = float("-inf")
    for b in range(B):
        L = int(seqlens[b])
        n_new = Tq if k is not None else 0
        Lk = min(max(L + n_new, 0), S)
        L_cache = min(max(L, 0), S)
        lo = min(max(int(pad[b]) if pad is not None else 0, 0), L_cache if k is not None else Lk)
        first = max(lo, Lk - Tq - window[0]) if window[0] >= 0 else lo
        span_begin = first // _SPLIT_ALIGN * _SPLIT_ALIGN
        slot = int(bidx[b]) if bidx is not None else b
        if not 0 <= slot < n_slots:
            slot, Lk, lo, span_begin = 0, 0, 0, 0
        for h in range(Hkv):
            for split in range(num_splits):
                for chunk in range(row_chunks):
                    write_new = k is not None and chunk == 0
                    gr = torch.arange(chunk * R, min(chunk * R + R, rows))
                    t, hq = gr // G, h * G + gr % G
                    qr = q[b, t, hq].float()
                    m = torch.full((len(gr),), inf)
                    l = torch.zeros(len(gr))
                    acc = torch.zeros(len(gr), D)
                    begin, end, active = _split_range(split, Lk, num_splits, span_begin)
                    if split >= active:
                        continue  # the block exits; the combine reads only active splits
                    if write_new and max(begin, L_cache) < end:  # the split's new rows, before the tiles
                        j = torch.arange(max(begin, L_cache), end)
                        pg, row = cache_rows(slot, j)
                        ok = pg >= 0
                        k_cache[pg[ok], row[ok], h] = k[b, j[ok] - L, h]
                        v_cache[pg[ok], row[ok], h] = v[b, j[ok] - L, h]
                    tile, tiles_end = begin, end
                    if variant:  # decode::chunk_keys with align BLOCK_N
                        f_lo = _row_bounds(t[:1], Lk, Tq, lo, end, causal, window)[0]
                        l_hi = _row_bounds(t[-1:], Lk, Tq, lo, end, causal, window)[1]
                        tile = max(begin, max(int(f_lo), 0) // BLOCK_N * BLOCK_N)
                        tiles_end = min(end, int(l_hi) + 1)
                    while tile < tiles_end:
                        n_valid = min(BLOCK_N, tiles_end - tile)
                        j = torch.arange(tile, tile + n_valid)
                        is_new = (j >= L) if k is not None else torch.zeros(n_valid, dtype=torch.bool)
                        pg, row = cache_rows(slot, j)
                        K = torch.zeros(n_valid, D, dtype=k_cache.dtype)
                        V = torch.zeros(n_valid, D, dtype=v_cache.dtype)
                        old = ~is_new & (pg >= 0)
                        K[old], V[old] = k_cache[pg[old], row[old], h], v_cache[pg[old], row[old], h]
                        if is_new.any():
                            K[is_new] = k[b, j[is_new] - L, h]
                            V[is_new] = v[b, j[is_new] - L, h]
                        s = qr @ K.float().T
                        if variant:
                            r_lo, r_hi, diag = _row_bounds(t, Lk, Tq, lo, tiles_end, causal, window)
                            if softcap > 0:
                                s = torch.tanh(s * (scale / softcap)) * (softcap * _LOG2E)
                            else:
                                s = s * (scale * _LOG2E)
                            if alibi is not None:
                                slope = (alibi[b] if alibi.dim() == 2 else alibi)[hq].float() * _LOG2E
                                s = s - slope[:, None] * (diag[:, None] - j[None, :]).abs().float()
                            vis = (j[None, :] >= r_lo[:, None]) & (j[None, :] <= r_hi[:, None])
                            s = s.masked_fill(~vis, inf)
                        else:
                            s = s * (scale * _LOG2E)
                        if causal and not variant:
                            s = s.masked_fill(~(j[None, :] <= t[:, None] + Lk - Tq), inf)
                        m_new = torch.maximum(m, s.max(dim=1).values)
                        m_use = torch.where(m_new == inf, torch.zeros_like(m_new), m_new)
                        p = torch.exp2(s - m_use[:, None])
                        alpha = torch.exp2(m - m_use)
                        l = l * alpha + p.sum(1)
                        acc = acc * alpha[:, None] + p @ V.float()
                        m = m_new
                        tile += BLOCK_N
                    inv = torch.where(l > 0, 1 / l, torch.zeros_like(l))
                    o_part[split, b, hq, t] = acc * inv[:, None]
                    lse_part[split, b, hq, t] = torch.where(l > 0, (m + torch.log2(l)) * _LN2, torch.full_like(l, inf))
    # combine (with one split this is the identity; inactive splits hold -inf: weight 0)
    mx = lse_part.max(dim=0).values
    w = torch.where(mx == inf, torch.zeros_like(lse_part), torch.exp(lse_part - mx))
    total = w.sum(0)
    out = (w[..., None] * o_part).sum(0) / torch.where(total > 0, total, torch.ones_like(total))[..., None]
    lse = torch.where(total > 0, mx + torch.log(total), torch.full_like(total, inf))
    return out.permute(0, 2, 1, 3).to(q.dtype), lse, num_splits


@pytest.mark.parametrize("with_new", [True, False], ids=["append", "no_append"])
@pytest.mark.parametrize("case", KV_CACHE_SHAPES + EXTRA_SHAPES[:3], ids=str)
def test_emulated_kernel_matches_reference(case, with_new, causal=True):
    dtype = torch.float32
    q, k_cache, v_cache, k, v, seqlens = kv_cache_inputs(case, dtype, with_new=with_new)
    ref, lse_ref, kc_ref, vc_ref = _reference(q, k_cache, v_cache, k, v, seqlens, causal, lowp=False)
    scale = q.shape[-1] ** -0.5
    out, lse, splits = _emulate(q, k_cache, v_cache, k, v, seqlens, causal, scale, sms=132)
    assert_close(out, ref, ref, dtype, "out", "cuda emulation")
    assert_close(lse, lse_ref, lse_ref, dtype, "lse", "cuda emulation")
    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_emulated_kernel_guard_lengths_and_many_splits(causal):
    """Device lengths past S and below 0, with the key axis cut into several splits."""
    B, Tq, S, Hq, Hkv, D = 4, 3, 600, 4, 2, 64
    gen = seeded(11)
    q = randn((B, Tq, Hq, D), torch.float32, gen)
    k_cache, v_cache = randn((B, S, Hkv, D), torch.float32, gen), randn((B, S, Hkv, D), torch.float32, gen)
    k, v = randn((B, Tq, Hkv, D), torch.float32, gen), randn((B, Tq, Hkv, D), torch.float32, gen)
    seqlens = torch.tensor([S - 1, S + 5, -2, 257], dtype=torch.int32)
    ref, lse_ref, kc_ref, vc_ref = _reference(q, k_cache, v_cache, k, v, seqlens, causal, lowp=False)
    out, lse, splits = _emulate(q, k_cache, v_cache, k, v, seqlens, causal, D**-0.5, sms=132)
    assert splits == 10  # ceil(600 / 64): at most one split per 64 cache rows
    assert_close(out, ref, ref, torch.float32, "out", "cuda emulation")
    assert_close(lse, lse_ref, lse_ref, torch.float32, "lse", "cuda emulation")
    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref)


# The CUDA-core kernel's variant and paged paths (fp32 inputs take it), 2 SMs: long tile loops.
EMULATED_SERVING = {
    "window(70,3)": dict(window=(70, 3)),
    "window(0,0)+leftpad": dict(window=(0, 0), leftpad=True),
    "softcap+alibi(B,Hq)": dict(softcap=3.0, alibi="bh"),
    "paged16+batch_idx+leftpad": dict(page_size=16, batch_idx=True, leftpad=True),
    "paged48+window(20,0)": dict(page_size=48, window=(20, 0)),
    "slots+alibi(Hq)+window(9,-1)": dict(slots=True, alibi="h", window=(9, -1)),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("name", list(EMULATED_SERVING), ids=str)
@pytest.mark.parametrize("case", [(3, 2, 160, 4, 2, 40, [0, 33, 150], [0, 5, 70]),
                                  (2, 1, 300, 8, 1, 64, [250, 1], [200, 1])], ids=str)
def test_emulated_simt_variants_and_paging(case, name, causal):
    o = dict(EMULATED_SERVING[name])
    B, Tq, S, Hq, Hkv, D, lengths, pads = case
    pad = pads if o.get("leftpad") else None
    if o.get("page_size"):
        rows = [B + 1 - b for b in range(B)] if o.get("batch_idx") else None
        inputs = csrc_oracle.paged_inputs(B, Tq, S, Hq, Hkv, D, lengths, o["page_size"], batch_rows=rows, leftpad=pad)
    else:
        slots = [2 * b + 1 for b in range(B)] if o.get("slots") else None
        inputs = csrc_oracle.slot_inputs(B, Tq, S, Hq, Hkv, D, lengths, slots=slots, leftpad=pad)
    q, kc, vc, k, v, seqlens, table, bidx, pad_t = inputs
    window, softcap = o.get("window", (-1, -1)), o.get("softcap", 0.0)
    alibi = csrc_oracle.alibi_slopes(B, Hq, o.get("alibi"))
    scale = D**-0.5
    ref, lse_ref, kc_ref, vc_ref = csrc_oracle.serving_reference(
        q, kc, vc, k, v, seqlens, causal, scale, window=window, softcap=softcap, alibi=alibi, block_table=table,
        batch_idx=bidx, leftpad=pad_t)
    out, lse, _ = _emulate(q, kc, vc, k, v, seqlens, causal, scale, 2, window, softcap, alibi, table, bidx, pad_t)
    assert_close(out, ref, ref, torch.float32, "out", "cuda simt emulation")
    assert_close(lse, lse_ref, lse_ref, torch.float32, "lse", "cuda simt emulation")
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
