"""`pytorch-mqa finetune`: instruction fine-tuning in the Alpaca format, with the training loop of train.py.

The prompt (template + instruction + input) is masked out of the loss by default, so the model
learns to produce the response and the end-of-text token that follows it.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from pytorch_mqa.data import InstructionBatches, encode_instruction, format_prompt, load_instructions, split_examples
from pytorch_mqa.train import (add_optim_arguments, apply_backend, apply_threads, fit, load_trainer_state, pick_device,
                               plot_loss_curves, summarize, train_config_from_args)


class InstructionData:
    """Train/val instruction batches behind the `sample(split, generator, device)` interface of `fit`."""

    def __init__(self, train_records, val_records, tokenizer, batch_size: int, max_len: int, mask_prompt: bool = True):
        pad = getattr(tokenizer, "pad_id", tokenizer.eos_id)  # padded positions are masked out of the loss

        def enc(recs):
            return [encode_instruction(r, tokenizer.encode, tokenizer.eos_id, max_len, mask_prompt) for r in recs]

        self.splits = {"train": InstructionBatches(enc(train_records), batch_size, pad),
                       "val": InstructionBatches(enc(val_records), batch_size, pad)}

    def sample(self, split, generator, device):
        return self.splits[split].sample(generator, device)


def respond(model, tokenizer, example: dict, max_new_tokens: int = 64, **sampling) -> str:
    """The model's response to an instruction record (greedy unless sampling arguments say otherwise)."""
    from pytorch_mqa.generate import generate

    prompt = tokenizer.encode(format_prompt(example))
    block = model.config.block_size
    n = min(max_new_tokens, block - min(len(prompt), block // 2))
    prompt = prompt[max(0, len(prompt) - (block - n)):]
    sampling.setdefault("temperature", 0)
    ids = generate(model, [prompt], n, eos_id=tokenizer.eos_id, **sampling)[0]
    return tokenizer.decode([i for i in ids if i != tokenizer.eos_id])


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
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cuda"))
    parser.add_argument("--out", default="runs/finetune")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    add_optim_arguments(parser, max_steps=200, lr=3e-4, batch_size=8, eval_interval=50, warmup_steps=20)


def run(args: argparse.Namespace) -> int:
    from pytorch_mqa.generate_cli import load_model_and_tokenizer

    apply_backend(args.backend)
    apply_threads(args.threads)
    device = pick_device(args.device)
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
