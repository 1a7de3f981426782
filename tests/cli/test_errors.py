"""Bad inputs through cli.main: each one a single line `pytorch-mqa CMD: error: WHERE: WHAT`, no traceback,
the right exit code (2 for the command line, 1 for files and running), and nothing written or overwritten."""

import json
import os
import shutil

import pytest
import torch

from pytorch_mqa import cli

CORPUS = ("The with statement wraps a block with methods of a context manager. Names refer to objects, "
          "and names are introduced by name binding operations. ") * 20
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "1", "--device", "cpu", "--no-progress", "--checkpoint-minutes", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A char-tokenizer checkpoint trained for a few steps, and its corpus."""
    root = tmp_path_factory.mktemp("errors")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    rc = cli.main(["train", "--corpus", str(corpus), *TINY, "--max-steps", "4", "--eval-interval", "4",
                   "--out", str(root / "run")])
    torch.set_num_threads(n)
    assert rc == 0
    return corpus, root / "run" / "checkpoint"


@pytest.fixture(scope="module")
def alpaca_ckpt(tmp_path_factory):
    """A char-tokenizer checkpoint whose corpus holds the Alpaca template's characters."""
    from pytorch_mqa.training.data import format_prompt

    root = tmp_path_factory.mktemp("alpaca")
    corpus = root / "corpus.txt"
    corpus.write_text((format_prompt({"instruction": "Name a colour", "input": "x"}) + "Red. ") * 20)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    assert cli.main(["train", "--corpus", str(corpus), *TINY, "--max-steps", "1", "--out", str(root / "t")]) == 0
    torch.set_num_threads(n)
    return root / "t" / "checkpoint"


def one_line_error(capsys, rc, command, code, *needles):
    """The command's stderr is one error line naming every needle; returns it."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[warning")]
    assert rc == code, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"pytorch-mqa {command}: error: "), err
    assert "Traceback" not in err and "File \"" not in err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def main(argv):
    """cli.main, with argparse's own exit (SystemExit) turned into the code it carries."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------- corpus


def test_non_utf8_corpus_names_path_and_byte_offset(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(CORPUS[:50].encode() + "é".encode("latin-1") + CORPUS[:200].encode())
    rc = cli.main(["train", "--corpus", str(bad), *TINY, "--out", str(tmp_path / "out")])
    one_line_error(capsys, rc, "train", 1, bad, "UTF-8", "byte offset 50", "0xe9")
    assert not (tmp_path / "out").exists()


def test_missing_corpus(tmp_path, capsys):
    rc = cli.main(["train", "--corpus", str(tmp_path / "nope.txt"), *TINY, "--out", str(tmp_path / "out")])
    one_line_error(capsys, rc, "train", 1, tmp_path / "nope.txt", "no such file")


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    rc = cli.main(["train", "--corpus", str(tmp_path / "empty.txt"), *TINY, "--out", str(tmp_path / "out")])
    one_line_error(capsys, rc, "train", 1, tmp_path / "empty.txt", "empty")


def test_short_validation_split_is_caught_before_training(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text(CORPUS[:150])  # 15 validation characters < block_size + 1
    rc = cli.main(["train", "--corpus", str(short), *TINY, "--out", str(tmp_path / "out")])
    one_line_error(capsys, rc, "train", 1, short, "validation split", "block_size + 1 = 17", "--block-size")
    assert not (tmp_path / "out").exists()  # refused before any step


# ------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("args, where, what", [
    (["--n-kv-head", "0"], "--n-kv-head", ">= 1"),
    (["--n-kv-head", "3"], "--n-kv-head", "divisor of --n-head 2"),
    (["--n-embd", "15"], "--n-embd", "multiple of --n-head 2"),
    (["--max-steps", "0"], "--max-steps", ">= 1"),
    (["--dropout", "1.5"], "--dropout", "[0, 1)"),
    (["--attn-dropout", "1.0"], "--attn-dropout", "[0, 1)"),
    (["--attn-dropout", "0.1", "--arch", "bigram"], "--attn-dropout", "--arch gpt"),
    (["--pack", "--arch", "unigram"], "--pack", "--arch gpt"),
    (["--n-kv-head", "two"], "--n-kv-head", "invalid int value"),
])
def test_bad_arguments_exit_2_naming_the_flag(tmp_path, capsys, args, where, what):
    rc = main(["train", "--corpus", str(tmp_path / "unread.txt"), *TINY, *args, "--out", str(tmp_path / "o")])
    one_line_error(capsys, rc, "train", 2, where, what)
    assert not (tmp_path / "o").exists()


def test_study_and_bench_arguments(capsys):
    rc = cli.main(["study", "--quick", "--n-kv-head", "3", "--device", "cpu"])
    one_line_error(capsys, rc, "study", 2, "--n-kv-head", "divisor of --n-head 4")
    if not torch.cuda.is_available():
        rc = cli.main(["bench", "attention", "--cuda-graph", "--device", "cpu"])
        one_line_error(capsys, rc, "bench", 2, "--cuda-graph", "CUDA")


# ----------------------------------------------------------------------------------------- --out


