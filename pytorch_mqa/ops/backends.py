"""Which backends this machine has, and how `backend=` / PYTORCH_MQA_BACKEND resolve.

A backend name is one of BACKENDS or a name registered with `add_backend` (USER_BACKENDS). `unavailable_reason(name, device)` returns None when the
backend can run tensors of that device type, or a sentence saying why it cannot.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import shutil

import torch

from pytorch_mqa import reference

BACKENDS = ("reference", "triton", "cuda")
BACKEND_CHOICES = ("auto",) + BACKENDS
ENV_VAR = "PYTORCH_MQA_BACKEND"

# backend="auto" on CUDA tensors: the measured choice per op (see BENCHMARKS.md for the figures).
# Until a GPU benchmark decides otherwise, both ops use Triton on CUDA.
# attention_with_kv_cache: the csrc/ kernel (backend="cuda") is not the auto choice yet; which of
# triton and cuda is faster for decoding is pending a GPU measurement.
AUTO_CUDA_BACKEND = {"attention": "triton", "attention_with_kv_cache": "triton"}

# Which backends implement which op.
OP_BACKENDS = {
    "attention": ("reference", "triton"),
    "attention_with_kv_cache": ("reference", "triton", "cuda"),
}


# Backends registered at run time (pytorch_mqa.register_backend): name -> {"attention": fn or None,
# "attention_backward": fn, "attention_with_kv_cache": fn or None, "device_types": tuple or None}.
USER_BACKENDS: dict[str, dict] = {}


def add_backend(name, *, attention=None, attention_with_kv_cache=None, attention_backward=None, device_types=None):
    """Put user callables behind the ops as backend `name` (no checks of their results; see
    pytorch_mqa.testing.register_backend). Without `attention_backward`, gradients run the reference."""
    if not isinstance(name, str) or not name.isidentifier() or name in BACKEND_CHOICES:
        raise ValueError(f"name: expected an identifier other than {BACKEND_CHOICES}, got {name!r}")
    fns = {"attention": attention, "attention_with_kv_cache": attention_with_kv_cache}
    for arg, fn in (*fns.items(), ("attention_backward", attention_backward)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{arg}: expected a callable or None, got {type(fn).__name__}")
    if attention is None and attention_with_kv_cache is None:
        raise ValueError("attention, attention_with_kv_cache: expected at least one callable, got None for both")
    if device_types is not None:
        device_types = (device_types,) if isinstance(device_types, str) else tuple(device_types)
    remove_backend(name)
    USER_BACKENDS[name] = dict(fns, attention_backward=attention_backward or _reference_backward, device_types=device_types)
    for op, fn in fns.items():
        if fn is not None:
            OP_BACKENDS[op] = OP_BACKENDS[op] + (name,)


def remove_backend(name: str) -> None:
    """Forget a backend added with add_backend (no-op if there is none by that name)."""
    if USER_BACKENDS.pop(name, None) is not None:
        for op in OP_BACKENDS:
            OP_BACKENDS[op] = tuple(b for b in OP_BACKENDS[op] if b != name)


def _reference_backward(dout, q, k, v, lse, delta, causal, scale):
    return reference.attention_backward(dout, q, k, v, lse, delta, causal=causal, scale=scale)


def backend_names() -> tuple:
    """The built-in backends, then the registered ones."""
    return BACKENDS + tuple(USER_BACKENDS)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    return None


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    if importlib.util.find_spec("pytorch_mqa._C") is not None:
        return None  # built ahead of time (PYTORCH_MQA_BUILD_CUDA=1): no nvcc or ninja needed
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc was not found on PATH and CUDA_HOME is not set (needed for the JIT build of csrc/)"
    if importlib.util.find_spec("ninja") is None and shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja; needed for the JIT build of csrc/)"
    return None


def unavailable_reason(name: str, device_type: str = "cuda") -> str | None:
    """None if backend `name` can run tensors on `device_type` here, else why not."""
    if name == "reference":
        return None
    if name in USER_BACKENDS:
        types = USER_BACKENDS[name]["device_types"]
        return None if types is None or device_type in types else f"backend {name!r} was registered for {types} only"
    if name == "triton":
        reason = _triton_reason()
        if reason:
            return reason
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available (torch.cuda.is_available() is False)"
        if device_type == "cpu":
            if triton_interpreting():
                return None
            return "Triton kernels run on CPU tensors only under the interpreter (set TRITON_INTERPRET=1 before importing triton)"
        return f"Triton does not support device type {device_type!r}"
    if name == "cuda":
        if device_type != "cuda":
            return f"the cuda backend needs CUDA tensors, got device type {device_type!r}"
        return _cuda_reason()
    raise ValueError(f"backend: expected one of {BACKEND_CHOICES}, got {name!r}")


def available_backends(device_type: str | None = None) -> list[str]:
    """Backends that can run on `device_type` (default: cuda if present, else cpu)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return [b for b in backend_names() if unavailable_reason(b, device_type) is None]


# The backend `use_backend` chose for calls that pass backend="auto" (None: no choice made).
_DEFAULT_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("pytorch_mqa_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str | None):
    """Within the block, calls with backend="auto" use `name` (None or "auto": no change).

    This is how a program (the CLI's --backend) picks a backend for a whole model without
    touching the process environment. It takes precedence over PYTORCH_MQA_BACKEND.
    """
    if name is not None and name not in BACKEND_CHOICES and name not in USER_BACKENDS:
        raise ValueError(f"backend: expected one of {BACKEND_CHOICES + tuple(USER_BACKENDS)}, got {name!r}")
    token = _DEFAULT_BACKEND.set(None if name == "auto" else name)
    try:
        yield
    finally:
        _DEFAULT_BACKEND.reset(token)


@torch.compiler.assume_constant_result
def chosen_backend() -> str:
    """The `use_backend` choice, else PYTORCH_MQA_BACKEND, else "auto". A constant to
    torch.compile (it cannot trace a context variable): read once when a graph is traced."""
    return _DEFAULT_BACKEND.get() or _env_backend() or "auto"


# os.environ's own mapping and the variable's key in it (CPython's os._Environ keeps both): one dict
# lookup per call, where os.environ.get runs four Python frames, about 10 us on the caches a large
# kernel has just evicted. os.environ.get where the interpreter has no such mapping.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENVIRON_DATA is not None and hasattr(os.environ, "encodekey") else None


def _env_backend() -> str | None:
    """PYTORCH_MQA_BACKEND as os.environ has it now, or None."""
    if _ENV_KEY is None:
        return os.environ.get(ENV_VAR)
    raw = _ENVIRON_DATA.get(_ENV_KEY)
    return None if raw is None else os.environ.decodevalue(raw)


def resolve_backend(op: str, backend: str, device_type: str) -> str:
    """Turn `backend` into a concrete backend. "auto" takes, in order, the `use_backend` choice,
    the PYTORCH_MQA_BACKEND environment variable, then the per-device default."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    if backend == "auto":
        backend = chosen_backend()
        if backend == "auto":
            return AUTO_CUDA_BACKEND[op] if device_type == "cuda" else "reference"
    if backend not in BACKENDS and backend not in USER_BACKENDS:
        raise ValueError(f"backend: expected one of {BACKEND_CHOICES + tuple(USER_BACKENDS)}, got {backend!r}")
    reason = unavailable_reason(backend, device_type)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable for {device_type} tensors: {reason}")
    return backend
