"""`pytorch-mqa generate`: stream text from a checkpoint (train/finetune output) or a Hugging Face GPT-2 directory.

--max-new-tokens is never cut short to fit the model's context: past block_size tokens the
context is cropped to its last block_size tokens (nanoGPT's rule, in the generation loop), and
this command says so once, before generating. The prompt itself is never cut to make room; an
--instruction prompt longer than the context is refused, since without its Alpaca header the
model would answer a different question.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from pytorch_mqa.cli.common import UserError, add_checkpoint_arguments, check_at_least, check_heads
from pytorch_mqa.core.devices import resolve_device
from pytorch_mqa.core.dtypes import DTYPE_CHOICES
from pytorch_mqa.model import generate
from pytorch_mqa.model.generation import ContextCropWarning, supports_cache
from pytorch_mqa.ops.backends import BACKEND_CHOICES, use_backend
from pytorch_mqa.training.data import format_prompt
from pytorch_mqa.training.pretrained import load_model_and_tokenizer


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=200,
                        help="tokens to generate; past the model's context the oldest tokens drop out of it")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default: all)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample within the smallest set of tokens of total probability p (default: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="penalise tokens already in the prompt or the output (1 = off), by --repetition-rule")
    parser.add_argument("--repetition-rule", choices=("ctrl", "divide"), default="ctrl",
                        help="ctrl (CTRL / Hugging Face): a seen token's positive logit is divided by the penalty, a "
                             "negative one multiplied, so it always becomes less likely; divide: every seen logit is "
                             "divided, whatever its sign (the simpler rule some tutorials use)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: unseeded)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step (no KV cache)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read from stdin)")
    parser.add_argument("--init", required=True, help="checkpoint directory (train/finetune output) or GPT-2 directory/file")
    parser.add_argument("--instruction", action="store_true",
                        help="wrap the prompt in the Alpaca template and print only the response")
    parser.add_argument("--input", default=None, help="with --instruction: the optional Alpaca input field")
    add_checkpoint_arguments(parser, "convert an MHA checkpoint to GQA/MQA on load")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto = cuda if available")
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="attention backend of the model's ops")
    add_sampling_arguments(parser)


def check_sampling_args(args: argparse.Namespace) -> None:
    check_at_least(args, 0, "max_new_tokens", "temperature")
    check_at_least(args, 1, "top_k")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UserError("--top-p", f"expected a probability in (0, 1], got {args.top_p}")
    if not args.repetition_penalty > 0:
        raise UserError("--repetition-penalty", f"expected a number > 0 (1 = off), got {args.repetition_penalty}")


def run(args: argparse.Namespace) -> int:
    check_sampling_args(args)
    check_heads(None, args.n_kv_head)
    check_at_least(args, 1, "n_head")
    if args.input is not None and not args.instruction:
        raise UserError("--input", "only used with --instruction (the Alpaca input field)")
    device = str(resolve_device(args.device))
    with use_backend(args.backend):
        return _generate(args, device)


def _generate(args: argparse.Namespace, device: str) -> int:
    model, tokenizer = load_model_and_tokenizer(args.init, n_kv_head=args.n_kv_head, n_head=args.n_head,
                                                tokenizer_dir=args.tokenizer_dir, device=device, dtype=args.dtype,
                                                tokenizer_kind="gpt2" if args.tokenizer == "gpt2" else None)
    text = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.instruction:
        text = format_prompt({"instruction": text.strip(), "input": args.input or ""})
    try:
        tokenizer.check_text(text, "--instruction prompt" if args.instruction else "prompt")
    except ValueError as e:
        raise UserError(*str(e).split(": ", 1)) from None
    prompt = tokenizer.encode(text)
    if not prompt:
        prompt = [tokenizer.eos_id]  # an empty prompt starts from end-of-text, as GPT-2 does
    prompt, max_new = fit_context(prompt, args.max_new_tokens, model.config.block_size, args.instruction)
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
    with warnings.catch_warnings():  # fit_context has said it, in this command's words
        warnings.simplefilter("ignore", ContextCropWarning)
        out = generate(model, [prompt], max_new, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       repetition_penalty=args.repetition_penalty, repetition_rule=args.repetition_rule,
                       eos_id=tokenizer.eos_id, use_cache=not args.no_cache, seed=args.seed, on_token=on_token)[0]
    dt = time.perf_counter() - t0
    tail = tokenizer.decode(produced)[printed:]
    sys.stdout.write(tail + "\n")
    print(f"[{len(out)} tokens in {dt:.2f} s: {len(out) / dt:.1f} tokens/s, "
          f"{'KV cache' if not args.no_cache and supports_cache(model) else 'no cache'}, {device}]")
    return 0


def fit_context(prompt: list[int], max_new: int, block: int, instruction: bool) -> tuple[list[int], int]:
    """The prompt the model starts from and the tokens to generate, with one warning where the context
    runs out; max_new is never reduced."""
    if len(prompt) > block:
        if instruction:
            raise UserError("--instruction", f"the prompt is {len(prompt)} tokens in the Alpaca template, longer "
                                             f"than the model's context of {block} tokens; shorten the instruction "
                                             "or --input")
        warn(f"the prompt is {len(prompt)} tokens, longer than the model's context of {block}: the model sees "
             f"only its last {block} tokens")
        prompt = prompt[len(prompt) - block:]
    if len(prompt) + max_new - 1 > block:  # the last new token is never fed back
        lost = "the Alpaca header of the prompt" if instruction else "the beginning of the prompt"
        warn(f"{len(prompt)} prompt + {max_new} new tokens exceed the model's context of {block} tokens: after "
             f"{block - len(prompt) + 1} new tokens the context is cropped to the last {block} tokens ({lost} drops "
             "out first)")
    return prompt, max_new


def warn(message: str) -> None:
    print(f"[warning: {message}]", file=sys.stderr, flush=True)
