"""A GPT and its tokenizer from one directory: what train/finetune write, or a GPT-2 directory."""

from __future__ import annotations

import os

from pytorch_mqa.model import GPT
from pytorch_mqa.training.tokenizers import GPT2Tokenizer, load_tokenizer


def load_model_and_tokenizer(path: str, *, n_kv_head=None, device="cpu", dtype=None, tokenizer_kind=None):
    """A GPT and its tokenizer from `path`: a directory written by train/finetune, or a GPT-2 directory.

    The tokenizer is the one saved beside the weights; else GPT-2's vocab.json/merges.txt in the
    directory; else (or with tokenizer_kind="gpt2") GPT-2's from tiktoken's cache.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"init: expected a checkpoint directory or weights file, {path!r} does not exist")
    model = GPT.from_pretrained(path, n_kv_head=n_kv_head, dtype=dtype, device=device)
    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if tokenizer_kind == "gpt2":
        tokenizer = GPT2Tokenizer()
    else:
        try:
            tokenizer = load_tokenizer(directory)
        except FileNotFoundError:
            tokenizer = GPT2Tokenizer()  # a bare GPT-2 checkpoint: raises a clear error if not cached
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer: its vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                         f"({model.config.vocab_size}) in {path!r}")
    return model, tokenizer


__all__ = ["load_model_and_tokenizer"]
