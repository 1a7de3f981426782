"""pytorch_mqa: fused multi-query / grouped-query attention for PyTorch.

Importing registers the custom ops `torch.ops.pytorch_mqa.attention` and
`torch.ops.pytorch_mqa.attention_with_kv_cache`; nothing is compiled and no GPU is needed.
"""

from pytorch_mqa.backends import available_backends
from pytorch_mqa.ops import attention, attention_with_kv_cache
from pytorch_mqa.cache import KVCache
from pytorch_mqa.generate import generate
from pytorch_mqa.model import GPT, GPTConfig

__version__ = "0.1.0"

__all__ = ["attention", "attention_with_kv_cache", "available_backends", "__version__"]
__all__ += ["GPT", "GPTConfig", "KVCache", "generate"]
