"""pytorch_mqa.testing.cases: the seeded matrix covers what DESIGN §5 asks for, reproducibly."""

import torch

from pytorch_mqa.testing import DTYPES, attention_cases, kv_cache_cases


def test_attention_matrix_covers_the_rule():
    cases = attention_cases()
    base = [c for c in cases if c.scale is None]
    assert len(base) == 9 * len(DTYPES) * 2  # every shape x dtype x (full, causal)
    assert {c.dtype for c in cases} == set(DTYPES)
    assert {c.Hq // c.Hkv for c in cases} >= {1, 2, 3, 4, 8}
    assert any(c.Tq == 1 for c in cases) and any(c.Tq > c.Tk and c.causal for c in cases)
    assert any(c.D % 2 for c in cases) and any(c.D == 256 for c in cases)
    assert any(c.strided for c in cases) and any(c.scale is not None for c in cases)
    assert any("rows with no key" in c.tags for c in cases)
    assert len({c.name for c in cases}) == len(cases)  # names identify cases


def test_kv_cache_matrix_covers_ragged_lengths_zero_and_capacity():
    cases = kv_cache_cases()
    assert any(len(set(c.lengths)) > 1 for c in cases)
    assert any(0 in c.lengths for c in cases)
    assert any(c.S in c.lengths and not c.with_new for c in cases)  # a full cache, read only
    assert any(max(c.lengths) + c.Tq == c.S and c.with_new for c in cases)  # an append that fills S
    assert any(c.Tq > 1 for c in cases) and any(not c.causal for c in cases)
    assert any("rows with no key" in c.tags for c in cases)
    for c in cases:
        assert all(L + (c.Tq if c.with_new else 0) <= c.S for L in c.lengths)


def test_quick_is_a_subset_and_inputs_are_seeded():
    assert {c.name for c in attention_cases(quick=True)} < {c.name for c in attention_cases()}
    assert {c.name for c in kv_cache_cases(quick=True)} < {c.name for c in kv_cache_cases()}
    case = attention_cases()[7]
    a, b = case.inputs(), case.inputs()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    kv = kv_cache_cases()[0]
    assert all(torch.equal(x, y) for x, y in zip(kv.inputs(), kv.inputs()) if x is not None)


def test_the_tests_helpers_are_the_kit_not_a_copy():
    import helpers
    import oracle

    from pytorch_mqa import testing

    for name in ("ATTENTION_SHAPES", "KV_CACHE_SHAPES", "DTYPES", "ATOL", "attention_inputs", "kv_cache_inputs",
                 "randn", "seeded", "random_case"):
        assert getattr(helpers, name) is getattr(testing, name), name
    assert oracle.attention_loop is testing.attention_loop
