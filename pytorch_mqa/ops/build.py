"""Build and load the C++ kernels of csrc/ on first use: the CUDA kernels (the `cuda` backend)
and the CPU kernels of csrc/cpu/ (`load_cpu_extension`, used by pytorch_mqa.ops.cpu_ext).

`load_extension()` registers the CUDA kernel of `torch.ops.pytorch_mqa.attention_with_kv_cache_cuda`
(its schema is defined in ops/library.py). It uses, in order:

1. a module built ahead of time by `PYTORCH_MQA_BUILD_CUDA=1 pip install .` (`pytorch_mqa._C`);
2. a JIT build with `torch.utils.cpp_extension.load` + ninja, cached in
   `$PYTORCH_MQA_CACHE_DIR` (default `~/.cache/pytorch_mqa/`) under a key that hashes the sources,
   the flags, the torch / CUDA / Python versions and the target architectures, and built under a
   file lock so concurrent processes build once.

Target architectures: `TORCH_CUDA_ARCH_LIST` if set, else the current device's (sm_90 -> 9.0a, so
Hopper-only instructions are available). Importing pytorch_mqa never compiles anything.

The CPU library is always JIT-built (with -march=native, so its cache key also hashes the host's
CPU model and flags) by the same body, `jit_load`: one cache directory, source hashing and lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import sys
from pathlib import Path

import torch

from pytorch_mqa.ops.backends import unavailable_reason
from pytorch_mqa.ops.build_flags import (
    CPU_CXX_FLAGS,
    CPU_SOURCE_SUFFIXES,
    CPU_SOURCES,
    CPU_SUBDIR,
    CXX_FLAGS,
    NVCC_FLAGS,
    SOURCE_SUFFIXES,
    SOURCES,
)

CACHE_ENV_VAR = "PYTORCH_MQA_CACHE_DIR"
PREBUILT_MODULE = "pytorch_mqa._C"


def source_dir(sub: str = "", sources: tuple = SOURCES) -> Path:
    """csrc/ (or its subdirectory `sub`) as installed (package data pytorch_mqa.csrc), else the
    source tree's."""
    spec = importlib.util.find_spec("pytorch_mqa.csrc")
    candidates = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates.append(str(Path(__file__).resolve().parents[2] / "csrc"))
    candidates = [str(Path(c) / sub) for c in candidates]
    for cand in candidates:
        if all((Path(cand) / name).is_file() for name in sources):
            return Path(cand)
    raise RuntimeError(f"C++ sources {sources} not found; looked in {candidates}")


def source_files(directory: Path | None = None, suffixes: tuple = SOURCE_SUFFIXES) -> list[Path]:
    """Every file that goes into the build (sources and headers), sorted by name."""
    directory = source_dir() if directory is None else Path(directory)
    return sorted(p for p in directory.iterdir() if p.suffix in suffixes)


def arch_list() -> list[str]:
    """Target architectures like ["8.0", "9.0a"]: TORCH_CUDA_ARCH_LIST, else the current device."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return [a for a in re.split(r"[;\s]+", env) if a]
    major, minor = torch.cuda.get_device_capability()
    return ["9.0a" if (major, minor) == (9, 0) else f"{major}.{minor}"]


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc -gencode flags for entries like "8.0", "9.0a" or "8.6+PTX"."""
    flags = []
    for arch in archs:
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch)
        if m is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: expected entries like 8.0, 9.0a or 8.6+PTX, got {arch!r}")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if m.group(4):
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags


def cache_key(files: list[Path], flags: list[str], archs: list[str]) -> str:
    """Hash of the sources (names and bytes), flags, targets and the toolchain versions."""
    h = hashlib.sha256()
    for path in files:
        h.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    meta = [
        " ".join(flags),
        " ".join(archs),
        torch.__version__,
        str(torch.version.cuda),
        f"{sys.version_info.major}.{sys.version_info.minor}",
    ]
    h.update("\n".join(meta).encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV_VAR)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "pytorch_mqa"


