"""The package's own kernels through the kit on a GPU: what `pytorch-mqa check --backend` runs."""

import pytest

from pytorch_mqa.ops.backends import unavailable_reason
from pytorch_mqa.testing import check_backend

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backend_passes_the_quick_matrix_on_cuda(backend):
    reason = unavailable_reason(backend, "cuda")
    if reason is not None:
        pytest.skip(reason)
    for report in check_backend(backend, device="cuda", quick=True):
        assert report.passed, report.summary() + "\n" + report.failure_details()
