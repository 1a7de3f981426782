"""The CPU kernels (`pytorch_mqa.ops.cpu`, what backend "reference" runs on CPU tensors) against
the oracle with DESIGN §5's rule, and what they promise beyond the numbers: the gradient through
the LSE, no copy of the attended K/V, one kernel call per decode, the op's own capacity check."""

import pytest
import torch
from helpers import ATTENTION_SHAPES, DTYPES, KV_CACHE_SHAPES, assert_close, attention_inputs, kv_cache_inputs

import pytorch_mqa
from pytorch_mqa import reference
from pytorch_mqa.ops import cpu


@pytest.fixture(params=[1, 8], ids=lambda n: f"threads{n}")
def threads(request):
    """The backward expands K/V when B * Hkv leaves threads idle: run with and without that."""
    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(n)


def _grads(fn, inputs, dout, dlse):
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out, lse = fn(*xs)
    loss = (out.float() * dout.float()).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0).float() * dlse).sum()
    loss.backward()
    return [x.grad for x in xs]


def _check_grads(shape, dtype, causal, with_lse, strided, label):
    q, k, v = attention_inputs(shape, dtype, seed=sum(shape), strided=strided)
    gen = torch.Generator().manual_seed(5)
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    dlse = torch.randn(shape[0], shape[3], shape[1], generator=gen) if with_lse else None
    got = _grads(lambda a, b, c: pytorch_mqa.attention(a, b, c, causal=causal, return_lse=True), (q, k, v), dout, dlse)
    ref32 = _grads(lambda a, b, c: reference.attention(a, b, c, causal=causal), (q.float(), k.float(), v.float()), dout, dlse)
    ref_lp = _grads(lambda a, b, c: reference.attention(a, b, c, causal=causal, upcast=False), (q, k, v), dout, dlse)
    for name, g, r32, rlp in zip(("dq", "dk", "dv"), got, ref32, ref_lp):
        assert g.dtype == dtype and g.shape == r32.shape
        assert_close(g, r32, rlp, dtype, name, label)


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_backward_matrix(shape, dtype, causal):
    _check_grads(shape, dtype, causal, with_lse=False, strided=shape[0] == 2, label="cpu attention")


