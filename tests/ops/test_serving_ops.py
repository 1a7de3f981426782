"""The serving arguments through the registered op: opcheck, torch.compile(fullgraph=True),
routing per backend (dispatch.KERNEL_VARIANTS), user backends, and the Triton launcher."""

import inspect

import pytest
import torch
from serving_cases import make_case, run_case

import pytorch_mqa
from pytorch_mqa import reference
from pytorch_mqa.ops import dispatch
from pytorch_mqa.ops.backends import add_backend, remove_backend, unavailable_reason


def _case(**kw):
    base = dict(page=16, S=32, lens=[5, 20], slots=True, leftpad=[2, 0], rotary=(8, False))
    base.update(kw)
    c = make_case(2, 2, 4, 2, 16, torch.float32, seed=3, **base)
    c["k_cache"].nan_to_num_(0.0)  # opcheck compares the mutated caches: no NaN sentinels here
    c["v_cache"].nan_to_num_(0.0)
    return c


def _op_args(c, causal=True, backend="reference"):
    kw = c["kw"]
    return (c["q"], c["k_cache"], c["v_cache"], c["k"], c["v"], c["cache_seqlens"], causal, 0.25, backend, -1, -1,
            0.0, None, kw.get("block_table"), kw.get("cache_batch_idx"), kw.get("cache_leftpad"),
            kw.get("rotary_cos"), kw.get("rotary_sin"), kw.get("rotary_interleaved", True))


@pytest.mark.parametrize("case", ["paged+slots+leftpad+rotary", "paged", "slots+rotary gptj"])
def test_opcheck_serving(case):
    kw = {"paged": dict(slots=False, leftpad=None, rotary=None),
          "slots+rotary gptj": dict(page=None, leftpad=None, rotary=(16, True))}.get(case, {})
    c = _case(**kw)
    torch.library.opcheck(torch.ops.pytorch_mqa.attention_with_kv_cache.default, _op_args(c))


def test_compile_fullgraph_with_block_table():
    torch._dynamo.reset()
    c = _case()
    q, kc, vc, k, v, lens = (c[n] for n in ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens"))
    kw = c["kw"]

    def step(q, kc, vc, k, v, lens, bt, slots, pad, cos, sin):
        return pytorch_mqa.attention_with_kv_cache(
            q, kc, vc, k, v, cache_seqlens=lens, block_table=bt, cache_batch_idx=slots, cache_leftpad=pad,
            rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False,
        )

    args = (kw["block_table"], kw["cache_batch_idx"], kw["cache_leftpad"], kw["rotary_cos"], kw["rotary_sin"])
    kc_e, vc_e = kc.clone(), vc.clone()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc, vc, k, v, lens, *args)
    want = step(q, kc_e, vc_e, k, v, lens, *args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(kc, kc_e) and torch.equal(vc, vc_e)  # the cache writes happened exactly once


def test_oracle_on_another_device_path():
    # backend="reference" on a non-CPU device runs the oracle; the meta device stands in for one
    # (the oracle reads no value on the host).
    c = _case()
    meta = {n: (x.to("meta") if isinstance(x, torch.Tensor) else x) for n, x in c["kw"].items()}
    q, kc, vc, k, v = (c[n].to("meta") for n in ("q", "k_cache", "v_cache", "k", "v"))
    out, lse = reference.attention_with_kv_cache(q, kc, vc, k, v, c["cache_seqlens"].to("meta"), **meta)
    assert out.shape == q.shape and lse.shape == (2, 4, 2)


@pytest.mark.parametrize("feature,kw,supported", [
    ("rotary", dict(rotary_cos=1, rotary_sin=1), False),
    ("block_table", dict(block_table=1), True),
    ("cache_batch_idx", dict(cache_batch_idx=1), True),
    ("cache_leftpad", dict(cache_leftpad=1), True),
])
def test_kernel_variant_table(feature, kw, supported):
    var = dict(window_size=(-1, -1), softcap=0.0, alibi_slopes=None, **kw)
    assert dispatch.unsupported("triton", var, "attention_with_kv_cache") == []
    assert dispatch.unsupported("cuda", var, "attention_with_kv_cache") == ([] if supported else [feature])
    if not supported:
        with pytest.raises(NotImplementedError, match=feature):
            dispatch._require("cuda", "attention_with_kv_cache", var)


def test_user_backend_gets_only_the_active_features():
    seen = {}

    def mine(q, k_cache, v_cache, k, v, *, cache_seqlens, causal, scale, return_lse, **kw):
        seen.update(kw)
        return reference.attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal=causal,
                                                 scale=scale, **kw)

    add_backend("serving_probe", attention_with_kv_cache=mine)
    try:
        c = _case(slots=False, rotary=None)
        q, kc, vc, k, v, lens = (c[n] for n in ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens"))
        out = pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens, backend="serving_probe",
                                                  softcap=2.0, **c["kw"])
        assert set(seen) == {"block_table", "cache_leftpad", "softcap"}
        assert out.shape == q.shape
    finally:
        remove_backend("serving_probe")


def _triton_takes_serving_args() -> str | None:
    if unavailable_reason("triton", "cpu") is not None:
        return "Triton cannot run here (needs TRITON_INTERPRET=1 on CPU)"
    from pytorch_mqa.kernels import attention_with_kv_cache as kernel

    params = inspect.signature(kernel.attention_with_kv_cache).parameters
    missing = [n for n in ("block_table", "cache_batch_idx", "cache_leftpad", "rotary_cos") if n not in params]
    return f"the Triton launcher does not take {missing} yet" if missing else None


TRITON_CASES = {
    "paged16 all Tq=1": (2, 1, 4, 2, 16, dict(page=16, S=48, lens=[20, 47], slots=True, leftpad=[3, 0],
                                              rotary=(8, False))),
    "contiguous slots leftpad rotary Tq=3": (2, 3, 4, 1, 32, dict(S=40, lens=[9, 30], slots=True, leftpad=[0, 7],
                                                                  rotary=(32, True))),
    "paged16 Tq=2 window": (2, 2, 8, 2, 16, dict(page=16, S=32, lens=[0, 17])),
}


@pytest.mark.parametrize("name", list(TRITON_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_serving_interpreter(name, dtype):
    reason = _triton_takes_serving_args()
    if reason:
        pytest.skip(reason)
    B, Tq, Hq, Hkv, D, kw = TRITON_CASES[name]
    case = make_case(B, Tq, Hq, Hkv, D, dtype, seed=21, **kw)
    var = dict(window_size=(4, 0)) if "window" in name else {}
    run_case(case, dtype, True, f"triton serving {name.split()[0]}", backend="triton", **var)
