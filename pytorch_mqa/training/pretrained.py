"""A GPT and its tokenizer from one directory: what train/finetune write, or a GPT-2 directory."""

from __future__ import annotations

import os

from pytorch_mqa.core.dtypes import as_dtype
from pytorch_mqa.model import GPT
from pytorch_mqa.model.bigram import BigramLM, is_bigram_checkpoint
from pytorch_mqa.training.files import MODEL_EXPECTED, FileFormatError, check_model_files
from pytorch_mqa.training.tokenizers import GPT2Tokenizer, load_tokenizer


def load_model(path: str, **kwargs) -> GPT:
    """`GPT.from_pretrained(path, **kwargs)`, with every failure to read the files reported against `path`.

    The files are checked first (JSON config, complete safetensors / torch.save weights), so a
    garbage or truncated checkpoint is named as such; anything else the loader raises is reported
    with the path in front.
    """
    check_model_files(path)
    return _load_checked(path, **kwargs)


def _load_checked(path: str, **kwargs) -> GPT:
    if os.path.isdir(path) and is_bigram_checkpoint(path):  # train --arch bigram/unigram
        extra = {k for k, v in kwargs.items() if v is not None and k not in ("device", "dtype")}
        if extra:
            raise ValueError(f"{', '.join(sorted(extra))}: a bigram/unigram checkpoint has no attention heads")
        model = BigramLM.from_pretrained(path, device=kwargs.get("device"))
        return model if kwargs.get("dtype") is None else model.to(as_dtype(kwargs["dtype"]))
    try:
        return GPT.from_pretrained(path, **kwargs)
    except (FileFormatError, FileNotFoundError):
        raise
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    except Exception as e:  # a loader's own words for an unreadable file (pickle, zip, safetensors errors)
        raise FileFormatError(path, f"could not be read ({type(e).__name__}: {e})", MODEL_EXPECTED) from e


def load_model_and_tokenizer(path: str, *, n_kv_head=None, device="cpu", dtype=None, tokenizer_kind=None,
                             n_head=None, tokenizer_dir=None):
    """A GPT and its tokenizer from `path`: a directory written by train/finetune, or a GPT-2 directory.

    The tokenizer is the one saved beside the weights; else GPT-2's vocab.json/merges.txt in the
    directory; else (or with tokenizer_kind="gpt2") GPT-2's from `tokenizer_dir` or tiktoken's cache.
    `n_head` is for weights files that do not say how many heads they have (a bare state dict).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory or weights file; expected {MODEL_EXPECTED}")
    check_model_files(path)  # cheap: a garbage or truncated file is named before anything else is tried
    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if tokenizer_kind == "gpt2":
        tokenizer = GPT2Tokenizer(path=tokenizer_dir)
    else:
        try:
            tokenizer = load_tokenizer(directory)
        except FileNotFoundError:
            tokenizer = GPT2Tokenizer(path=tokenizer_dir)  # a bare GPT-2 checkpoint: a clear error if not found
    model = _load_checked(path, n_kv_head=n_kv_head, n_head=n_head, dtype=dtype, device=device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{path}: the tokenizer's vocabulary ({tokenizer.vocab_size}) is larger than the "
                         f"model's ({model.config.vocab_size}); expected the tokenizer saved with these weights")
    return model, tokenizer


__all__ = ["load_model", "load_model_and_tokenizer"]
