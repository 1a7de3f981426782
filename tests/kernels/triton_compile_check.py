"""Compile the Triton kernels for a GPU target on a machine without one (Triton ships ptxas).

The interpreter accepts programs a GPU compiler rejects (a dot with K < 16, loop-carried values
that change type, layouts ptxas cannot take, ...), so the tests also lower each kernel to a cubin
for sm_90. Must run without
TRITON_INTERPRET (the tests call it in a subprocess):

    python tests/triton_compile_check.py attention attention_with_kv_cache
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

from pytorch_mqa.kernels import attention as A
from pytorch_mqa.kernels import attention_with_kv_cache as K

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = ("qk_scale", "scale")


def _compile(fn, pointers: dict, constexprs: dict, num_warps: int, num_stages: int):
    if isinstance(fn, Autotuner):
        fn = fn.fn
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    src = ASTSource(fn, sig, constexprs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def _cases_attention():
    for dt, prec in (("fp16", "tf32"), ("fp32", "ieee")):
        p = "*" + dt
        bm, bn, w, s = (64, 64, 4, 2) if dt == "fp16" else (32, 32, 4, 1)
        common = dict(G=3, D=40, BLOCK_D=64, CAUSAL=True, UPCAST=False, DOT_PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn)
        grads = {n: p for n in ("Q", "K", "V", "DO", "DK", "DV", "DQ")} | {"Lse": "*fp32", "Delta": "*fp32"}
        yield "fwd " + dt, A._attention_fwd_kernel, {"Q": p, "K": p, "V": p, "Out": p, "Lse": "*fp32"}, common, w, s
        yield "dkdv " + dt, A._attention_bwd_dkdv_kernel, grads, common, w, s
        yield "dq " + dt, A._attention_bwd_dq_kernel, grads, common, w, s


def _cases_attention_with_kv_cache():
    for dt, prec in (("fp16", "tf32"), ("fp32", "ieee")):
        p = "*" + dt
        split = dict(G=8, D=72, BLOCK_D=128, HAS_NEW=True, CAUSAL=True, UPCAST=False, DOT_PRECISION=prec,
                     BLOCK_M=16, BLOCK_N=32)
        ptrs = {"Q": p, "KC": p, "VC": p, "SEQLENS": "*i32", "Out": "*fp32", "Lse": "*fp32"}
        yield "split " + dt, K._decode_split_kernel, ptrs, split, 4, 2
        combine = dict(G=8, D=72, BLOCK_D=128, NUM_SPLITS=3, BLOCK_S=4, BLOCK_M=16)
        yield "combine " + dt, K._combine_kernel, {"OutPart": "*fp32", "LsePart": "*fp32", "Out": p, "Lse": "*fp32"}, combine, 4, 1
        append = dict(D=72, BLOCK_D=128, BLOCK_T=4)
        yield "append " + dt, K._append_kernel, {n: p for n in ("K", "V", "KC", "VC")} | {"SEQLENS": "*i32"}, append, 4, 1


CASES = {"attention": _cases_attention, "attention_with_kv_cache": _cases_attention_with_kv_cache}


def main(ops: list[str]) -> int:
    failed = 0
    for op in ops:
        for name, fn, pointers, constexprs, w, s in CASES[op]():
            try:
                kernel = _compile(fn, pointers, constexprs, w, s)
                print(f"ok {name}: {kernel.metadata.shared} B shared memory")
            except Exception as e:  # report every failure, not only the first
                failed += 1
                print(f"FAILED {name}: {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(CASES)))
