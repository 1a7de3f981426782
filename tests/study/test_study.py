"""The MHA/GQA/MQA study: variants, parameter matching, a run smaller than --quick, the report."""

import copy
import json
import math
import os

import pytest
import torch

from pytorch_mqa.study import metrics
from pytorch_mqa.study import run as study
from pytorch_mqa.model import GPTConfig
from pytorch_mqa.study.report import explain, mean_ci, render_report, separated, t_quantile_975, val_below_train

CORPUS = ("The for statement iterates over the items of a sequence. The while statement repeats a suite "
          "while an expression is true. A function returns the value of its expression list. ") * 30


# Small models on a shared 2-core machine run fastest on one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_kv_variants():
    assert study.kv_variants(4, None) == [("MHA", 4), ("GQA", 2), ("MQA", 1)]
    assert study.kv_variants(8, None) == [("MHA", 8), ("GQA", 4), ("MQA", 1)]
    assert study.kv_variants(8, 2) == [("MHA", 8), ("GQA", 2), ("MQA", 1)]
    assert study.kv_variants(2, None) == [("MHA", 2), ("MQA", 1)]
    with pytest.raises(ValueError, match="n_kv_head"):
        study.kv_variants(8, 3)


def test_matched_width_equalises_parameters():
    mha = GPTConfig(vocab_size=100, block_size=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=64)
    mqa = GPTConfig(vocab_size=100, block_size=64, n_layer=2, n_head=4, n_kv_head=1, n_embd=64)
    target = study.count_params(mha)
    width = study.matched_width(mqa, target)
    assert width > 64 and width % 4 == 0
    wide = study.count_params(GPTConfig(**{**mqa.__dict__, "n_embd": width}))
    narrower = study.count_params(GPTConfig(**{**mqa.__dict__, "n_embd": width - 4}))
    assert abs(wide - target) <= abs(narrower - target) and abs(wide - target) < 0.05 * target


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    corpus = out / "corpus.txt"
    corpus.write_text(CORPUS)
    torch.set_num_threads(1)
    p = dict(tokenizer="char", n_layer=1, n_head=4, n_embd=32, block_size=32, batch_size=8, max_steps=12, lr=1e-2,
             warmup_steps=2, eval_interval=6, eval_iters=1, seeds=2, gen_tokens=8)
    results = study.run_study(p, str(out), corpus=str(corpus), progress=False, match_params=True)
    return out, results


@pytest.mark.slow
def test_study_outputs(small_study):
    out, results = small_study
    assert {"report.md", "results.json", "loss_curves.png", "perplexity.png"} <= set(os.listdir(out))
    saved = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in saved["variants"]] == ["MHA", "GQA", "MQA", "MQA-wide"]
    keys = {"n_kv_head", "params", "val_perplexity_mean", "val_perplexity_std", "logprob_similar", "logprob_unrelated",
            "kv_bytes_per_token", "tokens_per_s_cache", "tokens_per_s_no_cache", "max_abs_logit_diff",
            "greedy_tokens_agree", "sample", "runs"}
    for v in saved["variants"]:
        assert keys <= set(v)
        assert len(v["runs"]) == 2 and v["val_perplexity_std"] >= 0
        ppl = [run["val_perplexity"] for run in v["runs"]]
        assert v["val_perplexity_ci"] == pytest.approx(12.706 * abs(ppl[0] - ppl[1]) / 2)  # t_{0.975,1} s / sqrt(2)
        assert v["logprob_similar"] < 0 and v["logprob_unrelated"] < 0
        assert v["max_abs_logit_diff"] < 1e-3 and v["greedy_tokens_agree"]
        assert v["sample"].startswith(metrics.SAMPLE_PROMPT)
    mha, gqa, mqa, wide = saved["variants"]
    # KV bytes per token: 2 (K and V) * layers * KV heads * head dim * 4 bytes (float32).
    assert mha["kv_bytes_per_token"] == 2 * 1 * 4 * 8 * 4
    assert mha["kv_bytes_per_token"] == 2 * gqa["kv_bytes_per_token"] == 4 * mqa["kv_bytes_per_token"]
    assert mha["params"] > gqa["params"] > mqa["params"]
    assert abs(wide["params"] - mha["params"]) < abs(mqa["params"] - mha["params"])
    assert saved["study"]["wall_seconds"] > 0
    report = (out / "report.md").read_text()
    for text in ("| MHA |", "| MQA-wide |", "KV cache", "multi-query", "loss_curves.png", "perplexity.png"):
        assert text in report


@pytest.mark.slow
def test_report_conclusions_follow_the_numbers(small_study):
    _, results = small_study
    r = copy.deepcopy(results)
    by = {v["name"]: v for v in r["variants"]}
    by["MHA"]["val_perplexity_mean"], by["MQA"]["val_perplexity_mean"] = 10.0, 12.0
    by["MHA"]["val_perplexity_ci"] = by["MQA"]["val_perplexity_ci"] = 0.5
    text = " ".join(explain(r))
    assert "MQA (12.000 ± 0.500) is worse than MHA (10.000 ± 0.500): the intervals do not overlap" in text
    assert "costs quality" in text and "95% Student t confidence interval" in text
    by["MHA"]["val_perplexity_ci"] = by["MQA"]["val_perplexity_ci"] = 1.5
    text = " ".join(explain(r))
    assert "are not distinguishable: their intervals overlap" in text and "costs quality" not in text
    # GQA is placed by the same rule: never "below both" from means alone.
    by["GQA"]["val_perplexity_mean"], by["GQA"]["val_perplexity_ci"] = 9.0, 2.0
    text = " ".join(explain(r))
    assert "GQA (9.000 ± 2.000) and MHA (10.000 ± 1.500) are not distinguishable" in text
    by["GQA"]["val_perplexity_ci"] = None  # one seed
    assert "with one seed there is no interval" in " ".join(explain(r))
    for v in r["variants"]:
        v["tokens_per_s_cache"], v["tokens_per_s_no_cache"] = 200.0, 100.0
    assert "faster for every variant" in " ".join(explain(r))
    by["MQA"]["tokens_per_s_cache"] = 50.0
    assert "not faster for every variant" in " ".join(explain(r))
    assert "2.00x (MHA)" in render_report(r)


