"""The suite registry: one entry per benchmark, named after what it measures (one stem per op).

Each suite module provides `SHAPES` (default shape sets: "cuda", "cuda_quick", "cpu",
"cpu_quick"), `COLUMNS` (the table), `run(...) -> rows` and `plot(rows, result, path)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional

from pytorch_mqa.bench import attention, attention_with_kv_cache, generate


@dataclass(frozen=True)
class Suite:
    name: str
    module: ModuleType  # SHAPES, COLUMNS, run, plot
    summary: Optional[Callable[[list], str]] = None  # a few lines printed under the table

    @property
    def columns(self) -> list:
        return self.module.COLUMNS


SUITES = {
    "attention": Suite("attention", attention),
    "attention_with_kv_cache": Suite("attention_with_kv_cache", attention_with_kv_cache),
    "generate": Suite("generate", generate, generate.summary),
}
# Earlier name of the decode suite, still accepted on the command line.
ALIASES = {"decode": "attention_with_kv_cache"}

__all__ = ["Suite", "SUITES", "ALIASES"]
