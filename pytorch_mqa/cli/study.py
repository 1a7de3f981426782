"""`pytorch-mqa study`: MHA vs GQA vs MQA trained the same way on the same text, over several seeds."""

from __future__ import annotations

import argparse
import time

from pytorch_mqa.cli.common import add_common_arguments
from pytorch_mqa.core.devices import resolve_device
from pytorch_mqa.core.threads import cpu_cores, set_threads
from pytorch_mqa.study.report import summary_table
from pytorch_mqa.study.run import PRESETS, run_study


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "runs/study")
    # The preset picks the tokenizer; one torch thread per training process is fastest for these small models.
    parser.set_defaults(tokenizer=None)
    parser.add_argument("--quick", action="store_true", help="the small preset: about 90 s on a 2-core CPU")
    parser.add_argument("--match-params", action="store_true",
                        help="add an MQA variant widened to the MHA variant's parameter count")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: 2 quick, 3 default)")
    parser.add_argument("--max-steps", type=int, default=None)
    for flag in ("n-layer", "n-head", "n-embd", "block-size", "batch-size"):
        parser.add_argument(f"--{flag}", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs trained at once in separate processes on CPU (default: the number of CPU cores, "
                             "at most 4)")


def run(args: argparse.Namespace) -> int:
    device = str(resolve_device(args.device))
    if args.threads or device == "cpu":
        set_threads(args.threads or 1)
    p = dict(PRESETS["quick" if args.quick else "default"])
    overrides = {"tokenizer": args.tokenizer, "seeds": args.seeds, "max_steps": args.max_steps,
                 "n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                 "block_size": args.block_size, "batch_size": args.batch_size}
    p.update({k: v for k, v in overrides.items() if v is not None})
    t0 = time.perf_counter()
    results = run_study(p, args.out, corpus=args.corpus, device=device, progress=not args.no_progress,
                        match_params=args.match_params, gqa_kv=args.n_kv_head, base_seed=args.seed,
                        vocab_size=args.vocab_size, jobs=args.jobs or min(4, cpu_cores()),
                        backend=args.backend)
    print()
    print(summary_table(results))
    print(f"\nwrote {args.out}/report.md, results.json, loss_curves.png, perplexity.png "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0
