"""The C++ CPU kernels (csrc/cpu/), built on first CPU use and optional.

`attention.cpp` registers the CPU and AutogradCPU kernels of `torch.ops.pytorch_mqa.attention`: a
plain CPU call (backend "reference", no variant, non-causal or Tq == Tk), with or without a
gradient, runs PyTorch's fused CPU kernel and its backward from C++; every other call is passed on
to `pytorch_mqa::attention_general` (the same schema, the Python dispatch and autograd).

`attention_with_kv_cache.cpp` registers itself as the CPU kernel of
`torch.ops.pytorch_mqa.attention_with_kv_cache`: once loaded, a plain CPU call (backend
"reference", no variant or serving argument, Tq * G <= 64) runs in C++ without entering Python;
every other call is passed on, unchanged, to `pytorch_mqa::attention_with_kv_cache_general` (the
same schema, the Python dispatch). Before the library is loaded, or where it cannot be built, the
op's Python kernel runs that same dispatch.

`load()` builds (JIT, ninja, cached by pytorch_mqa.ops.build) and loads the library once per
process; the first build prints one line on stderr. It never raises: where there is no compiler
or the build fails, `unavailable_reason()` says why (also shown by `pytorch-mqa info`), one line
on stderr says so once, and the Python CPU path is used. `PYTORCH_MQA_CPU_KERNELS=0` (read, never
written) turns the library off. Importing the package builds nothing.
"""

from __future__ import annotations

import os
import sys

import torch

from pytorch_mqa.ops import build

ENV_VAR = "PYTORCH_MQA_CPU_KERNELS"

_STATE = {"tried": False, "loaded": False, "reason": None}


def _say(line: str) -> None:
    print(f"pytorch_mqa: {line}", file=sys.stderr, flush=True)


def disabled_by_env() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off")


def load() -> bool:
    """Build (first time) and load the CPU kernels; True when they are registered."""
    if _STATE["tried"]:
        return _STATE["loaded"]
    _STATE["tried"] = True
    if disabled_by_env():
        _STATE["reason"] = f"disabled by {ENV_VAR}={os.environ.get(ENV_VAR)}"
        return False
    try:
        build.load_cpu_extension(on_build=lambda d: _say(f"building the C++ CPU kernels once (cached in {d}) ..."))
    except Exception as err:  # no compiler, a failed build: the Python CPU path stays
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _STATE["reason"] = str(err)
        _say(f"C++ CPU kernels unavailable, using the Python CPU path: {first}")
        return False
    _STATE["loaded"] = True
    return True


def loaded() -> bool:
    """Whether the C++ CPU kernels are registered in this process (no build attempted)."""
    return _STATE["loaded"]


def unavailable_reason() -> str | None:
    """Why the C++ CPU kernels are not in use, or None when they are (or were not tried yet and
    can be built: then None only after `load()`)."""
    if _STATE["loaded"]:
        return None
    if _STATE["tried"]:
        return _STATE["reason"]
    if disabled_by_env():
        return f"disabled by {ENV_VAR}={os.environ.get(ENV_VAR)}"
    return build.cpu_unavailable_reason()


def ready() -> bool:
    """Whether the CPU kernels are registered, loading them first on the first eager call (the
    lazy trigger of the public `attention`, which must know before it calls the op)."""
    if _STATE["loaded"]:
        return True
    if _STATE["tried"] or torch.compiler.is_compiling():
        return False
    return load()


def ensure_loaded_for(device: torch.device) -> None:
    """The lazy trigger of the ops' Python kernels: their first eager CPU call loads the library."""
    if device.type == "cpu":
        ready()


__all__ = ["ENV_VAR", "load", "loaded", "ready", "unavailable_reason", "ensure_loaded_for"]
