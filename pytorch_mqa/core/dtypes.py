"""The package's one dtype vocabulary: short and long names of the three supported dtypes."""

from __future__ import annotations

import torch

# Short names first: they are what the CLI offers as choices.
DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_CHOICES = ("fp32", "fp16", "bf16", "float32", "float16", "bfloat16")


def as_dtype(dtype, name: str = "dtype") -> torch.dtype | None:
    """None, a torch.dtype or one of DTYPE_CHOICES -> a torch.dtype (or None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"{name}: expected one of {DTYPE_CHOICES} or a torch.dtype, got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).replace("torch.", "")


__all__ = ["DTYPES", "DTYPE_CHOICES", "as_dtype", "dtype_name"]
