"""Training loop, evaluation and trainer checkpoints, shared by `train`, `study` and `finetune`.

`fit(model, batches, config)` runs AdamW (weight decay on 2-D weights only), linear warmup then
cosine or linear decay, gradient clipping, periodic train/val loss averaged over several batches,
and checkpoints (`save_pretrained` + optimizer/step/RNG state + tokenizer) that `--resume`
continues exactly. `batches` is anything with `sample(split, generator, device) -> (x, y)`.

Checkpoints are written every `checkpoint_minutes` of training, every `checkpoint_interval`
steps, at the end, and when `stop()` turns true (the CLI's SIGINT/SIGTERM handler), each one
atomically (files.atomic_directory): a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional, Protocol

import torch

from pytorch_mqa.core.plotting import new_figure, save_figure
from pytorch_mqa.model.loss import next_token_loss
from pytorch_mqa.training.data import check_split_lengths, get_lm_batch, split_train_val
from pytorch_mqa.training.files import FileFormatError, atomic_directory, check_torch_file, recover_directory, require_file

TRAINER_STATE = "trainer_state.pt"
EVAL_SEED = 1_000_003  # evaluation batches come from their own generator: the same for every run and step


class Batches(Protocol):
    def sample(self, split: str, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]: ...


class LMBatches:
    """Random windows of a token stream, split deterministically into train and val."""

    def __init__(self, ids, batch_size: int, block_size: int, val_fraction: float = 0.1, source: str = "corpus"):
        self.train, self.val = split_train_val(ids, val_fraction)
        check_split_lengths(len(self.train), len(self.val), block_size, val_fraction, source)
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
    checkpoint_interval: int = 0  # also checkpoint every this many steps (0: off)
    checkpoint_minutes: float = 5.0  # also checkpoint after this many minutes since the last one (0: off)
    progress: bool = True  # tqdm progress bar
    desc: str = "train"  # progress bar label
    extra: dict = field(default_factory=dict)  # recorded in the checkpoint (model/tokenizer settings)
    # Set by `fit` when a resumed run's max_steps differs from the checkpoint's: from this step on, the
    # decay continues from the learning rate the run had reached, so the schedule never jumps.
    decay_from_step: Optional[int] = None
    decay_from_lr: Optional[float] = None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): warmup, then cosine/linear decay to min_lr."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    start, peak = cfg.warmup_steps, cfg.lr
    if cfg.decay_from_step is not None and step >= cfg.decay_from_step:
        start, peak = cfg.decay_from_step, cfg.decay_from_lr
    span = max(1, cfg.max_steps - start)
    progress = min(1.0, (step - start) / span)
    if cfg.schedule == "linear":
        return peak + (min_lr - peak) * progress
    if cfg.schedule == "cosine":
        return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))
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
    """Mean next-token cross-entropy of model(x) against y over targets != IGNORE_INDEX (prompt
    and padding masked); a batch with no target left gives 0, not NaN."""
    return next_token_loss(model(x), y)


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


def resumed_config(cfg: TrainConfig, state: dict) -> TrainConfig:
    """`cfg` for continuing from trainer `state`: the same schedule when max_steps is unchanged;
    when it changed, the decay goes on from the learning rate reached, down to min_lr at the new end."""
    saved = state.get("config", {})
    step = int(state["step"])
    if step >= cfg.max_steps:
        raise ValueError(f"max_steps: expected more than the checkpoint's {step} steps to continue, got {cfg.max_steps}")
    old_max = saved.get("max_steps", cfg.max_steps)
    if old_max == cfg.max_steps:
        fields = {k: saved.get(k) for k in ("decay_from_step", "decay_from_lr")}
        return replace(cfg, **fields) if fields["decay_from_step"] is not None else cfg
    if step < cfg.warmup_steps:
        return cfg  # still warming up: warmup does not depend on max_steps
    known = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}
    old = replace(cfg, **known) if known else replace(cfg, max_steps=old_max)
    return replace(cfg, decay_from_step=step, decay_from_lr=lr_at(step, old))


def save_checkpoint(directory: str, model, optimizer, step: int, history: dict, generator: torch.Generator,
                    cfg: TrainConfig, tokenizer=None) -> None:
    """Model via `save_pretrained`, plus what `--resume` needs to continue exactly, written atomically:
    into a temporary directory beside `directory` that replaces it once every file is on disk."""
    with atomic_directory(directory) as tmp:
        _write_checkpoint(tmp, model, optimizer, step, history, generator, cfg, tokenizer)


def _write_checkpoint(directory, model, optimizer, step, history, generator, cfg, tokenizer) -> None:
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
    torch.save(state, os.path.join(directory, TRAINER_STATE))


STATE_EXPECTED = f"a {TRAINER_STATE} written by pytorch-mqa train/finetune (torch.save of the trainer state)"


def load_trainer_state(directory: str) -> dict:
    """The trainer state of a checkpoint directory, checked to be one (a swap a crash interrupted is finished first)."""
    recover_directory(directory)
    path = os.path.join(directory, TRAINER_STATE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no trainer state to resume from (no checkpoint has been written to "
                                f"{directory} yet); start without --resume")
    require_file(path, "trainer state")
    check_torch_file(path, STATE_EXPECTED)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors of a damaged file
        raise FileFormatError(path, f"could not be read ({type(e).__name__}: {e})", STATE_EXPECTED) from e
    missing = [k for k in ("step", "optimizer", "generator", "torch_rng", "history") if not isinstance(state, dict)
               or k not in state]
    if missing:
        raise FileFormatError(path, f"not a trainer state (missing {missing})", STATE_EXPECTED)
    return state


def fit(model, batches: Batches, cfg: TrainConfig, *, tokenizer=None, resume: Optional[dict] = None,
        on_eval: Optional[Callable[[int, dict], None]] = None, stop: Optional[Callable[[], bool]] = None) -> dict:
    """Train `model` in place for `cfg.max_steps` steps; returns the history.

    history: "step"/"loss"/"lr" per optimizer step, and "eval" entries {"step", "train", "val"}.
    `resume` is a trainer state from `load_trainer_state` (the model must already hold its weights);
    a larger max_steps than the checkpoint's continues its schedule (see resumed_config).
    `stop()` is polled after every step: when true, a checkpoint is written (if `checkpoint_dir`)
    and fit returns early with history["stopped_at"] = the last completed step.
    """
    if resume is not None:
        cfg = resumed_config(cfg, resume)
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
    t0 = last_checkpoint = time.perf_counter()
    history.pop("stopped_at", None)
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
        stopping = stop is not None and stop()
        if stopping:
            history["stopped_at"] = done
        now = time.perf_counter()
        if (done == cfg.max_steps or stopping or (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0)
                or (cfg.checkpoint_minutes and now - last_checkpoint >= 60 * cfg.checkpoint_minutes)):
            history["seconds"] += now - t0  # training time, checkpoint writing excluded
            checkpoint(done)
            t0 = last_checkpoint = time.perf_counter()
        if stopping:
            break
    bar.close()
    history["seconds"] += time.perf_counter() - t0
    return history


def plot_loss_curves(curves: dict[str, dict], path: str, title: str = "loss") -> str:
    """PNG of per-step training loss (thin) and evaluated val loss (markers), one colour per label."""
    fig, ax = new_figure(figsize=(7, 4.5))
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
    if ax.get_legend_handles_labels()[0]:  # no evaluation yet (an early interruption): no legend
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def summarize(history: dict) -> dict:
    last = history["eval"][-1] if history["eval"] else {}
    out = {"steps": history["step"][-1] if history["step"] else 0, "seconds": round(history["seconds"], 2)}
    if last:
        out.update(train_loss=last["train"], val_loss=last["val"], val_perplexity=math.exp(last["val"]))
    return out
