"""The C++ CPU kernels of `attention` (csrc/cpu/attention.cpp: the op's CPU and AutogradCPU
kernels, loaded by pytorch_mqa.ops.cpu_ext): the results and gradients of the Python path
(`attention_general`, the same schema) bit for bit, the oracle's within DESIGN §5, the path each
call takes (plain calls never enter Python, others go to the general op), torch.compile and
opcheck, and the Python path when the library is off. Skipped only where this machine has no C++
compiler (or ninja) to build it with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, attention_inputs, loss_on, randn, seeded

import pytorch_mqa
from pytorch_mqa import reference
from pytorch_mqa.ops import cpu_ext

REPO = Path(__file__).resolve().parents[2]
OP = torch.ops.pytorch_mqa.attention.default
GENERAL_OP = torch.ops.pytorch_mqa.attention_general.default
NAME, GENERAL = "pytorch_mqa::attention", "pytorch_mqa::attention_general"
BACKWARD_CPU = "pytorch_mqa::attention_backward_cpu"
FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"
FLASH_BACKWARD = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"


pytestmark = pytest.mark.usefixtures("cpp_kernels")  # tests/ops/conftest.py


def _run(fn, inputs, which):
    """out, lse and the gradients of q, k, v (zeros where unused) of a loss on `which`."""
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out, lse = fn(*xs)
    grads = torch.autograd.grad(loss_on(out, lse, which, seeded(7)), xs, allow_unused=True, materialize_grads=True)
    return (out, lse) + grads


def _same(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# (B, Tq, Tk, Hq, Hkv, D), causal, dtype. Plain: non-causal or Tq == Tk. The rest the C++ kernel
# passes on: causal Tq < Tk (a split), causal Tq > Tk (rows without keys), no keys, no queries.
PLAIN = [((1, 6, 6, 4, 2, 16), True, torch.float32), ((2, 5, 9, 4, 1, 8), False, torch.float32),
         ((1, 7, 7, 2, 2, 80), True, torch.bfloat16), ((3, 4, 4, 8, 1, 1), True, torch.float16),
         ((2, 33, 33, 8, 8, 64), True, torch.float32), ((1, 3, 17, 6, 3, 256), False, torch.float32),
         ((2, 1, 12, 8, 2, 32), False, torch.float16)]
PASSED_ON = [((1, 3, 9, 4, 2, 8), True, torch.float32), ((2, 9, 4, 4, 1, 16), True, torch.float32),
             ((1, 4, 0, 2, 1, 8), False, torch.float32), ((2, 0, 5, 4, 2, 8), True, torch.float32)]


@pytest.mark.parametrize("which", ["out", "out+lse", "lse"])
@pytest.mark.parametrize("case", PLAIN + PASSED_ON, ids=str)
def test_same_as_the_python_path(case, which, threads):
    shape, causal, dtype = case
    for strided in (False, True):
        q, k, v = attention_inputs(shape, dtype, seed=sum(shape), strided=strided)
        got = _run(lambda a, b, c: OP(a, b, c, causal, 0.3, "reference"), (q, k, v), which)
        want = _run(lambda a, b, c: GENERAL_OP(a, b, c, causal, 0.3, "reference"), (q, k, v), which)
        _same(got, want)


@pytest.mark.parametrize("case", PLAIN + PASSED_ON[:2], ids=str)
def test_against_the_oracle(case, threads):
    shape, causal, dtype = case
    q, k, v = attention_inputs(shape, dtype, seed=3, strided=shape[0] == 2)
    got = _run(lambda a, b, c: pytorch_mqa.attention(a, b, c, causal=causal, return_lse=True), (q, k, v), "out+lse")
    f32 = [x.float() for x in (q, k, v)]
    ref32 = _run(lambda a, b, c: reference.attention(a, b, c, causal=causal), f32, "out+lse")
    ref_lp = _run(lambda a, b, c: reference.attention(a, b, c, causal=causal, upcast=False), (q, k, v), "out+lse")
    for name, g, r32, rlp in zip(("out", "lse", "dq", "dk", "dv"), got, ref32, ref_lp):
        assert g.shape == r32.shape and g.dtype == (torch.float32 if name == "lse" else dtype)
        if name == "lse":
            assert torch.equal(g.isneginf(), r32.isneginf())
            torch.testing.assert_close(g, r32, atol=3e-5, rtol=1e-5)
        else:
            assert_close(g, r32, rlp, dtype, name, "cpu C++ attention")


def _names(fn):
    with torch.profiler.profile() as prof:
        fn()
    return [e.name for e in prof.events()]


def test_plain_calls_never_enter_python():
    q, k, v = (x.requires_grad_(True) for x in attention_inputs((2, 8, 8, 8, 2, 16), torch.float32))
    out = pytorch_mqa.attention(q, k, v, causal=True)
    assert "CppNode" in out.grad_fn.name() and "AttentionCpuFunction" in out.grad_fn.name()
    names = _names(lambda: pytorch_mqa.attention(q, k, v, causal=True).sum().backward())
    assert names.count(NAME) == 1 and FLASH in names and FLASH_BACKWARD in names
    assert GENERAL not in names and BACKWARD_CPU not in names
    with torch.no_grad():
        names = _names(lambda: pytorch_mqa.attention(q, k, v))
        assert pytorch_mqa.attention(q, k, v).grad_fn is None
    assert names.count(NAME) == 1 and FLASH in names and GENERAL not in names
    with torch.inference_mode():
        assert pytorch_mqa.attention(q.detach(), k.detach(), v.detach()).grad_fn is None


@pytest.mark.parametrize("kw, forward, backward", [
    (dict(causal=True, return_lse=True), NAME, BACKWARD_CPU),  # dLSE: the Python backward takes it
    (dict(window_size=(2, 0)), GENERAL, BACKWARD_CPU),  # a variant
    (dict(causal=True, q_rows=3), GENERAL, BACKWARD_CPU),  # bottom-right causal with Tq < Tk
])
def test_other_calls_go_to_the_python_path(kw, forward, backward):
    kw = dict(kw)
    Tq = kw.pop("q_rows", 8)
    q, k, v = (x.requires_grad_(True) for x in attention_inputs((2, Tq, 8, 8, 2, 16), torch.float32))

    def step():
        res = pytorch_mqa.attention(q, k, v, **kw)
        out, lse = res if kw.get("return_lse") else (res, None)
        (out.sum() + (0 if lse is None else lse.sum())).backward()

    names = _names(step)
    assert forward in names and backward in names


def test_any_layout_of_the_incoming_gradient():
    q, k, v = attention_inputs((2, 6, 6, 4, 2, 8), torch.float32, seed=4)
    dout = randn((2, 6, 4, 8), torch.float32, seeded(5))
    layouts = [dout, dout.transpose(1, 2).contiguous().transpose(1, 2),
               randn((8, 4, 6, 2), torch.float32, seeded(5)).permute(3, 2, 1, 0)]
    layouts += [torch.full((), 0.5).expand(2, 6, 4, 8)]  # what out.sum() * 0.5 sends back
    for d in layouts:
        xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        got = torch.autograd.grad(OP(*xs, True, 0.3, "reference")[0], xs, d)
        ys = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        want = torch.autograd.grad(GENERAL_OP(*ys, True, 0.3, "reference")[0], ys, d.contiguous())
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_only_some_inputs_need_a_gradient():
    q, k, v = attention_inputs((1, 5, 5, 4, 1, 8), torch.float32, seed=6)
    kk = k.clone().requires_grad_(True)
    out, _ = OP(q, kk, v, False, 0.3, "reference")
    (dk,) = torch.autograd.grad(out.sum(), [kk])
    kk2 = k.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(GENERAL_OP(q, kk2, v, False, 0.3, "reference")[0].sum(), [kk2])
    torch.testing.assert_close(dk, want, rtol=0, atol=0)


@pytest.mark.parametrize("case", [PLAIN[0], PLAIN[1], PASSED_ON[0]], ids=str)
def test_opcheck(case):
    shape, causal, dtype = case
    q, k, v = (x.requires_grad_(True) for x in attention_inputs(shape, dtype, seed=8))
    torch.library.opcheck(OP, (q, k, v, causal, 0.3, "reference"))


def test_compiled_forward_and_backward():
    torch._dynamo.reset()
    q, k, v = attention_inputs((2, 8, 8, 8, 2, 16), torch.float32, seed=9)

    def f(a, b, c):
        out, lse = pytorch_mqa.attention(a, b, c, causal=True, return_lse=True)
        return out * 2, lse

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    _run(compiled, (q, k, v), "out+lse")  # compile outside the profiled call
    names = _names(lambda: _run(compiled, (q, k, v), "out"))
    got = _run(compiled, (q, k, v), "out+lse")
    want = _run(f, (q, k, v), "out+lse")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert NAME in names


_PROBE = (
    "import torch, pytorch_mqa\n"
    "from pytorch_mqa import reference\n"
    "from pytorch_mqa.ops import cpu_ext\n"
    "q, k, v = (torch.randn(2, 6, h, 8, requires_grad=True) for h in (4, 2, 2))\n"
    "with torch.profiler.profile() as prof:\n"
    "    out = pytorch_mqa.attention(q, k, v, causal=True)\n"
    "    out.sum().backward()\n"
    "grads = [x.grad for x in (q, k, v)]\n"
    "ys = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]\n"
    "want = reference.attention(*ys, causal=True)[0]\n"
    "want.sum().backward()\n"
    "torch.testing.assert_close(out, want)\n"
    "for g, y in zip(grads, ys):\n"
    "    torch.testing.assert_close(g, y.grad)\n"
    "print('grad_fn', type(out.grad_fn).__name__)\n"
    "print('reason:', cpu_ext.unavailable_reason())\n"
)


def test_env_var_turns_the_cpp_path_off():
    env = dict(os.environ, **{cpu_ext.ENV_VAR: "0"})
    res = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    # Without the library: PyTorch's fused op with its own autograd (ops.cpu.fused_differentiable).
    assert "grad_fn TransposeBackward0" in res.stdout and f"disabled by {cpu_ext.ENV_VAR}=0" in res.stdout
