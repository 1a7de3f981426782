"""Flags and helpers shared by the commands: DESIGN §3b flags, argument checks, the error boundary's
mapping of exceptions to one-line messages, the --out policy and the interrupt handler."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading

from tqdm.auto import tqdm

from pytorch_mqa.core.devices import resolve_device
from pytorch_mqa.core.threads import set_threads
from pytorch_mqa.ops.backends import BACKEND_CHOICES, use_backend
from pytorch_mqa.training.distributed import barrier, launched_rank, process_group, shard_model
from pytorch_mqa.training.files import OLD_SUFFIX, TMP_PREFIX, FileFormatError, recover_directory, stale_temporaries
from pytorch_mqa.training.loop import TrainConfig, fit, load_trainer_state, steps_for_epochs
from pytorch_mqa.training.tokenizers import KINDS as TOKENIZER_KINDS


class UserError(Exception):
    """A mistake the user can fix, reported as `pytorch-mqa CMD: error: WHERE: WHAT` with no traceback.

    `where` is the argument (e.g. "--n-kv-head") or the path at fault; `usage=True` (a bad command
    line) exits 2, `usage=False` (a problem met while running) exits 1.
    """

    def __init__(self, where: str, what: str, usage: bool = True):
        self.where, self.what, self.usage = where, what, usage
        super().__init__(f"{where}: {what}")


def error_line(err: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that reached the command line."""
    if isinstance(err, UserError):
        code, msg = (2 if err.usage else 1), str(err)
    elif isinstance(err, KeyboardInterrupt):
        code, msg = 130, "interrupted (Ctrl-C)"
    elif isinstance(err, UnicodeDecodeError):  # a read this package did not wrap: no path to give
        code, msg = 1, f"a file is not UTF-8 text ({err}); convert it to UTF-8"
    elif isinstance(err, json.JSONDecodeError):
        code, msg = 1, f"a file is not valid JSON ({err}); check the JSON files given"
    elif isinstance(err, OSError):
        msg = str(err)
        if err.filename and str(err.filename) not in msg:
            msg = f"{err.filename}: {err.strerror or msg}"
        elif err.filename and err.strerror and msg.startswith("["):  # "[Errno 2] No such file ...: 'x'"
            msg = f"{err.filename}: {err.strerror}"
        code = 1
    elif isinstance(err, (ValueError, TypeError, RuntimeError, FileFormatError)):
        code, msg = 1, str(err)
    else:
        code, msg = 1, f"unexpected {type(err).__name__}: {err} (rerun with --debug for the traceback)"
    return code, " ".join(msg.split())


# ---------------------------------------------------------------------------------- flags


def add_common_arguments(parser: argparse.ArgumentParser, out_default: str, *, tokenizer_default="char",
                         helps: dict | None = None) -> None:
    """DESIGN §3b flags shared by train, study and finetune (`helps`: help texts that differ, by dest)."""
    h = {
        "corpus": "UTF-8 text file to train on (default: the embedded Python language reference)",
        "tokenizer": "char: one id per character; word: words (see --word-split), unknown ones shown as \u2047; "
                     "bpe: byte-level BPE trained on the corpus; gpt2: GPT-2's BPE from --tokenizer-dir or "
                     "tiktoken's cache",
        "n_kv_head": "KV heads, a divisor of --n-head: 1 = MQA, --n-head = MHA (default: --n-head)",
        "threads": "torch CPU threads (default: torch's choice)",
        **(helps or {}),
    }
    parser.add_argument("--corpus", default=None, help=h["corpus"])
    parser.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default=tokenizer_default, help=h["tokenizer"])
    parser.add_argument("--vocab-size", type=int, default=None, help="bpe/word vocabulary size (default 2048 / 8192)")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="--tokenizer gpt2: a directory with vocab.bpe + encoder.json, or vocab.json + merges.txt, "
                             "or tiktoken's cache (default: tiktoken's cache); nothing is downloaded")
    parser.add_argument("--word-split", choices=("whitespace", "punct"), default="whitespace",
                        help="--tokenizer word: whitespace = runs of non-space characters, joined by one space on "
                             "decoding (the word-level tutorials' text.split()); punct = words, punctuation marks and "
                             "whitespace runs as separate tokens (round-trips exactly)")
    parser.add_argument("--n-kv-head", type=int, default=None, help=h["n_kv_head"])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto = cuda if available")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="attention backend of the model's ops")
    parser.add_argument("--out", default=out_default, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None, help=h["threads"])


