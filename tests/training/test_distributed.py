"""DDP under torchrun: a real 2-process gloo job on CPU trains as one process does on the same global
batch, its checkpoint resumes in one process, and the global batch is shared out evenly."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pytorch_mqa import cli
from pytorch_mqa.model import GPT
from pytorch_mqa.training.distributed import Rank, check_divisible, launched_rank, rank_device, shard

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = ("A class definition defines a class object. The with statement wraps a block with methods of a "
          "context manager. ") * 25
# float32 training: the 2-process run sums the same token losses in another order (and DDP averages
# gradients), so per-step losses agree to rounding, not bit for bit.
TOL = 1e-5
# Adam moves every weight by about lr a step whatever its gradient's size, so rounding in a near-zero
# gradient shows in the weights as a small fraction of lr (1e-2 here), not of the loss.
WEIGHT_TOL = 1e-4
TRAIN = ["--n-layer", "1", "--n-head", "2", "--n-kv-head", "1", "--n-embd", "16", "--block-size", "16",
         "--batch-size", "8", "--warmup-steps", "2", "--eval-interval", "5", "--eval-iters", "2", "--lr", "1e-2",
         "--device", "cpu", "--no-progress", "--checkpoint-minutes", "0", "--threads", "1"]

pytestmark = pytest.mark.usefixtures("one_thread")


def torchrun(args, cwd, nproc=2, script=None):
    """`torchrun --standalone --nproc-per-node nproc -m pytorch_mqa ARGS` (or `SCRIPT ARGS`): its stdout
    (it must succeed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, [env.get("PYTHONPATH")])])
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          str(nproc), *([script] if script else ["-m", "pytorch_mqa"]), *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def history(out):
    return json.loads((out / "metrics.json").read_text())["history"]


def max_diff(a, b):
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def eval_diff(a, b):
    assert [e["step"] for e in a] == [e["step"] for e in b]
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("train", "val"))


def weights_diff(a, b):
    sa, sb = GPT.from_pretrained(str(a)).state_dict(), GPT.from_pretrained(str(b)).state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


