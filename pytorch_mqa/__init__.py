"""pytorch_mqa: fused multi-query / grouped-query attention for PyTorch.

Importing registers the custom ops `torch.ops.pytorch_mqa.attention` and
`torch.ops.pytorch_mqa.attention_with_kv_cache`; nothing is compiled and no GPU is needed.
The layers, bottom to top: core, reference (the oracle), kernels/csrc, ops, model, training,
study and bench, cli (DESIGN.md §2).
"""

from pytorch_mqa.model import GPT, GPTConfig, KVCache, generate
from pytorch_mqa.model.generation import GenerationConfig
from pytorch_mqa.model.hf import register_hf_attention
from pytorch_mqa.ops import attention, attention_varlen, attention_with_kv_cache, available_backends
from pytorch_mqa.testing import register_backend, unregister_backend
from pytorch_mqa.training.tokenizers import load_tokenizer
from pytorch_mqa.version import __version__

__all__ = ["attention", "attention_with_kv_cache", "attention_varlen", "available_backends", "__version__"]
__all__ += ["GPT", "GPTConfig", "KVCache", "GenerationConfig", "generate", "register_hf_attention"]
__all__ += ["register_backend", "unregister_backend", "load_tokenizer"]
