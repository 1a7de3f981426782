"""The reference itself against a plain float64 loop, before it is trusted as the oracle."""

import pytest
import torch
from helpers import attention_inputs, kv_cache_inputs, random_case
from oracle import attention_loop

from pytorch_mqa import reference

SMALL_SHAPES = [
    (1, 1, 1, 1, 1, 4),
    (2, 5, 7, 4, 1, 8),  # MQA
    (1, 7, 3, 6, 2, 5),  # G=3, Tq > Tk, odd D
    (2, 4, 9, 8, 8, 16),  # MHA
    (1, 3, 6, 8, 1, 3),  # G=8
]


@pytest.mark.parametrize("shape", SMALL_SHAPES + [random_case(s) for s in range(3)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_float64_loop(shape, causal):
    q, k, v = attention_inputs(shape, torch.float64, seed=1)
    if shape[1] > 40 or shape[2] > 40:  # the loop is slow; trim drawn shapes
        q, k, v = q[:, :40], k[:, :40], v[:, :40]
    out, lse = reference.attention(q, k, v, causal=causal, scale=0.3)
    out_l, lse_l = attention_loop(q, k, v, causal=causal, scale=0.3)
    torch.testing.assert_close(out, out_l, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, lse_l, rtol=0, atol=1e-12)


def test_reference_fp32_close_to_loop():
    q, k, v = attention_inputs((2, 9, 13, 4, 2, 24), torch.float32, seed=2)
    out, lse = reference.attention(q, k, v, causal=True)
    out_l, lse_l = attention_loop(q, k, v, causal=True)
    assert (out.double() - out_l).abs().max() < 1e-6
    assert (lse.double() - lse_l).abs().max() < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_reference_backward_matches_float64_autograd(causal):
    q, k, v = attention_inputs((2, 6, 9, 6, 2, 8), torch.float64, seed=3)
    for x in (q, k, v):
        x.requires_grad_(True)
    out, lse = attention_loop(q, k, v, causal=causal)
    gen = torch.Generator().manual_seed(0)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    dlse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    finite = torch.isfinite(lse)
    ((out * dout).sum() + (torch.where(finite, lse, 0) * dlse).sum()).backward()
    with torch.no_grad():
        delta = (dout * out).sum(-1).transpose(1, 2) - dlse
        dq, dk, dv = reference.attention_backward(dout, q, k, v, lse, delta, causal=causal)
    for got, x in zip((dq, dk, dv), (q, k, v)):
        torch.testing.assert_close(got, x.grad, rtol=0, atol=1e-10)


def test_rows_without_keys_are_zero_with_minus_inf_lse():
    # Tq > Tk with causal: the first Tq - Tk query rows see no key.
    q, k, v = attention_inputs((1, 6, 2, 2, 1, 8), torch.float32, seed=4)
    out, lse = reference.attention(q, k, v, causal=True)
    assert torch.all(out[:, :4] == 0) and torch.all(torch.isneginf(lse[:, :, :4]))
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 4:]).all()


@pytest.mark.parametrize("with_new", [True, False])
def test_reference_kv_cache_matches_loop(with_new):
    case = (3, 2, 12, 4, 2, 8, [0, 5, 10])
    q, kc, vc, k, v, lens = kv_cache_inputs(case, torch.float64, seed=5, with_new=with_new)
    kc0, vc0 = kc.clone(), vc.clone()
    out, lse = reference.attention_with_kv_cache(q, kc, vc, k, v, lens, causal=True)
    # Build the expected cache by hand, then attend with the loop.
    Tq = q.shape[1]
    for b, L in enumerate(lens.tolist()):
        if with_new:
            kc0[b, L : L + Tq] = k[b]
            vc0[b, L : L + Tq] = v[b]
    torch.testing.assert_close(kc, kc0, rtol=0, atol=0)
    torch.testing.assert_close(vc, vc0, rtol=0, atol=0)
    key_len = lens + (Tq if with_new else 0)
    out_l, lse_l = attention_loop(q, kc0, vc0, causal=True, key_len=key_len)
    torch.testing.assert_close(out, out_l, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, lse_l, rtol=0, atol=1e-12)


