"""backend="triton" of `attention_with_kv_cache`: fused append + split-KV decode against the reference.

Runs under the Triton interpreter on CPU (conftest); the same matrix runs on a GPU under the
`cuda` mark. Outputs follow DESIGN §5; cache contents must match the reference bit for bit.
"""

import os
import subprocess
import sys

import pytest
import torch

import pytorch_mqa
from helpers import DTYPES, KV_CACHE_SHAPES, assert_close, kv_cache_inputs, randn, seeded
from pytorch_mqa import reference
from pytorch_mqa.kernels import attention_with_kv_cache as kernel
from pytorch_mqa.kernels.common import INTERPRETER_SMS, override_sm_count, sm_count

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
LABEL = "triton kv_cache"

# Extra rows for this backend: G = 2, a cache already full without new rows (L = S), and a
# sequence longer than one split with several key blocks per split.
EXTRA_SHAPES = [
    (2, 2, 96, 4, 2, 24, [96 - 2, 31]),
    (2, 1, 64, 6, 3, 16, [64, 0]),
]


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def _run_all(case, dtype, device, with_new, causal, strided=False, seed=0):
    """Run the triton op and both references on copies of the same inputs; return everything."""
    q, k_cache, v_cache, k, v, seqlens = kv_cache_inputs(case, dtype, seed=seed, device=device, with_new=with_new)
    if with_new and case[6][0] == case[2]:
        pytest.skip("a cache already at capacity takes no new rows")
    if strided:
        # q, k, v as slices of one fused projection buffer.
        B, Tq, Hq, D = q.shape
        Hkv = k_cache.shape[2]
        buf = randn((B, Tq, Hq + 2 * Hkv + 1, D), dtype, seeded(seed + 1), device)
        buf[:, :, :Hq] = q
        q = buf[:, :, :Hq]
        if with_new:
            buf[:, :, Hq : Hq + Hkv] = k
            buf[:, :, Hq + Hkv : Hq + 2 * Hkv] = v
            k, v = buf[:, :, Hq : Hq + Hkv], buf[:, :, Hq + Hkv : Hq + 2 * Hkv]
    caches32 = (k_cache.float(), v_cache.float())
    caches_lp = (k_cache.clone(), v_cache.clone())
    new32 = (k.float(), v.float()) if with_new else (None, None)
    out, lse = pytorch_mqa.attention_with_kv_cache(
        q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=causal, return_lse=True, backend="triton"
    )
    ref32, lse32 = reference.attention_with_kv_cache(q.float(), *caches32, *new32, seqlens, causal=causal)
    ref_lp, lse_lp = reference.attention_with_kv_cache(
        q, *caches_lp, k, v, seqlens, causal=causal, upcast=False
    )
    return (out, lse), (ref32, lse32), (ref_lp, lse_lp), (k_cache, v_cache), caches_lp


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("with_new", [True, False], ids=["append", "no_new"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", KV_CACHE_SHAPES + EXTRA_SHAPES, ids=str)
def test_decode(case, dtype, with_new, causal, device):
    # Strided q/k/v on the non-causal half of the matrix.
    got, r32, rlp, caches, caches_ref = _run_all(case, dtype, device, with_new, causal, strided=not causal)
    assert got[0].dtype == dtype and got[0].is_contiguous() and got[1].dtype == torch.float32
    assert_close(got[0], r32[0], rlp[0], dtype, "out", LABEL)
    assert_close(got[1], r32[1], rlp[1], dtype, "lse", LABEL)
    assert torch.equal(caches[0], caches_ref[0]) and torch.equal(caches[1], caches_ref[1])


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_forced_split_counts(num_splits):
    # S = 1000 with 2 splits gives 4 key blocks per split; 8 splits leave some splits empty for
    # the shorter sequence.
    case = (2, 3, 1000, 4, 1, 16, [997, 200])
    q, k_cache, v_cache, k, v, seqlens = kv_cache_inputs(case, torch.float32, seed=9)
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse = kernel.attention_with_kv_cache(q, k_cache, v_cache, k, v, seqlens, True, 0.25, num_splits=num_splits)
    ref, ref_lse = reference.attention_with_kv_cache(q, kc, vc, k, v, seqlens, causal=True, scale=0.25)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=0)


def test_decode_plan_is_static_and_fills_the_device():
    # Depends on shapes and the SM count only; at B * Hkv = 1 there are about two waves of programs.
    plan = kernel.decode_plan(1, 1, 1, 8, 32768, 132)
    assert plan.split_programs >= 132 and plan.launches == 2
    assert plan.num_splits == 2 * 132
    assert kernel.decode_plan(1, 1, 1, 8, 64, 132).num_splits == 2  # at most one split per SPLIT_ALIGN rows
    assert kernel.decode_plan(1, 1, 1, 8, 20, 132).launches == 1
    assert kernel.decode_plan(512, 8, 1, 8, 4096, 132).num_splits == 1  # enough work without splitting
    p = kernel.decode_plan(4, 8, 4, 4, 4096, 132)  # 32 programs per split
    assert p.split_programs >= 2 * 132 - 32 and p.num_splits * 32 == p.split_programs
    with override_sm_count(132):
        assert kernel.decode_plan(1, 1, 1, 8, 32768, sm_count("cpu")).split_programs >= 132
    assert sm_count("cpu") == INTERPRETER_SMS


def test_live_length_partition():
    """The splits cover the live keys [0, Lk) exactly and equally, whatever the capacity S."""
    import math

    for Lk in (0, 1, 31, 32, 33, 1000, 4096, 32767):
        for n in (1, 3, 264):
            chunk = max(math.ceil(math.ceil(Lk / n) / kernel.SPLIT_ALIGN) * kernel.SPLIT_ALIGN, kernel.SPLIT_ALIGN)
            active = max(math.ceil(Lk / chunk), 1)
            assert active <= n and (active - 1) * chunk < max(Lk, 1) <= active * chunk
    # At S = 32k, L = 8k, B = Hkv = 1 on 132 SMs: 264 splits of 32 keys, 256 of them active.
    n = kernel.decode_plan(1, 1, 1, 8, 32768, 132).num_splits
    chunk = math.ceil(math.ceil(8193 / n) / kernel.SPLIT_ALIGN) * kernel.SPLIT_ALIGN
    assert math.ceil(8193 / chunk) >= 132


def test_at_most_two_launches(monkeypatch):
    """One call launches the fused split kernel and, with several splits, the combine: nothing else."""
    launches = []

    class Counting:
        def __init__(self, fn, name):
            self.fn, self.name = fn, name

        def __getitem__(self, grid):
            launches.append((self.name, grid))
            return self.fn[grid]

    for name in ("_decode_split_kernel", "_combine_kernel"):
        monkeypatch.setattr(kernel, name, Counting(getattr(kernel, name), name))
    q, k_cache, v_cache, k, v, seqlens = kv_cache_inputs((2, 1, 512, 8, 1, 16, [100, 3]), torch.float32, seed=3)
    with override_sm_count(132):
        kernel.attention_with_kv_cache(q, k_cache, v_cache, k, v, seqlens, True, 0.25)
    assert [n for n, _ in launches] == ["_decode_split_kernel", "_combine_kernel"]
    assert all(len(grid) == 1 for _, grid in launches)  # B * Hkv folded into axis 0
    launches.clear()
    kernel.attention_with_kv_cache(q, k_cache, v_cache, k, v, seqlens, True, 0.25, num_splits=1)
    assert [n for n, _ in launches] == ["_decode_split_kernel"]


# Preallocated caches: capacity S >= 4 x most live lengths, ragged lengths including 0, 1, S - 1
# and S - Tq; G from 1 to 32; Tq 1 to 4. (B, Tq, S, Hq, Hkv, D, lengths)
PREALLOCATED = [
    (5, 1, 256, 8, 1, 64, [0, 1, 255, 40, 63]),  # MQA, Tq = 1 (S - 1 = S - Tq)
    (5, 2, 192, 4, 4, 32, [0, 1, 191, 190, 33]),  # MHA (G = 1); S - 1 overflows by one new row
    (4, 3, 160, 32, 1, 16, [0, 1, 159, 157]),  # G = 32: 96 packed rows, two row blocks
    (5, 4, 200, 6, 3, 40, [0, 1, 199, 196, 62]),  # G = 2, odd D; L = 62: new rows straddle two splits
    (3, 1, 512, 16, 1, 128, [100, 17, 511]),  # G = 16, long capacity
    (2, 2, 384, 12, 3, 24, [5, 90]),  # G = 4, only short sequences in a large cache
]


def _guarded(shape, dtype, gen, pad=(2, 5, 1, 3)):
    """A tensor of `shape` as a view into a larger buffer filled with a sentinel; returns (view, buffer)."""
    B, S, H, D = shape
    buf = torch.full((B + 1, S + 2 * pad[1], H + pad[2], D + pad[3]), 7.0, dtype=dtype)
    view = buf[:B, pad[1] : pad[1] + S, pad[2] :, 1 : 1 + D]
    view.copy_(torch.randn(shape, generator=gen).to(dtype))
    return view, buf


def _dev(t, device):
    return None if t is None else t.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("with_new", [True, False], ids=["append", "no_new"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", PREALLOCATED, ids=str)
def test_preallocated_cache(case, dtype, with_new, causal, device):
    """Live-length splits on a planned GPU launch (132 SMs): matches the oracle, writes exactly
    rows [L_b, L_b + Tq) inside [0, S) and nothing outside the cache views."""
    B, Tq, S, Hq, Hkv, D, lengths = case
    gen = seeded(21)
    k_cache, buf_k = _guarded((B, S, Hkv, D), dtype, gen)
    v_cache, buf_v = _guarded((B, S, Hkv, D), dtype, gen)
    q = torch.randn((B, Tq, Hq, D), generator=gen).to(dtype)
    k = torch.randn((B, Tq, Hkv, D), generator=gen).to(dtype) if with_new else None
    v = torch.randn((B, Tq, Hkv, D), generator=gen).to(dtype) if with_new else None
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    expect_k, expect_v = buf_k.clone(), buf_v.clone()
    ek, ev = expect_k[:B, 5 : 5 + S, 1:, 1 : 1 + D], expect_v[:B, 5 : 5 + S, 1:, 1 : 1 + D]
    new32 = (k.float(), v.float()) if with_new else (None, None)
    ref32, lse32 = reference.attention_with_kv_cache(q.float(), ek.float(), ev.float(), *new32, seqlens, causal=causal)
    ref_lp, lse_lp = reference.attention_with_kv_cache(q, ek, ev, k, v, seqlens, causal=causal, upcast=False)
    if device != "cpu":  # the same views of the same buffers on the device
        buf_k, buf_v = buf_k.to(device), buf_v.to(device)
        k_cache = buf_k[:B, 5 : 5 + S, 1:, 1 : 1 + D]
        v_cache = buf_v[:B, 5 : 5 + S, 1:, 1 : 1 + D]
    with override_sm_count(132):
        plan = kernel.decode_plan(B, Hkv, Tq, Hq // Hkv, S, 132, fp32=dtype == torch.float32)
        assert plan.num_splits > 1
        out, lse = kernel.attention_with_kv_cache(_dev(q, device), k_cache, v_cache, _dev(k, device), _dev(v, device),
                                                  seqlens.to(device), causal, D**-0.5)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out.cpu(), ref32, ref_lp, dtype, "out", LABEL + " preallocated")
    assert_close(lse.cpu(), lse32, lse_lp, dtype, "lse", LABEL + " preallocated")
    # Exact cache contents, and the sentinel guard region around the views untouched.
    assert torch.equal(buf_k.cpu(), expect_k) and torch.equal(buf_v.cpu(), expect_v)


@pytest.mark.parametrize("with_new", [True, False], ids=["append", "no_new"])
def test_guard_region(with_new):
    """The caches are views into a larger sentinel-filled buffer: only rows [L_b, L_b + Tq) change."""
    B, Tq, S, Hq, Hkv, D = 3, 2, 40, 4, 2, 24
    sentinel = 7.0
    buf_k = torch.full((B + 1, S + 6, Hkv + 1, D + 5), sentinel)
    buf_v = torch.full((B + 1, S + 6, Hkv + 1, D + 5), sentinel)
    k_cache = buf_k[:B, 3 : 3 + S, 1:, 2 : 2 + D]
    v_cache = buf_v[:B, 3 : 3 + S, 1:, 2 : 2 + D]
    gen = seeded(11)
    k_cache.copy_(torch.randn(k_cache.shape, generator=gen))
    v_cache.copy_(torch.randn(v_cache.shape, generator=gen))
    q = torch.randn((B, Tq, Hq, D), generator=gen)
    k = torch.randn((B, Tq, Hkv, D), generator=gen) if with_new else None
    v = torch.randn((B, Tq, Hkv, D), generator=gen) if with_new else None
    seqlens = torch.tensor([0, 17, S - Tq], dtype=torch.int32)
    before_k, before_v = buf_k.clone(), buf_v.clone()
    pytorch_mqa.attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, backend="triton")
    expect_k, expect_v = before_k.clone(), before_v.clone()
    if with_new:
        for b, L in enumerate(seqlens.tolist()):
            expect_k[b, 3 + L : 3 + L + Tq, 1:, 2 : 2 + D] = k[b]
            expect_v[b, 3 + L : 3 + L + Tq, 1:, 2 : 2 + D] = v[b]
    assert torch.equal(buf_k, expect_k) and torch.equal(buf_v, expect_v)


def test_device_lengths_past_capacity_write_nothing_outside():
    """Lengths that live on the device are not checked on the host: L_b + Tq > S (and L_b < 0)
    must still write only inside the cache. The launcher is called directly, as the op does on
    a GPU where the host cannot see the lengths."""
    B, Tq, S, Hq, Hkv, D = 4, 3, 20, 2, 1, 16
    buf_k = torch.full((B, S + 8, Hkv, D), 7.0)
    buf_v = torch.full((B, S + 8, Hkv, D), 7.0)
    k_cache, v_cache = buf_k[:, 4 : 4 + S], buf_v[:, 4 : 4 + S]
    gen = seeded(12)
    k_cache.copy_(torch.randn(k_cache.shape, generator=gen))
    v_cache.copy_(torch.randn(v_cache.shape, generator=gen))
    q = torch.randn((B, Tq, Hq, D), generator=gen)
    k = torch.randn((B, Tq, Hkv, D), generator=gen)
    v = torch.randn((B, Tq, Hkv, D), generator=gen)
    seqlens = torch.tensor([S - 1, S + 5, -2, S - Tq], dtype=torch.int32)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    before_k, before_v = buf_k.clone(), buf_v.clone()
    out, lse = kernel.attention_with_kv_cache(q, k_cache, v_cache, k, v, seqlens, True, 0.25)
    ref, ref_lse = reference.attention_with_kv_cache(q, kc_ref, vc_ref, k, v, seqlens, causal=True, scale=0.25)
    # Outside the cache view: untouched. Inside: the reference's masked append.
    assert torch.equal(buf_k[:, :4], before_k[:, :4]) and torch.equal(buf_k[:, 4 + S :], before_k[:, 4 + S :])
    assert torch.equal(buf_v[:, :4], before_v[:, :4]) and torch.equal(buf_v[:, 4 + S :], before_v[:, 4 + S :])
    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=0)


def test_opcheck():
    q, k_cache, v_cache, k, v, seqlens = kv_cache_inputs((2, 2, 40, 4, 2, 16, [0, 21]), torch.float32, seed=13)
    torch.library.opcheck(
        torch.ops.pytorch_mqa.attention_with_kv_cache.default,
        (q, k_cache, v_cache, k, v, seqlens, True, 0.25, "triton"),
    )
    torch.library.opcheck(
        torch.ops.pytorch_mqa.attention_with_kv_cache.default,
        (q, k_cache, v_cache, None, None, seqlens, False, 0.25, "triton"),
    )


def test_torch_compile_fullgraph():
    case = (2, 1, 300, 8, 2, 32, [299, 130])  # several splits
    q, k_cache, v_cache, k, v, seqlens = kv_cache_inputs(case, torch.float32, seed=14)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()

    def step(q, k_cache, v_cache, k, v, seqlens):
        return pytorch_mqa.attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, backend="triton")

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k_cache, v_cache, k, v, seqlens)
    ref, _ = reference.attention_with_kv_cache(q, kc_ref, vc_ref, k, v, seqlens)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref)


@pytest.mark.slow
def test_kernels_compile_for_gpu():
    """Lower the decode kernels to sm_90 cubins through the real launcher, every dtype and autotune
    config; fails on a compile error or any register spill."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    res = subprocess.run(
        [sys.executable, script, "attention_with_kv_cache"], env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.parametrize("scale", [0.3, 0.0, -0.3])
def test_any_scale_sign(scale):
    """A positive scale is folded into the exp2 argument (one FFMA); zero and negative scales take
    the pre-scaled path, where masked keys must stay -inf (not NaN from -inf * 0)."""
    case = (2, 2, 200, 4, 1, 16, [150, 0])
    q, k_cache, v_cache, k, v, seqlens = kv_cache_inputs(case, torch.float32, seed=15)
    kc, vc = k_cache.clone(), v_cache.clone()
    with override_sm_count(132):
        out, lse = kernel.attention_with_kv_cache(q, k_cache, v_cache, k, v, seqlens, True, scale)
    ref, ref_lse = reference.attention_with_kv_cache(q, kc, vc, k, v, seqlens, causal=True, scale=scale)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=0)