def test_non_empty_out_is_refused_and_left_alone(ckpt, tmp_path, capsys):
    corpus, _ = ckpt
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"mine": 1}')
    rc = cli.main(["train", "--corpus", str(corpus), *TINY, "--max-steps", "2", "--out", str(out)])
    one_line_error(capsys, rc, "train", 2, "--out", out, "not empty", "--resume", "--overwrite")
    assert os.listdir(out) == ["metrics.json"] and (out / "metrics.json").read_text() == '{"mine": 1}'

    (out / "notes.txt").write_text("keep me")
    rc = cli.main(["train", "--corpus", str(corpus), *TINY, "--max-steps", "2", "--out", str(out), "--overwrite"])
    one_line_error(capsys, rc, "train", 2, "--overwrite", "notes.txt", "not deleting")
    assert (out / "notes.txt").read_text() == "keep me"

    rc = cli.main(["train", "--corpus", str(corpus), *TINY, "--max-steps", "2", "--out", str(out), "--resume",
                   "--overwrite"])
    one_line_error(capsys, rc, "train", 2, "--overwrite", "--resume")


def test_overwrite_replaces_a_run_without_stale_files(ckpt, tmp_path, capsys):
    corpus, _ = ckpt
    out = tmp_path / "run"
    base = ["train", "--corpus", str(corpus), *TINY, "--max-steps", "2", "--eval-interval", "2", "--out", str(out)]
    assert cli.main(base + ["--tokenizer", "bpe", "--vocab-size", "260"]) == 0
    assert "tokenizer_mqa.tiktoken" in os.listdir(out / "checkpoint")
    before = {n: (out / "checkpoint" / n).read_bytes() for n in os.listdir(out / "checkpoint")}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff" + CORPUS.encode())
    rc = cli.main(["train", "--corpus", str(bad), *TINY, "--out", str(out), "--overwrite"])
    one_line_error(capsys, rc, "train", 1, bad, "byte offset 0")
    assert {n: (out / "checkpoint" / n).read_bytes() for n in os.listdir(out / "checkpoint")} == before
    assert cli.main(base + ["--overwrite"]) == 0  # a char tokenizer now: no ranks file may remain
    assert "tokenizer_mqa.tiktoken" not in os.listdir(out / "checkpoint")
    assert json.loads((out / "checkpoint" / "tokenizer_mqa.json").read_text())["kind"] == "char"
    capsys.readouterr()


# ---------------------------------------------------------------------------------- checkpoints


