"""Training loop, evaluation and checkpoints, shared by `train`, `study` and `finetune`.

`fit(model, batches, config)` runs AdamW (weight decay on 2-D weights only), linear warmup then
cosine or linear decay, gradient clipping, periodic train/val loss averaged over several batches,
and checkpoints (`save_pretrained` + optimizer/step/RNG state + tokenizer) that `--resume`
continues exactly. `batches` is anything with `sample(split, generator, device) -> (x, y)`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F

from pytorch_mqa.data import IGNORE_INDEX, get_lm_batch, load_corpus, split_train_val

TRAINER_STATE = "trainer_state.pt"
EVAL_SEED = 1_000_003  # evaluation batches come from their own generator: the same for every run and step


class Batches(Protocol):
    def sample(self, split: str, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]: ...


class LMBatches:
    """Random windows of a token stream, split deterministically into train and val."""

    def __init__(self, ids, batch_size: int, block_size: int, val_fraction: float = 0.1):
        self.train, self.val = split_train_val(ids, val_fraction)
        self.batch_size, self.block_size = batch_size, block_size

    def sample(self, split, generator, device):
        return get_lm_batch(self.train if split == "train" else self.val, self.batch_size, self.block_size, generator, device)


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 16  # only recorded here; the Batches object draws batches of its own size
    lr: float = 1e-3  # peak learning rate
    min_lr: Optional[float] = None  # final learning rate (default lr / 10)
    warmup_steps: int = 50  # linear warmup from lr / warmup_steps
    schedule: str = "cosine"  # decay after warmup: "cosine", "linear" or "constant"
    weight_decay: float = 0.1  # AdamW decay, applied to 2-D weights (matmuls, embeddings) only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0 disables)
    eval_interval: int = 100  # evaluate every this many steps (and at the end)
    eval_iters: int = 10  # batches per split averaged in one evaluation
    seed: int = 0  # seeds the training batch generator
    device: str = "cpu"
    checkpoint_dir: Optional[str] = None  # where checkpoints go (None: no checkpoints)
    checkpoint_interval: int = 0  # also checkpoint every this many steps (0: only at the end)
    progress: bool = True  # tqdm progress bar
    desc: str = "train"  # progress bar label
    extra: dict = field(default_factory=dict)  # recorded in the checkpoint (model/tokenizer settings)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): warmup, then cosine/linear decay to min_lr."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return cfg.lr + (min_lr - cfg.lr) * progress
    if cfg.schedule == "cosine":
        return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule: expected 'cosine', 'linear' or 'constant', got {cfg.schedule!r}")


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of 2 or more dims only (not biases or LayerNorms)."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _autocast(device: torch.device):
    # bf16 autocast on CUDA; CPU trains in float32.
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


def lm_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over targets != IGNORE_INDEX (prompt and padding masked).

    A batch with no target left (every token masked) gives 0, not NaN.
    """
    logits = model(x)
    total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / (y != IGNORE_INDEX).sum().clamp(min=1)


@torch.no_grad()
def evaluate(model, batches: Batches, cfg: TrainConfig, splits=("train", "val")) -> dict[str, float]:
    """Mean loss over `cfg.eval_iters` batches per split; the same batches at every evaluation."""
    device = torch.device(cfg.device)
    was_training = model.training
    model.eval()
    out = {}
    for split in splits:
        gen = torch.Generator().manual_seed(EVAL_SEED)
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = batches.sample(split, gen, device)
            with _autocast(device):
                losses.append(lm_loss(model, x, y).item())
        out[split] = sum(losses) / len(losses)
    model.train(was_training)
    return out


def save_checkpoint(directory: str, model, optimizer, step: int, history: dict, generator: torch.Generator,
                    cfg: TrainConfig, tokenizer=None) -> None:
    """Model via `save_pretrained`, plus what `--resume` needs to continue exactly."""
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save(directory)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": history,
        "config": asdict(cfg),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    tmp = os.path.join(directory, TRAINER_STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(directory, TRAINER_STATE))