@pytest.mark.slow
def test_two_process_train_equals_one_process_and_its_checkpoint_resumes_in_one(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    base = ["train", "--corpus", str(tmp_path / "corpus.txt"), *TRAIN]
    assert cli.main(base + ["--max-steps", "10", "--out", str(tmp_path / "one")]) == 0
    # 2 processes x 2 micro-batches of 2 sequences: the same global batch of 8 per step.
    printed = torchrun(base + ["--max-steps", "10", "--grad-accum-steps", "2", "--out", str(tmp_path / "two")],
                       tmp_path)
    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    assert two["step"] == list(range(1, 11)) and two["lr"] == one["lr"]
    assert max_diff(one["loss"], two["loss"]) <= TOL
    assert eval_diff(one["eval"], two["eval"]) <= TOL
    assert one["loss"][-1] < one["loss"][0] - 0.1  # it trained: the comparison is not between two flat lines
    assert printed.count("model: ") == 1 and "x 2 processes (DDP)" in printed  # rank 0 alone prints
    assert weights_diff(tmp_path / "one" / "checkpoint", tmp_path / "two" / "checkpoint") <= WEIGHT_TOL
    state = torch.load(tmp_path / "two" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_by_rank"]) == 2

    # The 2-process checkpoint resumes in one process as the 1-process checkpoint does.
    capsys.readouterr()
    for name in ("one", "two"):
        assert cli.main(base + ["--max-steps", "14", "--out", str(tmp_path / name), "--resume"]) == 0
        assert f"resuming from {tmp_path / name / 'checkpoint'} at step 10 of 14" in capsys.readouterr().out
    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    assert two["step"] == list(range(1, 15)) and two["lr"] == one["lr"]
    assert max_diff(one["loss"][10:], two["loss"][10:]) <= TOL
    assert eval_diff(one["eval"], two["eval"]) <= TOL


@pytest.mark.slow
def test_two_process_finetune_equals_one_process(tmp_path):
    from test_finetune import DATA, make  # the same records, tokenizer and tiny model

    records, tok, model = make(block=128)
    init = tmp_path / "init"
    model.save_pretrained(str(init))
    tok.save(str(init))
    # Masked prompts and padding: each micro-batch has its own count of targets; the step's loss is
    # the token mean over the global batch all the same.
    args = ["finetune", "--data", DATA, "--init", str(init), "--max-steps", "6", "--batch-size", "4", "--lr", "1e-2",
            "--warmup-steps", "1", "--eval-interval", "3", "--eval-iters", "1", "--eval-full", "--device", "cpu",
            "--no-progress", "--checkpoint-minutes", "0", "--threads", "1"]
    assert cli.main(args + ["--out", str(tmp_path / "one")]) == 0
    torchrun(args + ["--out", str(tmp_path / "two")], tmp_path)
    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    assert max_diff(one["loss"], two["loss"]) <= TOL
    assert eval_diff(one["eval"], two["eval"]) <= TOL


@pytest.mark.slow
def test_fsdp_train_equals_one_process_and_checkpoints_go_both_ways(tmp_path, capsys):
    """--fsdp shards weights, gradients and optimizer state; its checkpoints are gathered whole, so a
    1-process checkpoint resumes under FSDP and an FSDP checkpoint in one process."""
    import shutil

    (tmp_path / "corpus.txt").write_text(CORPUS)
    base = ["train", "--corpus", str(tmp_path / "corpus.txt"), *TRAIN, "--n-layer", "2", "--eval-full"]
    assert cli.main(base + ["--max-steps", "6", "--out", str(tmp_path / "one")]) == 0
    shutil.copytree(tmp_path / "one", tmp_path / "one_then_fsdp")
    printed = torchrun(base + ["--max-steps", "6", "--fsdp", "--grad-accum-steps", "2", "--out",
                               str(tmp_path / "fsdp")], tmp_path)
    assert "x 2 processes (FSDP)" in printed
    one, fsdp = history(tmp_path / "one"), history(tmp_path / "fsdp")
    assert max_diff(one["loss"], fsdp["loss"]) <= TOL and eval_diff(one["eval"], fsdp["eval"]) <= TOL
    assert weights_diff(tmp_path / "one" / "checkpoint", tmp_path / "fsdp" / "checkpoint") <= WEIGHT_TOL

    more = ["--max-steps", "9", "--resume"]
    torchrun(base + more + ["--fsdp", "--out", str(tmp_path / "one_then_fsdp")], tmp_path)
    for name in ("one", "fsdp"):
        assert cli.main(base + more + ["--out", str(tmp_path / name)]) == 0
    runs = [history(tmp_path / name) for name in ("one", "fsdp", "one_then_fsdp")]
    for h in runs[1:]:
        assert h["step"] == list(range(1, 10))
        assert max_diff(runs[0]["loss"][6:], h["loss"][6:]) <= TOL and eval_diff(runs[0]["eval"], h["eval"]) <= TOL


STOP_ON_ONE_RANK = """
import json, sys
import torch
from pytorch_mqa.model import GPT, GPTConfig
from pytorch_mqa.training.distributed import process_group
from pytorch_mqa.training.loop import LMBatches, TrainConfig, fit
from pytorch_mqa.training.tokenizers import CharTokenizer

torch.set_num_threads(1)
text, out = open(sys.argv[1]).read(), sys.argv[2]
tok = CharTokenizer.train(text)
with process_group("cpu") as (rank, device):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
    polls = []
    stop = lambda: polls.append(1) or (rank.rank == 1 and len(polls) == 3)  # a signal that reached rank 1 only
    cfg = TrainConfig(max_steps=50, batch_size=8, eval_interval=50, eval_iters=1, progress=False,
                      checkpoint_dir=out + "/checkpoint", checkpoint_minutes=0)
    h = fit(model, LMBatches(tok.encode(text), 8, 16), cfg, tokenizer=tok, stop=stop)
    with open(f"{out}/rank{rank.rank}.json", "w") as f:
        json.dump({"stopped_at": h.get("stopped_at"), "steps": len(h["loss"])}, f)
"""


@pytest.mark.slow
def test_a_stop_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    (tmp_path / "stop.py").write_text(STOP_ON_ONE_RANK)
    torchrun([str(tmp_path / "corpus.txt"), str(tmp_path)], tmp_path, script=str(tmp_path / "stop.py"))
    for r in (0, 1):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == {"stopped_at": 3, "steps": 3}
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 3 and state["history"]["stopped_at"] == 3
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary directory left behind


# ------------------------------------------------------------------------------ the pieces


def test_shard_covers_the_global_batch_once():
    x = torch.arange(24).view(12, 2)
    y = x + 100
    got = [shard(x, y, Rank(r, 3), accum=2) for r in range(3)]
    assert all(len(parts) == 2 and all(len(p[0]) == 2 for p in parts) for parts in got)
    rows = torch.cat([xi for parts in got for xi, _ in parts])
    assert torch.equal(rows, x)  # rank-major, then micro-batch: every row exactly once, in order
    assert all(torch.equal(yi, xi + 100) for parts in got for xi, yi in parts)


def test_a_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match=r"batch_size: expected a multiple of .* = 4 .*got 6"):
        check_divisible(6, Rank(0, 2), accum=2)
    with pytest.raises(ValueError, match="got 6"):
        shard(torch.zeros(6, 3), torch.zeros(6, 3), Rank(1, 4), accum=1)


def test_cli_refuses_a_batch_that_does_not_split_evenly(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", "--batch-size", "6", "--grad-accum-steps", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size: expected a multiple of 2 process(es) * --grad-accum-steps 2 = 4" in err and "got 6" in err


def test_fsdp_needs_several_processes(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["train", "--fsdp", "--device", "cpu"]) == 2
    assert "--fsdp: expected a torchrun launch of 2 or more processes, got 1 process" in capsys.readouterr().err


def test_rank_from_the_torchrun_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert launched_rank() == Rank(0, 1, 0) and not launched_rank().enabled
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launched_rank() == Rank(3, 4, 1) and not launched_rank().is_main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="expected 0 <= RANK < WORLD_SIZE, got RANK=4 WORLD_SIZE=4"):
        launched_rank()


def test_each_process_gets_its_own_device():
    assert rank_device("cpu", Rank(1, 2, 1)) == "cpu"
    assert rank_device("cuda:1", Rank()) == "cuda:1"  # one process: the device asked for
    with pytest.raises(ValueError, match="expected cuda .* under torchrun, got 'cuda:0'"):
        rank_device("cuda:0", Rank(1, 2, 1))


def test_the_resume_line_under_torchrun_is_a_torchrun_line(monkeypatch):
    from pytorch_mqa.cli.common import resume_command

    argv = ["train", "--out", "runs/x", "--overwrite"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resume_command(argv, "train") == "pytorch-mqa train --out runs/x --resume"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_command(argv, "train") == ("torchrun --standalone --nproc-per-node 2 -m pytorch_mqa train "
                                             "--out runs/x --resume")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resume_command(argv, "train").startswith("torchrun --nproc-per-node 8 -m pytorch_mqa train --out runs/x "
                                                    "--resume  (on every node")