def test_heldout_loss_is_the_mean_over_fixed_windows():
    torch.manual_seed(0)
    from pytorch_mqa.model import GPT

    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
    val = torch.randint(0, 11, (50,))
    got = metrics.heldout_loss(model, val, 8, "cpu", max_windows=3, batch=2)
    stride = 49 // 3  # three windows spread over the whole split
    windows = torch.stack([val[i * stride : i * stride + 9] for i in range(3)])
    with torch.no_grad():
        logits = model(windows[:, :-1])
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), windows[:, 1:].reshape(-1)).item()
    assert got == pytest.approx(want, rel=1e-5)


def test_student_t_interval():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(2) == 4.303 and t_quantile_975(30) == 2.042
    assert t_quantile_975(120) == pytest.approx(1.980, abs=2e-3)
    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.303 * 1.0 / 3 ** 0.5)
    assert math.isnan(mean_ci([5.0])[1])
    assert separated((1.0, 0.1), (2.0, 0.1)) and not separated((1.0, 0.6), (2.0, 0.6))
    assert not separated((1.0, math.nan), (9.0, 0.1))


def test_val_below_train_is_explained():
    runs = [{"val_loss": 1.0, "train_loss": 1.2}, {"val_loss": 1.1, "train_loss": 1.3}]
    results = {"study": {"preset": {"eval_iters": 4}, "base_config": {"dropout": 0.0}},
               "variants": [{"name": "MHA", "runs": runs}, {"name": "MQA", "runs": [{"val_loss": 2, "train_loss": 1}]}]}
    text = val_below_train(results)
    assert "MHA (val 1.050 vs train 1.250 nats)" in text and "MQA" not in text
    assert "last 10% of the corpus" in text and "Dropout is 0" in text
    results["study"]["base_config"]["dropout"] = 0.1
    assert "off at evaluation" in val_below_train(results)
    results["variants"] = results["variants"][1:]
    assert val_below_train(results) == ""


@pytest.mark.slow
def test_in_domain_sentences_come_from_the_held_out_split(small_study):
    out, results = small_study
    saved = json.loads((out / "results.json").read_text())
    sent = saved["study"]["sentences"]
    assert sent["in_domain_source"] == "held-out split" and sent["in_domain"]
    # Every in-domain sentence is text of the corpus, and each is printed in the report with per-token values.
    report = (out / "report.md").read_text()
    assert "## Scored sentences" in report
    for s in sent["in_domain"] + sent["control"]:
        assert s in report
    for s in sent["in_domain"]:
        assert s in CORPUS
    for v in saved["variants"] + [saved["baseline"]]:
        for run in v["runs"]:
            scored = run["sentences"]["in_domain"]
            assert [x["text"] for x in scored] == sent["in_domain"]
            for x in scored:
                assert len(x["logprobs"]) == len(x["tokens"]) - 1 and all(lp <= 0 for lp in x["logprobs"])
                assert x["mean"] == pytest.approx(sum(x["logprobs"]) / len(x["logprobs"]))
    # The bigram baseline row: trained, in the table, and the floor is discussed.
    b = saved["baseline"]
    assert b["name"] == "bigram" and len(b["runs"]) == 2 and b["val_perplexity_mean"] > 1
    assert "| bigram (baseline) |" in report and "Against the bigram floor" in report


def test_heldout_sentences_are_whole_sentences_of_the_split():
    from pytorch_mqa.training.tokenizers import get_tokenizer

    text = "".join(f"Sentence number {i} is here for the test. " for i in range(200))
    tok = get_tokenizer("char", text)
    val = torch.tensor(tok.encode(text[-2000:]))
    got = metrics.heldout_sentences(tok, val, 4, 64)
    assert len(got) == 4 and len(set(got)) == 4
    assert all(s.startswith("Sentence number") and s.endswith("test.") and s in text[-2000:] for s in got)


def test_own_sentences_are_scored_by_every_variant(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    p = dict(tokenizer="word", n_layer=1, n_head=2, n_embd=16, block_size=24, batch_size=4, max_steps=4, lr=1e-2,
             warmup_steps=1, eval_interval=4, eval_iters=1, seeds=1, gen_tokens=4, dropout=0.1, weight_decay=0.0,
             schedule="constant")
    mine = ["The while statement repeats a suite while an expression is true.", "Bananas are yellow."]
    results = study.run_study(p, str(tmp_path / "out"), corpus=str(corpus), progress=False, sentences=mine,
                              sentences_source="mine.txt")
    assert results["study"]["sentences"]["in_domain"] == mine
    assert results["study"]["base_config"]["dropout"] == 0.1 and results["study"]["preset"]["schedule"] == "constant"
    for v in results["variants"]:
        scored = v["runs"][0]["sentences"]["in_domain"]
        assert [x["text"] for x in scored] == mine and all(x["logprobs"] for x in scored)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "the sentences of mine.txt" in report and "Bananas are yellow." in report
    scored = results["variants"][0]["runs"][0]["sentences"]["in_domain"]
    assert scored[0]["unknown"] == 0 and scored[1]["unknown"] == 2  # "are", "yellow." after the first token
    assert "2 of the" in report and "unknown token" in report
