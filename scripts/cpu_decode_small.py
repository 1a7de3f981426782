"""Small decode steps on CPU, where per-call overhead dominates: pytorch_mqa.attention_with_kv_cache
(the C++ kernel when built) vs `sdpa+write` vs the Python CPU path (the op's general form), timed
call by call in alternation (scripts/cpu_interleaved.py's `interleave`); plus decode_linear against
F.linear and addmm on the bench model's 17 one-row products.

    python scripts/cpu_decode_small.py --threads 2
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from cpu_interleaved import _load, interleave

from pytorch_mqa.bench import attention_with_kv_cache as decode_suite
from pytorch_mqa.ops import cpu_ext


def decode(args) -> None:
    Hq, D = 8, 64
    gen = torch.Generator().manual_seed(1)
    general = torch.ops.pytorch_mqa.attention_with_kv_cache_general
    print("| Hkv | B | L | mqa us | sdpa+write us | python path us | mqa / sdpa+write | reps | load |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|:--|")
    for Hkv in (1, 2, 8):
        for L in args.lengths:
            B, S = 1, L + 1
            q = torch.randn(B, 1, Hq, D, generator=gen)
            kc, vc = (torch.randn(B, S, Hkv, D, generator=gen) for _ in "kv")
            k, v = (torch.randn(B, 1, Hkv, D, generator=gen) for _ in "kv")
            a = (q, kc, vc, k, v, torch.full((B,), L, dtype=torch.int32), L)
            mqa = decode_suite._mqa_decode("reference")
            before = _load()
            r = interleave({"mqa": lambda: mqa(*a), "sdpa": lambda: decode_suite._sdpa_decode(*a),
                            "py": lambda: general(*a[:6], True, 1 / math.sqrt(D), "reference")}, args.budget)
            m, s, p = r["mqa"][0] * 1e3, r["sdpa"][0] * 1e3, r["py"][0] * 1e3
            print(f"| {Hkv} | {B} | {L} | {m:.1f} | {s:.1f} | {p:.1f} | {m / s:.2f} | {r['mqa'][2]} | "
                  f"{before} -> {_load()} |", flush=True)


def linear(args) -> None:
    gen = torch.Generator().manual_seed(2)
    shapes = [(768, 256), (256, 256), (1024, 256), (256, 1024)] * 4 + [(4096, 256)]
    ws = [torch.randn(o, i, generator=gen) / i**0.5 for o, i in shapes]
    bs = [torch.randn(o, generator=gen) for o, _ in shapes]
    wts = [w.t().contiguous() for w in ws]
    xs = {i: torch.randn(1, i, generator=gen) for _, i in shapes}

    def run(kind):
        for w, wt, b in zip(ws, wts, bs):
            x = xs[w.shape[1]]
            if kind == "ours":
                cpu_ext.decode_linear(x, w, b)
            elif kind == "addmm":
                torch.addmm(b, x, wt)
            else:
                F.linear(x, w, b)

    before = _load()
    r = interleave({k: (lambda k=k: run(k)) for k in ("ours", "addmm", "linear")}, args.budget)
    print(f"\n17 products (4 x [768x256, 256x256, 1024x256, 256x1024] + 4096x256), medians: "
          f"decode_linear {r['ours'][0]:.3f} ms, addmm (pre-transposed) {r['addmm'][0]:.3f} ms, "
          f"F.linear {r['linear'][0]:.3f} ms; load {before} -> {_load()}")
    w, b = torch.randn(3072, 768, generator=gen), torch.randn(3072, generator=gen)
    wt, x = w.t().contiguous(), torch.randn(1, 768, generator=gen)
    r = interleave({"ours": lambda: cpu_ext.decode_linear(x, w, b), "addmm": lambda: torch.addmm(b, x, wt),
                    "linear": lambda: F.linear(x, w, b)}, args.budget)
    print(f"GPT-2 small 3072x768: decode_linear {r['ours'][0] * 1e3:.1f} us, addmm {r['addmm'][0] * 1e3:.1f} us, "
          f"F.linear {r['linear'][0] * 1e3:.1f} us")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timed rounds per case")
    p.add_argument("--lengths", type=int, nargs="*", default=[16, 64, 256])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    print(f"C++ CPU kernels: {cpu_ext.load()} ({cpu_ext.unavailable_reason() or 'loaded'}, "
          f"{time.perf_counter() - t:.1f} s); torch {torch.__version__}, {args.threads} threads; load {_load()}")
    decode(args)
    linear(args)


if __name__ == "__main__":
    main()
