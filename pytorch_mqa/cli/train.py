"""`pytorch-mqa train`: train a GPT (MHA/GQA/MQA) on a text corpus."""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from pytorch_mqa.cli.common import add_common_arguments, add_model_arguments, add_optim_arguments, train_config_from_args
from pytorch_mqa.core.devices import resolve_device
from pytorch_mqa.core.threads import set_threads
from pytorch_mqa.model import GPT, GPTConfig
from pytorch_mqa.ops.backends import use_backend
from pytorch_mqa.training.data import load_corpus
from pytorch_mqa.training.loop import LMBatches, fit, load_trainer_state, plot_loss_curves, summarize
from pytorch_mqa.training.tokenizers import get_tokenizer, load_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "runs/train")
    add_model_arguments(parser)
    add_optim_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    device = str(resolve_device(args.device))
    with use_backend(args.backend):
        return _train(args, device)


def _train(args: argparse.Namespace, device: str) -> int:
    ckpt = os.path.join(args.out, "checkpoint")
    resume = None
    if args.resume:
        resume = load_trainer_state(ckpt)
        tokenizer = load_tokenizer(ckpt)
        model = GPT.from_pretrained(ckpt, device=device)
        print(f"resuming from {ckpt} at step {resume['step']}")
    else:
        torch.manual_seed(args.seed)
        tokenizer = get_tokenizer(args.tokenizer, load_corpus(args.corpus) if args.tokenizer != "gpt2" else None,
                                  vocab_size=args.vocab_size)
        config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                           n_head=args.n_head, n_kv_head=args.n_kv_head or args.n_head, n_embd=args.n_embd,
                           dropout=args.dropout)
        model = GPT(config)
    text = load_corpus(args.corpus)
    batches = LMBatches(tokenizer.encode(text), args.batch_size, model.config.block_size)
    cfg = train_config_from_args(args, device, ckpt, "train", {"tokenizer": tokenizer.kind, "corpus": args.corpus})
    print(f"model: {model.num_params(non_embedding=False):,} parameters, {model.config}")
    print(f"data: {len(batches.train):,} train / {len(batches.val):,} val tokens ({tokenizer.kind} tokenizer, "
          f"vocab {tokenizer.vocab_size})  device: {device}")
    history = fit(model, batches, cfg, tokenizer=tokenizer, resume=resume,
                  on_eval=lambda s, l: print(f"step {s}: train {l['train']:.4f}  val {l['val']:.4f}  "
                                             f"val ppl {math.exp(l['val']):.2f}", flush=True))
    plot_loss_curves({"model": history}, os.path.join(args.out, "loss.png"), title="training loss")
    summary = summarize(history)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"summary": summary, "history": history}, f, indent=1)
    print(f"wrote {ckpt}/ (model, tokenizer, trainer state), {args.out}/loss.png, {args.out}/metrics.json")
    return 0