def test_garbage_checkpoint(ckpt, tmp_path, capsys):
    bad = copy_ckpt(ckpt[1], tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(os.urandom(3000))
    rc = cli.main(["generate", "--init", str(bad), "--device", "cpu", "hi"])
    one_line_error(capsys, rc, "generate", 1, bad / "model.safetensors", "safetensors")


def test_truncated_safetensors(ckpt, tmp_path, capsys):
    bad = copy_ckpt(ckpt[1], tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    rc = cli.main(["generate", "--init", str(bad), "--device", "cpu", "hi"])
    one_line_error(capsys, rc, "generate", 1, bad / "model.safetensors", "truncated", "expected a complete .safetensors")


def test_garbage_weights_file(tmp_path, capsys):
    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(b"\x00garbage" * 100)
    rc = cli.main(["generate", "--init", str(bad), "--device", "cpu", "hi"])
    one_line_error(capsys, rc, "generate", 1, bad, "not a torch.save file", "expected a model checkpoint")


def test_bad_config_json(ckpt, tmp_path, capsys):
    bad = copy_ckpt(ckpt[1], tmp_path / "bad")
    (bad / "config.json").write_text('{"format": "pytorch_mqa", "n_head": ')
    rc = cli.main(["generate", "--init", str(bad), "--device", "cpu", "hi"])
    one_line_error(capsys, rc, "generate", 1, bad / "config.json", "not valid JSON", "line 1")


def test_missing_checkpoint(tmp_path, capsys):
    rc = cli.main(["generate", "--init", str(tmp_path / "nope"), "--device", "cpu", "hi"])
    one_line_error(capsys, rc, "generate", 1, tmp_path / "nope", "no such checkpoint")


def test_garbage_trainer_state_on_resume(ckpt, tmp_path, capsys):
    corpus, src = ckpt
    run = tmp_path / "run"
    copy_ckpt(src, run / "checkpoint")
    state = run / "checkpoint" / "trainer_state.pt"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 3])
    rc = cli.main(["train", "--corpus", str(corpus), *TINY, "--max-steps", "8", "--out", str(run), "--resume"])
    one_line_error(capsys, rc, "train", 1, state, "trainer_state.pt written by pytorch-mqa")
    assert state.read_bytes() == good[: len(good) // 3]  # nothing overwritten


def test_resume_without_checkpoint_and_without_more_steps(ckpt, tmp_path, capsys):
    corpus, src = ckpt
    rc = cli.main(["train", "--corpus", str(corpus), *TINY, "--out", str(tmp_path / "none"), "--resume"])
    one_line_error(capsys, rc, "train", 1, "trainer_state.pt", "no trainer state", "without --resume")
    run = tmp_path / "run"
    copy_ckpt(src, run / "checkpoint")
    rc = cli.main(["train", "--corpus", str(corpus), *TINY, "--max-steps", "4", "--out", str(run), "--resume"])
    one_line_error(capsys, rc, "train", 2, "--max-steps", "already at step 4")
    rc = cli.main(["train", *TINY, "--max-steps", "8", "--out", str(run), "--resume"])
    one_line_error(capsys, rc, "train", 2, "--corpus", f"trained on {corpus}", "same --corpus")


# ------------------------------------------------------------------------------------ tokenizers


@pytest.mark.parametrize("content, needle", [('{"kind": "char", "chars": [', "not valid JSON"),
                                              ('{"kind": "sentencepiece"}', "kind is 'sentencepiece'"),
                                              ('{"kind": "char"}', "missing or malformed field")])
def test_bad_tokenizer_json(ckpt, tmp_path, capsys, content, needle):
    bad = copy_ckpt(ckpt[1], tmp_path / "bad")
    (bad / "tokenizer_mqa.json").write_text(content)
    rc = cli.main(["generate", "--init", str(bad), "--device", "cpu", "hi"])
    one_line_error(capsys, rc, "generate", 1, bad / "tokenizer_mqa.json", needle, "expected a tokenizer_mqa.json")


def test_unknown_character_in_a_char_prompt_is_named(ckpt, capsys):
    rc = cli.main(["generate", "--init", str(ckpt[1]), "--device", "cpu", "--max-new-tokens", "2", "The ßtatement"])
    one_line_error(capsys, rc, "generate", 2, "prompt", "'ß' (U+00DF) at position 4")


# ---------------------------------------------------------------------------------- instructions


@pytest.mark.parametrize("content, needle", [
    ('[{"instruction": "a", "output": "b"},\n {"instruction": x}]', "not valid JSON"),
    ('[{"instruction": "a"}]', "record 0"),
    ('{"instruction": "a", "output": "b"', "not valid JSON"),
    ("[]", "empty list"),
])
def test_bad_instruction_file(ckpt, tmp_path, capsys, content, needle):
    data = tmp_path / "data.json"
    data.write_text(content)
    rc = cli.main(["finetune", "--data", str(data), "--init", str(ckpt[1]), "--device", "cpu",
                   "--out", str(tmp_path / "ft"), "--no-progress"])
    one_line_error(capsys, rc, "finetune", 1, data, needle, "expected a JSON list")
    assert not (tmp_path / "ft").exists()


def test_instruction_with_characters_the_model_lacks(ckpt, alpaca_ckpt, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Name a colour", "output": "Grün"}]))
    args = ["finetune", "--data", str(data), "--device", "cpu", "--out", str(tmp_path / "ft"), "--no-progress"]
    rc = cli.main(args + ["--init", str(ckpt[1])])  # this corpus lacks the template's '#'
    one_line_error(capsys, rc, "finetune", 1, ckpt[1], "the Alpaca prompt template", "'#'")
    rc = cli.main(args + ["--init", str(alpaca_ckpt)])
    one_line_error(capsys, rc, "finetune", 1, data, "record 0", "'G' (U+0047)", "'ü' (U+00FC)")


# ------------------------------------------------------------------------------ no silent caps


def test_max_new_tokens_is_not_capped_and_the_crop_is_announced(ckpt, capsys, monkeypatch):
    from pytorch_mqa.cli import generate as gen_cli

    seen = []
    monkeypatch.setattr(gen_cli, "generate", lambda model, prompts, n, **kw: seen.append((prompts, n)) or [[]])
    assert cli.main(["generate", "--init", str(ckpt[1]), "--device", "cpu", "--max-new-tokens", "40",
                     "The with"]) == 0
    err = capsys.readouterr().err
    assert seen[0][1] == 40 and len(seen[0][0][0]) == len("The with")  # block_size is 16: nothing cut
    assert err.count("[warning:") == 1 and "context of 16 tokens" in err


def test_instruction_prompt_is_kept_whole_or_refused(alpaca_ckpt, capsys):
    from pytorch_mqa.cli import generate as gen_cli

    # The Alpaca template alone is longer than this model's 16-token context: refused, never cut.
    rc = cli.main(["generate", "--init", str(alpaca_ckpt), "--device", "cpu", "--instruction", "Name a colour"])
    one_line_error(capsys, rc, "generate", 2, "--instruction", "longer than the model's context of 16")
    prompt, max_new = gen_cli.fit_context(list(range(10)), 30, 16, instruction=True)
    assert prompt == list(range(10)) and max_new == 30
    assert "Alpaca header" in capsys.readouterr().err


# -------------------------------------------------------------------------------- the boundary


def test_debug_shows_the_traceback_and_unexpected_errors_say_so(tmp_path, capsys, monkeypatch):
    with pytest.raises(FileNotFoundError):
        cli.main(["generate", "--init", str(tmp_path / "nope"), "--device", "cpu", "--debug", "hi"])
    from pytorch_mqa.cli import info

    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(info, "run", boom)
    rc = cli.main(["info"])
    one_line_error(capsys, rc, "info", 1, "unexpected ZeroDivisionError", "--debug")