def add_checkpoint_arguments(parser: argparse.ArgumentParser, n_kv_head_help: str) -> None:
    """Flags of the commands that start from a checkpoint (generate, finetune): its tokenizer and heads."""
    parser.add_argument("--tokenizer", choices=("saved", "gpt2"), default="saved",
                        help="the tokenizer saved with the checkpoint, or GPT-2's")
    parser.add_argument("--n-kv-head", type=int, default=None, help=n_kv_head_help)
    parser.add_argument("--n-head", type=int, default=None,
                        help="query heads of a bare weights file (a .pt/.bin/.safetensors state dict without "
                             "config.json), which does not say; GPT-2 sizes use n_embd // 64")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="with --tokenizer gpt2: a directory with vocab.bpe + encoder.json, vocab.json + "
                             "merges.txt, or tiktoken's cache (default: tiktoken's cache)")


def add_model_arguments(parser: argparse.ArgumentParser, *, n_layer=4, n_head=4, n_embd=128, block_size=128) -> None:
    parser.add_argument("--n-layer", type=int, default=n_layer, help="transformer blocks")
    parser.add_argument("--n-head", type=int, default=n_head, help="query heads")
    parser.add_argument("--n-embd", type=int, default=n_embd, help="model width, a multiple of --n-head")
    parser.add_argument("--block-size", type=int, default=block_size, help="context length in tokens")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout while training (off at evaluation)")


def add_optim_arguments(parser: argparse.ArgumentParser, *, max_steps=1000, lr=1e-3, batch_size=16,
                        eval_interval=100, warmup_steps=50) -> None:
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, default=None,
                       help=f"optimizer steps in all (with --resume: continue up to this many; default {max_steps})")
    steps.add_argument("--epochs", type=float, default=None,
                       help="train for this many passes over the training split instead of --max-steps (steps = "
                            "epochs * training sequences / --batch-size, rounded up)")
    parser.set_defaults(max_steps_default=max_steps)
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help="sequences per optimizer step: the global batch, over all processes and micro-batches")
    parser.add_argument("--grad-accum-steps", type=int, default=1,
                        help="micro-batches per process and step (each of --batch-size / (processes * this) "
                             "sequences); the step and its loss stay those of the whole batch")
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    parser.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: --lr / 10)")
    parser.add_argument("--warmup-steps", type=int, default=warmup_steps, help="linear warmup steps")
    parser.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine",
                        help="decay after warmup")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (2-D weights only)")
    parser.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1 (first-moment decay)")
    parser.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (second-moment decay)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    parser.add_argument("--eval-interval", type=int, default=eval_interval, help="evaluate every this many steps")
    parser.add_argument("--eval-iters", type=int, default=10, help="batches per split in one evaluation")
    parser.add_argument("--eval-full", action="store_true",
                        help="evaluate the val loss over the whole validation split (every non-overlapping "
                             "window, or every example) instead of --eval-iters sampled batches")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0,
                        help="write a checkpoint after this many minutes of training since the last (0 = off)")
    parser.add_argument("--checkpoint-interval", type=int, default=0,
                        help="also write a checkpoint every this many steps (0 = off)")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard weights, gradients and optimizer state over the processes (FSDP2 "
                             "fully_shard per transformer block) instead of replicating the model (DDP)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier run in --out instead of refusing")


def train_config_from_args(args, device: str, checkpoint_dir: str | None, desc: str, extra: dict) -> TrainConfig:
    return TrainConfig(
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum_steps=args.grad_accum_steps, lr=args.lr,
        min_lr=args.min_lr, warmup_steps=args.warmup_steps, schedule=args.schedule, weight_decay=args.weight_decay,
        beta1=args.beta1, beta2=args.beta2, grad_clip=args.grad_clip, eval_interval=args.eval_interval,
        eval_iters=args.eval_iters, eval_full=args.eval_full, seed=args.seed, device=device,
        checkpoint_dir=checkpoint_dir, checkpoint_interval=args.checkpoint_interval,
        checkpoint_minutes=args.checkpoint_minutes, progress=not args.no_progress, desc=desc, extra=extra,
    )


def check_resume_steps(resume: dict | None, ckpt: str, max_steps: int) -> None:
    """A checkpoint to resume must be short of --max-steps."""
    if resume is not None and resume["step"] >= max_steps:
        raise UserError("--max-steps", f"the checkpoint in {ckpt} is already at step {resume['step']}; "
                                       f"pass a larger --max-steps (or --epochs) to continue, got {max_steps}")


