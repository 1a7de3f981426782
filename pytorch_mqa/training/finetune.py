"""Instruction fine-tuning in the Alpaca format: the data behind `fit` and the model's response.

The prompt (template + instruction + input) is masked out of the loss by default, so the model
learns to produce the response and the end-of-text token that follows it.
"""

from __future__ import annotations

from pytorch_mqa.model import generate
from pytorch_mqa.training.data import InstructionBatches, collate_instructions, encode_instruction, format_prompt


class InstructionData:
    """Train/val instruction batches behind the `sample(split, generator, device)` interface of `fit`."""

    def __init__(self, train_records, val_records, tokenizer, batch_size: int, max_len: int, mask_prompt: bool = True):
        pad = getattr(tokenizer, "pad_id", tokenizer.eos_id)  # padded positions are masked out of the loss

        def enc(recs):
            return [encode_instruction(r, tokenizer.encode, tokenizer.eos_id, max_len, mask_prompt) for r in recs]

        self.splits = {"train": InstructionBatches(enc(train_records), batch_size, pad),
                       "val": InstructionBatches(enc(val_records), batch_size, pad)}

    def sample(self, split, generator, device):
        return self.splits[split].sample(generator, device)

    @property
    def batch_size(self) -> int:
        return self.splits["train"].batch_size

    @property
    def train_sequences(self) -> int:
        """Examples in one pass over the training split (for --epochs)."""
        return len(self.splits["train"].examples)

    def full_batches(self, split: str, batch_size: int):
        """Every example of `split` once, in order, `batch_size` at a time (on the CPU)."""
        part = self.splits[split]
        for i in range(0, len(part.examples), batch_size):
            yield collate_instructions(part.examples[i:i + batch_size], part.pad_id)


def respond(model, tokenizer, example: dict, max_new_tokens: int = 64, **sampling) -> str:
    """The model's response to an instruction record (greedy unless sampling arguments say otherwise).

    The prompt is kept whole, so the model always sees the Alpaca header: the response stops where
    prompt + response fill the context (see `response_budget`).
    """
    prompt = tokenizer.encode(format_prompt(example))
    n = response_budget(len(prompt), max_new_tokens, model.config.block_size)
    sampling.setdefault("temperature", 0)
    ids = generate(model, [prompt], n, eos_id=tokenizer.eos_id, **sampling)[0]
    return tokenizer.decode([i for i in ids if i != tokenizer.eos_id])


def response_budget(prompt_len: int, max_new_tokens: int, block_size: int) -> int:
    """Tokens a response may have with the whole prompt still in the context (the last new token is
    never fed back, so prompt + response - 1 positions are used)."""
    if prompt_len > block_size:
        raise ValueError(f"example: its prompt is {prompt_len} tokens, expected at most the model's context of "
                         f"{block_size} tokens, so that the whole prompt and some response fit")
    return min(max_new_tokens, block_size - prompt_len + 1)


__all__ = ["InstructionData", "respond", "response_budget"]