def test_append_masks_out_of_range_rows():
    # Lengths that overflow (as they could on a device, unchecked) write nothing outside [0, S).
    S = 5
    buf = torch.full((2, S + 4, 1, 2), -7.0)
    cache = buf[:, 2 : 2 + S]
    new = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 1, 2)
    reference.append_to_cache(cache, new, torch.tensor([3, 9]))
    assert torch.all(buf[:, :2] == -7) and torch.all(buf[:, 2 + S :] == -7)
    assert torch.equal(cache[0, 3:5], new[0, :2])  # rows 3, 4 written; the third is dropped
    assert torch.all(cache[0, :3] == -7) and torch.all(cache[1] == -7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_backward_upcast_false_is_a_low_precision_estimate(dtype):
    # upcast=False rounds matmul inputs to the input dtype: close to the float32 backward, not equal.
    q, k, v = attention_inputs((1, 6, 9, 4, 2, 16), dtype, seed=6)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    out, lse = reference.attention(q, k, v, causal=True)
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)
    hi = reference.attention_backward(dout, q, k, v, lse, delta, causal=True)
    lo = reference.attention_backward(dout, q, k, v, lse, delta, causal=True, upcast=False)
    for a, b in zip(hi, lo):
        assert a.dtype == b.dtype == dtype
        err = (a.float() - b.float()).abs().max().item()
        assert 0 < err < 0.1


def test_reference_kv_cache_reads_no_length_on_the_host():
    # The oracle is device-independent: on meta tensors (no data) it still runs, so no branch
    # of it reads a length on the host.
    q = torch.empty(2, 1, 4, 8, device="meta")
    kc, vc = torch.empty(2, 16, 2, 8, device="meta"), torch.empty(2, 16, 2, 8, device="meta")
    k, v = torch.empty(2, 1, 2, 8, device="meta"), torch.empty(2, 1, 2, 8, device="meta")
    lens = torch.empty(2, dtype=torch.int32, device="meta")
    out, lse = reference.attention_with_kv_cache(q, kc, vc, k, v, lens)
    assert out.shape == (2, 1, 4, 8) and lse.shape == (2, 4, 1)


# ---- the serving caches: block_table, cache_batch_idx, cache_leftpad, rotary --------------------


