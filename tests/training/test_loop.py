"""The training loop: loss falls, schedule, weight-decay groups, checkpoints and exact resume."""

import math
import os

import pytest
import torch

from pytorch_mqa.model import GPT, GPTConfig
from pytorch_mqa.training.tokenizers import CharTokenizer, load_tokenizer
from pytorch_mqa.training.loop import (LMBatches, TrainConfig, configure_optimizer, fit, load_trainer_state, lr_at,
                               plot_loss_curves)

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
