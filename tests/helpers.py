"""The package's tests use the public kit, pytorch_mqa.testing: these are its names, re-exported.

Only the run's summary lives here: the worst error/tolerance ratio per (label, tensor, dtype),
printed by conftest at the end of the run.
"""

from __future__ import annotations

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
