"""The C++ CPU kernel of attention_with_kv_cache (csrc/cpu/, pytorch_mqa.ops.cpu_ext) against the
oracle with DESIGN §5's rule, the path it takes (no Python, no fused SDPA call), what it leaves
untouched, and the Python path when it is off or cannot be built. Skipped only where this machine has no C++ compiler (or ninja) to build it with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close

import pytorch_mqa
from pytorch_mqa import reference
from pytorch_mqa.ops import cpu_ext

REPO = Path(__file__).resolve().parents[2]
FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"
OP = "pytorch_mqa::attention_with_kv_cache"
GENERAL = "pytorch_mqa::attention_with_kv_cache_general"


pytestmark = pytest.mark.usefixtures("cpp_kernels")  # tests/ops/conftest.py


def _inputs(B, Tq, Hq, Hkv, D, S, lens, dtype, new=True, seed=0, sentinel=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    q, kc, vc = r(B, Tq, Hq, D), r(B, S, Hkv, D), r(B, S, Hkv, D)
    k, v = (r(B, Tq, Hkv, D), r(B, Tq, Hkv, D)) if new else (None, None)
    if sentinel:  # stale NaN / inf past every sequence's live rows: never read, never written
        for b, L in enumerate(lens):
            kc[b, L + (Tq if new else 0):] = float("nan")
            vc[b, L + (Tq if new else 0):] = float("inf")
    return q, kc, vc, k, v, torch.tensor(lens, dtype=torch.int32)


def _check(q, kc, vc, k, v, lens, causal=True, label="cpu C++ decode"):
    """Run the public function (the C++ kernel) and the oracle in float32 and in the input
    dtype; DESIGN §5 on out, lse close, the caches bit-identical to the oracle's appended ones."""
    dtype = q.dtype
    f = lambda x: None if x is None else x.float()  # noqa: E731
    kc32, vc32 = kc.clone().float(), vc.clone().float()
    kc_lp, vc_lp = kc.clone(), vc.clone()
    out, lse = pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens, causal=causal, return_lse=True)
    ref32, lse32 = reference.attention_with_kv_cache(f(q), kc32, vc32, f(k), f(v), lens, causal=causal)
    ref_lp, _ = reference.attention_with_kv_cache(q, kc_lp, vc_lp, k, v, lens, causal=causal, upcast=False)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert lse.dtype == torch.float32
    assert not out.isnan().any()
    assert_close(out, ref32, ref_lp, dtype, "out", label)
    assert torch.equal(lse.isneginf(), lse32.isneginf())
    torch.testing.assert_close(lse, lse32, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(kc, kc_lp, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, vc_lp, rtol=0, atol=0, equal_nan=True)
    return out, lse


HEADS = [(8, 8), (8, 2), (8, 1)]  # MHA, GQA, MQA
DIMS = [1, 8, 32, 64, 80, 128, 256]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_row_matrix(D, heads, dtype):
    Hq, Hkv = heads
    i = DIMS.index(D) + 3 * HEADS.index(heads) + 7 * DTYPES.index(dtype)
    B = (1, 3, 17)[i % 3]
    S = 37
    ragged = [(7 * b + i) % (S - 1) for b in range(B)]
    if B > 1:
        ragged[1] = 0
    lens = [S - 1] * B if i % 4 == 0 else ragged
    for new in (True, False):
        _check(*_inputs(B, 1, Hq, Hkv, D, S, lens, dtype, new=new, seed=i))


@pytest.mark.parametrize("Tq", [2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(8, 8), (4, 2), (4, 1), (8, 1)], ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
def test_several_rows(Tq, causal, heads):
    # Tq * G rows per KV head: up to 8, 16, 32 and 64 in vectors of that many (MQA 8:1 with
    # Tq = 3, 4, 5, 8: 24, 32, 40, 64; the last two in two passes of up to 32 rows); above 64
    # (Tq = 9) the call goes on to the Python path: same results.
    Hq, Hkv = heads
    for dtype, new, lens in ((torch.float32, True, [0, 4, 30]), (torch.bfloat16, False, [2, 0, 33]),
                             (torch.float16, True, [1, 9, 17])):
        _check(*_inputs(3, Tq, Hq, Hkv, 32, 40, lens, dtype, new=new, seed=Tq), causal=causal)


def test_rows_that_see_no_key():
    # Causal Tq > L_b without new rows: the first rows see nothing (zeros, lse = -inf); L_b = 0: all.
    q, kc, vc, _, _, lens = _inputs(2, 4, 4, 2, 16, 20, [0, 2], torch.float32, new=False)
    out, lse = _check(q, kc, vc, None, None, lens)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool(lse[0].isneginf().all())
    assert bool(lse[1, :, :2].isneginf().all()) and bool(lse[1, :, 2:].isfinite().all())


def test_strided_query_and_caches(threads):
    B, S, Hq, Hkv, D, layers = 3, 48, 8, 2, 64, 3
    g = torch.Generator().manual_seed(3)
    # caches: one layer of a stacked buffer, every other sequence; v: permuted (S, B) storage.
    stacked = torch.randn(layers, 2 * B, S, Hkv, D, generator=g)
    kc = stacked[1, ::2]
    vc = torch.randn(S, B, Hkv, D, generator=g).transpose(0, 1)
    # q, k, v: slices of one fused projection (head stride D, row stride (Hq + 2 Hkv) D).
    buf = torch.randn(B, 2, Hq + 2 * Hkv, D, generator=g)
    q, k, v = buf[:, :, :Hq], buf[:, :, Hq:Hq + Hkv], buf[:, :, Hq + Hkv:]
    lens = torch.tensor([5, 0, 40], dtype=torch.int32)
    before = stacked.clone()
    _check(q, kc, vc, k, v, lens)
    for b, L in enumerate(lens.tolist()):  # only rows [L, L + 2) of the viewed sequences changed
        before[1, 2 * b, L:L + 2] = k[b]
    assert torch.equal(stacked, before)
    # caches whose head stride is not D (every other head of a wider buffer)
    wide = torch.randn(B, S, 2 * Hkv, D, generator=g)
    _check(q[:, :1], wide[:, :, ::2], wide[:, :, 1::2], k[:, :1], v[:, :1], lens)


def test_long_caches_split_over_threads(threads):
    # Calls of over 2**20 multiply-adds are split into tasks of rows (flash-decoding) and merged
    # (on 2 threads): uniform and ragged; below that they run on the calling thread.
    for Hkv, lens in ((2, [2500]), (8, [8300]), (8, [6000, 0, 3000])):
        _check(*_inputs(len(lens), 1, 8, Hkv, 128, 8400, lens, torch.float32, seed=Hkv))
    # 32 and 64 query rows per KV head (Tq = 4 and 8, MQA 8:1), split too.
    _check(*_inputs(2, 4, 8, 1, 64, 4200, [4000, 1500], torch.float32, seed=5))
    _check(*_inputs(1, 8, 8, 1, 128, 4200, [4100], torch.float32, seed=6))


def test_rows_per_kv_head_decide_the_path():
    # Up to 64 query rows per KV head in C++ (no fused SDPA call), above that the general op.
    for Tq, on_cpp in ((8, True), (9, False)):
        q, kc, vc, k, v, lens = _inputs(2, Tq, 8, 1, 32, 64, [9, 30], torch.float32, sentinel=False)
        with torch.profiler.profile() as prof:
            pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens)
        names = {e.name for e in prof.events()}
        assert OP in names and (FLASH not in names and GENERAL not in names) == on_cpp


def test_capacity_overflow_raises_and_writes_nothing():
    q, kc, vc, k, v, _ = _inputs(2, 2, 4, 2, 8, 8, [0, 0], torch.float32, sentinel=False)
    before = kc.clone(), vc.clone()
    for lens, msg in (([0, 7], r"cache_seqlens\[1\] = 7 with Tq = 2"), ([-1, 0], "expected values >= 0, got -1")):
        with pytest.raises(ValueError, match=msg):
            torch.ops.pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, torch.tensor(lens, dtype=torch.int32),
                                                          True, 0.3, "reference")
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_the_cpp_path_is_taken():
    q, kc, vc, k, v, lens = _inputs(2, 1, 8, 2, 64, 64, [9, 30], torch.float32, sentinel=False)
    with torch.profiler.profile() as prof:
        pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens)
    names = {e.name for e in prof.events()}
    assert OP in names and FLASH not in names and GENERAL not in names
    # A variant is passed on to the Python path (the general op), which calls the fused kernel.
    with torch.profiler.profile() as prof:
        pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens, window_size=(4, 0))
    assert {OP, GENERAL} <= {e.name for e in prof.events()}


