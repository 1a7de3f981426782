"""The training layer: corpora and batches, tokenizers, the training loop, instruction fine-tuning."""
