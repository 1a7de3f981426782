"""Checkpoints: atomic writes (a failing writer leaves the previous checkpoint loadable), recovery of an
interrupted swap, time-based checkpoints, stop(), and a resumed schedule when max_steps grows."""

import os

import pytest
import torch

from pytorch_mqa.model import GPT, GPTConfig
from pytorch_mqa.training import files, loop
from pytorch_mqa.training.loop import LMBatches, TrainConfig, fit, load_trainer_state, lr_at, resumed_config
from pytorch_mqa.training.tokenizers import CharTokenizer, load_tokenizer

TEXT = "the cat sat on the mat. the dog sat on the log. " * 40

pytestmark = pytest.mark.usefixtures("one_thread")


def setup():
    tok = CharTokenizer.train(TEXT)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
    return tok, model, LMBatches(tok.encode(TEXT), batch_size=4, block_size=16)


def cfg(**kw):
    base = dict(max_steps=4, lr=1e-2, warmup_steps=1, eval_interval=4, eval_iters=1, progress=False,
                checkpoint_minutes=0)
    base.update(kw)
    return TrainConfig(**base)


def snapshot(directory):
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory))}


@pytest.fixture
def trained(tmp_path):
    tok, model, batches = setup()
    ckpt = tmp_path / "run" / "checkpoint"
    fit(model, batches, cfg(checkpoint_dir=str(ckpt)), tokenizer=tok)
    return tok, model, batches, ckpt


def assert_intact(ckpt, before, step=4):
    assert snapshot(ckpt) == before
    assert load_trainer_state(str(ckpt))["step"] == step
    GPT.from_pretrained(str(ckpt))
    load_tokenizer(str(ckpt))
    assert files.stale_temporaries(str(ckpt.parent)) == []
    assert not os.path.exists(str(ckpt) + files.OLD_SUFFIX)


@pytest.mark.parametrize("failure", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_writer_failing_mid_file_leaves_the_previous_checkpoint(trained, monkeypatch, failure):
    tok, model, batches, ckpt = trained
    before = snapshot(ckpt)
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        with open(path, "r+b") as f:  # half the file on disk, then the "kill"
            f.truncate(os.path.getsize(path) // 2)
        raise failure

    monkeypatch.setattr(loop.torch, "save", failing_save)
    opt = loop.configure_optimizer(model, cfg())
    with pytest.raises(type(failure)):
        loop.save_checkpoint(str(ckpt), model, opt, 8, {"step": [], "loss": [], "lr": [], "eval": []},
                             torch.Generator(), cfg(), tok)
    monkeypatch.undo()
    assert_intact(ckpt, before)


def test_a_failing_model_writer_leaves_the_previous_checkpoint(trained, monkeypatch):
    tok, model, batches, ckpt = trained
    before = snapshot(ckpt)

    def broken(directory):
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(b"\x00" * 10)
        raise OSError("I/O error")

    monkeypatch.setattr(model, "save_pretrained", broken)
    opt = loop.configure_optimizer(model, cfg())
    with pytest.raises(OSError):
        loop.save_checkpoint(str(ckpt), model, opt, 8, {}, torch.Generator(), cfg(), tok)
    assert_intact(ckpt, before)


def test_every_file_is_fsynced_before_the_swap(trained, monkeypatch):
    tok, model, batches, ckpt = trained
    synced = []
    real = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    opt = loop.configure_optimizer(model, cfg())
    loop.save_checkpoint(str(ckpt), model, opt, 5, {"step": []}, torch.Generator(), cfg(), tok)
    names = {os.path.basename(p) for p in synced}
    assert {"model.safetensors", "config.json", "tokenizer_mqa.json", "trainer_state.pt"} <= names
    assert str(ckpt.parent) in synced  # the parent directory, after the renames
    assert load_trainer_state(str(ckpt))["step"] == 5


def test_a_swap_interrupted_between_renames_is_recovered(trained):
    tok, model, batches, ckpt = trained
    before = snapshot(ckpt)
    os.replace(ckpt, str(ckpt) + files.OLD_SUFFIX)  # killed after moving the old one aside
    assert load_trainer_state(str(ckpt))["step"] == 4
    assert_intact(ckpt, before)


def test_checkpoint_minutes_and_stop(tmp_path, monkeypatch):
    tok, model, batches = setup()
    steps = []
    real = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda d, m, o, step, *a: steps.append(step) or real(d, m, o, step, *a))
    fit(model, batches, cfg(max_steps=3, checkpoint_dir=str(tmp_path / "a"), checkpoint_minutes=1e-9), tokenizer=tok)
    assert steps == [1, 2, 3]  # every step is "a few minutes" after the last checkpoint here
    steps.clear()
    tok, model, batches = setup()
    calls = []
    h = fit(model, batches, cfg(max_steps=10, checkpoint_dir=str(tmp_path / "b")), tokenizer=tok,
            stop=lambda: calls.append(1) or len(calls) >= 3)
    assert h["stopped_at"] == 3 and h["step"] == [1, 2, 3] and steps == [3]
    assert load_trainer_state(str(tmp_path / "b"))["step"] == 3


def test_a_longer_run_continues_the_schedule():
    c = TrainConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    state = {"step": 60, "config": {**c.__dict__}}
    same = resumed_config(c, state)
    assert [lr_at(s, same) for s in range(60, 100)] == [lr_at(s, c) for s in range(60, 100)]
    longer = resumed_config(TrainConfig(max_steps=200, lr=1.0, min_lr=0.1, warmup_steps=10), state)
    lrs = [lr_at(s, longer) for s in range(60, 201)]
    assert lrs[0] == pytest.approx(lr_at(60, c))  # no jump back up
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.1)
    # A second resume with the same (longer) max_steps keeps the continued schedule.
    again = resumed_config(TrainConfig(max_steps=200, lr=1.0, min_lr=0.1, warmup_steps=10),
                           {"step": 120, "config": {**longer.__dict__}})
    assert lr_at(150, again) == pytest.approx(lr_at(150, longer))
    with pytest.raises(ValueError, match="max_steps"):
        resumed_config(TrainConfig(max_steps=60), state)


def test_resume_with_more_steps_trains_on_from_the_reached_rate(trained):
    tok, model, batches, ckpt = trained
    state = load_trainer_state(str(ckpt))
    h = fit(GPT.from_pretrained(str(ckpt)), batches, cfg(max_steps=8, warmup_steps=1), resume=state)
    assert h["step"] == list(range(1, 9))
    assert h["lr"][4] == pytest.approx(lr_at(4, cfg()))  # the rate reached at step 4 of the 4-step run
    assert h["lr"][4] <= h["lr"][3]
