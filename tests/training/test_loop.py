"""The training loop: loss falls, schedule, weight-decay groups, checkpoints and exact resume."""

import math
import os

import pytest
import torch

from pytorch_mqa.model import GPT, GPTConfig
from pytorch_mqa.training.tokenizers import CharTokenizer, load_tokenizer
from pytorch_mqa.training.loop import (LMBatches, TrainConfig, configure_optimizer, evaluate, fit, lm_loss,
                                       load_trainer_state, lr_at, plot_loss_curves, steps_for_epochs)

TEXT = "the cat sat on the mat. the dog sat on the log. " * 40


# Small models on a shared 2-core machine run fastest on one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(vocab, n_kv_head=2, block=16):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=1, n_head=2, n_kv_head=n_kv_head, n_embd=32))


def setup(n_kv_head=2):
    tok = CharTokenizer.train(TEXT)
    return tok, tiny(tok.vocab_size, n_kv_head), LMBatches(tok.encode(TEXT), batch_size=8, block_size=16)


def cfg(**kw):
    base = dict(max_steps=40, lr=1e-2, warmup_steps=5, eval_interval=20, eval_iters=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_loss_falls(n_kv_head):
    _, model, batches = setup(n_kv_head)
    h = fit(model, batches, cfg())
    assert len(h["loss"]) == 40 and [e["step"] for e in h["eval"]] == [20, 40]
    assert sum(h["loss"][-5:]) / 5 < 0.6 * sum(h["loss"][:5]) / 5
    assert h["eval"][-1]["val"] < math.log(model.config.vocab_size) - 1.0


def test_lr_schedule():
    c = TrainConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(1.0) and lr_at(100, c) == pytest.approx(0.1)
    assert lr_at(55, c) == pytest.approx(0.55)  # cosine midpoint
    lin = TrainConfig(max_steps=100, lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear")
    assert lr_at(25, lin) == pytest.approx(0.75)
    assert all(lr_at(s, c) >= lr_at(s + 1, c) for s in range(10, 100))


def test_weight_decay_only_on_matrices():
    model = tiny(20)
    opt = configure_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_params(non_embedding=False)  # the tied embedding is counted once


def test_checkpoint_and_exact_resume(tmp_path):
    tok, model, batches = setup()
    full = fit(model, batches, cfg(max_steps=12, eval_interval=6, seed=3))

    ckpt = str(tmp_path / "ckpt")
    tok, first, batches = setup()
    # Stopped after 6 of 12 steps (as SIGINT does through the CLI): the checkpoint is written then.
    steps = []
    fit(first, batches, cfg(max_steps=12, eval_interval=6, seed=3, checkpoint_dir=ckpt), tokenizer=tok,
        stop=lambda: steps.append(1) or len(steps) == 6)
    assert {"config.json", "model.safetensors", "trainer_state.pt"} <= set(os.listdir(ckpt))
    assert load_tokenizer(ckpt).encode("the cat") == tok.encode("the cat")

    state = load_trainer_state(ckpt)
    assert state["step"] == 6
    resumed_model = GPT.from_pretrained(ckpt)
    resumed = fit(resumed_model, batches, cfg(max_steps=12, eval_interval=6, seed=3), resume=state)
    assert resumed["step"] == full["step"]
    assert resumed["loss"][6] == pytest.approx(full["loss"][6], rel=1e-6, abs=1e-6)
    assert resumed["loss"] == pytest.approx(full["loss"], rel=1e-5, abs=1e-5)
    assert resumed["lr"] == full["lr"]


def test_resume_without_state_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer_state.pt: no trainer state"):
        load_trainer_state(str(tmp_path))


def test_plot(tmp_path):
    h = {"step": [1, 2, 3], "loss": [3.0, 2.0, 1.5], "eval": [{"step": 3, "train": 1.4, "val": 1.6}]}
    path = tmp_path / "loss.png"
    plot_loss_curves({"a": h}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grad_accumulation_equals_one_big_batch():
    _, model, batches = setup()
    one = fit(model, batches, cfg(max_steps=6, eval_interval=6, seed=1))
    _, model, batches = setup()
    four = fit(model, batches, cfg(max_steps=6, eval_interval=6, seed=1, grad_accum_steps=4))
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-5)
    assert four["eval"][-1]["val"] == pytest.approx(one["eval"][-1]["val"], rel=1e-5, abs=1e-5)


def test_grad_accumulation_weights_micro_batches_by_their_targets():
    """Instruction batches mask prompts and padding, so micro-batches hold different numbers of
    targets: the step's loss is the token mean of the whole batch, not a mean of micro-batch means."""
    from pytorch_mqa.training.data import format_prompt
    from pytorch_mqa.training.finetune import InstructionData

    records = [{"instruction": "say " + "a" * n, "output": "b" * (1 + 7 * n)} for n in range(8)]
    tok = CharTokenizer.train("".join(format_prompt(r) + r["output"] for r in records))
    data = InstructionData(records, records, tok, batch_size=4, max_len=127)
    runs = []
    for accum in (1, 2):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
        runs.append(fit(model, data, cfg(max_steps=4, eval_interval=4, grad_accum_steps=accum)))
    assert runs[1]["loss"] == pytest.approx(runs[0]["loss"], rel=1e-5, abs=1e-5)


def test_a_batch_that_does_not_split_into_micro_batches_is_refused():
    _, model, batches = setup()  # batch_size 8
    with pytest.raises(ValueError, match="batch_size: expected a multiple of .* = 3 .*got 8"):
        fit(model, batches, cfg(grad_accum_steps=3))


def test_full_evaluation_covers_every_window_once():
    tok, model, batches = setup()
    full = evaluate(model, batches, cfg(batch_size=5), splits=("val",), full=True)["val"]
    # By hand: every non-overlapping window of the val split, one at a time, token-weighted.
    T, val = batches.block_size, batches.val
    n = (len(val) - 1) // T
    model.eval()
    with torch.no_grad():
        losses = [lm_loss(model, val[i * T:(i + 1) * T][None], val[i * T + 1:(i + 1) * T + 1][None]).item()
                  for i in range(n)]
    assert n >= 5 and full == pytest.approx(sum(losses) / n, rel=1e-6)
    assert sum(len(x) for x, _ in batches.full_batches("val", 5)) == n
    assert batches.train_sequences == (len(batches.train) - 1) // T


def test_eval_full_in_fit():
    _, model, batches = setup()
    h = fit(model, batches, cfg(max_steps=2, eval_interval=2, eval_full=True))
    assert h["eval"][-1]["val"] == pytest.approx(
        evaluate(model, batches, cfg(), splits=("val",), full=True)["val"], rel=1e-6)


def test_steps_for_epochs():
    assert steps_for_epochs(1, 100, 16) == 7  # 100 sequences at 16 a step: rounded up
    assert steps_for_epochs(2.5, 100, 10) == 25
    assert steps_for_epochs(0.001, 100, 16) == 1
    with pytest.raises(ValueError, match="epochs: expected a number > 0, got 0"):
        steps_for_epochs(0, 100, 16)


def test_adamw_betas():
    opt = configure_optimizer(tiny(20), TrainConfig(beta1=0.8, beta2=0.99))
    assert all(g["betas"] == (0.8, 0.99) for g in opt.param_groups)


def test_cli_epochs_betas_and_eval_full(tmp_path, capsys):
    from pytorch_mqa import cli

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    args = ["train", "--corpus", str(corpus), "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
            "--batch-size", "8", "--eval-iters", "1", "--device", "cpu", "--no-progress", "--beta1", "0.8",
            "--beta2", "0.9", "--eval-full", "--out", str(tmp_path / "run")]
    assert cli.main(args + ["--epochs", "0.5"]) == 0
    windows = (int(len(TEXT) * 0.9) - 1) // 16  # the char tokenizer: one token per character
    steps = math.ceil(0.5 * windows / 8)
    assert f"0.5 epoch(s) of {windows:,} windows at 8 a step: {steps:,} steps" in capsys.readouterr().out
    state = load_trainer_state(str(tmp_path / "run" / "checkpoint"))
    assert state["step"] == steps and state["config"]["beta1"] == 0.8 and state["config"]["eval_full"]
    assert all(g["betas"] == (0.8, 0.9) for g in state["optimizer"]["param_groups"])

    with pytest.raises(SystemExit) as usage:  # argparse's own usage error
        cli.main(args + ["--epochs", "1", "--max-steps", "3"])
    assert usage.value.code == 2 and "--max-steps: not allowed with argument --epochs" in capsys.readouterr().err
    assert cli.main(args + ["--beta2", "1.0"]) == 2
    assert "--beta2: expected a value in [0, 1), got 1.0" in capsys.readouterr().err
