"""Data-parallel training with torch.distributed: the process group torchrun describes, and the
few collectives `fit` needs.

Under `torchrun --nproc-per-node N` each process is one rank. `process_group(device)` joins the
group (NCCL for CUDA devices, gloo for CPU) and gives each rank its device (`cuda` becomes
`cuda:LOCAL_RANK`). Every rank draws the whole global batch from the same seeded generator and
keeps its own rows (`shard`), so the batches, the generator state and the checkpoints are those
of a single-process run of the same global batch. Outside torchrun (or with one process)
everything here is a no-op on one rank.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pytorch_mqa.model.checkpoints import save_pretrained


@dataclass(frozen=True)
class Rank:
    """Where this process stands in the job: rank `rank` of `world_size` (`local_rank` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, shows progress and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = Rank()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer (as torchrun sets it), got {value!r}") from None


def launched_rank() -> Rank:
    """This process's place as torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) describes it."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK/WORLD_SIZE: expected 0 <= RANK < WORLD_SIZE, got RANK={rank} WORLD_SIZE={world}")
    return Rank(rank, world, local)


def current_rank() -> Rank:
    """This process's place in the initialised default process group (SINGLE when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Rank(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))


def rank_device(device: str, rank: Rank) -> str:
    """The device of `rank`: `cuda` -> `cuda:LOCAL_RANK` when several processes run; cpu stays cpu."""
    dev = torch.device(device)
    if not rank.enabled or dev.type == "cpu":
        return str(dev)
    if dev.type != "cuda":
        raise ValueError(f"device: expected cpu or cuda under torchrun, got {device!r}")
    if dev.index is not None:
        raise ValueError(f"device: expected cuda (each of the {rank.world_size} processes takes cuda:LOCAL_RANK) "
                         f"under torchrun, got {device!r}")
    if rank.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK: expected fewer processes per node than its {torch.cuda.device_count()} CUDA "
                         f"devices, got LOCAL_RANK={rank.local_rank}")
    return f"cuda:{rank.local_rank}"


@contextlib.contextmanager
def process_group(device: str):
    """Yield (rank, device of this rank); under torchrun with several processes, inside the default
    process group (NCCL on CUDA, gloo on CPU), left again at the end.

    An existing process group (a script that initialised its own) is used as it is and left open.
    """
    if dist.is_available() and dist.is_initialized():
        rank = current_rank()
        dev = rank_device(device, rank)
        if dev.startswith("cuda"):
            torch.cuda.set_device(dev)
        yield rank, dev
        return
    rank = launched_rank()
    if not rank.enabled:
        yield SINGLE, device
        return
    if not dist.is_available():
        raise RuntimeError("torch.distributed: expected a torch build with distributed support under torchrun, "
                           "got one without")
    dev = rank_device(device, rank)
    if dev.startswith("cuda"):
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=torch.device(dev))
    else:
        dist.init_process_group("gloo")
    ok = False
    try:
        yield rank, dev
        ok = True
    finally:
        if ok:
            dist.barrier()  # the others wait while rank 0 writes its last outputs
        dist.destroy_process_group()


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: list[float], device: torch.device, rank: Rank) -> list[float]:
    """Elementwise sum of `values` over the ranks (float64), one collective; `values` itself on one rank."""
    if not rank.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(t)
    return t.tolist()


def barrier(rank: Rank) -> None:
    if rank.enabled:
        dist.barrier()


