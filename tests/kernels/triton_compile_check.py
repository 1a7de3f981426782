"""Compile the Triton kernels for sm_90 on a machine without a GPU, through the real launchers.

Triton's active driver is replaced by one that reports an sm_90 target and launches nothing; the
launchers then run on CPU tensors of real shapes, so every kernel is specialised exactly as on a
GPU (dtypes, constexprs, the integer and divisibility hints of the real strides and lengths, the
GPU's DOT_PRECISION, a 132-SM launch plan), and every config autotuning can pick (after pruning)
is compiled. Each cubin's registers, spills and shared memory come from `cuobjdump
--dump-resource-usage` (shipped in Triton's wheel). Exit status 1 on a compile failure or on any
spill. Must run without TRITON_INTERPRET (the tests call it in a subprocess):

    python tests/kernels/triton_compile_check.py [attention] [attention_with_kv_cache] [--dtype bf16] [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver

from pytorch_mqa.kernels import attention as A
from pytorch_mqa.kernels import attention_with_kv_cache as K
from pytorch_mqa.kernels.common import override_sm_count

TARGET = GPUTarget("cuda", 90, 32)
SMS = 132  # H100 SXM / H200
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class _CompileOnlyDriver:
    """Stands in for the CUDA driver: an sm_90 target, device 0, no launches."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class _Recorder:
    """Replaces `kernel[grid]`: compiles every pruned autotune config (warmup) and records it."""

    def __init__(self, fn, name: str, label: str, out: list):
        self.fn, self.name, self.label, self.out = fn, name, label, out

    def __getitem__(self, grid):
        def compile_all(*args, **kwargs):
            if isinstance(self.fn, Autotuner):
                at = self.fn
                at.nargs = dict(zip(at.arg_names, args))
                configs = at.prune_configs(kwargs)
                at.nargs = None
                for c in configs:
                    kernel = at.fn.warmup(*args, grid=grid, **kwargs, **c.all_kwargs())
                    self.out.append((self.name, self.label, _config_name(c), kernel))
            else:
                w, s = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3)
                kernel = self.fn.warmup(*args, grid=grid, num_warps=w, num_stages=s, **kwargs)
                self.out.append((self.name, self.label, f"w{w} s{s}", kernel))

        return compile_all


def _config_name(c: triton.Config) -> str:
    blocks = "x".join(str(v) for v in c.kwargs.values())
    return f"{blocks} w{c.num_warps} s{c.num_stages}"


