"""The trimmed benchmark of scripts/gpu_check.sh: attention_with_kv_cache (exact-fit and 8x
preallocated caches) and attention, bf16, written to OUT/bench.json and OUT/bench.md.

    python scripts/gpu_check_bench.py OUT            # on the GPU
    python scripts/gpu_check_bench.py OUT --cpu      # tiny shapes on the CPU (checks the pipeline only)
"""
import argparse
import json
import os
import sys

import torch

from pytorch_mqa.bench.report import markdown_report
from pytorch_mqa.bench.runner import run_bench

GPU_SHAPES = {
    "attention_with_kv_cache": dict(Hq=32, D=128, Hkv=(1, 8), batch=(1, 16), lengths=(4096, 16384),
                                    capacity=(1, 8), budget_s=0.05),
    "attention": dict(Hq=32, D=128, Hkv=(8, 1), seqlens=(2048,), tokens=16384, budget_s=0.05),
}
CPU_SHAPES = {
    "attention_with_kv_cache": dict(Hq=4, D=32, Hkv=(1,), batch=(1,), lengths=(64,), capacity=(1, 8), budget_s=0.01),
    "attention": dict(Hq=4, D=32, Hkv=(1,), seqlens=(64,), tokens=64, budget_s=0.01),
    "calibration": dict(copy_bytes=1 << 20, matmul_n=64),
}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else torch.bfloat16
    result = run_bench(("attention_with_kv_cache", "attention"), device, dtype, True,
                       shapes=CPU_SHAPES if args.cpu else GPU_SHAPES)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(markdown_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
