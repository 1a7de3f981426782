"""Thread policy: how many torch CPU threads a piece of work runs on, set and restored in one place."""

from __future__ import annotations

import contextlib
import os

import torch


def cpu_cores() -> int:
    """CPU cores this process may use (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(n: int | None, name: str = "threads") -> None:
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"{name}: expected a positive int or None, got {n!r}")


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block on n torch CPU threads (None: leave torch's choice), then restore the old count."""
    check_threads(n)
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def set_threads(n: int | None) -> None:
    """Set the torch CPU thread count for the rest of the process (None: leave torch's choice)."""
    check_threads(n)
    if n is not None:
        torch.set_num_threads(n)


__all__ = ["cpu_cores", "check_threads", "torch_threads", "set_threads"]
