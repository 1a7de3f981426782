"""`pytorch-mqa generate`: stream text from a checkpoint (train/finetune output) or a Hugging Face GPT-2 directory."""

from __future__ import annotations

import argparse
import sys
import time

from pytorch_mqa.core.devices import resolve_device
from pytorch_mqa.core.dtypes import DTYPE_CHOICES
from pytorch_mqa.model import generate
from pytorch_mqa.ops.backends import BACKEND_CHOICES, use_backend
from pytorch_mqa.training.data import format_prompt
from pytorch_mqa.training.pretrained import load_model_and_tokenizer


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step (no KV cache)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read from stdin)")
    parser.add_argument("--init", required=True, help="checkpoint directory (train/finetune output) or GPT-2 directory/file")
    parser.add_argument("--instruction", action="store_true",
                        help="wrap the prompt in the Alpaca template and print only the response")
    parser.add_argument("--input", default=None, help="with --instruction: the optional Alpaca input field")
    parser.add_argument("--tokenizer", choices=("saved", "gpt2"), default="saved",
                        help="the tokenizer saved with the checkpoint (default) or GPT-2's")
    parser.add_argument("--n-kv-head", type=int, default=None, help="convert an MHA checkpoint to GQA/MQA on load")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES)
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    device = str(resolve_device(args.device))
    with use_backend(args.backend):
        return _generate(args, device)


def _generate(args: argparse.Namespace, device: str) -> int:
    model, tokenizer = load_model_and_tokenizer(args.init, n_kv_head=args.n_kv_head, device=device, dtype=args.dtype,
                                                tokenizer_kind="gpt2" if args.tokenizer == "gpt2" else None)
    text = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.instruction:
        text = format_prompt({"instruction": text.strip(), "input": args.input or ""})
    prompt = tokenizer.encode(text)
    if not prompt:
        prompt = [tokenizer.eos_id]  # an empty prompt starts from end-of-text, as GPT-2 does
    block = model.config.block_size
    max_new = min(args.max_new_tokens, block - min(len(prompt), block // 2))
    if len(prompt) + max_new > block:
        print(f"[prompt cut to its last {block - max_new} of {len(prompt)} tokens: the model's context is "
              f"{block} tokens]", file=sys.stderr)
        prompt = prompt[len(prompt) - (block - max_new):]
    if not args.instruction:
        sys.stdout.write(text)
    sys.stdout.flush()
    produced: list[int] = []
    printed = 0

    def on_token(step, ids):
        nonlocal printed
        if ids[0] is None or ids[0] == tokenizer.eos_id:
            return
        produced.append(ids[0])
        s = tokenizer.decode(produced)
        if s.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return
        sys.stdout.write(s[printed:])
        sys.stdout.flush()
        printed = len(s)

    t0 = time.perf_counter()
    out = generate(model, [prompt], max_new, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, eos_id=tokenizer.eos_id, use_cache=not args.no_cache,
                   seed=args.seed, on_token=on_token)[0]
    dt = time.perf_counter() - t0
    tail = tokenizer.decode(produced)[printed:]
    sys.stdout.write(tail + "\n")
    print(f"[{len(out)} tokens in {dt:.2f} s: {len(out) / dt:.1f} tokens/s, "
          f"{'no cache' if args.no_cache else 'KV cache'}, {device}]")
    return 0
