"""Per-call overhead on CPU: the public functions against PyTorch's own attention, at small and
medium shapes, where the Python around the fused kernel decides the ratio.

    python scripts/cpu_overhead.py --threads 2            # about 3 minutes
    python scripts/cpu_overhead.py --threads 2 --quick    # about 1 minute

attention (forward, forward + backward): `pytorch_mqa.attention(backend="auto")` against
`F.scaled_dot_product_attention` (its default CPU choice, no context manager around the call) and
SDPA's math backend (under `sdpa_kernel`, entered per call); the ratio is to the faster of the two.
decode: `pytorch_mqa.attention_with_kv_cache` (append one row at L, attend L + 1 rows) against the
same write as two slice assignments + SDPA over the live rows; "decode, Tq > 1" the same with
several new rows (Tq * G = 16-64 query rows per KV head), non-causal on both sides. The `op` column is the registered op
called directly (`torch.ops.pytorch_mqa.*`, no validation or backend choice): public - op is the
public function's own cost.

The providers of one case run in turn, one call each, the order rotated every round; each figure is
the median of its calls, in microseconds. Prints a markdown table, with the 1-minute load average
before and after each case, and the geometric mean and the worst ratio per group.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from cpu_interleaved import _load, interleave

import pytorch_mqa

HQ, D = 8, 64
ATTN = [(1, 16), (4, 16), (1, 64), (2, 128), (1, 256), (4, 512)]  # (B, T)
ATTN_QUICK = [(1, 16), (2, 128), (1, 512)]
DECODE = [(1, 16), (1, 128), (1, 1024), (16, 16), (16, 128), (16, 1024)]  # (B, L)
DECODE_QUICK = [(1, 16), (1, 1024), (16, 128)]


def _medians_us(providers: dict, budget_s: float) -> dict:
    """{name: median us} of scripts/cpu_interleaved.py's `interleave` (one call of each provider
    per round, the order rotated), with more rounds for these short calls."""
    return {n: m * 1e3 for n, (m, _, _) in interleave(providers, budget_s, min_reps=20, max_reps=5000).items()}


def _bhsd(x):
    return x.transpose(1, 2)


def attention_cases(args, rows: list) -> None:
    gen = torch.Generator().manual_seed(0)
    math_ = torch.nn.attention.SDPBackend.MATH
    op = torch.ops.pytorch_mqa.attention.default
    for Hkv in (8, 2, 1):
        for B, T in ATTN_QUICK if args.quick else ATTN:
            for causal in (False, True):
                for mode in ("fwd", "fwd_bwd"):
                    grad = mode == "fwd_bwd"
                    q, k, v, do = (torch.randn(B, T, h, D, generator=gen) for h in (HQ, Hkv, Hkv, HQ))
                    xs = (q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad))
                    scale = 1.0 / math.sqrt(D)

                    def ours():
                        return pytorch_mqa.attention(*xs, causal=causal)

                    def direct():
                        return op(*xs, causal, scale, "reference")[0]

                    def sdpa():
                        return F.scaled_dot_product_attention(*map(_bhsd, xs), is_causal=causal, enable_gqa=True).transpose(1, 2)

                    def sdpa_math():
                        with torch.nn.attention.sdpa_kernel([math_]):
                            return sdpa()

                    fns = dict(ours=ours, op=direct, sdpa=sdpa, math=sdpa_math)
                    if grad:
                        fns = {n: (lambda f=f: torch.autograd.grad(f(), xs, do)) for n, f in fns.items()}
                    before = _load()
                    r = _medians_us(fns, args.budget)
                    best = min(r["sdpa"], r["math"])
                    rows.append(dict(group=f"attention {mode}", case=f"| attention | {mode} | {Hkv} | {B} | {T} | {causal} ",
                                     ours=r["ours"], op=r["op"], sdpa=r["sdpa"], math=r["math"], ratio=r["ours"] / best,
                                     load=f"{before} -> {_load()}"))
                    print(_row(rows[-1]), flush=True)


# Several query rows per step (speculative decoding, short chunks): (Tq, Hq, Hkv) at B = 1,
# L = 1024, non-causal on both sides, so that SDPA over the live rows is the same problem.
# Tq * G = 16-64 query rows per KV head: the C++ kernel's widest cases.
DECODE_ROWS = [(2, 8, 1), (4, 8, 1), (8, 8, 1), (4, 16, 1), (2, 32, 1), (8, 32, 4)]


def decode_cases(args, rows: list) -> None:
    gen = torch.Generator().manual_seed(1)
    one_row = [(B, L, 1, HQ, Hkv) for Hkv in (8, 2, 1) for B, L in (DECODE_QUICK if args.quick else DECODE)]
    several = [(1, 1024, Tq, Hq, Hkv) for Tq, Hq, Hkv in (DECODE_ROWS[1::2] if args.quick else DECODE_ROWS)]
    for group, cases in (("decode", one_row), ("decode, Tq > 1", several)):
        for B, L, Tq, Hq, Hkv in cases:
            rows.append(_decode_case(args, gen, group, B, L, Tq, Hq, Hkv))
            print(_row(rows[-1]), flush=True)


def _decode_case(args, gen, group, B, L, Tq, Hq, Hkv) -> dict:
    """Append Tq rows at L (S = 2 L) and attend L + Tq rows: ours, the op, and the same write as
    slice assignments + SDPA over the live rows (non-causal for Tq > 1, as ours is then)."""
    op = torch.ops.pytorch_mqa.attention_with_kv_cache.default
    S, causal = 2 * L, Tq == 1  # for one row causal or not is the same problem
    q = torch.randn(B, Tq, Hq, D, generator=gen)
    kc, vc = (torch.randn(B, S, Hkv, D, generator=gen) for _ in "kv")
    k, v = (torch.randn(B, Tq, Hkv, D, generator=gen) for _ in "kv")
    lens = torch.full((B,), L, dtype=torch.int32)
    scale = 1.0 / math.sqrt(D)

    def ours():
        return pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens, causal=causal)

    def direct():
        return op(q, kc, vc, k, v, lens, causal, scale, "reference")[0]

    def sdpa_write():
        kc[:, L:L + Tq] = k
        vc[:, L:L + Tq] = v
        out = F.scaled_dot_product_attention(_bhsd(q), _bhsd(kc[:, : L + Tq]), _bhsd(vc[:, : L + Tq]), enable_gqa=True)
        return out.transpose(1, 2)

    before = _load()
    with torch.no_grad():
        r = _medians_us(dict(ours=ours, op=direct, sdpa=sdpa_write), args.budget)
    mode = "-" if Tq == 1 else f"Tq={Tq}, Hq={Hq}"
    return dict(group=group, case=f"| decode | {mode} | {Hkv} | {B} | {L} | {causal} ", ours=r["ours"], op=r["op"],
                sdpa=r["sdpa"], math=float("nan"), ratio=r["ours"] / r["sdpa"], load=f"{before} -> {_load()}")


def _row(r: dict) -> str:
    return (f"{r['case']}| {r['ours']:.1f} | {r['op']:.1f} | {r['ours'] - r['op']:.1f} | {r['sdpa']:.1f} | "
            f"{r['math']:.1f} | {r['ratio']:.2f} | {r['load']} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed rounds per case (default 1)")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--only", choices=("attention", "decode"), help="one group only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, Hq={HQ}, D={D}; load average {_load()} at start")
    print("ratio = ours / best SDPA (attention: min of sdpa default and math; decode: sdpa+write); medians, us\n")
    print("| op | mode | Hkv | B | T or L | causal | ours us | op us | ours - op | sdpa us | sdpa math us | ratio | load |")
    print("|:--|:--|---:|---:|---:|:--|---:|---:|---:|---:|---:|---:|:--|")
    rows: list = []
    if args.only != "decode":
        attention_cases(args, rows)
    if args.only != "attention":
        decode_cases(args, rows)
    print("\n| group | cases | geometric mean ratio | worst ratio |")
    print("|:--|---:|---:|---:|")
    for g in dict.fromkeys(r["group"] for r in rows):
        ratios = [r["ratio"] for r in rows if r["group"] == g]
        gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"| {g} | {len(ratios)} | {gm:.2f} | {max(ratios):.2f} |")
    print(f"\nload average {_load()} at the end")


if __name__ == "__main__":
    main()
