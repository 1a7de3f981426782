"""`pytorch-mqa train / generate / study` through cli.main(argv)."""

import io
import json
import os

import pytest
import torch

from pytorch_mqa import cli

CORPUS = ("A class definition defines a class object. The with statement wraps a block with methods of a "
          "context manager. Names refer to objects, and names are introduced by name binding. ") * 25


# Small models on a shared 2-core machine run fastest on one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS)
    out = root / "train"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    rc = cli.main(["train", "--corpus", str(corpus), "--tokenizer", "bpe", "--vocab-size", "300", "--n-layer", "1",
                   "--n-head", "2", "--n-kv-head", "1", "--n-embd", "32", "--block-size", "32", "--max-steps", "30",
                   "--lr", "1e-2", "--warmup-steps", "3", "--eval-interval", "15", "--eval-iters", "2",
                   "--out", str(out), "--device", "cpu", "--no-progress"])
    torch.set_num_threads(n)
    assert rc == 0
    return corpus, out


def test_commands_registered():
    parser = cli.build_parser()
    for cmd in ("info", "train", "generate", "study", "finetune"):
        assert cmd in cli.COMMANDS
    args = parser.parse_args(["train", "--tokenizer", "word", "--n-kv-head", "2", "--backend", "reference",
                              "--seed", "3", "--out", "x", "--corpus", "c.txt", "--device", "cpu"])
    assert (args.tokenizer, args.n_kv_head, args.backend, args.seed) == ("word", 2, "reference", 3)


@pytest.mark.slow
def test_train_outputs(trained):
    _, out = trained
    assert {"checkpoint", "loss.png", "metrics.json"} <= set(os.listdir(out))
    m = json.loads((out / "metrics.json").read_text())
    assert m["summary"]["steps"] == 30 and m["summary"]["val_perplexity"] > 1
    assert m["history"]["loss"][-1] < m["history"]["loss"][0]
    cfg = json.loads((out / "checkpoint" / "config.json").read_text())
    assert cfg["n_kv_head"] == 1 and cfg["vocab_size"] == 300