def gather_objects(obj, rank: Rank) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] on one)."""
    if not rank.enabled:
        return [obj]
    out = [None] * rank.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap(model: torch.nn.Module, device: torch.device, rank: Rank) -> torch.nn.Module:
    """`model` in DistributedDataParallel when several ranks train (rank 0's weights are broadcast);
    the model itself on one, or when it is already sharded with FSDP's `fully_shard` (which
    reduces the gradients itself). Checkpoints save the unwrapped model."""
    if not rank.enabled or is_sharded(model):
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


# torch.distributed.fsdp and torch.distributed.tensor take about a second to import (measured on a 2-core
# CPU: 1.1 of the CLI's 4.3 s), so only FSDP runs import them, inside the functions below.


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` was wrapped with torch.distributed.fsdp.fully_shard (FSDP2)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can have been sharded
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def shard_model(model: torch.nn.Module, rank: Rank, device: str) -> torch.nn.Module:
    """FSDP2 for a GPT: each transformer block, then the rest (embeddings, final norm), sharded over
    the ranks; every rank holds 1/world_size of the weights, gradients and optimizer state.

    A model on the CPU is moved to the process group's device one block at a time as it is sharded,
    so a model too large for one GPU can be built (or loaded) on the CPU and sharded from there."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not rank.enabled:
        raise ValueError(f"fsdp: expected a process group of 2 or more processes (torchrun), got {rank.world_size}")
    mesh = init_device_mesh(torch.device(device).type, (rank.world_size,))  # the device asked for, not the default
    with torch.no_grad():  # FSDP2 shards contiguous parameters only; GPT keeps its product weights column-major
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_tensors(state: dict, keep: bool = True) -> dict:
    """`state` (a state dict, nested dicts allowed) with every DTensor gathered whole, on the CPU; a
    collective. One whole tensor at a time is on the device; with keep=False (ranks that do not
    write) the gathered tensors are dropped at once."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = full_tensors(v, keep)
        elif isinstance(v, DTensor):
            whole = v.full_tensor()
            out[k] = whole.cpu() if keep else None
        else:
            out[k] = v
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict:
    """The optimizer's state_dict with whole tensors: the layout a single process saves; a collective."""
    state = optimizer.state_dict()
    return {**state, "state": {i: full_tensors(s, keep) for i, s in state["state"].items()}}


def load_sharded_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a single-process optimizer state_dict into an optimizer over FSDP-sharded parameters:
    each tensor shaped like its parameter is cut into this rank's shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in state["param_groups"] for i in group["params"]]
    if len(ids) != len(params):
        raise ValueError(f"optimizer state: expected {len(params)} parameters (the model's), got {len(ids)}")
    sharded = {}
    for i, p in zip(ids, params):
        if i not in state["state"]:
            continue
        sharded[i] = {k: distribute_tensor(v, p.device_mesh, p.placements)
                      if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                      for k, v in state["state"][i].items()}
    optimizer.load_state_dict({**state, "state": sharded})


class Unsharded:
    """What `save_pretrained` needs of a sharded model: its config and whole weights (gathered before)."""

    def __init__(self, model: torch.nn.Module, weights: dict):
        self.config, self._weights = model.config, weights

    def state_dict(self) -> dict:
        return self._weights

    def save_pretrained(self, directory) -> None:
        save_pretrained(self, directory)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, rank: Rank, sync: bool):
    """Around one micro-batch's backward: reduce its gradients across the ranks only when `sync`
    (the step's last micro-batch); DDP and FSDP alike."""
    if not rank.enabled or sync and not is_sharded(model):
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(sync)
        yield
    else:
        with model.no_sync():
            yield


def check_divisible(batch_size: int, rank: Rank, accum: int, what: str = "batch_size") -> None:
    parts = rank.world_size * accum
    if batch_size % parts:
        raise ValueError(f"{what}: expected a multiple of world_size * grad_accum_steps = {rank.world_size} * {accum} "
                         f"= {parts} (each process runs an equal share of the global batch), got {batch_size}")


def shard(x: torch.Tensor, y: torch.Tensor, rank: Rank, accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of the global batch (x, y): rows [r*B/W, (r+1)*B/W) in `accum` equal parts."""
    check_divisible(x.shape[0], rank, accum)
    n = x.shape[0] // rank.world_size
    xs, ys = x[rank.rank * n:(rank.rank + 1) * n], y[rank.rank * n:(rank.rank + 1) * n]
    return list(zip(xs.chunk(accum), ys.chunk(accum)))


__all__ = ["Rank", "SINGLE", "launched_rank", "current_rank", "rank_device", "process_group", "all_reduce_sum",
           "barrier", "gather_objects", "wrap", "is_sharded", "shard_model", "full_tensors", "full_optimizer_state",
           "load_sharded_optimizer_state", "Unsharded", "gradient_sync", "check_divisible", "shard"]
