"""The eager gradient path of `attention` and `attention_varlen`: the public functions call the op
through an autograd.Function (library.AttentionFunction) that shares the op's registered setup and
backward. Its gradients must be those of the op's registered autograd (torch.ops callers, opcheck,
torch.compile) exactly, and those of the oracle within DESIGN §5, with the gradient through the
LSE, the variants, dropout, every CPU backend and a user-registered one."""

import pytest
import torch
from helpers import assert_close, attention_inputs, loss_on, randn, seeded

import pytorch_mqa
from pytorch_mqa import available_backends, reference
from pytorch_mqa.ops import cpu, cpu_ext
from pytorch_mqa.ops.backends import add_backend, remove_backend

OP = torch.ops.pytorch_mqa.attention.default
GENERAL_OP = torch.ops.pytorch_mqa.attention_general.default  # the op's Python path (same schema)
VARLEN_OP = torch.ops.pytorch_mqa.attention_varlen.default

# (B, Tq, Tk, Hq, Hkv, D): Tq == Tk, Tq < Tk and Tq > Tk (bottom-right causal), one query row, MQA/GQA/MHA.
SHAPES = [(1, 6, 6, 4, 2, 16), (2, 3, 9, 4, 1, 8), (1, 7, 3, 2, 2, 8), (2, 1, 5, 8, 2, 16)]
LOSSES = ["out", "out+lse", "lse"]


def _cpu_backends():
    return [b for b in available_backends("cpu") if b != "cuda"]


def _grads(run, inputs, which):
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out, lse = run(*xs)
    loss = loss_on(out, lse, which, seeded(7))
    return (out, lse) + torch.autograd.grad(loss, xs, allow_unused=True, materialize_grads=True)


def _op_args(causal, scale, backend, variant):
    """The op's variant arguments for the keywords `variant` gives the public function."""
    if not variant:
        return ()
    left, right = variant.get("window_size", (-1, -1))
    seed = None
    if variant.get("dropout_p", 0.0) > 0:
        seed = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(variant["seed"]), dtype=torch.int64)
    return (left, right, float(variant.get("softcap", 0.0)), variant.get("alibi_slopes"),
            float(variant.get("dropout_p", 0.0)), seed)


def _public_kw(variant):
    kw = {k: v for k, v in variant.items() if k != "seed"}
    if "seed" in variant:
        kw["generator"] = torch.Generator().manual_seed(variant["seed"])
    return kw


