"""The serving caches on the CPU path (backend "reference" on CPU tensors) against the oracle
(DESIGN §5): paged caches (page sizes 16 and 256, permuted page pool, sentinel pages), cache slots
in a permuted order, left padding, rotary in the append, and all of them combined; MHA, GQA,
MQA; Tq = 1 and Tq > 1; lengths reaching the capacity. The caches after the call must equal the
inputs with the rotated new rows written at their rows, bit for bit, NaN sentinels included."""

import pytest
import torch
from helpers import DTYPES
from serving_cases import make_case, run_case

import pytorch_mqa
from pytorch_mqa import reference

# name: (B, Tq, Hq, Hkv, D, keywords of make_case)
CASES = {
    "slots MQA Tq=1": (3, 1, 8, 1, 64, dict(S=64, lens=[0, 17, "full"], slots=True)),
    "leftpad GQA Tq=4 full": (2, 4, 6, 2, 40, dict(S=50, lens=[13, "full"], leftpad=[5, 0])),
    "rotary neox R<D": (2, 1, 4, 4, 32, dict(S=40, lens=[7, 39], rotary=(16, False))),
    "rotary gptj R=D Tq=3": (2, 3, 8, 2, 48, dict(S=40, lens=[0, 20], rotary=(48, True))),
    "paged16 MQA Tq=1": (3, 1, 8, 1, 64, dict(page=16, S=64, lens=[0, 17, "full"])),
    "paged16 GQA Tq=5 full": (2, 5, 6, 3, 24, dict(page=16, S=48, lens=["full", 11])),
    "paged256 MHA Tq=2": (2, 2, 4, 4, 32, dict(page=256, S=512, lens=[300, 0])),
    "paged256 GQA Tq=1": (2, 1, 8, 2, 128, dict(page=256, S=512, lens=[511, 130])),
    "paged16 slots Tq=2": (3, 2, 4, 2, 16, dict(page=16, S=32, lens=[5, 30, 16], slots=True)),
    "all paged16 Tq=3": (3, 3, 8, 2, 32, dict(page=16, S=48, lens=[20, "full", 3], slots=True, leftpad=[4, 0, 3],
                                              rotary=(24, False))),
    "all contiguous Tq=1": (2, 1, 4, 1, 16, dict(S=24, lens=[9, 23], slots=True, leftpad=[9, 2], rotary=(16, True))),
    "all paged256 Tq=1": (2, 1, 6, 3, 64, dict(page=256, S=512, lens=[400, 257], leftpad=[100, 256],
                                               rotary=(32, True))),
    "paged16 read-only Tq=2": (3, 2, 4, 2, 16, dict(page=16, S=64, lens=[64, 0, 17], with_new=False)),
    "leftpad read-only": (2, 3, 4, 2, 16, dict(S=30, lens=[30, 7], leftpad=[12, 6], with_new=False)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_serving_matrix(name, dtype):
    B, Tq, Hq, Hkv, D, kw = CASES[name]
    case = make_case(B, Tq, Hq, Hkv, D, dtype, seed=hash(name) % 1000, **kw)
    feature = name.split()[0]
    run_case(case, dtype, True, f"serving {feature}")


VARIANTS = {
    "causal": (True, {}),
    "non-causal": (False, {}),
    "window causal": (True, dict(window_size=(3, -1))),
    "window non-causal": (False, dict(window_size=(2, 2))),
    "alibi causal": (True, dict(alibi_slopes=torch.rand(6) * 0.3)),
    "alibi non-causal per-seq": (False, dict(alibi_slopes=torch.rand(3, 6) * 0.3)),
    "softcap": (True, dict(softcap=1.5)),
    "softcap window alibi": (False, dict(softcap=2.0, window_size=(4, 1), alibi_slopes=torch.rand(6) * 0.3)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_leftpad_rotary_with_variants(variant, paged, dtype):
    # Left padding moves no alignment: the diagonal of query i is key i + L_b + Tq - Tq counted in
    # cache rows. Rotary q follows causal/window: per token, else every row at L_b.
    causal, var = VARIANTS[variant]
    case = make_case(3, 4, 6, 2, 32, dtype, S=48, page=16 if paged else None, lens=[20, 9, 40], leftpad=[6, 9, 0],
                     rotary=(16, variant.startswith("softcap")), seed=11)
    run_case(case, dtype, causal, f"serving leftpad+{variant.split()[0]}", **var)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [True, False])
def test_written_rows_are_rotate_then_write(dtype, interleaved):
    # The rows written equal rotating k in float64 and rounding once: exact in float32 up to float32
    # math, within one rounding of the dtype in float16/bfloat16.
    case = make_case(2, 3, 4, 2, 32, dtype, page=16, S=32, lens=[4, 20], rotary=(32, interleaved), seed=5)
    k = case["k"]
    k_written = run_case(case, dtype, True, "serving rotary-write")
    cos, sin = case["kw"]["rotary_cos"].double(), case["kw"]["rotary_sin"].double()
    pos = reference.rotary_positions(case["cache_seqlens"], 3, True)
    k64 = reference.apply_rotary(k.double(), cos, sin, pos, interleaved)
    # One rounding to the dtype (half an ulp, relative) plus float32 math (absolute, at |k|'s scale).
    eps = {torch.float32: 0.0, torch.float16: 2**-11, torch.bfloat16: 2**-8}[dtype]
    bound = eps * k64.abs() + 4 * 2**-24 * k.double().abs().max()
    over = (k_written.double() - k64).abs() - bound
    assert over.max() <= 0, f"written k: error over the rounding bound by {over.max().item():.2e}"


def test_paged_equals_contiguous():
    # The same logical cache, laid out contiguously and through a permuted page table, gives the same result.
    cont = make_case(2, 2, 4, 2, 16, torch.float32, S=32, lens=[3, 30], seed=7)
    paged = make_case(2, 2, 4, 2, 16, torch.float32, S=32, page=16, lens=[3, 30], seed=8)
    # Zeros, not NaN, past the lengths of the contiguous cache: it takes the plain path, whose CPU
    # kernel masks those rows additively instead of skipping them.
    cont["k_cache"].nan_to_num_(0.0)
    cont["v_cache"].nan_to_num_(0.0)
    for b in range(2):
        for j in range(cont["lens"][b]):
            paged["k_cache"][paged["where"](b, j)] = cont["k_cache"][b, j]
            paged["v_cache"][paged["where"](b, j)] = cont["v_cache"][b, j]
    for n in ("q", "k", "v"):
        paged[n] = cont[n]
    outs = []
    for c in (cont, paged):
        outs.append(pytorch_mqa.attention_with_kv_cache(
            c["q"], c["k_cache"], c["v_cache"], c["k"], c["v"], cache_seqlens=c["cache_seqlens"], **c["kw"]))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)


def test_leftpad_equals_unpadded_sequence():
    # A left-padded sequence attends like the same keys without padding, as FlashAttention defines
    # (rotary positions aside: they are absolute cache rows).
    case = make_case(1, 3, 4, 2, 16, torch.float32, S=40, lens=[25], leftpad=[10], seed=9)
    q, kc, vc, k, v = (case[n] for n in ("q", "k_cache", "v_cache", "k", "v"))
    out = pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=case["cache_seqlens"], **case["kw"])
    kc2 = torch.zeros(1, 40, 2, 16)
    kc2[0, :15], vc2 = kc[0, 10:25], torch.zeros(1, 40, 2, 16)
    vc2[0, :15] = vc[0, 10:25]
    want = pytorch_mqa.attention_with_kv_cache(q, kc2, vc2, k, v, cache_seqlens=15)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_noncausal_rotary_q_at_one_position():
    # Non-causal, no window: every q row is rotated at L_b, so identical q rows give identical outputs.
    case = make_case(2, 3, 4, 2, 16, torch.float32, S=24, lens=[5, 9], rotary=(16, True), seed=10)
    case["q"][:] = case["q"][:, :1]
    q, kc, vc, k, v = (case[n] for n in ("q", "k_cache", "v_cache", "k", "v"))
    out = pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=case["cache_seqlens"], causal=False,
                                              **case["kw"])
    torch.testing.assert_close(out, out[:, :1].expand_as(out), rtol=0, atol=0)
