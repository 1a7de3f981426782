"""pytorch_mqa.testing.tolerance: the DESIGN §5 rule as functions."""

import pytest
import torch

from pytorch_mqa.testing import ATOL, assert_close, compare, tolerance


def _refs():
    ref32 = torch.tensor([1.0, -2.0, 0.5, float("-inf")])
    ref_lp = ref32 + torch.tensor([1e-3, -2e-3, 0.0, 0.0])
    return ref32, ref_lp


def test_tolerance_is_twice_the_low_precision_error_plus_atol():
    ref32, ref_lp = _refs()
    assert tolerance(ref32, ref_lp, torch.float16) == pytest.approx(2 * 2e-3 + ATOL[torch.float16], rel=1e-4)


def test_compare_passes_within_and_fails_beyond_the_bound():
    ref32, ref_lp = _refs()
    tol = tolerance(ref32, ref_lp, torch.float16)
    ok = compare(ref32 + torch.tensor([0.0, tol * 0.99, 0.0, 0.0]), ref32, ref_lp, torch.float16)
    assert ok.passed and 0.98 < ok.ratio < 1.0 and ok.tolerance == pytest.approx(tol)
    bad = compare(ref32 + torch.tensor([0.0, 0.0, tol * 1.5, 0.0]), ref32, ref_lp, torch.float16, "lse")
    assert not bad.passed and bad.ratio == pytest.approx(1.5, rel=1e-3)
    assert bad.n_over == 1 and bad.first_over == [[2]] and bad.message.startswith("lse (float16)")


def test_infinities_must_match_and_nan_never_passes():
    ref32, ref_lp = _refs()
    finite_where_inf = ref32.clone()
    finite_where_inf[3] = 0.0
    c = compare(finite_where_inf, ref32, ref_lp, torch.float32)
    assert not c.passed and "infinity" in c.message
    nan = ref32.clone()
    nan[0] = float("nan")
    assert not compare(nan, ref32, ref_lp, torch.float32).passed


def test_shape_and_type_mismatch_fail_without_raising():
    ref32, ref_lp = _refs()
    assert "shape" in compare(ref32[:2], ref32, ref_lp, torch.float32).message
    assert "torch.Tensor" in compare(None, ref32, ref_lp, torch.float32).message


def test_a_reference_disagreeing_in_infinity_does_not_widen_the_bound():
    ref32 = torch.tensor([1.0, 2.0])
    ref_lp = torch.tensor([1.0, float("inf")])  # an overflow in low precision
    assert not compare(ref32 + 10.0, ref32, ref_lp, torch.float16).passed


def test_assert_close_raises_and_records():
    ref32, ref_lp = _refs()
    record = {}
    assert assert_close(ref32, ref32, ref_lp, torch.float16, "out", record=record, label="x") == 0.0
    assert "x out float16" in record
    with pytest.raises(AssertionError, match="max error"):
        assert_close(ref32 + 1.0, ref32, ref_lp, torch.float16)
