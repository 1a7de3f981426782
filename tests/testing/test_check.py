"""check_attention / check_attention_with_kv_cache: a correct kernel passes, subtly wrong ones fail
with the failing cases named."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import pytorch_mqa
from pytorch_mqa import reference
from pytorch_mqa.testing import attention_cases, check_attention, check_attention_with_kv_cache, kv_cache_cases

FP32 = (torch.float32,)


def sdpa(q, k, v, *, causal=False, scale=None):
    """SDPA in BSHD: its is_causal is top-left aligned, the package's bottom-right."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def sdpa_bottom_right(q, k, v, *, causal=False, scale=None):
    Tq, Tk = q.shape[1], k.shape[1]
    mask = reference.causal_mask(Tq, Tk, q.device) if causal else None
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    out = out.transpose(1, 2)
    if causal and Tq > Tk:  # rows that see no key: SDPA gives NaN, the contract zeros
        out = torch.nan_to_num(out, nan=0.0)
    return out


@pytest.mark.slow
def test_the_package_reference_passes_with_lse_and_gradients():
    fn = functools.partial(pytorch_mqa.attention, backend="reference")
    report = check_attention(fn, quick=True, lse=True, grad=True, device="cpu")
    assert report.passed, report.failure_details()
    assert len(report.results) == len(attention_cases(quick=True))
    assert all({c.name for c in r.comparisons} == {"out", "lse", "dq", "dk", "dv"} for r in report.results)
    assert 0 < report.worst_ratio < 1


@pytest.mark.slow
def test_a_correct_user_implementation_passes():
    report = check_attention(sdpa_bottom_right, dtypes=FP32)
    assert report.passed, report.failure_details()


def test_top_left_causal_fails_exactly_where_alignment_matters():
    report = check_attention(sdpa, dtypes=FP32)
    failed = {r.name for r in report.failures}
    want = {c.name for c in attention_cases(dtypes=FP32) if c.causal and c.Tq != c.Tk}
    assert failed == want and len(failed) == 5
    for r in report.failures:
        assert "causal bottom-right" in r.tags and r.case["Tq"] != r.case["Tk"]
        assert r.comparisons[0].ratio > 10
    assert "B=1 Tq=5 Tk=3 Hq=2 Hkv=2 D=7 float32 causal" in report.table(failures_only=True)


def test_a_wrong_default_scale_fails_every_unscaled_case_and_ignoring_scale_the_scaled_ones():
    def wrong_default(q, k, v, *, causal=False, scale=None):
        return sdpa_bottom_right(q, k, v, causal=causal, scale=1.0 / q.shape[-1] if scale is None else scale)

    def ignores_scale(q, k, v, *, causal=False, scale=None):
        return sdpa_bottom_right(q, k, v, causal=causal)

    wrong = check_attention(wrong_default, dtypes=FP32)
    assert {r.name for r in wrong.failures} == {r.name for r in wrong.results if r.case["scale"] is None and r.case["Tk"] > 1}
    ignored = check_attention(ignores_scale, dtypes=FP32)
    assert {r.name for r in ignored.failures} == {r.name for r in ignored.results if r.case["scale"] is not None}