def _same(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("which", LOSSES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_function_path_equals_the_registered_autograd(shape, causal, which, backend):
    q, k, v = attention_inputs(shape, torch.float32, seed=sum(shape))
    scale = 0.3
    got = _grads(lambda a, b, c: pytorch_mqa.attention(a, b, c, causal=causal, scale=scale, return_lse=True,
                                                       backend=backend), (q, k, v), which)
    want = _grads(lambda a, b, c: OP(a, b, c, causal, scale, backend), (q, k, v), which)
    _same(got, want)


def test_the_public_function_records_the_function_and_the_op_its_own_autograd():
    # A user backend on CPU: the public function records library.AttentionFunction. (With backend
    # "reference" on CPU the op's own C++ autograd kernel records the backward when the C++ CPU
    # kernels are loaded: tests/ops/test_attention_cpu_kernel.py.)
    add_backend("mine_records", attention=_user_attention)
    try:
        q, k, v = (x.requires_grad_(True) for x in attention_inputs((1, 4, 6, 2, 1, 8), torch.float32))
        out, _ = pytorch_mqa.attention(q, k, v, causal=True, return_lse=True, backend="mine_records")
        assert type(out.grad_fn).__name__ == "AttentionFunctionBackward"
        out_op, _ = OP(q, k, v, False, 0.25, "mine_records")
        assert "AttentionFunction" not in type(out_op.grad_fn).__name__
        with torch.no_grad():
            assert pytorch_mqa.attention(q, k, v, backend="mine_records").grad_fn is None
        with torch.profiler.profile() as prof:
            pytorch_mqa.attention(q, k, v, causal=True, return_lse=True, backend="mine_records")[0].sum().backward()
        names = {e.name for e in prof.events()}
        assert {"pytorch_mqa::attention", "pytorch_mqa::attention_backward"} <= names
    finally:
        remove_backend("mine_records")


# Without the C++ CPU kernels, eager CPU calls without lse and without variants, where the fused
# kernel's own semantics and backward are this package's (non-causal or Tq == Tk; one backward task
# per thread, or MHA), run PyTorch's fused op with its C++ autograd formula (cpu.fused_differentiable):
# the same kernel calls as the op's Python path. The C++ autograd kernel's twin of that test
# (fused_backward_ok) must agree with it: it calls the fused backward kernel itself exactly there.
FUSED = [((1, 6, 6, 4, 4, 16), True, torch.float32, 1), ((2, 5, 9, 4, 2, 8), False, torch.float32, 2),
         ((1, 7, 7, 2, 2, 8), True, torch.bfloat16, 2), ((3, 4, 4, 8, 1, 16), True, torch.float32, 2)]
NOT_FUSED = [((1, 3, 9, 4, 2, 8), True, torch.float32, 1),  # causal Tq != Tk: bottom-right alignment
             ((1, 6, 6, 8, 1, 16), True, torch.float32, 2),  # MQA at B = 1 on 2 threads: K/V expanded
             ((2, 6, 6, 4, 2, 8), False, torch.float16, 1),  # low precision with G > 1: dK/dV summed in fp32
             ((1, 4, 0, 2, 1, 8), False, torch.float32, 1)]  # no keys


@pytest.mark.parametrize("case", FUSED + NOT_FUSED, ids=str)
def test_fused_autograd_path_equals_the_python_path(case):
    shape, causal, dtype, threads = case
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = attention_inputs(shape, dtype, seed=14, strided=shape[0] == 2)
        assert cpu.fused_differentiable_ok(q, k, causal) == (case in FUSED)
        dout = randn(q.shape, dtype, seeded(15))
        ys = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        want_out, _ = GENERAL_OP(*ys, causal, 0.3, "reference")
        want = (want_out,) + torch.autograd.grad(want_out, ys, dout, allow_unused=True, materialize_grads=True)
        if case in FUSED:
            xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
            out = cpu.fused_differentiable(*xs, causal, 0.3)
            assert type(out.grad_fn).__name__ == "TransposeBackward0"
            got = (out,) + torch.autograd.grad(out, xs, dout, allow_unused=True, materialize_grads=True)
            _same((got[0].contiguous(),) + got[1:], want)
        if cpu_ext.loaded():
            xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
            with torch.profiler.profile() as prof:
                out, _ = OP(*xs, causal, 0.3, "reference")
                torch.autograd.grad(out, xs, dout, allow_unused=True)
            names = {e.name for e in prof.events()}
            assert ("pytorch_mqa::attention_backward_cpu" not in names) == (case in FUSED)
    finally:
        torch.set_num_threads(n)


VARIANTS = [
    ("window", dict(window_size=(2, 1))),
    ("softcap", dict(softcap=2.0)),
    ("alibi", dict(alibi_slopes="h")),
    ("dropout", dict(dropout_p=0.25, seed=3)),
    ("window+alibi(B,H)+softcap", dict(window_size=(3, 0), alibi_slopes="bh", softcap=1.5)),
]


def _variant(spec, B, Hq):
    spec = dict(spec)
    if spec.get("alibi_slopes") == "h":
        spec["alibi_slopes"] = torch.rand(Hq, generator=seeded(1)) * 0.5
    elif spec.get("alibi_slopes") == "bh":
        spec["alibi_slopes"] = torch.rand(B, Hq, generator=seeded(2)) * 0.5
    return spec


@pytest.mark.parametrize("which", ["out", "out+lse"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0])
def test_function_path_with_variants(variant, causal, which):
    shape = (2, 5, 7, 4, 2, 8)
    q, k, v = attention_inputs(shape, torch.float32, seed=4)
    var = _variant(variant[1], shape[0], shape[3])
    got = _grads(lambda a, b, c: pytorch_mqa.attention(a, b, c, causal=causal, scale=0.3, return_lse=True,
                                                       **_public_kw(var)), (q, k, v), which)
    want = _grads(lambda a, b, c: OP(a, b, c, causal, 0.3, "reference", *_op_args(causal, 0.3, "reference", var)),
                  (q, k, v), which)
    _same(got, want)
    if "dropout_p" in var:
        return  # the oracle draws its own mask from the seed; checked in test_dropout_varlen
    ref_kw = {k: v for k, v in var.items() if k != "seed"}
    r32 = _grads(lambda a, b, c: reference.attention(a, b, c, causal=causal, scale=0.3, **ref_kw),
                 (q.float(), k.float(), v.float()), which)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, r32):
        assert_close(a, b, b, torch.float32, name, "autograd.Function variants")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("which", LOSSES)
def test_function_path_against_the_oracle(which, dtype):
    shape = (2, 6, 9, 8, 2, 24)
    q, k, v = attention_inputs(shape, dtype, seed=6, strided=True)
    got = _grads(lambda a, b, c: pytorch_mqa.attention(a, b, c, causal=True, return_lse=True), (q, k, v), which)
    r32 = _grads(lambda a, b, c: reference.attention(a, b, c, causal=True), (q.float(), k.float(), v.float()), which)
    rlp = _grads(lambda a, b, c: reference.attention(a, b, c, causal=True, upcast=False), (q, k, v), which)
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), got, r32, rlp):
        assert a.dtype == (torch.float32 if name == "lse" else dtype)
        assert_close(a, b, c, dtype, name, f"autograd.Function ({which})")