@contextlib.contextmanager
def build_lock(path: Path):
    """Exclusive advisory lock (fcntl) on `path`, held for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prebuilt_library() -> str | None:
    """Path of the ahead-of-time built library, if installed. It has no Python init function:
    it is a library of op kernels, loaded with torch.ops.load_library."""
    try:
        spec = importlib.util.find_spec(PREBUILT_MODULE)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def jit_load(prefix: str, files: list[Path], cflags: list[str], cuda_cflags: list[str] | None, targets: list[str],
             what: str, verbose: bool = False, on_build=None) -> Path:
    """Build (once per key, under the lock) and load the library of `files` with
    torch.utils.cpp_extension.load + ninja; returns its build directory. `targets` go into the
    cache key and the error message; `on_build(build_dir)` is called before a build that has no
    cached library to reuse (e.g. to say that it may take a while)."""
    from torch.utils import cpp_extension

    key = cache_key(files, cflags + (cuda_cflags or []), targets)
    build_dir = cache_root() / key
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}_{key}"
    sources = [str(p) for p in files if p.suffix in (".cu", ".cpp")]
    with build_lock(cache_root() / f"{key}.lock"):
        if on_build is not None and not (build_dir / f"{name}.so").is_file():
            on_build(build_dir)
        extra = {} if cuda_cflags is None else {"extra_cuda_cflags": cuda_cflags}
        try:
            cpp_extension.load(
                name=name,
                sources=sources,
                extra_cflags=cflags,
                extra_include_paths=[str(files[0].parent)],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=verbose,
                **extra,
            )
        except Exception as err:
            # torch puts ninja's output (the compiler's own errors) in the message: pass it on whole.
            raise RuntimeError(f"building the {what} of pytorch_mqa failed (build directory {build_dir}, "
                               f"targets {targets}):\n{err}") from err
    return build_dir


def _jit_build(verbose: bool = False) -> None:
    archs = arch_list()
    nvcc_flags = NVCC_FLAGS + gencode_flags(archs)  # carries -gencode, so torch adds no arch flags of its own
    jit_load("pytorch_mqa_csrc", source_files(), CXX_FLAGS, nvcc_flags, archs,
             "CUDA kernels (set TORCH_CUDA_ARCH_LIST to change the targets)", verbose)


def host_cpu() -> str:
    """The host's CPU model and feature flags (what -march=native compiles for), for the cache key."""
    text = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return f"{platform.machine()} {fields.get('model name', platform.processor())} {fields.get('flags', '')}"


def cpu_unavailable_reason() -> str | None:
    """Why the CPU library cannot be built here (no C++ compiler or no ninja), or None."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} not found on PATH (set CXX to a compiler)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _cpu_key_targets() -> list[str]:
    return ["cpu", hashlib.sha256(host_cpu().encode()).hexdigest()[:16]]


@functools.cache
def load_cpu_extension(verbose: bool = False, on_build=None) -> None:
    """Register the csrc/cpu/ kernels with torch (once per process); build them if needed.
    Raises RuntimeError saying why when they cannot be built."""
    reason = cpu_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the CPU kernels of pytorch_mqa cannot be built: {reason}")
    files = source_files(source_dir(CPU_SUBDIR, CPU_SOURCES), CPU_SOURCE_SUFFIXES)
    jit_load("pytorch_mqa_cpu", files, CPU_CXX_FLAGS, None, _cpu_key_targets(), "CPU kernels", verbose, on_build)


@functools.cache
def load_extension(verbose: bool = False) -> None:
    """Register the csrc/ CUDA kernels with torch (once per process); build them if needed."""
    reason = unavailable_reason("cuda", "cuda")
    if reason is not None:
        raise RuntimeError(f"the cuda backend of pytorch_mqa cannot be built: {reason}")
    prebuilt = _prebuilt_library()
    if prebuilt is not None:
        torch.ops.load_library(prebuilt)
        return
    _jit_build(verbose)