def _resources(kernel) -> dict:
    """REG / STACK / SHARED / LOCAL of a compiled kernel, from cuobjdump on its cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    res = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    # Spill bytes per thread: local memory (spilled registers live there) and stack frame.
    res["spill"] = max(res.get("LOCAL", 0), res.get("STACK", 0))
    return res


def _patched(module, names: list[str], label: str, out: list):
    saved = {n: getattr(module, n) for n in names}
    for n in names:
        setattr(module, n, _Recorder(saved[n], n, label, out))
    return saved


def _cases_attention_with_kv_cache(dtype):
    # (label, B, Tq, S, Hq, Hkv, D, with_new, causal): MQA/GQA decode on a 32k preallocated cache,
    # speculative Tq = 4 at G = 32 (two row blocks of 64), an odd head dim, and a batch that needs no split.
    yield "mqa G8 D128", 1, 1, 32768, 8, 1, 128, True, True
    yield "gqa G32 Tq4 D128", 1, 4, 8192, 32, 1, 128, True, True
    yield "gqa G4 D96 no-new", 2, 1, 4096, 16, 4, 96, False, False
    yield "batch64 G8 D64", 64, 1, 2048, 32, 4, 64, True, True
    # Serving caches (paged with page_size 16 / 256, slots, left padding, rotary in the append).
    yield "paged16 G8 D128", 1, 1, 32768, 8, 1, 128, True, True, dict(page=16)
    yield "paged256 G8 D128", 1, 1, 32768, 8, 1, 128, True, True, dict(page=256)
    yield "rotary G8 D128", 1, 1, 32768, 8, 1, 128, True, True, dict(rotary=128)
    yield "paged16 all G8 D128", 1, 1, 32768, 8, 1, 128, True, True, dict(page=16, rotary=128, leftpad=True,
                                                                          slots=True)


def _cases_attention(dtype):
    # (label, B, Tq, Tk, Hq, Hkv, D, causal)
    yield "mqa causal D128", 1, 4096, 4096, 8, 1, 128, True
    yield "gqa D64", 2, 1024, 1024, 16, 4, 64, False
    yield "gqa causal D96", 1, 2048, 2048, 12, 3, 96, True


QUICK = False


def _limit(cases):
    return list(cases)[:1] if QUICK else cases


def run_attention_with_kv_cache(dtype, out):
    saved = _patched(K, ["_decode_split_kernel", "_combine_kernel"], "", out)
    try:
        for label, B, Tq, S, Hq, Hkv, D, with_new, causal, *serving in _limit(_cases_attention_with_kv_cache(dtype)):
            for rec in (K._decode_split_kernel, K._combine_kernel):
                rec.label = f"{label} {_dt_name(dtype)}"
            srv = serving[0] if serving else {}
            q = torch.empty((B, Tq, Hq, D), dtype=dtype)
            page = srv.get("page")
            shape = (B, S, Hkv, D) if page is None else (B * S // page, page, Hkv, D)
            kc = torch.empty(shape, dtype=dtype)
            vc = torch.empty(shape, dtype=dtype)
            k = torch.empty((B, Tq, Hkv, D), dtype=dtype) if with_new else None
            v = torch.empty((B, Tq, Hkv, D), dtype=dtype) if with_new else None
            lens = torch.zeros((B,), dtype=torch.int32)
            kw = {}
            if page is not None:
                kw["block_table"] = torch.zeros((B, S // page), dtype=torch.int32)
            if srv.get("slots"):
                kw["cache_batch_idx"] = torch.zeros((B,), dtype=torch.int32)
            if srv.get("leftpad"):
                kw["cache_leftpad"] = torch.zeros((B,), dtype=torch.int32)
            if srv.get("rotary"):
                kw["rotary_cos"] = torch.empty((S, srv["rotary"] // 2), dtype=dtype)
                kw["rotary_sin"] = torch.empty((S, srv["rotary"] // 2), dtype=dtype)
            K.attention_with_kv_cache(q, kc, vc, k, v, lens, causal, D**-0.5, **kw)
    finally:
        for n, f in saved.items():
            setattr(K, n, f)


def run_attention(dtype, out):
    names = ["_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"]
    saved = _patched(A, names, "", out)
    try:
        for label, B, Tq, Tk, Hq, Hkv, D, causal in _limit(_cases_attention(dtype)):
            for n in names:
                getattr(A, n).label = f"{label} {_dt_name(dtype)}"
            q = torch.empty((B, Tq, Hq, D), dtype=dtype)
            k = torch.empty((B, Tk, Hkv, D), dtype=dtype)
            v = torch.empty((B, Tk, Hkv, D), dtype=dtype)
            A.attention_forward(q, k, v, causal, D**-0.5)
            lse = torch.empty((B, Hq, Tq), dtype=torch.float32)
            A.attention_backward(torch.empty_like(q), q, k, v, lse, torch.empty_like(lse), causal, D**-0.5)
    finally:
        for n, f in saved.items():
            setattr(A, n, f)


def _dt_name(dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


OPS = {"attention": run_attention, "attention_with_kv_cache": run_attention_with_kv_cache}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ops", nargs="*", help=f"any of {list(OPS)} (default: all)")
    ap.add_argument("--dtype", action="append", choices=list(DTYPES), help="default: fp16, bf16, fp32")
    ap.add_argument("--quick", action="store_true", help="only the first (largest-tile) case of each op")
    args = ap.parse_args(argv)
    bad = [op for op in args.ops if op not in OPS]
    if bad:
        ap.error(f"ops: expected any of {list(OPS)}, got {bad}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("triton_compile_check: unset TRITON_INTERPRET (it compiles for a GPU)", file=sys.stderr)
        return 2
    global QUICK
    QUICK = args.quick
    driver.set_active(_CompileOnlyDriver())
    failed = spilled = 0
    print(f"{'kernel':<28} {'case':<28} {'config':<16} {'regs':>5} {'spill B':>8} {'smem B':>8}")
    for op in args.ops or list(OPS):
        for dt in args.dtype or list(DTYPES):
            out: list = []
            try:
                with override_sm_count(SMS):
                    OPS[op](DTYPES[dt], out)
            except Exception as e:  # report every failure, not only the first
                failed += 1
                print(f"FAILED {op} {dt}: {type(e).__name__}: {str(e)[:2000]}")
            seen = set()
            for name, label, cfg, kernel in out:
                key = (name, kernel.hash)
                if key in seen:
                    continue
                seen.add(key)
                r = _resources(kernel)
                flag = "  SPILLS" if r["spill"] else ""
                spilled += bool(r["spill"])
                print(f"{name:<28} {label:<28} {cfg:<16} {r.get('REG', 0):>5} {r['spill']:>8} "
                      f"{kernel.metadata.shared:>8}{flag}", flush=True)
    if spilled:
        print(f"triton_compile_check: {spilled} kernel/config pairs spill registers")
    if failed:
        print(f"triton_compile_check: {failed} compile failures")
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
