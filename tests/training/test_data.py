"""Corpora, batching, the Alpaca template, padding collate and loss masking."""

import json
import os

import pytest
import torch

from pytorch_mqa.training import data as D

HERE = os.path.join(os.path.dirname(__file__), "..")


def test_default_corpus_is_embedded_and_deterministic():
    text = D.default_corpus()
    assert 400_000 < len(text) < 600_000
    assert text == D.default_corpus()
    assert "for" in text and "statement" in text


def test_load_corpus_file(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("héllo wörld\n", encoding="utf-8")
    assert D.load_corpus(str(p)) == "héllo wörld\n"
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="corpus"):
        D.load_corpus(str(tmp_path / "e.txt"))


def test_split_is_deterministic_tail():
    train, val = D.split_train_val(list(range(100)), 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))


def test_lm_batches_are_shifted_windows_and_seeded():
    data = torch.arange(1000)
    x, y = D.get_lm_batch(data, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(y, x + 1)  # each target is the next token of the window
    x2, _ = D.get_lm_batch(data, 4, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="block_size"):
        D.get_lm_batch(torch.arange(5), 1, 8, torch.Generator())


def test_alpaca_templates():
    with_input = D.format_prompt({"instruction": "Add.", "input": "1 and 2", "output": "3"})
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:\n")
    no_input = D.format_prompt({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert no_input.startswith("Below is an instruction that describes a task. Write a response")
    assert no_input.endswith("### Instruction:\nSay hi.\n\n### Response:\n") and "### Input" not in no_input


def test_load_instructions_json_and_jsonl(tmp_path):
    records = D.load_instructions(os.path.join(HERE, "data", "instructions.json"))
    assert len(records) >= 10 and all("output" in r for r in records)
    p = tmp_path / "x.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in records[:3]))
    assert D.load_instructions(str(p)) == records[:3]
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(ValueError, match="output"):
        D.load_instructions(str(tmp_path / "bad.json"))


def encode_chars(s):
    return [ord(c) for c in s]


def test_encode_instruction_masks_prompt():
    ex = {"instruction": "Hi", "output": "yo"}
    ids, labels = D.encode_instruction(ex, encode_chars, eos_id=0, max_len=1000)
    n_prompt = len(D.format_prompt(ex))
    assert ids == encode_chars(D.format_prompt(ex) + "yo") + [0]
    assert labels == [D.IGNORE_INDEX] * n_prompt + encode_chars("yo") + [0]
    _, unmasked = D.encode_instruction(ex, encode_chars, 0, 1000, mask_prompt=False)
    assert unmasked == ids
    short, short_labels = D.encode_instruction(ex, encode_chars, 0, max_len=10)
    assert len(short) == len(short_labels) == 11


def test_collate_pads_and_masks():
    batch = [([5, 6, 7, 8], [-100, -100, 7, 8]), ([1, 2], [-100, 2])]
    x, y = D.collate_instructions(batch, pad_id=9)
    assert x.tolist() == [[5, 6, 7], [1, 9, 9]]
    assert y.tolist() == [[-100, 7, 8], [2, -100, -100]]
    _, y2 = D.collate_instructions(batch, pad_id=9, ignore_index=-1)
    assert y2.tolist() == [[-1, 7, 8], [2, -1, -1]]


def test_split_examples():
    recs = [{"instruction": str(i), "output": str(i)} for i in range(20)]
    train, val = D.split_examples(recs, 0.1, seed=0)
    assert len(val) == 2 and len(train) == 18 and not {r["instruction"] for r in val} & {r["instruction"] for r in train}
    assert D.split_examples(recs, 0.1, seed=0) == (train, val)


# ----------------------------------------------------------------------------- packed documents


def test_pack_documents():
    ids, cu, m = D.pack_documents([[5, 6, 7], [], [8], [9, 10]])
    assert ids.tolist() == [5, 6, 7, 8, 9, 10] and ids.dtype == torch.long
    assert cu.tolist() == [0, 3, 3, 4, 6] and cu.dtype == torch.int32 and m == 3
    with pytest.raises(ValueError, match="documents: expected at least one document"):
        D.pack_documents([])


def test_eot_cu_seqlens_ends_documents_after_eot_and_at_row_ends():
    EOT = 0
    x = torch.tensor([[3, 4, EOT, 5, 6, 7],
                      [EOT, 8, 9, EOT, EOT, 2]])
    cu, m = D.eot_cu_seqlens(x, EOT)
    # row 0: [3 4 EOT] [5 6 7] | row 1: [EOT] [8 9 EOT] [EOT] [2]
    assert cu.tolist() == [0, 3, 6, 7, 10, 11, 12] and cu.dtype == torch.int32 and m == 3
    cu1, m1 = D.eot_cu_seqlens(x[0], EOT)
    assert cu1.tolist() == [0, 3, 6] and m1 == 3
    cu2, _ = D.eot_cu_seqlens(torch.tensor([[1, 2, EOT]]), EOT)  # an EOT at the row end: no empty document
    assert cu2.tolist() == [0, 3]
    with pytest.raises(ValueError, match=r"x: expected token ids of shape \(B, T\)"):
        D.eot_cu_seqlens(torch.zeros(1, 2, 3, dtype=torch.long), EOT)


def test_encode_documents():
    ids = D.encode_documents(["ab", "  ", "c"], lambda s: [ord(ch) for ch in s], 0)
    assert ids == [97, 98, 0, 99, 0]
    with pytest.raises(ValueError, match="non-blank document"):
        D.encode_documents(["", " "], list, 0)


def test_packed_lm_loss_is_the_token_mean_over_documents():
    """lm_loss with pack_eot_id: each document of each window on its own, the token mean over all."""
    from model_helpers import tiny_gpt
    from pytorch_mqa.testing.tolerance import atol
    from pytorch_mqa.training.loop import lm_loss

    model = tiny_gpt(2)
    EOT = 0
    x = torch.tensor([[3, 4, EOT, 5, 6, 7, 8, 9], [EOT, 8, 9, 10, 11, EOT, 2, 3]])
    y = torch.randint(1, 97, x.shape, generator=torch.Generator().manual_seed(0))
    y[1, 2] = -100
    cu, _ = D.eot_cu_seqlens(x, EOT)
    xf, yf = x.reshape(-1), y.reshape(-1)
    with torch.no_grad():
        got = lm_loss(model, x, y, EOT).item()
        total, n = 0.0, 0
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            _, loss = model(xf[a:b][None], yf[a:b][None])
            k = int((yf[a:b] != -100).sum())
            total, n = total + loss.item() * k, n + k
        plain = lm_loss(model, x, y).item()
    assert abs(got - total / n) <= atol(torch.float32) * 10
    assert abs(got - plain) > 1e-4  # the document boundaries matter