def test_low_precision_accumulation_fails_and_exceptions_are_reported():
    def fp16_softmax(q, k, v, *, causal=False, scale=None):
        s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(q.shape[2] // k.shape[2], 2))
        s = (s * (scale or 1 / math.sqrt(q.shape[-1]))).to(torch.float16)  # scores rounded to fp16
        if causal:
            s = s.masked_fill(~reference.causal_mask(q.shape[1], k.shape[1]), float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype)
        return torch.einsum("bhqk,bkhd->bqhd", p, v.repeat_interleave(q.shape[2] // k.shape[2], 2))

    report = check_attention(fp16_softmax, dtypes=FP32)
    assert not report.passed and len(report.failures) > len(report.results) // 2

    def raises(q, k, v, *, causal=False, scale=None):
        raise NotImplementedError("D > 128")

    r = check_attention(raises, quick=True, dtypes=FP32)
    assert not r.passed and all("NotImplementedError: D > 128" in x.problems[0] for x in r.results)


def test_in_place_input_writes_and_wrong_dtypes_are_named():
    def scribbles(q, k, v, *, causal=False, scale=None):
        out = sdpa_bottom_right(q, k, v, causal=causal, scale=scale)
        k.zero_()
        return out.float()

    r = check_attention(scribbles, quick=True, dtypes=(torch.float16,))
    msgs = r.failures[0].problems
    assert any("expected dtype torch.float16" in m for m in msgs) and any("k: modified in place" in m for m in msgs)


def test_a_wrong_backward_fails_the_gradient_check():
    class ScaledGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.01

    def wrong_grad(q, k, v, *, causal=False, scale=None):
        return pytorch_mqa.attention(ScaledGrad.apply(q), k, v, causal=causal, scale=scale)

    cases = attention_cases(quick=True, dtypes=FP32)[:4]
    assert check_attention(wrong_grad, cases=cases).passed  # forward is right
    r = check_attention(wrong_grad, cases=cases, grad=True)
    assert len(r.failures) == 2  # the two Tk > 1 cases (with one key, dq is 0)
    assert all({c.name for c in x.comparisons if not c.passed} == {"dq"} for x in r.failures)


# --------------------------------------------------------------------------------------------
# The cache op
# --------------------------------------------------------------------------------------------

def _decode(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, causal=True, scale=None):
    return pytorch_mqa.attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                               causal=causal, scale=scale, backend="reference")


def test_kv_cache_correct_implementation_passes_every_case():
    report = check_attention_with_kv_cache(functools.partial(pytorch_mqa.attention_with_kv_cache, backend="reference"),
                                           lse=True, dtypes=FP32)
    assert report.passed, report.failure_details()
    assert len(report.results) == len(kv_cache_cases(dtypes=FP32))


def test_a_write_past_the_cache_end_is_caught_by_the_guard():
    def overruns(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, causal=True, scale=None):
        out = _decode(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=causal, scale=scale)
        torch.as_strided(v_cache, (2,), (1,), v_cache.storage_offset() + v_cache.numel()).zero_()
        return out

    r = check_attention_with_kv_cache(overruns, quick=True, dtypes=FP32)
    assert len(r.failures) == len(r.results)
    assert all(any("v_cache: 2 elements written after the cache" in m for m in x.problems) for x in r.results)


def test_appending_one_row_too_far_and_not_appending_are_caught():
    def off_by_one(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, causal=True, scale=None):
        out = _decode(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=cache_seqlens, causal=causal, scale=scale)
        if k is not None:
            for b, L in enumerate(cache_seqlens.tolist()):
                n = min(k.shape[1], k_cache.shape[1] - L - 1)
                k_cache[b, L + 1 : L + 1 + n] = k[b, :n]
                v_cache[b, L : L + k.shape[1]] = v[b]
        return out

    r = check_attention_with_kv_cache(off_by_one, dtypes=FP32)
    appending = [x for x in r.results if x.case["with_new"]]
    assert all(not x.passed for x in appending)
    assert all(any(m.startswith("k_cache:") and "appended rows differ" in m for m in x.problems) for x in appending)
    assert all(x.passed for x in r.results if not x.case["with_new"])


def test_kv_cache_top_left_causal_fails_the_multi_row_cases():
    def top_left(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, causal=True, scale=None):
        out = torch.empty_like(q)
        for b, L in enumerate(cache_seqlens.tolist()):
            if k is not None:
                k_cache[b, L : L + q.shape[1]] = k[b]
                v_cache[b, L : L + q.shape[1]] = v[b]
            n = L + (q.shape[1] if k is not None else 0)
            out[b : b + 1] = sdpa(q[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n], causal=causal, scale=scale)
        return out.nan_to_num(0.0)

    r = check_attention_with_kv_cache(top_left, dtypes=FP32)
    for x in r.results:
        c = x.case
        # Top-left alignment only agrees where a sequence has no key or exactly Tq keys.
        n_keys = [L + (c["Tq"] if c["with_new"] else 0) for L in c["lengths"]]
        misaligned = c["causal"] and any(0 < n != c["Tq"] for n in n_keys)
        assert x.passed != misaligned, x.name
    assert 0 < len(r.failures) < len(r.results)
