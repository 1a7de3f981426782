"""Instruction fine-tuning: prompt and padding tokens contribute nothing to the loss; an end-to-end run."""

import json
import os

import pytest
import torch

from pytorch_mqa import cli
from pytorch_mqa.training.data import IGNORE_INDEX, collate_instructions, encode_instruction, format_prompt, load_instructions
from pytorch_mqa.training.finetune import InstructionData, respond
from pytorch_mqa.model import GPT, GPTConfig
from pytorch_mqa.training.tokenizers import CharTokenizer
from pytorch_mqa.training.loop import lm_loss

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "instructions.json")


# Small models on a shared 2-core machine run fastest on one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def make(block=256):
    records = load_instructions(DATA)
    tok = CharTokenizer.train("".join(format_prompt(r) + r["output"] for r in records))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block, n_layer=1, n_head=2, n_kv_head=1, n_embd=32))
    return records, tok, model


class ScrambleMasked(torch.nn.Module):
    """Wraps a model; replaces the logits wherever the target is masked with random values."""

    def __init__(self, model, y):
        super().__init__()
        self.model, self.mask = model, (y == IGNORE_INDEX)

    def forward(self, x):
        logits = self.model(x)
        noise = torch.randn_like(logits) * 50
        return torch.where(self.mask[..., None], noise, logits)


def test_prompt_and_padding_positions_do_not_change_the_loss():
    records, tok, model = make()
    batch = [encode_instruction(r, tok.encode, tok.eos_id, 255) for r in records[:3]]
    x, y = collate_instructions(batch, pad_id=tok.eos_id)
    assert (y == IGNORE_INDEX).any(dim=1).all()  # every row has masked (prompt and/or padding) targets
    with torch.no_grad():
        base = lm_loss(model, x, y)
        scrambled = lm_loss(ScrambleMasked(model, y), x, y)
    torch.testing.assert_close(scrambled, base, rtol=1e-6, atol=1e-6)


def test_padding_changes_nothing_per_example():
    records, tok, model = make()
    a, b = (encode_instruction(r, tok.encode, tok.eos_id, 255) for r in records[:2])
    with torch.no_grad():
        xa, ya = collate_instructions([a], tok.eos_id)
        xb, yb = collate_instructions([b], tok.eos_id)
        na, nb = (ya != IGNORE_INDEX).sum(), (yb != IGNORE_INDEX).sum()
        expected = (lm_loss(model, xa, ya) * na + lm_loss(model, xb, yb) * nb) / (na + nb)
        x, y = collate_instructions([a, b], tok.eos_id)
        assert x.shape[1] == max(xa.shape[1], xb.shape[1])
        torch.testing.assert_close(lm_loss(model, x, y), expected, rtol=1e-5, atol=1e-6)


def test_loss_counts_only_response_tokens():
    records, tok, model = make()
    ex = records[0]
    ids, labels = encode_instruction(ex, tok.encode, tok.eos_id, 255)
    x, y = collate_instructions([(ids, labels)], tok.eos_id)
    n_response = len(tok.encode(ex["output"])) + 1  # + end-of-text
    assert int((y != IGNORE_INDEX).sum()) == n_response
    with torch.no_grad():
        logp = torch.log_softmax(model(x), -1)[0, -n_response:]
        manual = -logp.gather(-1, torch.tensor(ids[-n_response:])[:, None]).mean()
        torch.testing.assert_close(lm_loss(model, x, y), manual, rtol=1e-5, atol=1e-6)
    _, unmasked = collate_instructions([encode_instruction(ex, tok.encode, tok.eos_id, 255, mask_prompt=False)], 0)
    assert int((unmasked != IGNORE_INDEX).sum()) == len(ids) - 1


def test_long_prompts_keep_the_response():
    records, tok, model = make(block=64)
    ids, labels = encode_instruction(records[1], tok.encode, tok.eos_id, max_len=63)
    assert len(ids) == 64 and labels[-1] == tok.eos_id
    assert tok.decode(ids).endswith("### Response:\n" + records[1]["output"] + tok.decode([tok.eos_id]))


