"""Roofline model of one decode call (`attention_with_kv_cache`, Tq = 1) per shape and backend.

Bytes: what the call must move (pytorch_mqa.bench.timing.decode_bytes: the live K/V rows, q, the
output, the new k/v read and written) plus the fp32 split partials written and read back by the
combine. Floor: bytes / copy bandwidth (H200: 4.3 TB/s measured device-to-device copy). The
prediction adds, as stated assumptions to be checked by a GPU run:

* a launch gap of LAUNCH_US per launch beyond the first (back-to-back kernels, no CUDA graph);
* bandwidth scaling with busy SMs: with P active programs on N SMs the kernel streams at
  min(1, P / N) of the copy bandwidth (one program per SM at a time for these tiles).

"before" is the previous design: splits over the capacity S (at most 64, 128-row multiples) and
3 Triton launches (append, split, combine). The plans come from the launchers' own functions
(kernels.attention_with_kv_cache.decode_plan, the csrc rule in csrc/decode_index.h, mirrored here).

    python scripts/roofline.py            # Markdown table (BENCHMARKS.md)
    python scripts/roofline.py --json     # the same rows as JSON (scripts/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pytorch_mqa.bench.timing import decode_bytes  # noqa: E402
from pytorch_mqa.kernels.attention_with_kv_cache import SPLIT_ALIGN, decode_plan  # noqa: E402

COPY_GBS = 4300.0  # H200 device-to-device copy, GB/s
SMS = 132
LAUNCH_US = 2.5
# csrc rule (csrc/decode_common.cuh, decode_index.h): 16 rows per block, 64-key alignment.
CSRC_ROWS, CSRC_ALIGN, CSRC_MAX_SPLITS = 16, 64, 1024

# (B, L, S, Hq, Hkv, D): preallocated MQA caches at B = 1, then the grid scripts/gpu_check.sh
# benchmarks (B 1 / 16, L 4k / 16k, exact-fit S = L + 1 and S = 8 L, Hkv 1 / 8), then large batches.
SHAPES = [(1, 8192, 32768, 32, 1, 128), (1, 1024, 1025, 32, 1, 128)]
SHAPES += [(B, L, S, 32, Hkv, 128) for Hkv in (1, 8) for B in (1, 16) for L in (4096, 16384)
           for S in (L + 1, 8 * L)]
SHAPES += [(64, 1024, 1025, 32, 8, 128), (64, 1024, 8192, 32, 8, 128), (16, 4096, 32768, 32, 32, 128)]


def _chunk(Lk: int, n: int, align: int) -> int:
    return max(math.ceil(math.ceil(Lk / n) / align) * align, align)


def _predict(nbytes: float, partial_bytes: float, launches: int, programs: int) -> dict:
    total = nbytes + partial_bytes
    floor_us = nbytes / (COPY_GBS * 1e3)
    busy = min(1.0, programs / SMS)
    pred_us = total / (COPY_GBS * 1e3 * busy) + LAUNCH_US * (launches - 1)
    return dict(bytes=total, floor_us=floor_us, pred_us=pred_us, pred_pct=100 * floor_us / pred_us,
                launches=launches, programs=programs)


def rows(elt: int = 2) -> list[dict]:
    out = []
    for B, L, S, Hq, Hkv, D in SHAPES:
        G, Tq = Hq // Hkv, 1
        Lk = L + 1
        nbytes = decode_bytes([L] * B, Tq, Hq, Hkv, D, elt)
        part_row = B * Hq * Tq * (D + 1) * 4 * 2  # one split's partial, written then read
        base = dict(B=B, L=L, S=S, Hq=Hq, Hkv=Hkv, D=D, floor_us=nbytes / (COPY_GBS * 1e3))
        # Triton now: live-length splits, append fused, <= 2 launches.
        p = decode_plan(B, Hkv, Tq, G, S, SMS)
        act = min(p.num_splits, math.ceil(Lk / _chunk(Lk, p.num_splits, SPLIT_ALIGN)))
        tri = _predict(nbytes, part_row * act if p.num_splits > 1 else 0, p.launches, B * Hkv * p.row_blocks * act)
        # Triton before: splits over S (<= 64, 128-row multiples), append + split + combine.
        rb = p.row_blocks
        ns_old = max(1, min(math.ceil(2 * SMS / (B * Hkv * rb)), math.ceil(S / 128), 64))
        split_len = math.ceil(math.ceil(S / ns_old) / 128) * 128
        ns_old = math.ceil(S / split_len)
        act_old = math.ceil(Lk / split_len)
        old = _predict(nbytes, part_row * ns_old if ns_old > 1 else 0, 3 if ns_old > 1 else 2, B * Hkv * rb * act_old)
        # csrc now: live-length splits of 64-key multiples, 16 rows per block.
        chunks = math.ceil(G * Tq / CSRC_ROWS)
        ns_c = max(1, min(math.ceil(2 * SMS / (B * Hkv * chunks)), math.ceil(S / CSRC_ALIGN), CSRC_MAX_SPLITS))
        act_c = min(ns_c, math.ceil(Lk / _chunk(Lk, ns_c, CSRC_ALIGN)))
        cu = _predict(nbytes, part_row * act_c if ns_c > 1 else 0, 2 if ns_c > 1 else 1, B * Hkv * chunks * act_c)
        out.append(dict(base, bytes=nbytes, triton=tri, triton_before=old, cuda=cu,
                        triton_splits=p.num_splits, cuda_splits=ns_c))
    return out


def markdown(rs: list[dict]) -> str:
    lines = [
        f"| B | L | S | Hkv | MB moved | floor µs @ {COPY_GBS / 1000:.1f} TB/s | Triton before: launches / programs / pred % "
        "| Triton now: launches / programs / pred µs / pred % | CUDA now: launches / blocks / pred % |",
        "|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rs:
        o, t, c = r["triton_before"], r["triton"], r["cuda"]
        lines.append(
            f"| {r['B']} | {r['L']} | {r['S']} | {r['Hkv']} | {r['bytes'] / 1e6:.2f} | {r['floor_us']:.2f} "
            f"| {o['launches']} / {o['programs']} / {o['pred_pct']:.0f}% "
            f"| {t['launches']} / {t['programs']} / {t['pred_us']:.2f} / {t['pred_pct']:.0f}% "
            f"| {c['launches']} / {c['programs']} / {c['pred_pct']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rs = rows()
    print(json.dumps(rs, indent=1) if args.json else markdown(rs), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
