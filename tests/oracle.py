"""The float64 loop oracle lives in the kit (pytorch_mqa.testing.oracle); re-exported for the tests."""

from pytorch_mqa.testing.oracle import attention_float64, attention_loop  # noqa: F401
