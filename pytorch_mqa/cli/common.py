"""Flags and helpers shared by the training commands (train, study, finetune): DESIGN §3b."""

from __future__ import annotations

import argparse

from pytorch_mqa.ops.backends import BACKEND_CHOICES
from pytorch_mqa.training.loop import TrainConfig
from pytorch_mqa.training.tokenizers import KINDS as TOKENIZER_KINDS


def add_common_arguments(parser: argparse.ArgumentParser, out_default: str) -> None:
    """DESIGN §3b flags shared by train, study and finetune."""
    parser.add_argument("--corpus", default=None, help="UTF-8 text file (default: the embedded Python reference text)")
    parser.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default="char")
    parser.add_argument("--vocab-size", type=int, default=None, help="bpe/word vocabulary size (default 2048 / 8192)")
    parser.add_argument("--n-kv-head", type=int, default=None, help="KV heads: 1 = MQA, n_head = MHA (default)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="attention backend of the model's ops (default: auto)")
    parser.add_argument("--out", default=out_default, help=f"output directory (default {out_default})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_model_arguments(parser: argparse.ArgumentParser, *, n_layer=4, n_head=4, n_embd=128, block_size=128) -> None:
    parser.add_argument("--n-layer", type=int, default=n_layer)
    parser.add_argument("--n-head", type=int, default=n_head)
    parser.add_argument("--n-embd", type=int, default=n_embd)
    parser.add_argument("--block-size", type=int, default=block_size)
    parser.add_argument("--dropout", type=float, default=0.0)


def add_optim_arguments(parser: argparse.ArgumentParser, *, max_steps=1000, lr=1e-3, batch_size=16,
                        eval_interval=100, warmup_steps=50) -> None:
    parser.add_argument("--max-steps", type=int, default=max_steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--min-lr", type=float, default=None, help="final learning rate (default lr / 10)")
    parser.add_argument("--warmup-steps", type=int, default=warmup_steps)
    parser.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--eval-interval", type=int, default=eval_interval)
    parser.add_argument("--eval-iters", type=int, default=10)
    parser.add_argument("--checkpoint-interval", type=int, default=0, help="also checkpoint every N steps")


def train_config_from_args(args, device: str, checkpoint_dir: str | None, desc: str, extra: dict) -> TrainConfig:
    return TrainConfig(
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, schedule=args.schedule, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, eval_interval=args.eval_interval, eval_iters=args.eval_iters, seed=args.seed,
        device=device, checkpoint_dir=checkpoint_dir, checkpoint_interval=args.checkpoint_interval,
        progress=not args.no_progress, desc=desc, extra=extra,
    )
