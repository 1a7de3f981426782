"""Corpora, language-model batches and the Alpaca instruction format.

The default corpus is the Python language reference that ships with every CPython
(`pydoc_data.topics`, ~465 KB of English prose), so nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from typing import Callable, Sequence

import torch

from pytorch_mqa.model.loss import IGNORE_INDEX  # noqa: E402  (re-exported: the training data masks with it)
from pytorch_mqa.training.files import FileFormatError, read_utf8

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


# ------------------------------------------------------------------------------------- corpora


def default_corpus() -> str:
    """The embedded corpus: every `pydoc_data.topics` entry, in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def load_corpus(path: str | None = None) -> str:
    """`path` (a UTF-8 text file) or, when None, the embedded default corpus.

    A missing, unreadable, empty or non-UTF-8 file raises an error that names the path (and, for
    bad UTF-8, the byte offset)."""
    if path is None:
        return default_corpus()
    text = read_utf8(path, "corpus")
    if not text:
        raise FileFormatError(path, "empty", "a non-empty UTF-8 text file as the corpus")
    return text


def check_split_lengths(n_train: int, n_val: int, block_size: int, val_fraction: float = 0.1,
                        source: str = "corpus") -> None:
    """Both splits must hold at least one window of block_size + 1 tokens; the message says which does not.

    (Batches are drawn with replacement, so the batch size needs no more tokens than one window.)"""
    for name, n in ((f"training split (the first {1 - val_fraction:.0%})", n_train),
                    (f"validation split (the last {val_fraction:.0%})", n_val)):
        if n < block_size + 1:
            raise ValueError(
                f"{source}: the {name} has {n:,} tokens, expected at least block_size + 1 = {block_size + 1}; "
                "use a longer corpus or a smaller --block-size"
            )


def split_train_val(ids: Sequence[int] | torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split: the first `1 - val_fraction` of the tokens train, the rest validate."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction}")
    data = torch.as_tensor(ids, dtype=torch.long)
    n_val = max(1, int(len(data) * val_fraction))
    return data[:-n_val], data[-n_val:]


