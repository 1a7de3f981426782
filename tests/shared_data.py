"""Data files shared beside the clone (../shared/data: GPT-2's BPE files, Tiny Shakespeare).

Tests that need them skip cleanly when they are absent; nothing is ever downloaded.
"""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared/data beside the clone; a git worktree sits one level deeper.
CANDIDATES = [os.path.join(ROOT, "..", "shared", "data"), os.path.join(ROOT, "..", "..", "shared", "data")]


def shared_path(name: str) -> str:
    """The path of ../shared/data/NAME, or skip the test when it is not there."""
    for base in CANDIDATES:
        path = os.path.normpath(os.path.join(base, name))
        if os.path.exists(path):
            return path
    pytest.skip(f"{name}: not found under ../shared/data beside the repository")
