"""`pytorch-mqa check`: table, JSON report, exit status."""

import json

import pytest

from pytorch_mqa import cli

IMPL = '''
import torch.nn.functional as F
from pytorch_mqa import reference

def sdpa(q, k, v, *, causal=False, scale=None):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal, scale=scale, enable_gqa=True).transpose(1, 2)

def decode(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, causal=True, scale=None):
    return reference.attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal=causal, scale=scale)[0]

not_callable = 3
'''


@pytest.fixture
def impl(tmp_path):
    path = tmp_path / "my_kernels.py"
    path.write_text(IMPL)
    return path


def test_a_failing_impl_exits_1_with_the_cases_in_the_table_and_json(impl, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["check", "--impl", f"{impl}:sdpa", "--quick", "--dtype", "fp32", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 1
    assert "B=1 Tq=5 Tk=3 Hq=2 Hkv=2 D=7 float32 causal" in text and "FAIL" in text
    assert "11 of 14 cases pass" in text
    (report_file,) = out.glob("*.json")
    report = json.loads(report_file.read_text())
    assert report["op"] == "attention" and report["n_failed"] == 3 and not report["passed"]
    failed = [c for c in report["cases"] if not c["passed"]]
    assert all(c["case"]["causal"] and c["case"]["Tq"] != c["case"]["Tk"] for c in failed)
    assert all({"error", "tolerance", "ratio"} <= set(c["comparisons"][0]) for c in report["cases"])


def test_a_correct_cache_impl_exits_0(impl, tmp_path, capsys):
    rc = cli.main(["check", "--impl", f"{impl}:decode", "--op", "attention_with_kv_cache", "--quick",
                   "--dtype", "bf16", "--out", str(tmp_path)])
    assert rc == 0 and "PASS" in capsys.readouterr().out


def test_a_builtin_backend(tmp_path, capsys):
    rc = cli.main(["check", "--backend", "reference", "--op", "attention", "--quick", "--dtype", "fp16",
                   "--device", "cpu", "--failures-only", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0 and "(no failing cases)" in text and "backend=reference attention on cpu" in text


@pytest.mark.parametrize("argv, message", [
    (["--impl", "nocolon"], "expected MODULE:FUNCTION"),
    (["--impl", "missing_file.py:f"], "expected an existing Python file"),
    (["--impl", "{impl}:nothing"], "got no attribute 'nothing'"),
    (["--impl", "{impl}:not_callable"], "expected a callable"),
    (["--backend", "nosuch"], "got 'nosuch'"),
    (["--backend", "triton", "--op", "attention", "--device", "cpu"], None),
])
def test_unusable_arguments_exit_2(impl, tmp_path, capsys, monkeypatch, argv, message):
    if argv[:2] == ["--backend", "triton"]:
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton on CPU tensors needs the interpreter
        message = "TRITON_INTERPRET=1"
    argv = [a.replace("{impl}", str(impl)) for a in argv]
    assert cli.main(["check", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
