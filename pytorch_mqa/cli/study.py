"""`pytorch-mqa study`: MHA vs GQA vs MQA trained the same way on the same text, over several seeds."""

from __future__ import annotations

import argparse
import time

from pytorch_mqa.cli.common import UserError, add_common_arguments, check_at_least, check_heads
from pytorch_mqa.core.devices import resolve_device
from pytorch_mqa.core.threads import cpu_cores, set_threads
from pytorch_mqa.study.metrics import read_sentences
from pytorch_mqa.study.report import summary_table
from pytorch_mqa.study.run import PRESETS, run_study


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The preset picks the tokenizer; one torch thread per training process is fastest for these small models.
    add_common_arguments(parser, "runs/study", tokenizer_default=None, helps={
        "tokenizer": "tokenizer of every run (default: the preset's, char for --quick, bpe otherwise)",
        "n_kv_head": "KV heads of the GQA variant, a divisor of --n-head (default: a middle divisor)",
        "threads": "torch CPU threads per training process (default: 1 on CPU)"})
    parser.add_argument("--quick", action="store_true", help="the small preset: about 90 s on a 2-core CPU")
    parser.add_argument("--match-params", action="store_true",
                        help="add an MQA variant widened to the MHA variant's parameter count")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: 2 quick, 3 default)")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps per run (default: the preset's)")
    for name, what in (("n-layer", "transformer blocks"), ("n-head", "query heads"), ("n-embd", "model width"),
                       ("block-size", "context length"), ("batch-size", "sequences per step")):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"{what} (default: the preset's)")
    parser.add_argument("--sentences", default=None, metavar="FILE",
                        help="a UTF-8 file, one sentence per line, each scored by every variant (per-token "
                             "log-probabilities in report.md and results.json) in place of the in-domain sentences "
                             "drawn from the held-out split of --corpus")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    parser.add_argument("--dropout", type=float, default=None, help="dropout while training (default 0)")
    parser.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay, 2-D weights (default 0.1)")
    parser.add_argument("--schedule", choices=("cosine", "linear", "constant"), default=None,
                        help="learning-rate decay after warmup (default cosine)")
    parser.add_argument("--bigram-lr", type=float, default=None,
                        help="learning rate of the bigram baseline (default 0.1, no weight decay)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs trained at once in separate processes on CPU (default: the number of CPU cores, "
                             "at most 4)")


def run(args: argparse.Namespace) -> int:
    check_at_least(args, 1, "seeds", "max_steps", "n_layer", "n_head", "n_embd", "block_size", "batch_size", "jobs",
                   "threads")
    preset = PRESETS["quick" if args.quick else "default"]
    n_head = args.n_head or preset["n_head"]
    check_heads(n_head, args.n_kv_head, args.n_embd or preset["n_embd"])
    if args.vocab_size is not None and args.vocab_size < 257 and (args.tokenizer or preset["tokenizer"]) == "bpe":
        raise UserError("--vocab-size", f"expected at least 257 for the bpe tokenizer, got {args.vocab_size}")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise UserError("--dropout", f"expected a probability in [0, 1), got {args.dropout}")
    for name in ("lr", "bigram_lr"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')}", f"expected a positive learning rate, got {getattr(args, name)}")
    if args.weight_decay is not None and args.weight_decay < 0:
        raise UserError("--weight-decay", f"expected >= 0, got {args.weight_decay}")
    sentences = None
    if args.sentences is not None:
        try:
            sentences = read_sentences(args.sentences)
        except FileNotFoundError:
            raise UserError("--sentences", f"expected a file of sentences, got {args.sentences!r}, which does not "
                                           "exist") from None
        except ValueError as e:
            raise UserError("--sentences", str(e)) from None
    device = str(resolve_device(args.device))
    if args.threads or device == "cpu":
        set_threads(args.threads or 1)
    p = dict(PRESETS["quick" if args.quick else "default"])
    overrides = {"tokenizer": args.tokenizer, "seeds": args.seeds, "max_steps": args.max_steps,
                 "n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                 "block_size": args.block_size, "batch_size": args.batch_size, "lr": args.lr, "dropout": args.dropout,
                 "weight_decay": args.weight_decay, "schedule": args.schedule, "bigram_lr": args.bigram_lr}
    p.update({k: v for k, v in overrides.items() if v is not None})
    t0 = time.perf_counter()
    results = run_study(p, args.out, corpus=args.corpus, device=device, progress=not args.no_progress,
                        match_params=args.match_params, gqa_kv=args.n_kv_head, base_seed=args.seed,
                        vocab_size=args.vocab_size, jobs=args.jobs or min(4, cpu_cores()),
                        backend=args.backend, sentences=sentences, sentences_source=args.sentences,
                        tokenizer_dir=args.tokenizer_dir, word_split=args.word_split)
    print()
    print(summary_table(results))
    print(f"\nwrote {args.out}/report.md, results.json, loss_curves.png, perplexity.png "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0
