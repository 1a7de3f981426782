"""Backend selection: auto, the environment variable, and clear errors for unavailable ones."""

import os
import subprocess
import sys

import pytest
import torch

import pytorch_mqa
from pytorch_mqa.ops.backends import BACKENDS, resolve_backend, unavailable_reason


def test_auto_is_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("PYTORCH_MQA_BACKEND", raising=False)
    assert resolve_backend("attention", "auto", "cpu") == "reference"
    assert resolve_backend("attention_with_kv_cache", "auto", "cpu") == "reference"


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("PYTORCH_MQA_BACKEND", "reference")
    assert resolve_backend("attention", "auto", "cpu") == "reference"
    monkeypatch.setenv("PYTORCH_MQA_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        pytorch_mqa.attention(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    monkeypatch.setenv("PYTORCH_MQA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("attention", "auto", "cpu")


def test_explicit_backend_beats_env_var(monkeypatch):
    monkeypatch.setenv("PYTORCH_MQA_BACKEND", "cuda")
    q = torch.randn(1, 2, 2, 8)
    out = pytorch_mqa.attention(q, q[:, :, :1], q[:, :, :1], backend="reference")
    assert out.shape == q.shape


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_backend_on_cpu_machine_says_why():
    q = torch.randn(1, 1, 2, 8)
    kc = torch.zeros(1, 4, 1, 8)
    with pytest.raises(RuntimeError, match="cuda"):
        pytorch_mqa.attention_with_kv_cache(q, kc, kc.clone(), cache_seqlens=1, backend="cuda")
    assert "CUDA is not available" in unavailable_reason("cuda", "cuda")


def test_available_backends_lists_reference():
    assert "reference" in pytorch_mqa.available_backends("cpu")
    assert set(pytorch_mqa.available_backends()) <= set(BACKENDS)


def test_triton_on_cpu_without_interpreter_is_refused():
    pytest.importorskip("triton")
    code = (
        "import torch, pytorch_mqa\n"
        "q = torch.randn(1, 2, 2, 16)\n"
        "try:\n"
        "    pytorch_mqa.attention(q, q[:, :, :1], q[:, :, :1], backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


def test_info_command_reports_backends(capsys):
    from pytorch_mqa.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "torch" in out and "backends for cpu tensors" in out