@pytest.mark.slow
def test_train_resume_continues(trained):
    corpus, out = trained
    rc = cli.main(["train", "--corpus", str(corpus), "--max-steps", "35", "--lr", "1e-2", "--warmup-steps", "3",
                   "--eval-interval", "15", "--eval-iters", "2", "--out", str(out), "--device", "cpu",
                   "--no-progress", "--resume"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["history"]["step"] == list(range(1, 36))


def test_generate_from_argument_and_stdin(trained, capsys, monkeypatch):
    _, out = trained
    ckpt = str(out / "checkpoint")
    common = ["generate", "--init", ckpt, "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu"]
    assert cli.main(common + ["A class"]) == 0
    cached = capsys.readouterr().out
    lines = cached.rstrip("\n").splitlines()
    assert cached.startswith("A class") and "tokens/s" in lines[-1] and "KV cache" in lines[-1]
    assert cli.main(common + ["--no-cache", "A class"]) == 0
    uncached = capsys.readouterr().out
    assert "no cache" in uncached.splitlines()[-1]
    assert uncached.splitlines()[:-1] == lines[:-1]  # greedy text is the same with and without the cache
    monkeypatch.setattr("sys.stdin", io.StringIO("A class"))
    assert cli.main(common) == 0
    assert capsys.readouterr().out.splitlines()[:-1] == lines[:-1]


def test_generate_sampling_flags(trained, capsys):
    _, out = trained
    args = ["generate", "--init", str(out / "checkpoint"), "--max-new-tokens", "10", "--temperature", "0.9",
            "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.2", "--seed", "7", "--device", "cpu", "Names"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out.splitlines()[:-1]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.splitlines()[:-1] == first  # seeded sampling is reproducible


def test_generate_missing_checkpoint(tmp_path, capsys):
    assert cli.main(["generate", "--init", str(tmp_path / "nope"), "hi"]) == 1
    assert f"{tmp_path / 'nope'}: no such checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_study_cli(trained, tmp_path, capsys):
    corpus, _ = trained
    out = tmp_path / "study"
    rc = cli.main(["study", "--quick", "--corpus", str(corpus), "--n-layer", "1", "--n-embd", "32", "--block-size",
                   "32", "--max-steps", "6", "--seeds", "1", "--out", str(out), "--device", "cpu", "--no-progress"])
    assert rc == 0
    assert "| MQA |" in capsys.readouterr().out
    assert {"report.md", "results.json", "loss_curves.png", "perplexity.png"} <= set(os.listdir(out))


def test_backend_flag_forces_the_backend(trained, capsys, monkeypatch):
    from pytorch_mqa.kernels import attention_with_kv_cache as kernel
    from pytorch_mqa.ops.backends import ENV_VAR

    _, out = trained
    monkeypatch.setenv(ENV_VAR, "auto")  # restored after the test
    seen = []
    launch = kernel.attention_with_kv_cache

    def spy(*args):
        seen.append("triton")
        return launch(*args)

    monkeypatch.setattr(kernel, "attention_with_kv_cache", spy)
    assert cli.main(["generate", "--init", str(out / "checkpoint"), "--backend", "triton", "--max-new-tokens", "3",
                     "--device", "cpu", "A"]) == 0
    assert seen and set(seen) == {"triton"}
    assert os.environ[ENV_VAR] == "auto"  # the choice travels as an argument, not through the environment
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["generate", "--init", str(out / "checkpoint"), "--backend", "fast", "A"])


def test_generate_from_a_bare_scratch_layout_file_needs_n_head(trained, tmp_path, capsys):
    from pytorch_mqa.model import GPT
    from pytorch_mqa.training.tokenizers import load_tokenizer

    _, out = trained
    model = GPT.from_pretrained(str(out / "checkpoint"))
    model.save_pretrained(str(tmp_path), format="scratch")  # tmp_path/model.pth: no config.json
    load_tokenizer(str(out / "checkpoint")).save(str(tmp_path))
    argv = ["generate", "--init", str(tmp_path / "model.pth"), "--max-new-tokens", "3", "--temperature", "0",
            "--device", "cpu", "A"]
    assert cli.main(argv) == 1
    assert "n_head" in capsys.readouterr().err
    assert cli.main(argv + ["--n-head", "2"]) == 0
    assert "[3 tokens in" in capsys.readouterr().out


def test_train_with_attention_dropout(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    out = tmp_path / "run"
    rc = cli.main(["train", "--corpus", str(corpus), "--tokenizer", "char", "--n-layer", "1", "--n-head", "2",
                   "--n-kv-head", "1", "--n-embd", "32", "--block-size", "32", "--max-steps", "20", "--lr", "1e-2",
                   "--warmup-steps", "3", "--eval-interval", "20", "--eval-iters", "1", "--attn-dropout", "0.2",
                   "--out", str(out), "--device", "cpu", "--no-progress", "--checkpoint-minutes", "0"])
    assert rc == 0
    cfg = json.loads((out / "checkpoint" / "config.json").read_text())
    assert cfg["attn_dropout"] == 0.2
    m = json.loads((out / "metrics.json").read_text())
    assert m["history"]["loss"][-1] < m["history"]["loss"][0]


def test_train_packed(tmp_path, capsys):
    """--pack: documents cut at <|endoftext|>, each batch one packed row; the run trains and
    resuming without --pack is refused."""
    corpus = tmp_path / "stories.txt"
    corpus.write_text("<|endoftext|>".join(CORPUS[i:i + 90] for i in range(0, len(CORPUS), 90)))
    out = tmp_path / "run"
    base = ["train", "--corpus", str(corpus), "--tokenizer", "char", "--n-layer", "1", "--n-head", "2",
            "--n-kv-head", "1", "--n-embd", "32", "--block-size", "32", "--lr", "1e-2", "--warmup-steps", "3",
            "--eval-interval", "20", "--eval-iters", "1", "--out", str(out), "--device", "cpu", "--no-progress",
            "--checkpoint-minutes", "0"]
    assert cli.main([*base, "--max-steps", "20", "--pack"]) == 0
    printed = capsys.readouterr().out
    assert f"packed: {len(range(0, len(CORPUS), 90))} documents" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["history"]["loss"][-1] < m["history"]["loss"][0]
    assert cli.main([*base, "--max-steps", "25", "--resume"]) == 2
    assert "--pack" in capsys.readouterr().err
