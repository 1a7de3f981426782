"""The package's tests use the public kit, pytorch_mqa.testing: these are its names, re-exported.

Besides them: the run's summary (the worst error/tolerance ratio per (label, tensor, dtype),
printed by conftest at the end of the run) and the loss the gradient tests share.
"""

from __future__ import annotations

import torch

from pytorch_mqa import testing
from pytorch_mqa.testing import (  # noqa: F401  (re-exported for the tests)
    ATOL,
    ATTENTION_SHAPES,
    DTYPES,
    KV_CACHE_SHAPES,
    attention_inputs,
    kv_cache_inputs,
    randn,
    random_case,
    seeded,
)

# Worst error/bound ratio seen per (label, dtype); printed at the end of the run by conftest.
ERROR_RATIOS: dict[str, tuple[float, str]] = {}


def assert_close(got, ref32, ref_lp, dtype, name: str = "out", label: str = "") -> float:
    """DESIGN §5 (pytorch_mqa.testing.assert_close), recording the ratio for the run's summary."""
    return testing.assert_close(got, ref32, ref_lp, dtype, name, record=ERROR_RATIOS, label=label)


def loss_on(out, lse, which: str, gen):
    """A loss on out, on lse (a z-loss, say) or on both ("out", "lse", "out+lse"), with random
    weights from `gen`; rows without keys (lse = -inf) do not enter it."""
    total = 0
    if "out" in which:
        total = total + (out.float() * randn(out.shape, torch.float32, gen)).sum()
    if which.endswith("lse"):
        total = total + (torch.where(torch.isfinite(lse), lse, 0) * randn(lse.shape, torch.float32, gen)).sum()
    return total
