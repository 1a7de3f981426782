"""`pytorch-mqa finetune`: instruction fine-tuning in the Alpaca format, with the training loop of `fit`.

The prompt (template + instruction + input) is masked out of the loss by default, so the model
learns to produce the response and the end-of-text token that follows it.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from pytorch_mqa.cli.common import add_optim_arguments, train_config_from_args
from pytorch_mqa.core.devices import resolve_device
from pytorch_mqa.core.threads import set_threads
from pytorch_mqa.ops.backends import BACKEND_CHOICES, use_backend
from pytorch_mqa.training.data import load_instructions, split_examples
from pytorch_mqa.training.finetune import InstructionData, respond
from pytorch_mqa.training.loop import fit, load_trainer_state, plot_loss_curves, summarize
from pytorch_mqa.training.pretrained import load_model_and_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="JSON list (or JSON lines) of {instruction, input?, output}")
    parser.add_argument("--init", required=True, help="checkpoint directory (from train) or Hugging Face GPT-2 directory")
    parser.add_argument("--tokenizer", choices=("saved", "gpt2"), default="saved",
                        help="the tokenizer saved with --init (default) or GPT-2's")
    parser.add_argument("--n-kv-head", type=int, default=None, help="convert MHA weights to GQA/MQA before fine-tuning")
    parser.add_argument("--max-len", type=int, default=None, help="tokens per example (default: the model's block_size)")
    parser.add_argument("--no-mask-prompt", action="store_true", help="also train on the prompt tokens")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    parser.add_argument("--out", default="runs/finetune")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    add_optim_arguments(parser, max_steps=200, lr=3e-4, batch_size=8, eval_interval=50, warmup_steps=20)


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    device = str(resolve_device(args.device))
    with use_backend(args.backend):
        return _finetune(args, device)


def _finetune(args: argparse.Namespace, device: str) -> int:
    ckpt = os.path.join(args.out, "checkpoint")
    resume = load_trainer_state(ckpt) if args.resume else None
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(ckpt if args.resume else args.init, n_kv_head=args.n_kv_head,
                                                device=device,
                                                tokenizer_kind="gpt2" if args.tokenizer == "gpt2" else None)
    model = model.float()
    records = load_instructions(args.data)
    train_recs, val_recs = split_examples(records, args.val_fraction, args.seed)
    max_len = min(args.max_len or model.config.block_size, model.config.block_size)
    data = InstructionData(train_recs, val_recs, tokenizer, args.batch_size, max_len, not args.no_mask_prompt)
    cfg = train_config_from_args(args, device, ckpt, "finetune", {"data": args.data, "init": args.init})
    print(f"model: {model.num_params(non_embedding=False):,} parameters, {model.config}")
    print(f"data: {len(train_recs)} train / {len(val_recs)} val examples ({tokenizer.kind} tokenizer)  device: {device}")
    history = fit(model, data, cfg, tokenizer=tokenizer, resume=resume,
                  on_eval=lambda s, l: print(f"step {s}: train {l['train']:.4f}  val {l['val']:.4f}  "
                                             f"val ppl {math.exp(l['val']):.2f}", flush=True))
    plot_loss_curves({"finetune": history}, os.path.join(args.out, "loss.png"), title="fine-tuning loss")
    example = val_recs[0]
    response = respond(model, tokenizer, example)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"summary": summarize(history), "example": {**example, "model_response": response},
                   "history": history}, f, indent=1)
    print(f"\nexample instruction: {example['instruction']!r}\nmodel response: {response!r}")
    print(f"wrote {ckpt}/ (model, tokenizer, trainer state), {args.out}/loss.png, {args.out}/metrics.json")
    extra = f" --input {json.dumps(example['input'])}" if example.get("input") else ""
    print(f"try: pytorch-mqa generate --init {ckpt} --instruction {json.dumps(example['instruction'])}{extra} "
          "--temperature 0")
    return 0