def test_version_counters_and_no_autograd():
    q, kc, vc, k, v, lens = _inputs(1, 1, 4, 1, 16, 16, [3], torch.float32, sentinel=False)
    vk, vv = kc._version, vc._version
    pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens)
    assert kc._version > vk and vc._version > vv
    vk = kc._version
    pytorch_mqa.attention_with_kv_cache(q, kc, vc, cache_seqlens=lens)  # nothing written
    assert kc._version == vk


def test_opcheck_ragged_several_rows():
    q, kc, vc, k, v, lens = _inputs(3, 2, 8, 2, 16, 24, [0, 5, 20], torch.float32, sentinel=False)
    torch.library.opcheck(torch.ops.pytorch_mqa.attention_with_kv_cache.default,
                          (q, kc, vc, k, v, lens, True, 0.25, "reference"))


def test_compiled_call_runs_the_op_in_place():
    torch._dynamo.reset()
    q, kc, vc, k, v, lens = _inputs(2, 1, 8, 1, 32, 40, [7, 19], torch.float32, sentinel=False)
    kc_e, vc_e = kc.clone(), vc.clone()

    def step(q, kc, vc, k, v, lens):
        return pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens) * 2

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    compiled(q, kc.clone(), vc.clone(), k, v, lens)  # compile outside the profiled call
    with torch.profiler.profile() as prof:
        got = compiled(q, kc, vc, k, v, lens)
    want = step(q, kc_e, vc_e, k, v, lens)
    torch.testing.assert_close(got, want)
    assert torch.equal(kc, kc_e) and torch.equal(vc, vc_e)
    names = {e.name for e in prof.events()}
    assert OP in names and FLASH not in names


