"""The package's correctness kit, for any attention kernel with the package's signatures.

- the DESIGN §5 rule: `tolerance`, `compare`, `assert_close`, `ATOL`;
- the seeded case matrix as data: `attention_cases()`, `kv_cache_cases()` (and the raw shape
  lists), with the input makers the package's own tests use;
- the float64 oracle: `attention_loop` (a plain loop) and the reference run in float64;
- `check_attention(fn)` and `check_attention_with_kv_cache(fn)`, which return a `Report`
  (per case: error, tolerance, ratio; failures with their shapes); `check_backend(name)` checks a
  backend of the package itself;
- `register_backend(name, attention=..., attention_with_kv_cache=...)`: a user's kernel behind the
  package's custom ops, validated by the kit first if asked.

`pytorch-mqa check` runs the same checks from the command line.
"""

from pytorch_mqa.testing.backends import load_backend_plugins, register_backend, unregister_backend
from pytorch_mqa.testing.cases import (
    ATTENTION_SHAPES,
    DTYPES,
    KV_CACHE_READ_ONLY_SHAPES,
    KV_CACHE_SHAPES,
    AttentionCase,
    KVCacheCase,
    attention_cases,
    attention_inputs,
    kv_cache_cases,
    kv_cache_inputs,
    randn,
    random_case,
    seeded,
)
from pytorch_mqa.testing.check import backend_function, check_attention, check_attention_with_kv_cache, check_backend
from pytorch_mqa.testing.oracle import attention_float64, attention_loop, attention_with_kv_cache_float64
from pytorch_mqa.testing.report import CaseResult, Report
from pytorch_mqa.testing.tolerance import ATOL, Comparison, assert_close, atol, compare, tolerance

__all__ = [
    "ATOL", "Comparison", "atol", "tolerance", "compare", "assert_close",
    "DTYPES", "ATTENTION_SHAPES", "KV_CACHE_SHAPES", "KV_CACHE_READ_ONLY_SHAPES", "AttentionCase", "KVCacheCase",
    "attention_cases", "kv_cache_cases", "seeded", "randn", "attention_inputs", "kv_cache_inputs", "random_case",
    "attention_loop", "attention_float64", "attention_with_kv_cache_float64",
    "check_attention", "check_attention_with_kv_cache", "check_backend", "backend_function",
    "CaseResult", "Report", "register_backend", "unregister_backend", "load_backend_plugins",
]