@pytest.mark.parametrize("shape", [(1, 9, 9, 8, 1, 16), (1, 5, 11, 6, 2, 24), (2, 12, 5, 4, 1, 8), (1, 1, 7, 8, 2, 16)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_backward_with_and_without_expansion(shape, causal, threads):
    _check_grads(shape, torch.float32, causal, with_lse=False, strided=False, label="cpu attention")


@pytest.mark.parametrize("shape", [(1, 7, 7, 4, 2, 16), (2, 5, 9, 6, 2, 8), (1, 9, 4, 4, 1, 24), (2, 6, 6, 8, 8, 40)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_gradient_through_lse(shape, dtype, causal):
    # A loss on the LSE (as in a distillation or z-loss) reaches q and k through dLSE.
    _check_grads(shape, dtype, causal, with_lse=True, strided=shape[0] == 2, label="cpu attention (dlse)")


def test_lse_gradient_is_not_dropped():
    # Only the LSE is used: the gradient is nonzero and matches the oracle's autograd.
    q, k, v = attention_inputs((1, 4, 6, 2, 1, 8), torch.float32, seed=3)
    q.requires_grad_(True)
    _, lse = pytorch_mqa.attention(q, k, v, causal=True, return_lse=True)
    (lse.sum()).backward()
    q2 = q.detach().clone().requires_grad_(True)
    reference.attention(q2, k, v, causal=True)[1].sum().backward()
    assert q.grad.abs().max() > 0
    torch.testing.assert_close(q.grad, q2.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_decode_strided_query(causal):
    # q, k, v sliced from one fused projection buffer, as a model produces them.
    B, Tq, S, Hq, Hkv, D = 2, 3, 20, 4, 2, 16
    gen = torch.Generator().manual_seed(8)
    buf = torch.randn(B, Tq, Hq + 2 * Hkv, D, generator=gen)
    q, k, v = buf[:, :, :Hq], buf[:, :, Hq : Hq + Hkv], buf[:, :, Hq + Hkv :]
    kc, vc = torch.randn(B, S, Hkv, D, generator=gen), torch.randn(B, S, Hkv, D, generator=gen)
    for lens in ([5, 5], [0, 11]):
        lens = torch.tensor(lens, dtype=torch.int32)
        kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        out, lse = pytorch_mqa.attention_with_kv_cache(q, kc1, vc1, k, v, cache_seqlens=lens, causal=causal, return_lse=True)
        want, want_lse = reference.attention_with_kv_cache(q, kc2, vc2, k, v, lens, causal=causal)
        assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", KV_CACHE_SHAPES, ids=lambda c: str(c[:6]))
def test_decode_non_causal(case):
    q, kc, vc, k, v, lens = kv_cache_inputs(case, torch.float32, seed=9)
    kc2, vc2 = kc.clone(), vc.clone()
    out, lse = pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens, causal=False, return_lse=True)
    want, want_lse = reference.attention_with_kv_cache(q, kc2, vc2, k, v, lens, causal=False)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-5)


def _copies(fn):
    """(largest element count any copy-like op touched, number of fused attention calls)."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    biggest, calls = 0, 0
    for e in prof.events():
        if e.name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::index_put_", "aten::cat"):
            # copy_ and index_put_ write into their first input (the cache, in place): count the rest.
            sources = e.input_shapes[1:] if e.name in ("aten::copy_", "aten::index_put_") else e.input_shapes
            for shape in sources:
                if shape and all(isinstance(n, int) for n in shape):
                    biggest = max(biggest, torch.Size(shape).numel())
        if e.name == "aten::_scaled_dot_product_flash_attention_for_cpu":
            calls += 1
    return biggest, calls


@pytest.mark.parametrize("lengths", [[300, 300, 300], [0, 170, 299]], ids=["uniform", "ragged"])
@pytest.mark.parametrize("Tq", [1, 3])
def test_decode_reads_the_cache_in_place(lengths, Tq):
    # The Python CPU path (the op's general form; the C++ kernel has its own tests): no copy of
    # the attended K/V (only the new rows are written) and one kernel call for the whole batch
    # (two for the causal split when Tq > 1 and lengths are equal), never one per sequence.
    B, S, Hq, Hkv, D = 3, 320, 8, 2, 16
    q = torch.randn(B, Tq, Hq, D)
    kc, vc = torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    k, v = torch.randn(B, Tq, Hkv, D), torch.randn(B, Tq, Hkv, D)
    lens = torch.tensor(lengths, dtype=torch.int32)
    general = torch.ops.pytorch_mqa.attention_with_kv_cache_general
    biggest, calls = _copies(lambda: general(q, kc, vc, k, v, lens, True, D**-0.5, "reference"))
    assert biggest <= B * Tq * Hq * D < kc[:, :170].numel()
    assert calls == (2 if Tq > 1 and len(set(lengths)) == 1 else 1)


def test_op_checks_capacity_itself():
    # The public function does not read the lengths; the op does, once, and refuses an overflow
    # before writing anything, also when called directly.
    q, kc, vc, k, v, _ = kv_cache_inputs((2, 2, 8, 4, 2, 8, [0, 0]), torch.float32)
    before = kc.clone()
    for lens in ([0, 7], [-1, 0]):
        with pytest.raises(ValueError, match="cache_seqlens"):
            torch.ops.pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, torch.tensor(lens, dtype=torch.int32), True, 0.3, "reference")
    assert torch.equal(kc, before)


def test_expansion_rule():
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu._expansion(1, 8, 1) == 2 and cpu._expansion(2, 8, 1) == 1 and cpu._expansion(1, 8, 8) == 1
        torch.set_num_threads(6)
        assert cpu._expansion(1, 6, 1) == 6 and cpu._expansion(1, 8, 2) == 4
    finally:
        torch.set_num_threads(n)


def test_ops_show_in_the_profiler_under_their_names():
    q, kc, vc, k, v, lens = kv_cache_inputs((1, 1, 16, 4, 1, 8, [3]), torch.float32)
    qa, ka, va = attention_inputs((1, 4, 4, 2, 1, 8), torch.float32)
    with torch.profiler.profile() as prof:
        pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens)
        pytorch_mqa.attention(qa, ka, va)
    names = {e.name for e in prof.events()}
    assert {"pytorch_mqa::attention_with_kv_cache", "pytorch_mqa::attention"} <= names


def test_inductor_writes_the_caches_in_place():
    # The declared mutation lets inductor call the op on the caller's caches: no copy of a cache
    # into the graph and back.
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    q, kc, vc, k, v, lens = kv_cache_inputs((2, 1, 64, 4, 2, 16, [3, 9]), torch.float32, seed=2)
    kc_e, vc_e = kc.clone(), vc.clone()

    def step(q, kc, vc, k, v, lens):
        return pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens) * 2

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    got, codes = run_and_get_code(compiled, q, kc, vc, k, v, lens)
    want = step(q, kc_e, vc_e, k, v, lens)
    torch.testing.assert_close(got, want)
    assert torch.equal(kc, kc_e) and torch.equal(vc, vc_e)
    code = "\n".join(codes)
    assert "torch.ops.pytorch_mqa.attention_with_kv_cache.default(" in code
    assert "copy_" not in code and "clone" not in code


@pytest.mark.parametrize("case", [c for c in KV_CACHE_SHAPES if c[1] == 1], ids=lambda c: str(c[:6]))
@pytest.mark.parametrize("with_new", [True, False])
def test_decode_one_row_with_and_without_head_split(case, with_new, threads):
    # One query row: G query heads per KV head as rows of one head, or split into e heads.
    q, kc, vc, k, v, lens = kv_cache_inputs(case, torch.float32, seed=10, with_new=with_new)
    kc2, vc2 = kc.clone(), vc.clone()
    out, lse = pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens, return_lse=True)
    want, want_lse = reference.attention_with_kv_cache(q, kc2, vc2, k, v, lens)
    assert torch.equal(kc, kc2)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-5)


@pytest.mark.parametrize("Hq,Hkv,B", [(8, 1, 1), (8, 1, 3), (8, 2, 1), (8, 2, 2), (6, 6, 2), (16, 2, 1)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_step_on_strided_caches(Hq, Hkv, B, dtype, threads):
    # The uniform one-row step builds its views with as_strided: caches that are one layer of a
    # stacked (layers, B, S, Hkv, D) buffer (storage offset, batch stride of a larger tensor),
    # every other sequence of a bigger batch, and q, k, v sliced from one fused projection.
    S, D, layers, L = 40, 16, 3, 21
    gen = torch.Generator().manual_seed(11)
    stacked = [torch.randn(layers, 2 * B, S, Hkv, D, generator=gen).to(dtype) for _ in "kv"]
    kc, vc = stacked[0][1, ::2], stacked[1][2, ::2]
    buf = torch.randn(B, 1, Hq + 2 * Hkv, D, generator=gen).to(dtype)
    q, k, v = buf[:, :, :Hq], buf[:, :, Hq : Hq + Hkv], buf[:, :, Hq + Hkv :]
    lens = torch.full((B,), L, dtype=torch.int32)
    for new in (True, False):
        kn, vn = (k, v) if new else (None, None)
        before = [x.clone() for x in stacked]
        kc2, vc2 = kc.clone(), vc.clone()
        out, lse = pytorch_mqa.attention_with_kv_cache(q, kc, vc, kn, vn, cache_seqlens=lens, return_lse=True)
        ref32, lse32 = reference.attention_with_kv_cache(q.float(), kc2.float(), vc2.float(), None if kn is None else kn.float(),
                                                         None if vn is None else vn.float(), lens)
        ref_lp, _ = reference.attention_with_kv_cache(q, kc2.clone(), vc2.clone(), kn, vn, lens, upcast=False)
        assert out.shape == (B, 1, Hq, D) and out.dtype == dtype and out.is_contiguous()
        assert lse.shape == (B, Hq, 1) and lse.dtype == torch.float32
        assert_close(out, ref32, ref_lp, dtype, "out", "cpu decode step (strided caches)")
        torch.testing.assert_close(lse, lse32, rtol=0, atol=1e-3 if dtype != torch.float32 else 1e-5)
        # Exactly row L of the viewed sequences changed (with new rows), nothing else in the buffers.
        for x, b4, src in zip(stacked, before, (k, v)):
            layer = 1 if x is stacked[0] else 2
            if new:
                b4[layer, ::2, L] = src[:, 0]
            assert torch.equal(x, b4)


def test_decode_step_empty_cache_without_new_rows():
    # L = 0 and no k/v: every row sees no key (zeros, lse = -inf), as the oracle.
    q = torch.randn(2, 1, 8, 16)
    kc, vc = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    out, lse = pytorch_mqa.attention_with_kv_cache(q, kc, vc, cache_seqlens=torch.zeros(2, dtype=torch.int32),
                                                  return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())


@pytest.mark.parametrize("Tq,causal", [(1, True), (3, True), (3, False)])
@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_ragged_decode_ignores_nan_past_each_length(Tq, causal, Hkv):
    """Stale NaN/inf past a sequence's length (a cache reused without clearing) never reaches
    the result: the CPU path equals the oracle, which never reads those rows."""
    B, S, Hq, D = 3, 40, 4, 16
    g = torch.Generator().manual_seed(Tq * 10 + Hkv)
    q = torch.randn(B, Tq, Hq, D, generator=g)
    kc, vc = torch.randn(B, S, Hkv, D, generator=g), torch.randn(B, S, Hkv, D, generator=g)
    k, v = torch.randn(B, Tq, Hkv, D, generator=g), torch.randn(B, Tq, Hkv, D, generator=g)
    lens = torch.tensor([5, 0, 21], dtype=torch.int32)
    for b, L in enumerate(lens.tolist()):
        kc[b, L:] = float("nan")
        vc[b, L + 1:] = float("inf")
    kr, vr = kc.clone(), vc.clone()
    out, lse = pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens, causal=causal, return_lse=True)
    want, want_lse = reference.attention_with_kv_cache(q, kr, vr, k, v, lens, causal=causal)
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc, kr, equal_nan=True)
