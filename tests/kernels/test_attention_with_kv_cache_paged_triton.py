"""backend="triton" of `attention_with_kv_cache` with the serving caches: paged KV (block_table),
cache_batch_idx, cache_leftpad and rotary in the append, alone and combined, against the oracle.

Inputs come from tests/serving_cases.py: permuted block tables with NaN sentinel pages nobody
points to, permuted cache slots, and NaN in every row the call must neither read nor write
(padding, rows past the live keys, unused slots). The caches must match the oracle bit for bit
(rotary included: fp32 math rounded once), out and lse follow DESIGN §5. Every call is planned for
a 132-SM GPU, so the live keys are split over several programs and merged by the combine kernel.
"""

import pytest
import torch
from serving_cases import bits, make_case, run_case

from pytorch_mqa import reference
from pytorch_mqa.kernels import attention_with_kv_cache as kernel
from pytorch_mqa.kernels.common import override_sm_count

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SMS = 132


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def _run(case, dtype, causal, label, **variant):
    """run_case on the Triton backend, planned for SMS SMs; checks the plan really splits."""
    B, Tq, Hq, D = case["q"].shape
    Hkv = case["k_cache"].shape[2]
    table = case["kw"].get("block_table")
    S = case["k_cache"].shape[1] * (1 if table is None else table.shape[1])
    plan = kernel.decode_plan(B, Hkv, Tq, Hq // Hkv, S, SMS, fp32=dtype == torch.float32)
    assert plan.num_splits > 1
    with override_sm_count(SMS):
        return run_case(case, dtype, causal, label, backend="triton", **variant)


# (B, Tq, Hq, Hkv, D, make_case keywords): MHA / GQA / MQA; page sizes 16 and 32 (a tile spans
# several pages: one vector table read per tile), 48 (not a power of two) and 256 (one page per
# tile: one scalar read); slots, left padding (some longer than a split, some ending mid-page),
# ragged lengths including 0, 1 and full.
PAGED = {
    "mha page16 Tq1": (3, 1, 4, 4, 32, dict(page=16, S=96, lens=[0, 37, 95])),
    "gqa page32 Tq3 slots leftpad": (3, 3, 8, 2, 40, dict(page=32, S=128, lens=[5, 64, "full"], slots=True,
                                                          leftpad=[0, 10, 70])),
    "mqa page256 Tq2 leftpad": (2, 2, 8, 1, 64, dict(page=256, S=512, lens=[300, 1], leftpad=[260, 0])),
    "gqa page48 Tq4 slots leftpad": (2, 4, 6, 3, 16, dict(page=48, S=144, lens=[100, 0], slots=True, leftpad=[33, 0])),
    "mqa contiguous slots leftpad": (3, 1, 8, 1, 128, dict(S=80, lens=[79, 10, 40], slots=True, leftpad=[70, 0, 39])),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("name", list(PAGED))
def test_paged_slots_leftpad(name, dtype, causal):
    B, Tq, Hq, Hkv, D, kw = PAGED[name]
    case = make_case(B, Tq, Hq, Hkv, D, dtype, seed=31, **kw)
    _run(case, dtype, causal, "triton paged")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("name", ["mha page16 Tq1", "mqa page256 Tq2 leftpad", "mqa contiguous slots leftpad"])
def test_no_new_rows(name, dtype):
    """Without new k/v nothing is written; lengths must leave at least one live key."""
    B, Tq, Hq, Hkv, D, kw = PAGED[name]
    kw = dict(kw, lens=[max(x, 1) if isinstance(x, int) else x for x in kw["lens"]])
    case = make_case(B, Tq, Hq, Hkv, D, dtype, seed=32, with_new=False, **kw)
    _run(case, dtype, True, "triton paged")


# Rotary: GPT-J (interleaved) and GPT-NeoX, rotary_dim = D, D / 2 and values that are not
# multiples of 16 (6 of 40, 10 of 24), with every other serving feature.
ROTARY = {
    "gptj R=D page16": (2, 1, 4, 1, 32, dict(page=16, S=64, lens=[10, 40], rotary=(32, True))),
    "neox R=D/2 page256 slots leftpad Tq3": (2, 3, 4, 2, 64, dict(page=256, S=256, lens=[100, 3], slots=True,
                                                                  leftpad=[50, 0], rotary=(32, False))),
    "neox R=6 D=40 contiguous": (2, 2, 6, 3, 40, dict(S=48, lens=[0, 30], rotary=(6, False))),
    "gptj R=10 D=24 page32 leftpad": (3, 2, 2, 2, 24, dict(page=32, S=64, lens=[5, 33, 60], leftpad=[5, 1, 40],
                                                           rotary=(10, True))),
}
MODES = {"causal": (True, {}), "full": (False, {}), "window": (False, dict(window_size=(7, 2)))}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("name", list(ROTARY))
def test_rotary(name, dtype, mode):
    """New k rotated before the write (the cache holds reference.apply_rotary(k) exactly), q
    rotated per token (causal, window) or all at L_b (full); cos/sin in fp32 or q's dtype."""
    B, Tq, Hq, Hkv, D, kw = ROTARY[name]
    case = make_case(B, Tq, Hq, Hkv, D, dtype, seed=33, **kw)
    if dtype != torch.float32 and "gptj" in name:  # cos/sin in q's dtype, as FlashAttention's tests pass them
        case["kw"]["rotary_cos"] = case["kw"]["rotary_cos"].to(dtype)
        case["kw"]["rotary_sin"] = case["kw"]["rotary_sin"].to(dtype)
    causal, variant = MODES[mode]
    k_written = _run(case, dtype, causal, "triton rotary", **variant)
    assert not torch.equal(k_written, case["k"])  # the rotation did something


# The variants on paged caches with left padding: alignment in cache rows (i + K_b - Tq).
VARIANTS = {
    "window": dict(window_size=(20, 0)),
    "softcap": dict(softcap=3.0),
    "alibi": dict(alibi_slopes=torch.tensor([0.05, 0.3, 0.11, 0.7])),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_with_leftpad(variant, dtype):
    case = make_case(2, 2, 4, 2, 32, dtype, seed=34, page=16, S=96, lens=[80, 30], slots=True, leftpad=[41, 3],
                     rotary=(16, False))
    _run(case, dtype, variant != "softcap", f"triton paged {variant}", **VARIANTS[variant])


@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("page", [16, 64])
def test_forced_split_counts(page, num_splits):
    """The launcher with a forced split count: paged, slots, left padding and rotary together
    (fp32: exact cache, output within 2e-6 of the oracle). Page 64 is one tile per page."""
    case = make_case(2, 3, 8, 2, 32, torch.float32, seed=35, page=page, S=256, lens=[200, 70], slots=True,
                     leftpad=[97, 0], rotary=(32, False))
    q, kc, vc, k, v, lens = (case[n] for n in ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens"))
    kw = case["kw"]
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref, ref_lse = reference.attention_with_kv_cache(q, kc_ref, vc_ref, k, v, lens, causal=True, scale=0.25, **kw)
    out, lse = kernel.attention_with_kv_cache(q, kc, vc, k, v, lens, True, 0.25, num_splits=num_splits, **kw)
    assert torch.equal(bits(kc), bits(kc_ref)) and torch.equal(bits(vc), bits(vc_ref))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=0)


def test_shared_slot_without_new_rows():
    """Two sequences may read the same slot (or table row) when nothing is appended."""
    case = make_case(2, 1, 4, 1, 16, torch.float32, seed=36, page=16, S=64, lens=[40, 40], with_new=False)
    kw = dict(case["kw"], cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32),
              cache_leftpad=torch.tensor([0, 17], dtype=torch.int32))
    q, kc, vc, lens = case["q"], case["k_cache"], case["v_cache"], case["cache_seqlens"]
    ref, ref_lse = reference.attention_with_kv_cache(q, kc.clone(), vc.clone(), None, None, lens, scale=0.25, **kw)
    with override_sm_count(SMS):
        out, lse = kernel.attention_with_kv_cache(q, kc, vc, None, None, lens, True, 0.25, **kw)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=0)


def test_rotary_and_pages_add_no_launch(monkeypatch):
    """Paged caches, slots, padding and rotary run in the same (at most two) launches."""
    launches = []

    class Counting:
        def __init__(self, fn, name):
            self.fn, self.name = fn, name

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.fn[grid]

    for name in ("_decode_split_kernel", "_combine_kernel"):
        monkeypatch.setattr(kernel, name, Counting(getattr(kernel, name), name))
    case = make_case(2, 1, 4, 2, 16, torch.float32, seed=37, page=16, S=64, lens=[20, 50], slots=True,
                     leftpad=[3, 0], rotary=(16, True))
    q, kc, vc, k, v, lens = (case[n] for n in ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens"))
    with override_sm_count(SMS):
        kernel.attention_with_kv_cache(q, kc, vc, k, v, lens, True, 0.25, **case["kw"])
    assert launches == ["_decode_split_kernel", "_combine_kernel"]
    launches.clear()
    kernel.attention_with_kv_cache(q, kc, vc, k, v, lens + 1, True, 0.25, num_splits=1, **case["kw"])
    assert launches == ["_decode_split_kernel"]


def test_plan_uses_the_table_capacity(monkeypatch):
    """The split rule sees S = max_blocks * page_size (the capacity through the table)."""
    case = make_case(1, 1, 8, 1, 16, torch.float32, seed=38, page=16, S=1024, lens=[1000])
    q, kc, vc, k, v, lens = (case[n] for n in ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens"))
    seen = []
    orig = kernel.decode_plan
    monkeypatch.setattr(kernel, "decode_plan", lambda *a, **kw: seen.append(orig(*a, **kw)) or seen[-1])
    with override_sm_count(SMS):
        kernel.attention_with_kv_cache(q, kc, vc, k, v, lens, True, 0.25, **case["kw"])
    expect = orig(1, 1, 1, 8, 1024, SMS)
    assert seen == [expect] and expect.num_splits > 1