@pytest.mark.parametrize("which", LOSSES)
def test_compiled_gradients_equal_eager(which):
    torch._dynamo.reset()
    q, k, v = attention_inputs((2, 5, 8, 4, 1, 16), torch.float32, seed=8)

    def step(a, b, c):
        return pytorch_mqa.attention(a, b, c, causal=True, return_lse=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = _grads(compiled, (q, k, v), which)
    want = _grads(step, (q, k, v), which)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _user_attention(q, k, v, *, causal, scale, return_lse=True, **variants):
    return reference.attention(q, k, v, causal=causal, scale=scale, **variants)


@pytest.mark.parametrize("which", LOSSES)
@pytest.mark.parametrize("own_backward", [False, True])
def test_function_path_with_a_user_backend(own_backward, which):
    calls = []

    def backward(dout, q, k, v, lse, delta, causal, scale):
        calls.append(1)
        return reference.attention_backward(dout, q, k, v, lse, delta, causal=causal, scale=scale)

    add_backend("mine_autograd", attention=_user_attention, attention_backward=backward if own_backward else None)
    try:
        q, k, v = attention_inputs((1, 4, 6, 4, 2, 8), torch.float32, seed=9)
        got = _grads(lambda a, b, c: pytorch_mqa.attention(a, b, c, causal=True, scale=0.3, return_lse=True,
                                                           backend="mine_autograd"), (q, k, v), which)
        n = len(calls)
        want = _grads(lambda a, b, c: OP(a, b, c, True, 0.3, "mine_autograd"), (q, k, v), which)
        assert len(calls) == 2 * n and (n == 1) == own_backward
        _same(got, want)
    finally:
        remove_backend("mine_autograd")


def _varlen(lq, lk, Hq, Hkv, D, seed):
    g = seeded(seed)
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
    q = randn((sum(lq), Hq, D), torch.float32, g)
    k, v = randn((sum(lk), Hkv, D), torch.float32, g), randn((sum(lk), Hkv, D), torch.float32, g)
    return q, k, v, cu(lq), cu(lk)


@pytest.mark.parametrize("which", LOSSES)
@pytest.mark.parametrize("variant", [("plain", {}), ("window", dict(window_size=(2, 0))), ("dropout", dict(dropout_p=0.2, seed=5))],
                         ids=lambda v: v[0])
def test_varlen_function_path_equals_the_registered_autograd(variant, which):
    lq, lk = [5, 0, 7], [6, 3, 7]
    q, k, v, cq, ck = _varlen(lq, lk, 4, 2, 8, seed=10)
    var = variant[1]
    got = _grads(lambda a, b, c: pytorch_mqa.attention_varlen(a, b, c, cq, ck, max(lq), max(lk), causal=True, scale=0.3,
                                                              return_lse=True, **_public_kw(var)), (q, k, v), which)
    out = got[0]
    assert type(out.grad_fn).__name__ == "AttentionVarlenFunctionBackward"
    want = _grads(lambda a, b, c: VARLEN_OP(a, b, c, cq, ck, max(lq), max(lk), True, 0.3, "reference",
                                            *_op_args(True, 0.3, "reference", var)), (q, k, v), which)
    _same(got, want)


def test_varlen_compiled_gradients_equal_eager():
    torch._dynamo.reset()
    lq, lk = [4, 6], [4, 9]
    q, k, v, cq, ck = _varlen(lq, lk, 4, 1, 8, seed=11)

    def step(a, b, c):
        return pytorch_mqa.attention_varlen(a, b, c, cq, ck, 6, 9, causal=True, return_lse=True)

    got = _grads(torch.compile(step, fullgraph=True, backend="aot_eager"), (q, k, v), "out+lse")
    want = _grads(step, (q, k, v), "out+lse")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# The CPU kernels return lse in the fused kernel's own layout (no copy); the fake declares it, so
# opcheck (fake against real, strides included) and inductor (which asserts the strides of an
# opaque op's outputs) see the same tensor. Every path: fused, merged (causal Tq < Tk, one row
# too), Tq > Tk, empty, and the variant kernels.
LAYOUT_CASES = [
    ((2, 5, 5, 4, 2, 8), True, {}), ((1, 1, 6, 4, 1, 8), True, {}), ((2, 3, 8, 2, 2, 8), True, {}),
    ((1, 7, 3, 4, 2, 8), True, {}), ((1, 4, 4, 1, 1, 8), False, {}), ((2, 0, 4, 2, 1, 8), False, {}),
    ((1, 4, 0, 2, 1, 8), True, {}), ((1, 5, 7, 4, 2, 8), True, dict(window=(2, 0))),
    ((1, 1, 7, 4, 2, 8), False, dict(softcap=1.5)),
]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_cpu_lse_layout_is_the_fake_layout(case):
    shape, causal, var = case
    q, k, v = attention_inputs(shape, torch.float32, seed=12)
    left, right = var.get("window", (-1, -1))
    args = (q, k, v, causal, 0.3, "reference") + ((left, right, var.get("softcap", 0.0)) if var else ())
    out, lse = OP(*args)
    B, Tq, Hq = shape[0], shape[1], shape[3]
    want = torch.empty((B, Tq, Hq)).transpose(1, 2)
    assert lse.shape == want.shape and lse.stride() == want.stride() and out.is_contiguous()
    torch.library.opcheck(OP, args)


@pytest.mark.parametrize("shape", [(1, 1, 6, 4, 1, 8), (2, 3, 8, 4, 2, 8)], ids=str)
def test_inductor_accepts_the_cpu_lse_layout(shape):
    torch._dynamo.reset()
    q, k, v = attention_inputs(shape, torch.float32, seed=13)

    def step(a, b, c):
        out, lse = pytorch_mqa.attention(a, b, c, causal=True, return_lse=True)
        return out * 2, lse.exp()

    got = torch.compile(step, fullgraph=True, backend="inductor")(q, k, v)
    torch.testing.assert_close(got, step(q, k, v))
