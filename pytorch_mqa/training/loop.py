"""Training loop, evaluation and trainer checkpoints, shared by `train`, `study` and `finetune`.

`fit(model, batches, config)` runs AdamW (weight decay on 2-D weights only), linear warmup then
cosine or linear decay, gradient clipping, periodic train/val loss averaged over several batches,
and checkpoints (`save_pretrained` + optimizer/step/RNG state + tokenizer) that `--resume`
continues exactly. `batches` is anything with `sample(split, generator, device) -> (x, y)`.

Checkpoints are written every `checkpoint_minutes` of training, every `checkpoint_interval`
steps, at the end, and when `stop()` turns true (the CLI's SIGINT/SIGTERM handler), each one
atomically (files.atomic_directory): a crash mid-write leaves the previous checkpoint intact.

One optimizer step takes the global batch `batches.sample` draws, in `grad_accum_steps`
micro-batches per process. Inside a torch.distributed process group (torchrun) the model trains
in DistributedDataParallel: every rank draws the same global batch and runs its own rows of it
(distributed.shard), the loss is the token mean over the whole global batch, and only rank 0
logs, shows progress and writes checkpoints, which hold the unwrapped model and load in a single
process. The ranks agree after every step on the logged loss and on stopping, so they all stop
at the same step. A model sharded with FSDP2's `fully_shard` (distributed.shard_model, `--fsdp`)
trains the same way; its checkpoints gather the whole weights and optimizer state first.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional, Protocol

import torch

from pytorch_mqa.core.plotting import new_figure, save_figure
from pytorch_mqa.model.loss import IGNORE_INDEX, next_token_loss
from pytorch_mqa.training.data import check_split_lengths, eot_cu_seqlens, get_lm_batch, split_train_val
from pytorch_mqa.training.distributed import (Rank, Unsharded, all_reduce_sum, barrier, check_divisible, current_rank,
                                              full_optimizer_state, full_tensors, gather_objects, gradient_sync,
                                              is_sharded, load_sharded_optimizer_state, shard, wrap)
from pytorch_mqa.training.files import FileFormatError, atomic_directory, check_torch_file, recover_directory, require_file

TRAINER_STATE = "trainer_state.pt"
EVAL_SEED = 1_000_003  # evaluation batches come from their own generator: the same for every run and step


class Batches(Protocol):
    def sample(self, split: str, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]: ...

    # Optional, for evaluate(full=True) and --epochs:
    #   full_batches(split, batch_size) -> iterable of (x, y) covering the split once, in order;
    #   train_sequences -> sequences in one pass over the training split.


class LMBatches:
    """Random windows of a token stream, split deterministically into train and val."""

    def __init__(self, ids, batch_size: int, block_size: int, val_fraction: float = 0.1, source: str = "corpus"):
        self.train, self.val = split_train_val(ids, val_fraction)
        check_split_lengths(len(self.train), len(self.val), block_size, val_fraction, source)
        self.batch_size, self.block_size = batch_size, block_size

    def sample(self, split, generator, device):
        return get_lm_batch(self.train if split == "train" else self.val, self.batch_size, self.block_size, generator, device)

    @property
    def train_sequences(self) -> int:
        """Non-overlapping windows of block_size tokens (plus the next one) in the training split."""
        return (len(self.train) - 1) // self.block_size

    def full_batches(self, split: str, batch_size: int):
        """Every non-overlapping window of `split` in order, `batch_size` windows at a time (on the CPU)."""
        data = self.train if split == "train" else self.val
        T = self.block_size
        starts = torch.arange((len(data) - 1) // T) * T
        offsets = torch.arange(T + 1)
        for chunk in starts.split(batch_size):
            windows = data[chunk[:, None] + offsets]
            yield windows[:, :-1], windows[:, 1:]


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 16  # the global batch (all processes): recorded, and evaluate(full=True) runs batch_size /
    # (processes * grad_accum_steps) windows a forward; fit trains on what the Batches object draws
    grad_accum_steps: int = 1  # micro-batches per process and optimizer step (the global batch is split evenly)
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
    eval_full: bool = False  # evaluate val on every non-overlapping window of the split (train stays sampled)
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
    # Packed, padding-free batches: the documents of the token stream end with this token id; each
    # micro-batch's windows are run as one packed row (training/data.eot_cu_seqlens), attention stays
    # inside each document and positions restart in it (a GPT's forward with cu_seqlens). None: off.
    pack_eot_id: Optional[int] = None


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


def lm_loss(model, x: torch.Tensor, y: torch.Tensor, pack_eot_id: Optional[int] = None) -> torch.Tensor:
    """Mean next-token cross-entropy of model(x) against y over targets != IGNORE_INDEX (prompt
    and padding masked); a batch with no target left gives 0, not NaN. With `pack_eot_id`, the
    rows of x are one packed row of documents that end with that token (TrainConfig.pack_eot_id)."""
    if pack_eot_id is None:
        return next_token_loss(model(x), y)
    cu_seqlens, max_seqlen = eot_cu_seqlens(x, pack_eot_id)
    return next_token_loss(model(x.reshape(1, -1), cu_seqlens=cu_seqlens, max_seqlen=max_seqlen), y.reshape(1, -1))


def steps_for_epochs(epochs: float, train_sequences: int, batch_size: int) -> int:
    """Optimizer steps in which `epochs` passes over `train_sequences` sequences are drawn, `batch_size`
    (the global batch) a step; at least one."""
    if not epochs > 0:
        raise ValueError(f"epochs: expected a number > 0, got {epochs}")
    return max(1, math.ceil(epochs * train_sequences / batch_size))


def _parts(x: torch.Tensor, y: torch.Tensor, rank: Rank, accum: int):
    """This rank's share of an evaluation batch in up to `accum` pieces (any batch size; empty pieces dropped)."""
    mine = x.tensor_split(rank.world_size)[rank.rank], y.tensor_split(rank.world_size)[rank.rank]
    return [(a, b) for a, b in zip(mine[0].tensor_split(accum), mine[1].tensor_split(accum)) if len(a)]


