"""Instruction fine-tuning in the Alpaca format: the data behind `fit` and the model's response.

The prompt (template + instruction + input) is masked out of the loss by default, so the model
learns to produce the response and the end-of-text token that follows it.
"""

from __future__ import annotations

from pytorch_mqa.model import generate
from pytorch_mqa.training.data import InstructionBatches, encode_instruction, format_prompt


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


def respond(model, tokenizer, example: dict, max_new_tokens: int = 64, **sampling) -> str:
    """The model's response to an instruction record (greedy unless sampling arguments say otherwise)."""
    prompt = tokenizer.encode(format_prompt(example))
    block = model.config.block_size
    n = min(max_new_tokens, block - min(len(prompt), block // 2))
    prompt = prompt[max(0, len(prompt) - (block - n)):]
    sampling.setdefault("temperature", 0)
    ids = generate(model, [prompt], n, eos_id=tokenizer.eos_id, **sampling)[0]
    return tokenizer.decode([i for i in ids if i != tokenizer.eos_id])


__all__ = ["InstructionData", "respond"]