def load_trainer_state(directory: str) -> dict:
    path = os.path.join(directory, TRAINER_STATE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume: expected a checkpoint with {TRAINER_STATE} in {directory!r}, found none")
    return torch.load(path, map_location="cpu", weights_only=True)


def fit(model, batches: Batches, cfg: TrainConfig, *, tokenizer=None, resume: Optional[dict] = None,
        on_eval: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Train `model` in place for `cfg.max_steps` steps; returns the history.

    history: "step"/"loss"/"lr" per optimizer step, and "eval" entries {"step", "train", "val"}.
    `resume` is a trainer state from `load_trainer_state` (the model must already hold its weights).
    """
    device = torch.device(cfg.device)
    model.to(device).train()
    optimizer = configure_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    history = {"step": [], "loss": [], "lr": [], "eval": [], "seconds": 0.0}
    start = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        if "cuda_rng" in resume and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume["cuda_rng"])
        history, start = resume["history"], int(resume["step"])

    def checkpoint(step):
        if cfg.checkpoint_dir:
            save_checkpoint(cfg.checkpoint_dir, model, optimizer, step, history, generator, cfg, tokenizer)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, desc=cfg.desc, disable=not cfg.progress, leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in range(start, cfg.max_steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batches.sample("train", generator, device)
        with _autocast(device):
            loss = lm_loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        done = step + 1
        history["step"].append(done)
        history["loss"].append(loss.item())
        history["lr"].append(lr)
        bar.update(1)
        if done % cfg.eval_interval == 0 or done == cfg.max_steps:
            losses = evaluate(model, batches, cfg)
            history["eval"].append({"step": done, **losses})
            bar.set_postfix(train=f"{losses['train']:.3f}", val=f"{losses['val']:.3f}")
            if on_eval is not None:
                on_eval(done, losses)
        if done == cfg.max_steps or (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0):
            history["seconds"] += time.perf_counter() - t0  # training time, checkpoint writing excluded
            checkpoint(done)
            t0 = time.perf_counter()
    bar.close()
    history["seconds"] += time.perf_counter() - t0
    return history


def plot_loss_curves(curves: dict[str, dict], path: str, title: str = "loss") -> None:
    """PNG of per-step training loss (thin) and evaluated val loss (markers), one colour per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, h) in enumerate(curves.items()):
        color = f"C{i % 10}"
        ax.plot(h["step"], h["loss"], color=color, alpha=0.35, linewidth=0.8)
        if h["eval"]:
            steps = [e["step"] for e in h["eval"]]
            ax.plot(steps, [e["val"] for e in h["eval"]], "o-", color=color, label=f"{label} val", markersize=3)
            ax.plot(steps, [e["train"] for e in h["eval"]], "--", color=color, label=f"{label} train", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------- the CLI


def pick_device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device: {name!r} was asked for but CUDA is not available (torch.cuda.is_available() is False)")
    return name


def apply_backend(name: str | None) -> None:
    """`--backend`: force the attention backend the model's ops use (via PYTORCH_MQA_BACKEND)."""
    if name and name != "auto":
        from pytorch_mqa.backends import BACKENDS, ENV_VAR

        if name not in BACKENDS:
            raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {name!r}")
        os.environ[ENV_VAR] = name


def add_common_arguments(parser: argparse.ArgumentParser, out_default: str) -> None:
    """DESIGN §3b flags shared by train, study and finetune."""
    parser.add_argument("--corpus", default=None, help="UTF-8 text file (default: the embedded Python reference text)")
    parser.add_argument("--tokenizer", choices=("char", "word", "bpe", "gpt2"), default="char")
    parser.add_argument("--vocab-size", type=int, default=None, help="bpe/word vocabulary size (default 2048 / 8192)")
    parser.add_argument("--n-kv-head", type=int, default=None, help="KV heads: 1 = MQA, n_head = MHA (default)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cuda"))
    parser.add_argument("--out", default=out_default, help=f"output directory (default {out_default})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def apply_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "runs/train")
    add_model_arguments(parser)
    add_optim_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")


def summarize(history: dict) -> dict:
    last = history["eval"][-1] if history["eval"] else {}
    out = {"steps": history["step"][-1] if history["step"] else 0, "seconds": round(history["seconds"], 2)}
    if last:
        out.update(train_loss=last["train"], val_loss=last["val"], val_perplexity=math.exp(last["val"]))
    return out


def run(args: argparse.Namespace) -> int:
    from pytorch_mqa.model import GPT, GPTConfig
    from pytorch_mqa.tokenizers import get_tokenizer, load_tokenizer

    apply_backend(args.backend)
    apply_threads(args.threads)
    device = pick_device(args.device)
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
