"""`pytorch-mqa finetune`: instruction fine-tuning in the Alpaca format, with the training loop of `fit`.

The prompt (template + instruction + input) is masked out of the loss by default, so the model
learns to produce the response and the end-of-text token that follows it. Under `torchrun` it
trains with DistributedDataParallel, as `train` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import torch
from tqdm.auto import tqdm

from pytorch_mqa.cli.common import (UserError, add_checkpoint_arguments, add_optim_arguments, check_at_least, check_heads, check_optim_args,
                                    check_resume_steps, fit_until_done, launch_training, prepare_out, print_stopped,
                                    resume_state, set_max_steps, train_config_from_args)
from pytorch_mqa.ops.backends import BACKEND_CHOICES
from pytorch_mqa.training.data import ALPACA_PROMPT_WITH_INPUT, format_prompt, load_instructions, split_examples
from pytorch_mqa.training.distributed import Rank
from pytorch_mqa.training.finetune import InstructionData, respond, response_budget
from pytorch_mqa.training.loop import plot_loss_curves, summarize
from pytorch_mqa.training.pretrained import load_model_and_tokenizer

RESPONSE_TOKENS = 64  # the example response printed at the end


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="JSON list (or JSON lines) of {instruction, input?, output}")
    parser.add_argument("--init", required=True, help="checkpoint directory (from train) or Hugging Face GPT-2 directory")
    add_checkpoint_arguments(parser, "convert MHA weights to GQA/MQA before fine-tuning (default: keep the checkpoint's)")
    parser.add_argument("--max-len", type=int, default=None, help="tokens per example (default: the model's block_size)")
    parser.add_argument("--no-mask-prompt", action="store_true", help="also train on the prompt tokens")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the records held out for validation")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto = cuda if available")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="attention backend of the model's ops")
    parser.add_argument("--out", default="runs/finetune", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the batches")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from OUT/checkpoint")
    parser.add_argument("--answers", default=None, metavar="FILE",
                        help="after training, write the model's greedy response to every held-out record into this "
                             "JSON file (the records with a \"model_response\" field added)")
    parser.add_argument("--answer-tokens", type=int, default=256,
                        help="most new tokens per response in --answers (the whole prompt is kept in the context)")
    add_optim_arguments(parser, max_steps=200, lr=3e-4, batch_size=8, eval_interval=50, warmup_steps=20)


def run(args: argparse.Namespace) -> int:
    check_optim_args(args)
    check_heads(None, args.n_kv_head)
    check_at_least(args, 1, "n_head")
    if not 0.0 < args.val_fraction < 1.0:
        raise UserError("--val-fraction", f"expected a fraction in (0, 1), got {args.val_fraction}")
    if args.answer_tokens < 1:
        raise UserError("--answer-tokens", f"expected at least 1, got {args.answer_tokens}")
    if args.answers is not None and os.path.isdir(args.answers):
        raise UserError("--answers", f"expected a JSON file to write, got the directory {args.answers!r}")
    if args.max_len is not None and args.max_len < 2:
        raise UserError("--max-len", f"expected at least 2 tokens, got {args.max_len}")
    return launch_training(args, _finetune)


def _finetune(args: argparse.Namespace, device: str, rank: Rank) -> int:
    say = print if rank.is_main else (lambda *a, **k: None)
    ckpt = os.path.join(args.out, "checkpoint")
    to_remove = prepare_out(args.out, "finetune", args.resume, args.overwrite)
    records = load_instructions(args.data)  # the cheap check first: a bad data file fails before any loading
    resume = resume_state(args, ckpt, rank)
    if args.max_steps is not None:
        check_resume_steps(resume, ckpt, args.max_steps)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(ckpt if args.resume else args.init, n_kv_head=args.n_kv_head,
                                                n_head=args.n_head, tokenizer_dir=args.tokenizer_dir,
                                                device="cpu" if args.fsdp else device,
                                                tokenizer_kind="gpt2" if args.tokenizer == "gpt2" else None)
    model = model.float()
    try:
        tokenizer.check_text(ALPACA_PROMPT_WITH_INPUT.format(instruction="", input=""), "the Alpaca prompt template")
    except ValueError as e:
        raise UserError(args.init, str(e), usage=False) from None
    for i, r in enumerate(records):
        try:
            tokenizer.check_text(format_prompt(r) + r["output"], f"record {i}")
        except ValueError as e:
            raise UserError(args.data, str(e), usage=False) from None
    train_recs, val_recs = split_examples(records, args.val_fraction, args.seed)
    max_len = min(args.max_len or model.config.block_size, model.config.block_size)
    data = InstructionData(train_recs, val_recs, tokenizer, args.batch_size, max_len, not args.no_mask_prompt)
    cut = sum(len(tokenizer.encode(format_prompt(r) + r["output"])) + 1 > max_len + 1 for r in records)
    check_resume_steps(resume, ckpt, set_max_steps(args, data))
    cfg = train_config_from_args(args, device, ckpt, "finetune", {"data": args.data, "init": args.init})
    per_epoch = math.ceil(len(train_recs) / args.batch_size)
    if args.epochs is not None:  # the validation loss of every epoch, over the whole validation split
        cfg = dataclasses.replace(cfg, eval_interval=per_epoch, eval_full=True)
    say(f"model: {model.num_params(non_embedding=False):,} parameters, {model.config}")
    say(f"data: {len(train_recs)} train / {len(val_recs)} val examples ({tokenizer.kind} tokenizer)  device: {device}"
        + (f" x {rank.world_size} processes ({'FSDP' if args.fsdp else 'DDP'})" if rank.enabled else ""))
    if args.epochs is not None:
        say(f"{args.epochs:g} epoch(s) of {len(train_recs)} examples at {args.batch_size} a step: "
            f"{args.max_steps:,} steps")
    if cut:
        say(f"[warning: {cut} of {len(records)} examples are longer than {max_len} tokens: their prompt loses its "
            "beginning (or the response its end) in training]", file=sys.stderr)
    if resume is not None:
        say(f"resuming from {ckpt} at step {resume['step']} of {args.max_steps}")
    history, reason, code = fit_until_done(model, data, cfg, args, rank, device, to_remove, tokenizer=tokenizer,
                                           resume=resume, step_label=lambda s: f"{s} (epoch {s / per_epoch:.2f})")
    epochs = [{"epoch": round(e["step"] / per_epoch, 4), **e} for e in history["eval"]]
    if not rank.is_main:
        return code if "stopped_at" in history else 0
    plot_loss_curves({"finetune": history}, os.path.join(args.out, "loss.png"), title="fine-tuning loss")
    if "stopped_at" in history:
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump({"summary": summarize(history), "history": history}, f, indent=1)
        print_stopped(args, "finetune", history, reason, ckpt)
        return code
    example = val_recs[0]
    prompt_len, block = len(tokenizer.encode(format_prompt(example))), model.config.block_size
    if args.fsdp:  # the weights are sharded over the processes: generation needs them whole
        response, note = None, f" [none under --fsdp: generate from {ckpt} as shown below]"
    elif prompt_len <= block:
        response = respond(model, tokenizer, example, RESPONSE_TOKENS)
        budget = response_budget(prompt_len, RESPONSE_TOKENS, block)
        note = (f" [at most {budget} tokens: the {prompt_len}-token prompt is kept whole in the model's "
                f"{block}-token context]" if budget < RESPONSE_TOKENS else "")
    else:
        response, note = None, f" [none: the prompt is {prompt_len} tokens, the model's context {block}]"
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"summary": summarize(history), "epochs": epochs,
                   "example": {**example, "model_response": response}, "history": history}, f, indent=1)
    if args.answers is not None:
        write_answers(args.answers, model, tokenizer, val_recs, args.answer_tokens, block, not args.no_progress)
    print(f"\nexample instruction: {example['instruction']!r}\nmodel response: {response!r}{note}")
    print(f"wrote {ckpt}/ (model, tokenizer, trainer state), {args.out}/loss.png, {args.out}/metrics.json")
    extra = f" --input {json.dumps(example['input'])}" if example.get("input") else ""
    print(f"try: pytorch-mqa generate --init {ckpt} --instruction {json.dumps(example['instruction'])}{extra} "
          "--temperature 0")
    return 0


def write_answers(path: str, model, tokenizer, records: list[dict], max_new_tokens: int, block: int,
                  progress: bool = True) -> None:
    """The held-out records with the model's greedy response to each added as "model_response"."""
    out = []
    for r in tqdm(records, desc="answers", leave=False, disable=not progress):
        prompt_len = len(tokenizer.encode(format_prompt(r)))
        response = respond(model, tokenizer, r, max_new_tokens) if prompt_len <= block else None
        out.append({**r, "model_response": response})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    print(f"wrote {len(out)} held-out responses to {path}")
