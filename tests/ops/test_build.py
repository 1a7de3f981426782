"""pytorch_mqa._build without a GPU: sources, cache key, targets, lock, error messages."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pytorch_mqa.ops import build as _build

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_loader():
    _build.load_extension.cache_clear()
    yield
    _build.load_extension.cache_clear()


def test_source_files_are_the_csrc_sources():
    files = _build.source_files()
    names = {p.name for p in files}
    assert set(_build.SOURCES) <= names
    assert "attention_with_kv_cache.cuh" in names
    assert all(p.is_file() for p in files)


def test_cache_key_changes_with_sources_flags_and_targets(tmp_path):
    for name in ("attention_with_kv_cache.cu", "attention_with_kv_cache.cuh", "bindings.cpp"):
        shutil.copy(_build.source_dir() / name, tmp_path / name)
    files = _build.source_files(tmp_path)
    flags, archs = ["-O3"], ["9.0a"]
    key = _build.cache_key(files, flags, archs)
    assert key == _build.cache_key(files, flags, archs)  # deterministic
    assert key != _build.cache_key(files, ["-O2"], archs)
    assert key != _build.cache_key(files, flags, ["8.0"])
    header = tmp_path / "attention_with_kv_cache.cuh"
    header.write_text(header.read_text() + "\n// edited\n")
    assert key != _build.cache_key(files, flags, archs)


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv(_build.CACHE_ENV_VAR, str(tmp_path / "c"))
    assert _build.cache_root() == tmp_path / "c"
    monkeypatch.delenv(_build.CACHE_ENV_VAR)
    assert _build.cache_root() == Path.home() / ".cache" / "pytorch_mqa"


def test_arch_list_from_env_and_from_device(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a 8.6+PTX")
    assert _build.arch_list() == ["8.0", "9.0a", "8.6+PTX"]
    assert _build.gencode_flags(_build.arch_list()) == [
        "-gencode", "arch=compute_80,code=sm_80",
        "-gencode", "arch=compute_90a,code=sm_90a",
        "-gencode", "arch=compute_86,code=sm_86",
        "-gencode", "arch=compute_86,code=compute_86",
    ]
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert _build.arch_list() == ["9.0a"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    assert _build.arch_list() == ["8.6"]
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        _build.gencode_flags(["sm90"])


def test_lock_is_exclusive(tmp_path):
    path = tmp_path / "key.lock"
    with _build.build_lock(path):
        with open(path, "a") as other:  # a second open file description, as another process has
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(path, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on exit


def test_load_extension_without_cuda_says_why(fresh_loader):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        _build.load_extension()


def test_load_extension_without_nvcc_says_so(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc here
    monkeypatch.delenv("CUDA_HOME", raising=False)
    with pytest.raises(RuntimeError, match="nvcc was not found"):
        _build.load_extension()


def test_build_failure_surfaces_compiler_output(fresh_loader, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    nvcc_text = "attention_with_kv_cache.cu(42): error: identifier \"undefined_thing\" is undefined"

    def failing_load(**kwargs):
        assert any("-gencode" in f for f in kwargs["extra_cuda_cflags"])
        assert Path(kwargs["build_directory"]).parent == tmp_path
        raise RuntimeError(f"Error building extension '{kwargs['name']}': {nvcc_text}")

    monkeypatch.setenv(_build.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    monkeypatch.setattr(_build, "unavailable_reason", lambda *a: None)
    monkeypatch.setattr(_build, "_prebuilt_library", lambda: None)
    with pytest.raises(RuntimeError) as info:
        _build.load_extension()
    assert nvcc_text in str(info.value)
    assert "9.0a" in str(info.value)


def test_load_extension_prefers_the_prebuilt_library(fresh_loader, monkeypatch, tmp_path):
    loaded = []
    monkeypatch.setattr(_build, "unavailable_reason", lambda *a: None)
    monkeypatch.setattr(_build, "_prebuilt_library", lambda: str(tmp_path / "_C.so"))
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    monkeypatch.setattr(_build, "_jit_build", lambda *a: pytest.fail("JIT build despite a prebuilt library"))
    _build.load_extension()
    _build.load_extension()  # cached: loads once
    assert loaded == [str(tmp_path / "_C.so")]


@pytest.mark.slow
def test_import_compiles_nothing(tmp_path):
    """A fresh interpreter imports pytorch_mqa (and asks for its backends) with every build entry
    point of torch booby-trapped and an empty cache directory that must stay empty."""
    code = (
        "import torch.utils.cpp_extension as ext\n"
        "def boom(*a, **k): raise SystemExit('compiled at import')\n"
        "ext.load = ext.load_inline = ext._jit_compile = boom\n"
        "import pytorch_mqa\n"
        "pytorch_mqa.available_backends()\n"
    )
    env = dict(os.environ, PYTORCH_MQA_CACHE_DIR=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)
    assert not (tmp_path / "cache").exists()


def test_compile_check_script_fails_clearly_without_nvcc(tmp_path):
    path = "/usr/bin:/bin"
    if shutil.which("nvcc", path=path) is not None:
        pytest.skip("nvcc is in /usr/bin or /bin")
    env = {k: v for k, v in os.environ.items() if k != "NVCC"}
    env["PATH"] = path
    script = REPO / "scripts" / "check_cuda_compile.sh"
    out = subprocess.run([shutil.which("bash"), str(script)], capture_output=True, text=True, env=env)
    assert out.returncode != 0
    assert "nvcc not found" in out.stderr
