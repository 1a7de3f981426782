"""Shrunken versions of README's "Redo the classic exercises": the same commands, tiny sizes.

They use ../shared/data (Tiny Shakespeare, GPT-2's BPE files) when it is beside the clone, and
fall back to the embedded corpus and a byte-level GPT-2 vocabulary when it is not.
"""

import json
import os
import re
import shutil

import pytest
import torch

from pytorch_mqa import cli
from shared_data import CANDIDATES

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "instructions.json")

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def _shared(name):
    for base in CANDIDATES:
        path = os.path.normpath(os.path.join(base, name))
        if os.path.exists(path):
            return path
    return None


def _shakespeare(tmp_path, chars=200_000):
    """The first `chars` characters of Tiny Shakespeare, or None (the embedded corpus) without it."""
    path = _shared("tinyshakespeare.txt")
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read()[:chars]
    (tmp_path / "shakespeare.txt").write_text(text, encoding="utf-8")
    return str(tmp_path / "shakespeare.txt")


def test_word_level_mqa_study(tmp_path, capsys):
    corpus, out = _shakespeare(tmp_path), tmp_path / "study"
    sentences = tmp_path / "mine.txt"
    sentences.write_text("ROMEO: I will go.\nThe king is dead.\n")
    argv = ["study", "--tokenizer", "word", "--word-split", "whitespace", "--vocab-size", "1024", "--n-layer", "1",
            "--n-head", "4", "--n-embd", "32", "--block-size", "16", "--batch-size", "8", "--max-steps", "8",
            "--seeds", "2", "--jobs", "1", "--lr", "3e-3", "--schedule", "linear", "--dropout", "0.1",
            "--weight-decay", "0.05", "--out", str(out), "--device", "cpu", "--no-progress"]
    assert cli.main(argv + (["--corpus", corpus] if corpus else [])) == 0
    printed = capsys.readouterr().out
    assert "| bigram (baseline) |" in printed and "| MQA |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["study"]["sentences"]["in_domain_source"] == "held-out split"
    assert results["study"]["preset"]["schedule"] == "linear" and results["study"]["base_config"]["dropout"] == 0.1
    report = (out / "report.md").read_text()
    for s in results["study"]["sentences"]["in_domain"]:
        assert s in report
    # Own sentences: each scored by every variant and printed.
    assert cli.main(argv + ["--sentences", str(sentences), "--seeds", "1", "--out", str(tmp_path / "own")]
                    + (["--corpus", corpus] if corpus else [])) == 0
    own = json.loads((tmp_path / "own" / "results.json").read_text())
    assert own["study"]["sentences"]["in_domain"] == ["ROMEO: I will go.", "The king is dead."]
    assert all(len(v["runs"][0]["sentences"]["in_domain"]) == 2 for v in own["variants"])
    assert "The king is dead." in (tmp_path / "own" / "report.md").read_text()


def _gpt2_directory(root):
    """A tiny randomly initialised GPT-2 in a Hugging Face directory, with GPT-2's real tokenizer files
    (vocab.json + merges.txt) when they are beside the clone, else a byte-level vocabulary."""
    transformers = pytest.importorskip("transformers")
    from pytorch_mqa.training import tokenizers as T

    root.mkdir()
    gpt2 = _shared("gpt2")
    if gpt2 is not None:
        shutil.copy(os.path.join(gpt2, "encoder.json"), root / "vocab.json")
        shutil.copy(os.path.join(gpt2, "vocab.bpe"), root / "merges.txt")
        vocab = 50257
    else:
        symbols = {c: i for i, c in enumerate(T._gpt2_byte_decoder())}
        symbols[T.EOT] = 256
        (root / "vocab.json").write_text(json.dumps(symbols))
        (root / "merges.txt").write_text("#version: 0.2\n")
        vocab = 257
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(root))
    return root


def test_gpt2_instruction_finetuning(tmp_path, capsys):
    hf = _gpt2_directory(tmp_path / "gpt2")
    out, answers = tmp_path / "ft", tmp_path / "ft" / "answers.json"
    assert cli.main(["finetune", "--data", DATA, "--init", str(hf), "--n-kv-head", "1", "--epochs", "2",
                     "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "1", "--answers", str(answers),
                     "--answer-tokens", "8", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [round(e["epoch"]) for e in metrics["epochs"]] == [1, 2]
    assert all("model_response" in r for r in json.loads(answers.read_text()))
    capsys.readouterr()
    lines = []
    for flag in ([], ["--no-cache"]):
        assert cli.main(["generate", "--init", str(out / "checkpoint"), "--instruction", "--temperature", "0",
                         "--max-new-tokens", "12", "--device", "cpu", *flag, "Name a colour."]) == 0
        lines.append(capsys.readouterr().out.splitlines())
    assert lines[0][:-1] == lines[1][:-1]  # the same greedy text with and without the cache
    assert "KV cache" in lines[0][-1] and "no cache" in lines[1][-1] and "tokens/s" in lines[0][-1]


def test_char_level_shakespeare_bigram_to_transformer(tmp_path, capsys):
    corpus = _shakespeare(tmp_path, 100_000)
    base = ["--tokenizer", "char", "--batch-size", "16", "--device", "cpu", "--no-progress", "--eval-full"]
    base += ["--corpus", corpus] if corpus else []
    assert cli.main(["train", "--arch", "bigram", "--block-size", "8", "--max-steps", "60", "--lr", "1e-1",
                     "--weight-decay", "0", "--schedule", "constant", "--warmup-steps", "1", "--eval-interval", "60",
                     "--out", str(tmp_path / "bigram"), *base]) == 0
    bigram = json.loads((tmp_path / "bigram" / "metrics.json").read_text())["history"]["eval"][-1]
    assert bigram["val"] < 3.5  # ln(67) = 4.2 untrained
    assert cli.main(["train", "--n-layer", "1", "--n-head", "4", "--n-kv-head", "1", "--n-embd", "32",
                     "--block-size", "32", "--max-steps", "30", "--lr", "3e-3", "--warmup-steps", "3",
                     "--eval-interval", "30", "--out", str(tmp_path / "gpt"), *base]) == 0
    capsys.readouterr()
    texts = []
    for init, flag in ((tmp_path / "gpt", []), (tmp_path / "gpt", ["--no-cache"]), (tmp_path / "bigram", [])):
        assert cli.main(["generate", "--init", str(init / "checkpoint"), "--max-new-tokens", "100", "--temperature",
                         "0", "--device", "cpu", *flag, "ROMEO:"]) == 0
        captured = capsys.readouterr()
        assert re.search(r"\[100 tokens in", captured.out)  # never cut short by the context
        assert captured.err.count("[warning:") == 1 and "cropped to the last" in captured.err
        texts.append(captured.out.rsplit("\n[", 1)[0])
    assert texts[0] == texts[1] and len(texts[0]) == len("ROMEO:") + 100
