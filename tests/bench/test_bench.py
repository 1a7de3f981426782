"""Smoke test of the benchmark code (tiny shapes, CPU): counting, rows, JSON, plots, CLI wiring.

Nothing here checks a timing: benchmarks are never timed tests (DESIGN §6).
"""

import importlib.util
import json

import pytest
import torch

from pytorch_mqa import cli
from pytorch_mqa.bench import attention as bench_attention
from pytorch_mqa.bench import attention_with_kv_cache as bench_decode
from pytorch_mqa.bench import generate as bench_generate
from pytorch_mqa.bench import report, runner, timing

TINY = {
    "attention": dict(Hq=4, D=16, Hkv=(4, 1), seqlens=(32,), tokens=64, budget_s=0.0),
    "attention_with_kv_cache": dict(Hq=4, D=16, Hkv=(2,), batch=(2,), lengths=(40,), budget_s=0.0),
    "generate": dict(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=64, prompt=4, new_tokens=6,
                     repeats=1, threads=None, mqa_kv_heads=(1,)),
    "calibration": dict(copy_bytes=2**22, matmul_n=256),
}


def test_attention_flops_by_hand():
    # B=2, Hq=4, Tq=8, Tk=16, D=32: 4 * 2 * 4 * 8 * 16 * 32 = 131072
    assert timing.attention_flops(2, 4, 8, 16, 32, causal=False) == 131072
    assert timing.attention_flops(2, 4, 8, 16, 32, causal=True) == 65536
    assert timing.attention_flops(2, 4, 8, 16, 32, causal=False, mode="fwd_bwd") == 131072 * 3.5
    assert timing.attention_flops(2, 4, 8, 16, 32, causal=True, mode="fwd_bwd") == 65536 * 3.5
    with pytest.raises(ValueError, match="mode"):
        timing.attention_flops(1, 1, 1, 1, 1, False, mode="bwd")


def test_decode_bytes_by_hand():
    # lengths [3, 5], Tq=1, Hq=4, Hkv=2, D=8, 2-byte elements:
    # K/V read: (4 + 6) rows * 2 heads * 8 * 2 (K and V) * 2 bytes = 640
    # q read + out written: 2 * (2 * 1 * 4 * 8 * 2) = 256; new k/v read and written: 2 * 2 * 2 * 8 * 2 * 2 = 256
    assert timing.decode_bytes([3, 5], 1, 4, 2, 8, 2) == 640 + 256 + 256
    # ragged lengths count each sequence's own rows
    assert timing.decode_bytes([0], 1, 1, 1, 1, 4) == 2 * 4 + 2 * 4 + 4 * 4


def test_paged_decode_bytes_by_hand():
    # lengths [3, 20], Tq = 1, page 16: the live rows as decode_bytes counts them, plus 1 + 2 live
    # pages' int32 table entries.
    assert bench_decode.paged_decode_bytes([3, 20], 1, 4, 2, 8, 2, 16) == timing.decode_bytes([3, 20], 1, 4, 2, 8, 2) + 12


def test_paged_rows_beside_contiguous():
    """Paged cases (page 16) beside the contiguous one: the same reference result as sdpa+gather,
    GB/s over the live rows and live pages only."""
    shapes = dict(TINY["attention_with_kv_cache"], pages=(None, 16))
    calib = {"copy_gbs": 1.0}
    rows = bench_decode.run(torch.device("cpu"), torch.float32, calib, True, shapes=shapes)
    timed = [r for r in rows if r.get("case") != "all"]
    by = {(r["provider"], r["page"]): r for r in timed}
    assert set(by) == {("mqa.reference", None), ("sdpa+write", None), ("mqa.reference", 16), ("sdpa+gather", 16)}
    paged = by[("mqa.reference", 16)]
    assert paged["S"] == 48 and paged["case"].endswith("page16")  # L + 1 = 41 rows in whole pages
    assert by[("sdpa+gather", 16)]["max_abs_err"] < 1e-5
    nbytes = bench_decode.paged_decode_bytes([40, 40], 1, 4, 2, 16, 4, 16)
    assert paged["gbs"] == pytest.approx(nbytes / (paged["ms"] * 1e-3) / 1e9)


def test_a_case_that_does_not_fit_is_skipped_before_allocation(monkeypatch):
    """A case whose caches exceed the memory budget is a row with a reason, not a killed process."""
    from pytorch_mqa.bench import common

    monkeypatch.setattr(common, "available_bytes", lambda device: 1024)
    rows = bench_decode.run(torch.device("cpu"), torch.float32, {"copy_gbs": 1.0}, True,
                            shapes=TINY["attention_with_kv_cache"])
    skipped = [r for r in rows if r.get("reason", "").startswith("inputs need")]
    assert skipped and all(r["ms"] is None for r in skipped)
    assert not [r for r in rows if r.get("ms")]
    assert common.inputs_too_big(100, torch.device("cpu")) is None


