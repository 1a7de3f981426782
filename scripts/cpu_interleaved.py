"""The CPU comparisons of the bench suites, timed call by call in alternation.

`pytorch-mqa bench` times one provider after the other, so on a shared machine a change of load
between the two timing windows moves the ratio. Here the providers of one case run in turn, one
call each, the order rotated every round (so none always follows the same one), and the ratio is
that of the medians. Same providers and shapes as the suites (`bench/attention.py`'s `_mqa` /
`_sdpa`, `bench/attention_with_kv_cache.py`'s `_mqa_decode` / `_sdpa_decode`, SHAPES["cpu"]).

    python scripts/cpu_interleaved.py decode --threads 2
    python scripts/cpu_interleaved.py attention --threads 2

Prints a markdown table, with the 1-minute load average before and after each case.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time

import torch

from pytorch_mqa.bench import attention as attn_suite
from pytorch_mqa.bench import attention_with_kv_cache as decode_suite


def _load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def interleave(providers: dict, budget_s: float, min_reps: int = 5, max_reps: int = 400) -> dict:
    """{name: (median ms, p20 ms, reps)}: one call of each provider per round, in a new random
    order every round (seeded), so that every provider follows every other one equally often
    across rounds. (A call after a provider that allocates and frees much memory, SDPA's math
    backend, runs slower: rotating the order and reversing it every other round put one
    provider after that one in 4 rounds of 6 with three providers, 3 of 4 with four, and showed
    it 6% slower than it is.)"""
    names = list(providers)
    for n in names:  # warm-up, and a first timing to size the rounds
        providers[n]()
    t0 = time.perf_counter()
    for n in names:
        providers[n]()
    per_round = time.perf_counter() - t0
    reps = int(max(min_reps, min(max_reps, budget_s / max(per_round, 1e-9))))
    times = {n: [] for n in names}
    shuffle = random.Random(0).shuffle
    order = list(names)
    for _ in range(reps):
        shuffle(order)
        for n in order:
            t = time.perf_counter()
            providers[n]()
            times[n].append((time.perf_counter() - t) * 1e3)
    return {n: (statistics.median(v), statistics.quantiles(v, n=5)[0], len(v)) for n, v in times.items()}


def _rotating(fn, sets):
    state = [0]

    def call():
        args = sets[state[0] % len(sets)]
        state[0] += 1
        return fn(*args)

    return call


def decode(args) -> None:
    shp = decode_suite.SHAPES["cpu"]
    Hq, D = shp["Hq"], shp["D"]
    gen = torch.Generator().manual_seed(1)
    print("| Hkv | B | L | S | mqa ms | sdpa+write ms | ratio (medians) | ratio (p20) | reps | load |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|:--|")
    for Hkv in shp["Hkv"]:
        for B in args.batch or shp["batch"]:
            for L in shp["lengths"]:
                for cap in shp["capacity"]:
                    S = L + 1 if cap == 1 else cap * L
                    cache_gb = 2 * B * S * Hkv * D * 4 / 2**30
                    if cache_gb > args.max_cache_gb:
                        print(f"| {Hkv} | {B} | {L} | {S} | - | - | - | - | - | skipped: caches {cache_gb:.1f} GiB |")
                        continue
                    n_sets = 2 if cache_gb < 0.125 else 1
                    sets = []
                    for _ in range(n_sets):
                        q = torch.randn(B, 1, Hq, D, generator=gen)
                        kc, vc = (torch.randn(B, S, Hkv, D, generator=gen) for _ in "kv")
                        k, v = (torch.randn(B, 1, Hkv, D, generator=gen) for _ in "kv")
                        sets.append((q, kc, vc, k, v, torch.full((B,), L, dtype=torch.int32), L))
                    before = _load()
                    r = interleave({"mqa": _rotating(decode_suite._mqa_decode("reference"), sets),
                                    "sdpa": _rotating(decode_suite._sdpa_decode, sets)}, args.budget)
                    (m, m20, reps), (s, s20, _) = r["mqa"], r["sdpa"]
                    print(f"| {Hkv} | {B} | {L} | {S} | {m:.4g} | {s:.4g} | {m / s:.2f} | {m20 / s20:.2f} | {reps} | "
                          f"{before} -> {_load()} |", flush=True)
                    del sets


def attention(args) -> None:
    shp = attn_suite.SHAPES["cpu"]
    Hq, D = shp["Hq"], shp["D"]
    gen = torch.Generator().manual_seed(0)
    flash = torch.nn.attention.SDPBackend.FLASH_ATTENTION
    math_ = torch.nn.attention.SDPBackend.MATH
    print("| Hkv | B | T | causal | mode | mqa ms | sdpa flash ms | sdpa math ms | ratio to best (medians) | ratio (p20) | reps | load |")
    print("|---:|---:|---:|:--|:--|---:|---:|---:|---:|---:|---:|:--|")
    for Hkv in shp["Hkv"]:
        for T in shp["seqlens"]:
            B = max(1, shp["tokens"] // T)
            for causal in (False, True):
                for mode in attn_suite.MODES:
                    grad = mode == "fwd_bwd"
                    q, k, v, do = (torch.randn(B, T, h, D, generator=gen) for h in (Hq, Hkv, Hkv, Hq))
                    xs = (q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad)) + ((do,) if grad else ())

                    def provider(fwd, backend=None):
                        fn = attn_suite._with_backward(fwd) if grad else fwd

                        def call():
                            ctx = torch.nn.attention.sdpa_kernel([backend]) if backend else contextlib.nullcontext()
                            with ctx:
                                return fn(*xs)

                        return call

                    providers = {"mqa": provider(attn_suite._mqa("reference", causal)),
                                 "flash": provider(attn_suite._sdpa(causal), flash)}
                    if not args.no_math:
                        providers["math"] = provider(attn_suite._sdpa(causal), math_)
                    before = _load()
                    r = interleave(providers, args.budget, min_reps=5)
                    inf = (float("inf"),) * 2
                    (m, m20, reps), (f, f20, _), (mt, mt20) = r["mqa"], r["flash"], r.get("math", inf)[:2]
                    print(f"| {Hkv} | {B} | {T} | {causal} | {mode} | {m:.4g} | {f:.4g} | {mt:.4g} | "
                          f"{m / min(f, mt):.2f} | {m20 / min(f20, mt20):.2f} | {reps} | {before} -> {_load()} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite", choices=("decode", "attention"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=8.0, help="seconds of timed rounds per case (default 8)")
    p.add_argument("--max-cache-gb", type=float, default=4.5, help="decode: skip cases whose two caches exceed this")
    p.add_argument("--batch", type=int, nargs="*", help="decode: only these batch sizes")
    p.add_argument("--no-math", action="store_true", help="attention: leave out SDPA's math backend")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32; load average {_load()} at start")
    (decode if args.suite == "decode" else attention)(args)


if __name__ == "__main__":
    main()