def get_lm_batch(
    data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of `block_size` tokens and their next-token targets, both (B, T)."""
    if len(data) < block_size + 1:
        raise ValueError(
            f"data: expected at least block_size + 1 = {block_size + 1} tokens, got {len(data)} "
            "(use a longer corpus or a smaller --block-size)"
        )
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size + 1)
    windows = data[starts[:, None] + offsets]
    x, y = windows[:, :-1], windows[:, 1:]
    return x.to(device), y.to(device)


# ------------------------------------------------------------------------- packed documents


def pack_documents(documents: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Documents one after another in one row, for `GPT.forward(ids, cu_seqlens=..., max_seqlen=...)`.

    Returns ids (total,) int64, cu_seqlens int32 (N + 1,) (0, len_0, len_0 + len_1, ..., total) and
    max_seqlen, the longest document (a host int). Empty documents are kept (empty ranges)."""
    if not len(documents):
        raise ValueError("documents: expected at least one document, got none")
    lengths = [len(d) for d in documents]
    ids = torch.tensor([t for d in documents for t in d], dtype=torch.long)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return ids, cu, max(lengths)


def eot_cu_seqlens(x: torch.Tensor, eot_id: int) -> tuple[torch.Tensor, int]:
    """Document boundaries of windows x (B, T) (or (T,)) cut from a token stream whose documents
    each end with the token `eot_id` (GPT-2's <|endoftext|>): a document ends after every EOT token
    and at the end of every row. Returns cu_seqlens int32 over the B * T tokens of x flattened (one
    packed row) and max_seqlen, a host int (reading it is a device sync when x is on a GPU)."""
    if x.dim() not in (1, 2):
        raise ValueError(f"x: expected token ids of shape (B, T) or (T,), got shape {tuple(x.shape)}")
    T = x.shape[-1]
    flat = x.reshape(-1)
    ends = torch.nonzero(flat == eot_id).flatten() + 1
    row_ends = torch.arange(1, flat.numel() // max(T, 1) + 1, device=x.device) * T
    cu = torch.cat([torch.zeros(1, dtype=ends.dtype, device=x.device), ends, row_ends]).unique(sorted=True)
    max_seqlen = int(cu.diff().max()) if cu.numel() > 1 else 0
    return cu.to(torch.int32), max_seqlen


def encode_documents(documents: Sequence[str], encode: Callable[[str], list[int]], eot_id: int) -> list[int]:
    """One token stream: every non-blank document's ids followed by `eot_id` (GPT-2's data layout)."""
    ids: list[int] = []
    for doc in documents:
        if doc.strip():
            ids += encode(doc) + [eot_id]
    if not ids:
        raise ValueError("documents: expected at least one non-blank document, got none")
    return ids


# ------------------------------------------------------------------------------- instructions


def format_prompt(example: dict) -> str:
    """The Alpaca prompt for `example` (with or without its optional `input`), ending in "### Response:\\n"."""
    if "instruction" not in example:
        raise ValueError(f"example: expected an 'instruction' key, got keys {sorted(example)}")
    if example.get("input"):
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=example["instruction"], input=example["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=example["instruction"])


INSTRUCTIONS_EXPECTED = ('a JSON list of {"instruction", "input" (optional), "output"} objects, '
                         "or one such object per line (JSON lines)")


def load_instructions(path: str) -> list[dict]:
    """A JSON list (or JSON-lines file) of {"instruction", optional "input", "output"} records.

    Errors name the file, and the line and column (bad JSON) or the record (bad fields)."""
    text = read_utf8(path, "instruction data")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as whole:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                where = f"line {whole.lineno} column {whole.colno}" if lineno == 1 else f"line {lineno}"
                raise FileFormatError(path, f"not valid JSON ({whole.msg} at {where})",
                                      INSTRUCTIONS_EXPECTED) from None
    if not isinstance(records, list) or not records:
        got = "an empty list" if records == [] else f"a JSON {type(records).__name__}"
        raise FileFormatError(path, f"holds {got}", INSTRUCTIONS_EXPECTED)
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise FileFormatError(path, f"record {i} is {json.dumps(r)[:80]}", INSTRUCTIONS_EXPECTED)
        if not isinstance(r.get("input", ""), str):
            raise FileFormatError(path, f"record {i} has a non-string 'input'", INSTRUCTIONS_EXPECTED)
    return records


def encode_instruction(
    example: dict, encode: Callable[[str], list[int]], eos_id: int, max_len: int, mask_prompt: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response + end-of-text, and per-position labels (same length).

    Labels are the ids themselves, with the prompt's positions set to IGNORE_INDEX when
    `mask_prompt`. Both are cut to `max_len + 1` tokens (inputs and targets are shifted later):
    a long prompt loses its beginning (its end, "### Response:", is what the response follows),
    keeping at least half the budget for the response.
    """
    prompt = encode(format_prompt(example))
    response = encode(example["output"]) + [eos_id]
    budget = max_len + 1
    keep = min(len(prompt), max(budget - len(response), budget // 2))
    prompt = prompt[len(prompt) - keep:]
    ids = (prompt + response)[:budget]
    labels = ([IGNORE_INDEX] * len(prompt) if mask_prompt else list(prompt)) + response
    return ids, labels[:budget]


def collate_instructions(
    batch: Sequence[tuple[list[int], list[int]]], pad_id: int, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch of (ids, labels) into inputs x (B, T) and targets y (B, T).

    x[t] predicts y[t] = labels[t + 1]; padded positions get `ignore_index`, so neither padding
    nor (masked) prompt tokens contribute to the loss.
    """
    T = max(len(ids) for ids, _ in batch) - 1
    if T < 1:
        raise ValueError("batch: expected examples of at least two tokens")
    x = torch.full((len(batch), T), pad_id, dtype=torch.long)
    y = torch.full((len(batch), T), ignore_index, dtype=torch.long)
    for i, (ids, labels) in enumerate(batch):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        lab = torch.tensor(labels[1:])
        y[i, :n] = torch.where(lab == IGNORE_INDEX, torch.full_like(lab, ignore_index), lab)
    return x, y


class InstructionBatches:
    """Random batches of encoded instruction examples, drawn with a seeded generator."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int):
        if not examples:
            raise ValueError("examples: expected at least one encoded instruction example")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id

    def sample(self, generator: torch.Generator, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.examples), (self.batch_size,), generator=generator).tolist()
        x, y = collate_instructions([self.examples[i] for i in idx], self.pad_id)
        return x.to(device), y.to(device)


def split_examples(records: list[dict], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic shuffle-and-split of instruction records (at least one in each part when possible)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(records) * val_fraction)) if len(records) > 1 else 0
    val = [records[i] for i in order[:n_val]]
    train = [records[i] for i in order[n_val:]]
    return train, val or train
