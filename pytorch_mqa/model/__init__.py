"""The model layer: GPT (config, blocks), its KV cache, generation, checkpoints, Hugging Face interop.

Built on the op layer (`pytorch_mqa.ops`); nothing below imports it.
"""

from pytorch_mqa.model.cache import KVCache
from pytorch_mqa.model.config import GPTConfig
from pytorch_mqa.model.generation import GenerationConfig, generate, stream_generate
from pytorch_mqa.model.gpt import GPT

__all__ = ["GPT", "GPTConfig", "GenerationConfig", "KVCache", "generate", "stream_generate"]
