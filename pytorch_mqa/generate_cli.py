"""`pytorch-mqa generate`: stream text from a checkpoint (train/finetune output) or a Hugging Face GPT-2 directory."""

from __future__ import annotations

import argparse
import os
import sys
import time

from pytorch_mqa.train import apply_backend, pick_device


def load_model_and_tokenizer(path: str, *, n_kv_head=None, device="cpu", dtype=None, tokenizer_kind=None):
    """A GPT and its tokenizer from `path`: a directory written by train/finetune, or a GPT-2 directory.

    The tokenizer is the one saved beside the weights; else GPT-2's vocab.json/merges.txt in the
    directory; else (or with tokenizer_kind="gpt2") GPT-2's from tiktoken's cache.
    """
    from pytorch_mqa.model import GPT
    from pytorch_mqa.tokenizers import GPT2Tokenizer, load_tokenizer

    if not os.path.exists(path):
        raise FileNotFoundError(f"init: expected a checkpoint directory or weights file, {path!r} does not exist")
    model = GPT.from_pretrained(path, n_kv_head=n_kv_head, dtype=dtype, device=device)
    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if tokenizer_kind == "gpt2":
        tokenizer = GPT2Tokenizer()
    else:
        try:
            tokenizer = load_tokenizer(directory)
        except FileNotFoundError:
            tokenizer = GPT2Tokenizer()  # a bare GPT-2 checkpoint: raises a clear error if not cached
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer: its vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                         f"({model.config.vocab_size}) in {path!r}")
    return model, tokenizer


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
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cuda"))
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pytorch_mqa.data import format_prompt
    from pytorch_mqa.generate import generate

    apply_backend(args.backend)
    device = pick_device(args.device)
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