def _rotate_loop(x, cos, sin, p, interleaved):
    """x (H, D) float64 rotated at position p, one channel pair at a time."""
    y = x.clone()
    R = 2 * cos.shape[1]
    for i in range(R // 2):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + R // 2)
        c, s = float(cos[p, i]), float(sin[p, i])
        y[:, a], y[:, b] = x[:, a] * c - x[:, b] * s, x[:, a] * s + x[:, b] * c
    return y


def _serving_loop(q, kc, vc, k, v, lens, causal, scale, window, softcap, alibi, kw):
    """The cache op with the serving arguments as plainly as possible, in float64."""
    import math

    kc, vc = kc.clone(), vc.clone()
    B, Tq, Hq, D = q.shape
    G = Hq // kc.shape[2]
    table, slots, pads = kw.get("block_table"), kw.get("cache_batch_idx"), kw.get("cache_leftpad")
    cos, sin, inter = kw.get("rotary_cos"), kw.get("rotary_sin"), kw.get("rotary_interleaved", True)

    def row(b, j):
        r = b if slots is None else int(slots[b])
        return (r, j) if table is None else (int(table[r, j // kc.shape[1]]), j % kc.shape[1])

    out = torch.zeros(B, Tq, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, Tq), float("-inf"), dtype=torch.float64)
    left, right = window
    for b in range(B):
        L = int(lens[b])
        qb = q[b].clone()
        if k is not None:
            for t in range(k.shape[1]):
                kt = k[b, t] if cos is None else _rotate_loop(k[b, t], cos, sin, L + t, inter)
                kc[row(b, L + t)], vc[row(b, L + t)] = kt, v[b, t]
            if cos is not None:
                for i in range(Tq):
                    qb[i] = _rotate_loop(q[b, i], cos, sin, L + i if causal or window != (-1, -1) else L, inter)
        K = L + (0 if k is None else k.shape[1])
        P0 = 0 if pads is None else int(pads[b])
        for h in range(Hq):
            for i in range(Tq):
                diag = i + K - Tq
                js = [j for j in range(P0, K) if (not causal or j <= diag) and (left < 0 or j >= diag - left)
                      and (right < 0 or j <= diag + right)]
                if not js:
                    continue
                s = []
                for j in js:
                    x = float((qb[i, h] * kc[row(b, j)][h // G]).sum()) * scale
                    if softcap > 0:
                        x = softcap * math.tanh(x / softcap)
                    if alibi is not None:
                        x -= float(alibi[h]) * abs(diag - j)
                    s.append(x)
                s = torch.tensor(s, dtype=torch.float64)
                lse[b, h, i] = torch.logsumexp(s, 0)
                w = torch.exp(s - lse[b, h, i])
                out[b, i, h] = sum(w[n] * vc[row(b, j)][h // G] for n, j in enumerate(js))
    return out, lse, kc, vc


SERVING_LOOP_CASES = {
    "paged slots leftpad rotary causal": (True, (-1, -1), 0.0, False,
                                          dict(page=16, S=32, lens=[5, 29], slots=True, leftpad=[2, 0],
                                               rotary=(6, False))),
    "slots rotary non-causal window": (False, (2, 1), 0.0, False, dict(S=20, lens=[7, 0], slots=True, rotary=(8, True))),
    "paged leftpad alibi softcap": (False, (-1, -1), 1.5, True, dict(page=16, S=48, lens=[33, 20], leftpad=[17, 20])),
    "contiguous leftpad window causal read-only": (True, (1, -1), 0.0, False,
                                                   dict(S=16, lens=[16, 9], leftpad=[3, 8], with_new=False)),
}


@pytest.mark.parametrize("name", list(SERVING_LOOP_CASES))
def test_reference_serving_matches_float64_loop(name):
    from serving_cases import bits, make_case

    causal, window, softcap, alibi, kw = SERVING_LOOP_CASES[name]
    case = make_case(2, 3, 4, 2, 8, torch.float64, seed=12, **kw)
    skw = dict(case["kw"])
    for n in ("rotary_cos", "rotary_sin"):
        if n in skw:
            skw[n] = skw[n].double()
    # Dyadic slopes: the oracle forms the ALiBi bias in float32, exactly for these.
    slopes = torch.tensor([0.125, 0.25, 0.375, 0.0625]) if alibi else None
    q, kc, vc, k, v, lens = (case[n] for n in ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens"))
    out_l, lse_l, kc_l, vc_l = _serving_loop(q, kc, vc, k, v, lens, causal, 0.3, window, softcap, slopes, skw)
    out, lse = reference.attention_with_kv_cache(q, kc, vc, k, v, lens, causal=causal, scale=0.3, window_size=window,
                                                 softcap=softcap, alibi_slopes=slopes, **skw)
    assert torch.equal(bits(kc), bits(kc_l)) and torch.equal(bits(vc), bits(vc_l))
    torch.testing.assert_close(out, out_l, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, lse_l, rtol=0, atol=1e-12)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("R", [2, 6, 8])
def test_apply_rotary_matches_loop(interleaved, R):
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 2, 8, generator=gen, dtype=torch.float64)
    cos, sin = torch.randn(10, R // 2, generator=gen, dtype=torch.float64), torch.randn(10, R // 2, generator=gen, dtype=torch.float64)
    pos = torch.tensor([[0, 4, 9], [2, 2, 7]])
    got = reference.apply_rotary(x, cos, sin, pos, interleaved)
    for b in range(2):
        for t in range(3):
            torch.testing.assert_close(got[b, t], _rotate_loop(x[b, t], cos, sin, int(pos[b, t]), interleaved),
                                       rtol=0, atol=1e-14)
    assert torch.equal(got[..., R:], x[..., R:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_rotary_rounds_once(dtype):
    # float32 math, one rounding to the dtype: the result equals the float64 rotation rounded.
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(1, 4, 3, 16, generator=gen).to(dtype)
    ang = torch.rand(8, 8, generator=gen, dtype=torch.float64) * 6.3
    pos = torch.tensor([[0, 3, 5, 7]])
    got = reference.apply_rotary(x, ang.cos().float(), ang.sin().float(), pos, False)
    want = reference.apply_rotary(x.double(), ang.cos().float().double(), ang.sin().float().double(), pos, False)
    ulp = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    assert ((got.double() - want).abs() <= ulp * want.abs() + 1e-6).all()
