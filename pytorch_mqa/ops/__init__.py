"""The op layer: validation, registration, dispatch, backends, the CPU path and the csrc build.

Importing it registers `torch.ops.pytorch_mqa.*`. Public functions: `attention`,
`attention_with_kv_cache`; `available_backends` says what this machine can run.
"""

from pytorch_mqa.ops.api import attention, attention_varlen, attention_with_kv_cache
from pytorch_mqa.ops.backends import AUTO_CUDA_BACKEND, BACKENDS, OP_BACKENDS, available_backends
from pytorch_mqa.ops.validation import validate_attention, validate_kv_cache

__all__ = [
    "attention",
    "attention_with_kv_cache",
    "attention_varlen",
    "available_backends",
    "AUTO_CUDA_BACKEND",
    "BACKENDS",
    "OP_BACKENDS",
    "validate_attention",
    "validate_kv_cache",
]