def _sum_and_count(model, x, y, device, pack_eot_id=None) -> tuple[float, int]:
    """Summed next-token loss and the number of targets that count, for one batch."""
    n = int((y != IGNORE_INDEX).sum())
    with _autocast(device):
        mean = lm_loss(model, x.to(device), y.to(device), pack_eot_id).item()
    return mean * n, n


@torch.no_grad()
def evaluate(model, batches: Batches, cfg: TrainConfig, splits=("train", "val"), full: bool = False) -> dict[str, float]:
    """Mean loss per split: over `cfg.eval_iters` sampled batches (the same batches at every
    evaluation), or with `full=True` over every sequence of the split that `batches.full_batches`
    gives (for LMBatches: every non-overlapping window), weighted by target tokens.

    Inside a process group each rank evaluates its share and the sums are reduced: every rank
    returns what one process evaluating everything would.
    """
    device = torch.device(cfg.device)
    rank, accum = current_rank(), max(1, cfg.grad_accum_steps)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # no gradients: the wrapper is not needed
    was_training = model.training
    model.eval()
    out = {}
    for split in splits:
        if full:
            if not hasattr(batches, "full_batches"):
                raise TypeError(f"batches: expected an object with full_batches(split, batch_size) for full=True, "
                                f"got {type(batches).__name__}")
            size = max(1, cfg.batch_size // (rank.world_size * accum))
            chunks = list(batches.full_batches(split, size))
            total = [0.0, 0.0]
            # Round-robin over the ranks; under FSDP every rank must run as many forwards as the others,
            # so a rank past the end repeats a chunk and discards it.
            for i in range(rank.rank, -(-len(chunks) // rank.world_size) * rank.world_size, rank.world_size):
                if i >= len(chunks) and not is_sharded(model):
                    break
                s, n = _sum_and_count(model, *chunks[min(i, len(chunks) - 1)], device, cfg.pack_eot_id)
                if i < len(chunks):
                    total[0] += s
                    total[1] += n
            total = all_reduce_sum(total, device, rank)
            out[split] = total[0] / max(total[1], 1)
            continue
        gen = torch.Generator().manual_seed(EVAL_SEED)
        sums = []  # per batch: summed loss, target count
        for _ in range(cfg.eval_iters):
            x, y = batches.sample(split, gen, "cpu")
            parts = [_sum_and_count(model, xp, yp, device, cfg.pack_eot_id) for xp, yp in _parts(x, y, rank, accum)]
            sums += [sum(p[0] for p in parts), sum(p[1] for p in parts)]
        sums = all_reduce_sum(sums, device, rank)
        means = [sums[i] / max(sums[i + 1], 1) for i in range(0, len(sums), 2)]
        out[split] = sum(means) / len(means)
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
                    cfg: TrainConfig, tokenizer=None, rng_by_rank: Optional[list] = None) -> None:
    """Model via `save_pretrained`, plus what `--resume` needs to continue exactly, written atomically:
    into a temporary directory beside `directory` that replaces it once every file is on disk.

    `rng_by_rank`: each rank's {"torch", "cuda"} RNG states, for a run of several processes.
    `optimizer` may be its state_dict already (gathered whole from an FSDP run)."""
    with atomic_directory(directory) as tmp:
        _write_checkpoint(tmp, model, optimizer, step, history, generator, cfg, tokenizer, rng_by_rank)


def _write_checkpoint(directory, model, optimizer, step, history, generator, cfg, tokenizer, rng_by_rank) -> None:
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save(directory)
    state = {
        "step": step,
        "optimizer": optimizer if isinstance(optimizer, dict) else optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": history,
        "config": asdict(cfg),
        "world_size": len(rng_by_rank) if rng_by_rank else 1,
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if rng_by_rank:
        state["rng_by_rank"] = rng_by_rank
    torch.save(state, os.path.join(directory, TRAINER_STATE))


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(resume: dict, rank: Rank, device: torch.device, seed: int) -> None:
    """RNG states of a checkpoint: each rank its own when the world size is the checkpoint's; otherwise
    rank 0 takes the saved one and the others are seeded afresh (dropout masks differ per rank)."""
    by_rank = resume.get("rng_by_rank")
    if by_rank and len(by_rank) == rank.world_size:
        torch.set_rng_state(by_rank[rank.rank]["torch"])
        if "cuda" in by_rank[rank.rank] and device.type == "cuda":
            torch.cuda.set_rng_state(by_rank[rank.rank]["cuda"], device)
        return
    if rank.rank > 0:
        torch.manual_seed(_rank_seed(seed, rank))
        return
    torch.set_rng_state(resume["torch_rng"])
    if "cuda_rng" in resume and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(resume["cuda_rng"])


def _rank_seed(seed: int, rank: Rank) -> int:
    return seed * 1_000_003 + rank.rank


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
    `stop()` is polled after every step: when true (on any rank), a checkpoint is written (if
    `checkpoint_dir`) and fit returns early with history["stopped_at"] = the last completed step.
    Inside a process group every rank calls fit alike; `on_eval` runs on rank 0 only.
    """
    if resume is not None:
        cfg = resumed_config(cfg, resume)
    rank, accum = current_rank(), cfg.grad_accum_steps
    if accum < 1:
        raise ValueError(f"grad_accum_steps: expected a number >= 1, got {accum}")
    check_divisible(getattr(batches, "batch_size", rank.world_size * accum), rank, accum)
    device = torch.device(cfg.device)
    model.to(device).train()
    train_model = wrap(model, device, rank)
    optimizer = configure_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)  # the same on every rank: they draw the same global batch
    history = {"step": [], "loss": [], "lr": [], "eval": [], "seconds": 0.0}
    start = 0
    sharded = is_sharded(model)
    if resume is not None:
        if sharded:
            load_sharded_optimizer_state(optimizer, resume["optimizer"])
        else:
            optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        _restore_rng(resume, rank, device, cfg.seed)
        history, start = resume["history"], int(resume["step"])
    elif rank.rank > 0:
        torch.manual_seed(_rank_seed(cfg.seed, rank))  # dropout: masks of their own

    def checkpoint(step):
        if not cfg.checkpoint_dir:
            return
        rng = gather_objects(_rng_state(device), rank) if rank.enabled else None
        # FSDP: the whole weights and optimizer state are gathered, so the checkpoint is a single-process one.
        saved, opt = ((Unsharded(model, full_tensors(model.state_dict(), rank.is_main)),
                       full_optimizer_state(optimizer, rank.is_main)) if sharded else (model, optimizer))
        if rank.is_main:
            save_checkpoint(cfg.checkpoint_dir, saved, opt, step, history, generator, cfg, tokenizer, rng)
        barrier(rank)

    def evaluation():
        if not cfg.eval_full:
            return evaluate(model, batches, cfg)
        return {**evaluate(model, batches, cfg, splits=("train",)),
                **evaluate(model, batches, cfg, splits=("val",), full=True)}

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, desc=cfg.desc, disable=not (cfg.progress and rank.is_main),
               leave=False, dynamic_ncols=True)
    t0 = last_checkpoint = time.perf_counter()
    history.pop("stopped_at", None)
    for step in range(start, cfg.max_steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batches.sample("train", generator, "cpu")  # the global batch
        n_global = max(int((y != IGNORE_INDEX).sum()), 1)
        parts = shard(x, y, rank, accum)
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i, (xi, yi) in enumerate(parts):
            n = int((yi != IGNORE_INDEX).sum())
            with gradient_sync(train_model, rank, sync=i == len(parts) - 1):
                with _autocast(device):
                    loss = lm_loss(train_model, xi.to(device), yi.to(device), cfg.pack_eot_id)
                # Weighted so the gradients (DDP averages over ranks) are those of the token mean over the
                # global batch: exactly `loss` for one process and one micro-batch.
                (loss * (n * rank.world_size / n_global)).backward()
            total += loss.detach().double() * n
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        done = step + 1
        stopping = stop is not None and stop()
        due = bool(cfg.checkpoint_minutes) and time.perf_counter() - last_checkpoint >= 60 * cfg.checkpoint_minutes
        summed, stopping, due = all_reduce_sum([total.item(), float(stopping), float(due)], device, rank)
        stopping, due = stopping > 0, due > 0  # any rank's signal or clock stops / checkpoints them all
        history["step"].append(done)
        history["loss"].append(summed / n_global)
        history["lr"].append(lr)
        bar.update(1)
        if done % cfg.eval_interval == 0 or done == cfg.max_steps:
            losses = evaluation()
            history["eval"].append({"step": done, **losses})
            bar.set_postfix(train=f"{losses['train']:.3f}", val=f"{losses['val']:.3f}")
            if on_eval is not None and rank.is_main:
                on_eval(done, losses)
        if stopping:
            history["stopped_at"] = done
        if done == cfg.max_steps or stopping or (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0) or due:
            history["seconds"] += time.perf_counter() - t0  # training time, checkpoint writing excluded
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
