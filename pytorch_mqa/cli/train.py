"""`pytorch-mqa train`: train a GPT (MHA/GQA/MQA) on a text corpus.

Everything is checked before the first step (arguments, --out, the corpus, both splits, the
checkpoint to resume); checkpoints are written every --checkpoint-minutes and on SIGINT/SIGTERM,
after which the command says how to resume. Under `torchrun --nproc-per-node N -m pytorch_mqa
train ...` it trains with DistributedDataParallel; rank 0 prints and writes the outputs.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

import torch

from pytorch_mqa.cli.common import (UserError, add_common_arguments, add_model_arguments, add_optim_arguments,
                                    check_at_least, check_heads, check_optim_args, check_resume_steps, fit_until_done,
                                    launch_training, prepare_out, print_stopped, resume_state, set_max_steps,
                                    train_config_from_args)
from pytorch_mqa.model import GPT, GPTConfig
from pytorch_mqa.model.bigram import BigramConfig, BigramLM, is_bigram_checkpoint
from pytorch_mqa.training.data import encode_documents, load_corpus
from pytorch_mqa.training.distributed import Rank
from pytorch_mqa.training.loop import LMBatches, plot_loss_curves, summarize
from pytorch_mqa.training.pretrained import load_model
from pytorch_mqa.training.tokenizers import EOT, get_tokenizer, load_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "runs/train")
    add_model_arguments(parser)
    add_optim_arguments(parser)
    parser.add_argument("--arch", choices=("gpt", "bigram", "unigram"), default="gpt",
                        help="gpt: the transformer; bigram: a table of next-token logits per token (the char-level "
                             "tutorial's baseline; --n-layer/--n-head/--n-embd are not used); unigram: one logit "
                             "vector for every position")
    parser.add_argument("--attn-dropout", type=float, default=0.0,
                        help="dropout on the attention probabilities while training (off at evaluation and in "
                             "generation); stored in the checkpoint's config")
    parser.add_argument("--pack", action="store_true",
                        help="padding-free packed training: the corpus is cut into documents at --doc-separator, "
                             "each one followed by the tokenizer's end-of-text token; every batch runs as one packed "
                             "row in which no token attends across a document and positions restart per document")
    parser.add_argument("--doc-separator", default=EOT,
                        help=f"with --pack: the text between documents of the corpus (default {EOT!r}, the "
                             "layout of GPT-2-style text dumps such as TinyStories; e.g. $'\\n\\n' for paragraphs)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from OUT/checkpoint (model and tokenizer come from it)")


def check_args(args: argparse.Namespace) -> None:
    check_optim_args(args)
    if args.arch != "gpt" and args.fsdp:
        raise UserError("--fsdp", f"expected --arch gpt (FSDP shards transformer blocks), got --arch {args.arch}")
    check_at_least(args, 1, "n_layer", "block_size", "n_embd")
    check_heads(args.n_head, args.n_kv_head, args.n_embd)
    if not 0.0 <= args.dropout < 1.0:
        raise UserError("--dropout", f"expected a probability in [0, 1), got {args.dropout}")
    if not 0.0 <= args.attn_dropout < 1.0:
        raise UserError("--attn-dropout", f"expected a probability in [0, 1), got {args.attn_dropout}")
    if args.attn_dropout and args.arch != "gpt":
        raise UserError("--attn-dropout", f"expected --arch gpt (the {args.arch} model has no attention), "
                                          f"got --arch {args.arch}")
    if args.pack and args.arch != "gpt":
        raise UserError("--pack", f"expected --arch gpt (packing needs attention), got --arch {args.arch}")
    if not args.doc_separator:
        raise UserError("--doc-separator", "expected a non-empty string, got ''")
    minimum = {"bpe": 257, "word": 4}.get(args.tokenizer)
    if args.vocab_size is not None and minimum and args.vocab_size < minimum:
        raise UserError("--vocab-size", f"expected at least {minimum} for --tokenizer {args.tokenizer}, "
                                        f"got {args.vocab_size}")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    return launch_training(args, _train)


def _train(args: argparse.Namespace, device: str, rank: Rank) -> int:
    say = print if rank.is_main else (lambda *a, **k: None)
    ckpt = os.path.join(args.out, "checkpoint")
    to_remove = prepare_out(args.out, "train", args.resume, args.overwrite)
    text = load_corpus(args.corpus)
    resume = resume_state(args, ckpt, rank)
    if resume is not None:
        if args.max_steps is not None:
            check_resume_steps(resume, ckpt, args.max_steps)
        packed = resume.get("config", {}).get("pack_eot_id") is not None
        if packed != args.pack:
            raise UserError("--pack", f"the run in {args.out} was trained {'with' if packed else 'without'} --pack; "
                                      "resume it the same way")
        trained_on = resume.get("config", {}).get("extra", {}).get("corpus", args.corpus)
        if trained_on != args.corpus:
            raise UserError("--corpus", f"the run in {args.out} was trained on {trained_on or 'the embedded corpus'}; "
                                        "pass the same --corpus to resume it")
        tokenizer = load_tokenizer(ckpt)
        if is_bigram_checkpoint(ckpt):
            model = BigramLM.from_pretrained(ckpt, device=device)
        else:
            model = load_model(ckpt, device="cpu" if args.fsdp else device)  # FSDP: moved to the device in shards
    else:
        torch.manual_seed(args.seed)
        # with --pack the tokenizer learns the documents' text, not the separators
        vocab_text = "\n".join(text.split(args.doc_separator)) if args.pack else text
        tokenizer = get_tokenizer(args.tokenizer, vocab_text if args.tokenizer != "gpt2" else None,
                                  vocab_size=args.vocab_size, path=args.tokenizer_dir, word_split=args.word_split)
        if args.arch == "gpt":
            config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                               n_head=args.n_head, n_kv_head=args.n_kv_head or args.n_head, n_embd=args.n_embd,
                               dropout=args.dropout, attn_dropout=args.attn_dropout)
            model = GPT(config)
        else:
            model = BigramLM(BigramConfig(tokenizer.vocab_size, args.block_size, 2 if args.arch == "bigram" else 1))
    if args.pack:
        documents = text.split(args.doc_separator)
        ids = encode_documents(documents, tokenizer.encode, tokenizer.eos_id)
    else:
        ids = tokenizer.encode(text)
    batches = LMBatches(ids, args.batch_size, model.config.block_size, source=args.corpus or "corpus")
    check_resume_steps(resume, ckpt, set_max_steps(args, batches))
    cfg = train_config_from_args(args, device, ckpt, "train", {"tokenizer": tokenizer.kind, "corpus": args.corpus,
                                                                       "arch": args.arch})
    if args.pack:
        cfg = replace(cfg, pack_eot_id=tokenizer.eos_id)
    say(f"model: {model.num_params(non_embedding=False):,} parameters, {model.config}")
    scale = f" x {rank.world_size} processes ({'FSDP' if args.fsdp else 'DDP'})" if rank.enabled else ""
    say(f"data: {len(batches.train):,} train / {len(batches.val):,} val tokens ({tokenizer.kind} tokenizer, "
        f"vocab {tokenizer.vocab_size})  device: {device}{scale}")
    if args.pack:
        n_docs = sum(1 for d in documents if d.strip())
        say(f"packed: {n_docs:,} documents, each ending with token {tokenizer.eos_id}; attention stays inside each "
            "document" + (f" (the corpus holds no --doc-separator {args.doc_separator!r})" if n_docs == 1 else ""))
    if args.epochs is not None:
        say(f"{args.epochs:g} epoch(s) of {batches.train_sequences:,} windows at {args.batch_size} a step: "
            f"{args.max_steps:,} steps")
    if resume is not None:
        say(f"resuming from {ckpt} at step {resume['step']} of {args.max_steps}")
    history, reason, code = fit_until_done(model, batches, cfg, args, rank, device, to_remove, tokenizer=tokenizer,
                                           resume=resume)
    if not rank.is_main:
        return code if "stopped_at" in history else 0
    plot_loss_curves({"model": history}, os.path.join(args.out, "loss.png"), title="training loss")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"summary": summarize(history), "history": history}, f, indent=1)
    if "stopped_at" in history:
        print_stopped(args, "train", history, reason, ckpt)
        return code
    print(f"wrote {ckpt}/ (model, tokenizer, trainer state), {args.out}/loss.png, {args.out}/metrics.json")
    return 0