def _check_timed(row, rate_key):
    assert row["ms"] > 0 and row["p20_ms"] <= row["ms"] <= row["p80_ms"], row
    assert row[rate_key] > 0 and row["pct_peak"] > 0, row


@pytest.mark.slow
def test_ops_rows_side_by_side(tmp_path):
    result = runner.run_bench(["attention", "attention_with_kv_cache"], torch.device("cpu"), torch.float32, quick=True,
                             shapes=TINY, log=lambda *a: None)
    calib = result["calibration"]
    assert calib["copy_gbs"] > 0 and calib["matmul_tflops"] > 0
    env = result["environment"]
    for key in ("device_name", "torch", "triton", "git_revision"):
        assert key in env

    att = [r for r in result["rows"] if r["suite"] == "attention" and r["case"] != "all" and "variant" not in r]
    variants = [r for r in result["rows"] if r["suite"] == "attention" and "variant" in r]
    assert {(r["variant"], r["mode"]) for r in variants} == {(c, m) for c in ("window", "varlen") for m in ("fwd", "fwd_bwd")}
    for r in variants:
        if r["provider"] == "mqa.reference":
            _check_timed(r, "tflops")
    cases = {(r["case"], r["causal"], r["mode"]) for r in att}
    assert len(cases) == 2 * 2 * 2  # Hkv in {4, 1} x causal x {fwd, fwd_bwd}
    for case in cases:
        by = {r["provider"]: r for r in att if (r["case"], r["causal"], r["mode"]) == case}
        _check_timed(by["mqa.reference"], "tflops")
        _check_timed(by["sdpa.MATH"], "tflops")
        if case[2] == "fwd":
            assert by["sdpa.MATH"]["max_abs_err"] < 1e-5
    skipped = {r["provider"]: r["reason"] for r in result["rows"] if r.get("case") == "all"}
    assert "flex" in skipped and "mqa.cuda" in skipped
    for name in bench_attention.SDPA_BACKENDS:  # every SDPA backend is timed or says why not
        for case in cases:
            row = [r for r in att if r["provider"] == f"sdpa.{name}" and (r["case"], r["causal"], r["mode"]) == case]
            assert (row and (row[0]["ms"] or row[0]["reason"])) or skipped[f"sdpa.{name}"]

    dec = [r for r in result["rows"] if r["suite"] == "attention_with_kv_cache" and r.get("case") != "all"]
    by = {r["provider"]: r for r in dec}
    _check_timed(by["mqa.reference"], "gbs")
    _check_timed(by["sdpa+write"], "gbs")
    assert by["sdpa+write"]["max_abs_err"] < 1e-5
    row = by["mqa.reference"]
    assert row["gbs"] == pytest.approx(timing.decode_bytes([40, 40], 1, 4, 2, 16, 4) / (row["ms"] * 1e-3) / 1e9)

    # The JSON file holds the same rows; a plot is written per suite.
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(result))
    assert json.loads(path.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    md = report.markdown_report(result)
    assert "### attention" in md and "### attention_with_kv_cache" in md and "| mqa.reference |" in md and "sdpa+write" in md
    pytest.importorskip("matplotlib")
    pngs = report.write_plots(result, str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in pngs) == ["bench_attention.png", "bench_attention_with_kv_cache.png"]


@pytest.mark.slow
def test_generate_rows(tmp_path):
    pytest.importorskip("safetensors")
    rows = bench_generate.run(torch.device("cpu"), torch.float32, None, True, TINY["generate"], compile=True)
    if importlib.util.find_spec("matplotlib") is not None:
        result = {"rows": rows, "environment": {"device_name": "cpu"}}
        assert [p.rsplit("/", 1)[1] for p in report.write_plots(result, str(tmp_path))] == ["bench_generate.png"]
    by = {(r["provider"], r["n_kv_head"]): r for r in rows}
    cached, uncached = by[("mqa.cached", 2)], by[("mqa.uncached", 2)]
    assert cached["tokens_per_s"] > 0 and uncached["same_tokens"] is True
    assert cached["x_vs_uncached"] == pytest.approx(cached["tokens_per_s"] / uncached["tokens_per_s"])
    assert by[("mqa.cached", 1)]["tokens_per_s"] > 0
    compiled = by[("mqa.compiled", 2)]
    assert compiled["same_tokens"] is True and compiled["compile_seconds"] > 0 and compiled["tokens_per_s"] > 0
    hf = by[("hf.transformers", 2)]
    try:
        import transformers
    except ImportError:
        assert hf["reason"]
    else:
        assert hf["same_tokens"] is True, transformers.__version__  # same weights, same greedy tokens
        assert "x_vs_hf" in cached


def test_cli_wiring(capsys):
    args = cli.build_parser().parse_args(["bench", "decode", "--quick", "--out", "x", "--plot"])
    assert (args.suite, args.quick, args.out, args.plot) == ("decode", True, "x", True)
    assert cli.build_parser().parse_args(["bench"]).suite == "all"
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--device", "cuda"]) == 2
        assert capsys.readouterr().err.startswith("pytorch-mqa bench: error: --device: expected a device")
