"""The two float64 oracles of the kit agree: the plain loop and the reference run in float64."""

import pytest
import torch

from pytorch_mqa.testing import attention_float64, attention_loop, attention_with_kv_cache_float64, kv_cache_cases


@pytest.mark.parametrize("shape", [(1, 5, 3, 2, 2, 7), (2, 4, 9, 6, 2, 8), (1, 1, 6, 8, 1, 4)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_loop_equals_reference_in_float64(shape, causal):
    from pytorch_mqa.testing import attention_inputs

    q, k, v = attention_inputs(shape, torch.float16, seed=3)
    out, lse = attention_float64(q, k, v, causal=causal, scale=0.4)
    out_l, lse_l = attention_loop(q, k, v, causal=causal, scale=0.4)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, out_l, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, lse_l, rtol=0, atol=1e-12)


def test_kv_cache_float64_equals_loop_on_the_appended_cache():
    case = next(c for c in kv_cache_cases() if c.Tq == 3 and not c.with_new and c.dtype == torch.float32)
    q, kc, vc, k, v, lens = case.inputs()
    out, lse, kc64, vc64 = attention_with_kv_cache_float64(q, kc, vc, k, v, lens, causal=True)
    assert torch.equal(kc64, kc.double())  # read only: nothing appended, the input untouched
    out_l, lse_l = attention_loop(q, kc, vc, causal=True, key_len=lens)
    torch.testing.assert_close(out, out_l, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, lse_l, rtol=0, atol=1e-12)
    assert torch.isneginf(lse[1, :, 0]).all()  # L = 2 < Tq = 3: the first causal row sees no key
