"""Helpers shared by the Triton kernels: constants, launch flags, the SM count, the packed-row
index math of MQA/GQA and the online-softmax step and epilogue.

Packed rows: every program works on one KV head hk and packs its G query heads into the M
dimension of its tiles. Packed row r of KV head hk is query position t = r // G of query head
h = hk * G + r % G, so each K/V tile is loaded once for the whole group and K/V are never
expanded. `packed_rows` is the only place that states this mapping.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): scores are scaled into the exp2 domain
LN2 = 0.6931471805599453  # ln(2): log2-domain LSE back to natural log
# The same constants as seen from @triton.jit code (kernels may read only constexpr globals).
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)

# SM count assumed for CPU tensors (the interpreter has no device to ask).
INTERPRETER_SMS = 8

_sm_override: list[int] = []


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _device_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def sm_count(device: torch.device | str) -> int:
    """SM count every launch plan uses: the innermost `override_sm_count`, else the device's."""
    if _sm_override:
        return _sm_override[-1]
    device = torch.device(device)
    if device.type == "cuda":
        return _device_sms(device)
    return INTERPRETER_SMS


@contextlib.contextmanager
def override_sm_count(sms: int):
    """Plan launches as if the device had `sms` SMs (checks a GPU launch plan on a CPU)."""
    if not isinstance(sms, int) or sms < 1:
        raise ValueError(f"sms: expected a positive int, got {sms!r}")
    _sm_override.append(sms)
    try:
        yield
    finally:
        _sm_override.pop()


def dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, DOT_PRECISION) for inputs of `dtype`.

    bf16 tiles are computed in fp32 under the interpreter (its bf16 arithmetic is broken).
    fp32 dots use "tf32x3" on a GPU (three TF32 products, error near fp32, on tensor cores) and
    exact "ieee" products in the interpreter; 16-bit dots use the hardware default.
    """
    upcast = dtype == torch.bfloat16 and interpreting()
    if dtype == torch.float32 or upcast:
        return upcast, "ieee" if interpreting() else "tf32x3"
    return upcast, "tf32"


def store_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    """The interpreter's fp32 -> bf16 cast truncates: there, results are stored in fp32 and rounded by torch."""
    return torch.float32 if upcast else dtype


def block_d(D: int) -> int:
    """Head-dim tile: the next power of two >= D, at least 16 (the smallest tl.dot K)."""
    return max(16, triton.next_power_of_2(D))


def elem_bytes(precision: str) -> int:
    """Bytes per element of the K/V tiles a kernel stages in shared memory."""
    return 2 if precision == "tf32" else 4


@triton.jit
def packed_rows(row0, hk, Tq, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Packed rows [row0, row0 + BLOCK_M) of KV head hk -> (t int64, h int64, row_ok)."""
    rows = row0 + tl.arange(0, BLOCK_M)
    t = rows // G
    h = hk * G + (rows % G)
    return t.to(tl.int64), h.to(tl.int64), t < Tq


@triton.jit
def split_pid(pid, n_inner):
    """Grid axis 0 folds an outer index (batch * KV head) with n_inner inner programs:
    pid -> (outer int64, inner). One axis of 2^31 - 1 programs, so B * Hkv cannot overflow."""
    return (pid // n_inner).to(tl.int64), pid % n_inner


@triton.jit
def online_softmax_step(acc, l_i, m_i, qk, qk_scale, v, DOT_PRECISION: tl.constexpr, FOLD_SCALE: tl.constexpr):
    """Fold one key block into the running softmax (log2 domain); v (N, D); qk (M, N) masked to -inf.

    FOLD_SCALE (needs qk_scale > 0): qk holds raw dot products and the scale goes into the exp2
    argument, qk * qk_scale - m, one FFMA per score. Otherwise qk is already scaled. Returns the
    updated (acc, l_i, m_i)."""
    if FOLD_SCALE:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row that has seen no key yet keeps m = -inf: subtract 0 instead so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if FOLD_SCALE:
        p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
    else:
        p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def softmax_epilogue(acc, l_i, m_i):
    """Normalise the accumulator: -> (out fp32 (M, D), lse natural log (M,)). Rows that saw no
    key give zeros and lse = -inf."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2_C, float("-inf"))
    return out, lse


@triton.jit
def lse_to_log2(lse):
    """Natural-log LSE -> log2 domain; -inf (rows that saw nothing) -> +inf so exp2(s - lse2) = 0."""
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E_C)


def autotune_configs(names: tuple[str, ...], gpu: list[tuple], interpreter: tuple) -> list[triton.Config]:
    """triton.Config list from (*block sizes, num_warps, num_stages) tuples; under the interpreter
    one config of `interpreter` block sizes (it cannot benchmark, and large blocks run fastest).
    PYTORCH_MQA_TRITON_AUTOTUNE=0 (read at import) keeps only the first GPU config: one compile per
    specialisation instead of one per config, for test runs that check results, not speed."""
    if interpreting():
        return [triton.Config(dict(zip(names, interpreter)), num_warps=4, num_stages=1)]
    configs = [triton.Config(dict(zip(names, c[: len(names)])), num_warps=c[-2], num_stages=c[-1]) for c in gpu]
    if os.environ.get("PYTORCH_MQA_TRITON_AUTOTUNE", "1") == "0":
        return configs[:1]
    return configs
