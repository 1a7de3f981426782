"""SIGINT / SIGTERM during `train`: a checkpoint, a clean exit that says how to resume, and a resumed run
that equals an uninterrupted one."""

import json
import os
import signal

import pytest
import torch

from pytorch_mqa import cli
from pytorch_mqa.training import loop

CORPUS = ("A class definition defines a class object. The with statement wraps a block with methods of a "
          "context manager. ") * 25
ARGS = ["--n-layer", "1", "--n-head", "2", "--n-kv-head", "1", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "4", "--max-steps", "12", "--warmup-steps", "2", "--eval-interval", "4", "--eval-iters", "1",
        "--lr", "1e-2", "--device", "cpu", "--no-progress", "--checkpoint-minutes", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def history(out):
    return json.loads((out / "metrics.json").read_text())["history"]


def signal_at_step(monkeypatch, signum, at):
    """Send `signum` to this process during the training forward pass of step `at` (1-based)."""
    real, count = loop.lm_loss, []

    def lm_loss(model, x, y, *rest):
        if model.training:
            count.append(1)
            if len(count) == at:
                os.kill(os.getpid(), signum)
        return real(model, x, y, *rest)

    monkeypatch.setattr(loop, "lm_loss", lm_loss)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_then_resume_equals_an_uninterrupted_run(tmp_path, capsys, monkeypatch, signum, code):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    base = ["train", "--corpus", str(corpus), *ARGS]
    assert cli.main(base + ["--out", str(tmp_path / "full")]) == 0
    full = history(tmp_path / "full")
    capsys.readouterr()

    out = tmp_path / "cut"
    signal_at_step(monkeypatch, signum, at=6)
    before = signal.getsignal(signum)
    assert cli.main(base + ["--out", str(out)]) == code
    assert signal.getsignal(signum) is before  # the handler is restored
    monkeypatch.undo()
    printed = capsys.readouterr().out
    assert f"stopped by {signal.Signals(signum).name} at step 6 of 12" in printed
    resume_line = next(line for line in printed.splitlines() if line.startswith("resume with: "))
    assert resume_line.endswith("--resume") and f"--out {out}" in resume_line
    assert loop.load_trainer_state(str(out / "checkpoint"))["step"] == 6
    assert history(out)["step"] == list(range(1, 7))

    argv = resume_line.removeprefix("resume with: pytorch-mqa ").split()
    assert cli.main(argv) == 0
    resumed = history(out)
    assert resumed["step"] == full["step"]
    assert resumed["loss"] == full["loss"]  # bit-exact: weights, optimizer, RNG and schedule all restored
    assert resumed["lr"] == full["lr"]
    assert resumed["eval"] == full["eval"]
    a = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert a["step"] == 12


def test_finetune_interrupt_then_resume(tmp_path, capsys, monkeypatch):
    from pytorch_mqa.training.data import format_prompt

    record = {"instruction": "Name a colour", "output": "Red."}
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((format_prompt({**record, "input": "x"}) + record["output"] + " ") * 10)
    tiny = ARGS[:ARGS.index("--block-size")] + ["--block-size", "128"] + ARGS[ARGS.index("--batch-size"):]
    assert cli.main(["train", "--corpus", str(corpus), *tiny, "--max-steps", "1", "--out", str(tmp_path / "t")]) == 0
    data = tmp_path / "data.json"
    data.write_text(json.dumps([record] * 4))
    base = ["finetune", "--data", str(data), "--init", str(tmp_path / "t" / "checkpoint"), "--max-steps", "6",
            "--eval-interval", "3", "--eval-iters", "1", "--batch-size", "2", "--device", "cpu", "--no-progress",
            "--checkpoint-minutes", "0"]
    assert cli.main(base + ["--out", str(tmp_path / "full")]) == 0
    capsys.readouterr()
    signal_at_step(monkeypatch, signal.SIGINT, at=4)
    assert cli.main(base + ["--out", str(tmp_path / "cut")]) == 130
    monkeypatch.undo()
    printed = capsys.readouterr().out
    assert "stopped by SIGINT at step 4 of 6" in printed
    resume_line = next(line for line in printed.splitlines() if line.startswith("resume with: "))
    assert cli.main(resume_line.removeprefix("resume with: pytorch-mqa ").split()) == 0
    assert history(tmp_path / "cut")["loss"] == history(tmp_path / "full")["loss"]