def set_max_steps(args, batches) -> int:
    """--max-steps from --epochs (the training split's size over the global batch), once the data is known."""
    if args.epochs is not None:
        args.max_steps = steps_for_epochs(args.epochs, batches.train_sequences, args.batch_size)
    return args.max_steps


# ------------------------------------------------------------------------------ argument checks


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_at_least(args, minimum, *names: str) -> None:
    """UserError naming the flag unless every `args.<name>` that is set is >= minimum."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise UserError(flag(name), f"expected a number >= {minimum}, got {value}")


def check_optim_args(args) -> None:
    """The optimizer flags, and the split of --batch-size over torchrun's processes and --grad-accum-steps.
    Without --epochs, --max-steps gets its default here."""
    check_at_least(args, 1, "max_steps", "batch_size", "grad_accum_steps", "eval_interval", "eval_iters", "threads")
    check_at_least(args, 0, "warmup_steps", "checkpoint_interval", "checkpoint_minutes", "weight_decay", "grad_clip",
                   "min_lr")
    if not args.lr > 0:
        raise UserError("--lr", f"expected a learning rate > 0, got {args.lr}")
    if args.epochs is not None and not args.epochs > 0:
        raise UserError("--epochs", f"expected a number of passes > 0, got {args.epochs}")
    if args.epochs is None and args.max_steps is None:
        args.max_steps = args.max_steps_default
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise UserError(flag(name), f"expected a value in [0, 1), got {getattr(args, name)}")
    world = launched_rank().world_size
    if args.fsdp and world < 2:
        raise UserError("--fsdp", f"expected a torchrun launch of 2 or more processes, got {world} process")
    if args.batch_size % (world * args.grad_accum_steps):
        raise UserError("--batch-size", f"expected a multiple of {world} process(es) * --grad-accum-steps "
                                        f"{args.grad_accum_steps} = {world * args.grad_accum_steps} (each process runs "
                                        f"an equal share of the global batch), got {args.batch_size}")


def check_heads(n_head: int, n_kv_head: int | None, n_embd: int | None = None) -> None:
    """Head counts the model can be built with, checked before any data is read."""
    if n_head is not None and n_head < 1:
        raise UserError("--n-head", f"expected a number >= 1, got {n_head}")
    if n_kv_head is not None:
        if n_kv_head < 1:
            raise UserError("--n-kv-head", f"expected a number >= 1 (1 = MQA, --n-head = MHA), got {n_kv_head}")
        if n_head is not None and n_head % n_kv_head:
            raise UserError("--n-kv-head", f"expected a divisor of --n-head {n_head}, got {n_kv_head}")
    if n_embd is not None and n_head is not None and n_embd % n_head:
        raise UserError("--n-embd", f"expected a multiple of --n-head {n_head}, got {n_embd}")


# ---------------------------------------------------------------------------------- --out policy

RUN_OUTPUTS = ("checkpoint", "checkpoint" + OLD_SUFFIX, "loss.png", "metrics.json")


def prepare_out(out: str, command: str, resume: bool, overwrite: bool) -> list[str]:
    """Check --out against --resume/--overwrite before any work; returns the paths to delete before training.

    A non-empty --out is refused unless --resume (continue the run in it) or --overwrite (replace
    that run's outputs; files this command did not write are never deleted).
    """
    if resume and overwrite:
        raise UserError("--overwrite", "cannot be combined with --resume (which continues the run in --out)")
    if not os.path.exists(out):
        return []
    if not os.path.isdir(out):
        raise UserError("--out", f"{out} is a file; expected a directory (new or empty)")
    entries = sorted(os.listdir(out))
    if resume or not entries:
        return stale_temporaries(out) if resume else []
    if not overwrite:
        shown = ", ".join(entries[:4]) + (" ..." if len(entries) > 4 else "")
        raise UserError("--out", f"{out} is not empty (holds {shown}); pass --resume to continue the run in it, "
                                 "--overwrite to replace it, or choose a new --out")
    foreign = [e for e in entries if e not in RUN_OUTPUTS and not e.startswith(TMP_PREFIX)]
    if foreign:
        raise UserError("--overwrite", f"{out} also holds files `{command}` does not write "
                                       f"({', '.join(foreign[:4])}); not deleting them: choose a new --out")
    return [os.path.join(out, e) for e in entries]


def remove_paths(paths: list[str]) -> None:
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.remove(p)


# ------------------------------------------------------------------------------- interruption

SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


@contextlib.contextmanager
def stop_on_signals(announce: bool = True):
    """While the block runs, SIGINT and SIGTERM set a flag instead of killing the process.

    Yields `received`, a list that holds the signals seen; `fit(stop=lambda: bool(received))`
    polls it after every step, writes a checkpoint and returns. A third signal raises
    KeyboardInterrupt at once (for a step or a write that hangs). Outside the main thread (where
    handlers cannot be installed) nothing changes. `announce=False` (torchrun's ranks other than 0)
    keeps the notice off the terminal.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        received.append(signum)
        if len(received) == 1 and announce:
            tqdm.write(f"[{signal.Signals(signum).name}: finishing this step and writing a checkpoint; a third "
                       "signal quits at once, keeping the last complete checkpoint]", file=sys.stderr)
        elif len(received) >= 3:
            raise KeyboardInterrupt  # checkpoints are atomic: the previous one stays whole

    old = {s: signal.signal(s, handler) for s in SIGNAL_EXIT}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_reason(received: list[int]) -> tuple[str, int]:
    """(what stopped the run, exit code): this process's signal, or one that another torchrun process received."""
    if received:
        return signal.Signals(received[0]).name, SIGNAL_EXIT[received[0]]
    return "a signal to another process of the job", SIGNAL_EXIT[signal.SIGTERM]


def resume_command(argv: list[str] | None, command: str) -> str:
    """The command line that continues an interrupted run: the same arguments, --resume, no --overwrite
    (under torchrun, a torchrun line with this node's process count)."""
    args = [a for a in (argv or []) if a not in ("--overwrite", "--resume")]
    if args and args[0] == command:
        args = args[1:]
    rank = launched_rank()
    if not rank.enabled:
        return shlex.join(["pytorch-mqa", command, *args, "--resume"])
    per_node = os.environ.get("LOCAL_WORLD_SIZE", str(rank.world_size))
    one_node = per_node == str(rank.world_size)
    line = shlex.join(["torchrun", *(["--standalone"] if one_node else []), "--nproc-per-node", per_node, "-m",
                       "pytorch_mqa", command, *args, "--resume"])
    return line if one_node else line + "  (on every node, with the same --nnodes and rendezvous options as before)"


# ------------------------------------------------------------------ the run of a training command


def launch_training(args, body):
    """Threads, device, torchrun's process group (if launched by it) and the backend of a training
    command, then `body(args, device, rank)`."""
    set_threads(args.threads)
    device = str(resolve_device(args.device))
    with process_group(device) as (rank, device), use_backend(args.backend):
        return body(args, device, rank)


def resume_state(args, ckpt: str, rank):
    """With --resume, the trainer state in `ckpt` (rank 0 first finishes a checkpoint swap that a
    crash interrupted; then every rank reads); else None."""
    if not args.resume:
        return None
    if rank.is_main:
        recover_directory(ckpt)
    barrier(rank)
    return load_trainer_state(ckpt)


def fit_until_done(model, data, cfg, args, rank, device, to_remove, *, tokenizer, resume, step_label=str):
    """Shard the model for --fsdp, remove --overwrite's old outputs (every input is checked by
    now), and train, with SIGINT/SIGTERM turned into a checkpoint and a clean stop.

    Returns (history, the signal's name or None, the exit code a stop should give)."""
    if args.fsdp:
        shard_model(model, rank, device)  # from the CPU, a block at a time
    if rank.is_main:
        remove_paths(to_remove)

    def on_eval(step, losses):
        tqdm.write(f"step {step_label(step)}: train {losses['train']:.4f}  val {losses['val']:.4f}  "
                   f"val ppl {math.exp(losses['val']):.2f}")

    with stop_on_signals(announce=rank.is_main) as received:
        history = fit(model, data, cfg, tokenizer=tokenizer, resume=resume, stop=lambda: bool(received),
                      on_eval=on_eval)
    reason, code = stop_reason(received)
    return history, reason, code


def print_stopped(args, command: str, history: dict, reason, ckpt: str) -> None:
    print(f"stopped by {reason} at step {history['stopped_at']} of {args.max_steps}; checkpoint written to "
          f"{ckpt}/\nresume with: {resume_command(getattr(args, 'argv', None), command)}", flush=True)
