"""Test setup: Triton runs on CPU tensors through its interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before anything imports pytorch_mqa.kernels.
"""

import os

# numpy's OpenBLAS threads (used by the interpreter's tl.dot) fight torch's threads for the cores
# and slow interpreted kernels down several-fold; one BLAS thread is fastest for these small tiles.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "inductor"))

import pytest  # noqa: E402

from helpers import ERROR_RATIOS  # noqa: E402


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny models train faster without a second contended thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if ERROR_RATIOS:
        terminalreporter.write_sep("-", "worst error / tolerance ratio (DESIGN §5), per backend and dtype")
        for key in sorted(ERROR_RATIOS):
            ratio, where = ERROR_RATIOS[key]
            terminalreporter.write_line(f"{key:<40} {ratio:.3f}  ({where})")