_PROBE = (
    "import torch, pytorch_mqa\n"
    "from pytorch_mqa import reference\n"
    "from pytorch_mqa.ops import cpu_ext\n"
    "q, kc, vc = torch.randn(2, 1, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)\n"
    "lens = torch.tensor([2, 4], dtype=torch.int32)\n"
    "with torch.profiler.profile() as prof:\n"
    "    out = pytorch_mqa.attention_with_kv_cache(q, kc, vc, cache_seqlens=lens)\n"
    "torch.testing.assert_close(out, reference.attention_with_kv_cache(q, kc, vc, None, None, lens)[0])\n"
    f"print('flash' if any(e.name == '{FLASH}' for e in prof.events()) else 'noflash')\n"
    "print('reason:', cpu_ext.unavailable_reason())\n"
)


def _probe(env: dict) -> str:
    res = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout + res.stderr


def test_env_var_turns_the_cpp_path_off():
    out = _probe(dict(os.environ, **{cpu_ext.ENV_VAR: "0"}))
    assert "flash" in out.split() and f"disabled by {cpu_ext.ENV_VAR}=0" in out


def test_no_compiler_gives_the_python_path(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), PYTORCH_MQA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop(cpu_ext.ENV_VAR, None)
    out = _probe(env)
    assert "flash" in out.split() and "no C++ compiler" in out
    assert out.count("C++ CPU kernels unavailable") == 1  # said once, on stderr
    assert not (tmp_path / "cache").exists()
