"""Device resolution and synchronisation, one rule for every command and library entry point."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """`None` or "auto" -> cuda if this machine has it, else cpu; otherwise the named device.

    Raises ValueError for a device type other than cpu/cuda and RuntimeError for a CUDA device
    on a machine without CUDA, each naming the argument, the expected and the received value.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected cpu, cuda, cuda:N or auto, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu, cuda, cuda:N or auto, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device: expected a device this machine has, got {name!r} (torch.cuda.is_available() is False)"
        )
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["resolve_device", "synchronize"]