@pytest.mark.slow
def test_finetune_cli_end_to_end(tmp_path, capsys):
    records, tok, model = make()
    init = tmp_path / "init"
    model.save_pretrained(str(init))
    tok.save(str(init))
    out = tmp_path / "ft"
    rc = cli.main(["finetune", "--data", DATA, "--init", str(init), "--out", str(out), "--max-steps", "40",
                   "--lr", "1e-2", "--warmup-steps", "5", "--eval-interval", "20", "--eval-iters", "2",
                   "--batch-size", "4", "--device", "cpu", "--no-progress"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    losses = metrics["history"]["loss"]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert (out / "loss.png").exists() and (out / "checkpoint" / "model.safetensors").exists()
    capsys.readouterr()
    rc = cli.main(["generate", "--init", str(out / "checkpoint"), "--instruction", "--temperature", "0",
                   "--max-new-tokens", "20", "--device", "cpu", records[0]["instruction"]])
    text = capsys.readouterr().out
    assert rc == 0 and "tokens/s" in text.splitlines()[-1]
    assert "### Response" not in text  # only the response is shown, not the template


def test_respond_uses_the_template():
    records, tok, model = make()
    data = InstructionData(records[:4], records[4:6], tok, batch_size=2, max_len=255)
    x, y = data.sample("train", torch.Generator().manual_seed(0), "cpu")
    assert x.shape[0] == 2 and (y != IGNORE_INDEX).any()
    assert isinstance(respond(model, tok, records[0], max_new_tokens=5), str)


@pytest.mark.slow
def test_finetune_from_hugging_face_directory_with_kv_conversion(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from pytorch_mqa.training import tokenizers as T

    hf = tmp_path / "hf"
    byte_order = list(T._gpt2_byte_decoder())  # GPT-2's byte symbols in id order
    vocab = {c: i for i, c in enumerate(byte_order)}
    vocab[T.EOT] = 256
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=257, n_positions=256, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(hf))
    (hf / "vocab.json").write_text(json.dumps(vocab))
    (hf / "merges.txt").write_text("#version: 0.2\n")
    out = tmp_path / "ft"
    assert cli.main(["finetune", "--data", DATA, "--init", str(hf), "--n-kv-head", "1", "--out", str(out),
                     "--max-steps", "4", "--eval-interval", "4", "--eval-iters", "1", "--batch-size", "2",
                     "--device", "cpu", "--no-progress"]) == 0
    saved = json.loads((out / "checkpoint" / "config.json").read_text())
    assert saved["n_kv_head"] == 1 and saved["n_head"] == 2 and saved["vocab_size"] == 257
    assert T.load_tokenizer(str(out / "checkpoint")).eos_id == 256
    capsys.readouterr()
    assert cli.main(["generate", "--init", str(out / "checkpoint"), "--instruction", "--max-new-tokens", "4",
                     "--seed", "0", "--device", "cpu", "Say hi."]) == 0
    assert "tokens/s" in capsys.readouterr().out


@pytest.mark.slow
def test_finetune_epochs_report_val_loss_and_write_answers(tmp_path, capsys):
    records, tok, model = make()
    init = tmp_path / "init"
    model.save_pretrained(str(init))
    tok.save(str(init))
    out, answers = tmp_path / "ft", tmp_path / "answers" / "val.json"
    rc = cli.main(["finetune", "--data", DATA, "--init", str(init), "--out", str(out), "--epochs", "2",
                   "--lr", "1e-2", "--warmup-steps", "2", "--batch-size", "4", "--device", "cpu", "--no-progress",
                   "--answers", str(answers), "--answer-tokens", "8"])
    assert rc == 0
    text = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert [round(e["epoch"]) for e in metrics["epochs"]] == [1, 2]  # one full-split val loss per epoch
    assert all(e["val"] > 0 for e in metrics["epochs"]) and "(epoch 1.00)" in text
    got = json.loads(answers.read_text())
    from pytorch_mqa.training.data import split_examples

    held_out = split_examples(records, 0.1, 0)[1]
    assert [r["instruction"] for r in got] == [r["instruction"] for r in held_out]
    assert all(set(r) >= {"instruction", "output", "model_response"} for r in got)
    assert all(isinstance(r["model_response"], str) for r in got)
