"""Fixtures of the C++ CPU kernel tests (csrc/cpu/, pytorch_mqa.ops.cpu_ext)."""

import pytest
import torch

from pytorch_mqa.ops import build, cpu_ext


@pytest.fixture(scope="module")
def cpp_kernels():
    """Build (first time: tens of seconds) and load the C++ CPU kernels once per test file; skip
    only where this machine cannot build them (no C++ compiler or ninja) or they are turned off."""
    reason = build.cpu_unavailable_reason()
    if reason is not None:
        pytest.skip(f"the C++ CPU kernels cannot be built here: {reason}")
    if cpu_ext.disabled_by_env():
        pytest.skip(f"{cpu_ext.ENV_VAR} turns the C++ CPU kernels off in this run")
    assert cpu_ext.load(), cpu_ext.unavailable_reason()


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    """1 and 2 torch threads: on 2, short batches take the kernels' thread-split paths (decode:
    flash-decoding; attention's backward: K/V expanded for GQA / MQA at B * Hkv < 2)."""
    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(n)
