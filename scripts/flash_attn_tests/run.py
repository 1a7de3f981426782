"""Run FlashAttention 2's own tests (tests/test_flash_attn.py) against pytorch_mqa on the CPU.

    python scripts/flash_attn_tests/run.py --fa PATH [--backend reference|triton] [--features ...]

PATH is a FlashAttention checkout: a work tree (PATH/tests/test_flash_attn.py) or a git
directory (its HEAD is read with `git show`). Nothing is downloaded. The test file is copied to
--workdir (outside this repository) with the CUDA device replaced by the CPU:
`torch.cuda.get_device_capability("cuda")` becomes (8, 0) (so the backward checks that
FlashAttention runs on sm80 run), `get_device_properties("cuda").total_memory` becomes 80 GiB
(no shape is skipped for memory; the selection below bounds the cost instead) and every
`device="cuda"` becomes "cpu". `flash_attn` is the stand-in package beside this file
(flash_attn/flash_attn_interface.py says exactly how each argument is mapped).

Selection (fa_select.py): only the tests that go through the public Python API; of their
parametrizations, those using at least one of --features and costing at most --max-work (a
relative cost: batch * heads * Tq * Tk * D * passes); of those, --per-feature drawn with a fixed
seed per test function and feature, plus every one costing at most --small-work. Each runs under
a --timeout (a timed-out test counts as failed). At the end the counts per feature and dtype
(passed / failed / skipped) and the worst error ratio per feature, dtype and quantity are
printed; a ratio is the test's own max|package - reference| over max|PyTorch low-precision -
reference|, which the tests bound by 2 (output) or 3 (gradients; 3 or 5 for the kvcache test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

from fa_select import FEATURES, TESTS  # noqa: E402

REPLACEMENTS = [
    ('torch.cuda.get_device_capability("cuda")', "(8, 0)"),
    ('torch.cuda.get_device_properties("cuda").total_memory', "(80 * 2**30)"),
    ('device = "cuda"', 'device = "cpu"'),
    ('device="cuda"', 'device="cpu"'),
]
BATCH_IDX = ('@pytest.mark.parametrize("has_batch_idx", [False])', '@pytest.mark.parametrize("has_batch_idx", [False, True])')


def read_test_file(fa: Path) -> str:
    tree = fa / "tests" / "test_flash_attn.py"
    if tree.is_file():
        return tree.read_text()
    try:
        return subprocess.run(["git", "--git-dir", str(fa), "show", "HEAD:tests/test_flash_attn.py"], check=True,
                              capture_output=True, text=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise SystemExit(f"--fa: expected a FlashAttention work tree or git directory with tests/test_flash_attn.py, "
                         f"got {fa} ({e})")


def prepare(src: str, batch_idx: bool) -> str:
    for old, new in REPLACEMENTS:
        if old not in src:
            raise SystemExit(f"--fa: expected the test file to contain {old!r} (another FlashAttention version?)")
        src = src.replace(old, new)
    if batch_idx:
        if BATCH_IDX[0] not in src:
            raise SystemExit(f"--batch-idx: expected the test file to contain {BATCH_IDX[0]!r}")
        src = src.replace(*BATCH_IDX)
    # draw the parametrizations before pytest generates them (508,777 in FlashAttention 2.8's file)
    return src + "\n\nimport fa_select as _fa_select  # noqa: E402\n\n_fa_select.sample_module(globals())\n"


def summarise(results: Path, features) -> int:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.exists() else []
    counts = defaultdict(lambda: defaultdict(int))
    worst = defaultdict(float)
    zero_ref = defaultdict(int)
    for r in rows:
        for feat in r["features"]:
            if feat not in features:
                continue
            counts[(feat, r["dtype"])][r["outcome"]] += 1
            if r["outcome"] == "passed":
                for q, x in r["ratios"].items():
                    if x == float("inf"):  # PyTorch's error was 0: passed on the test's absolute slack
                        zero_ref[(feat, r["dtype"])] += 1
                        continue
                    worst[(feat, r["dtype"], q)] = max(worst[(feat, r["dtype"], q)], x)
    total = defaultdict(int)
    for r in rows:
        total[r["outcome"]] += 1
    print(f"\nparametrizations run: {len(rows)}  passed {total['passed']}  failed {total['failed']}  "
          f"skipped {total['skipped']}")
    print(f"{'feature':<10} {'dtype':<9} {'passed':>7} {'failed':>7} {'skipped':>8}   worst ratios (passed tests)")
    for (feat, dt) in sorted(counts):
        c = counts[(feat, dt)]
        ratios = ", ".join(f"{q} {worst[(f2, d2, q)]:.3f}" for (f2, d2, q) in sorted(worst) if (f2, d2) == (feat, dt))
        zero = f" ({zero_ref[(feat, dt)]} with PyTorch's error 0)" if zero_ref[(feat, dt)] else ""
        print(f"{feat:<10} {dt:<9} {c['passed']:>7} {c['failed']:>7} {c['skipped']:>8}   {ratios}{zero}")
    reasons = defaultdict(int)
    for r in rows:
        if r["outcome"] == "skipped":
            reasons[r.get("reason", "")[:160]] += 1
    for reason, n in sorted(reasons.items(), key=lambda x: -x[1]):
        print(f"skipped {n:>5}: {reason}")
    for r in rows:
        if r["outcome"] == "failed":
            print(f"FAILED {r['nodeid']}: {r.get('error', '')}")
    return 1 if total["failed"] else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fa", type=Path, required=True, help="FlashAttention checkout (work tree or git directory)")
    ap.add_argument("--backend", default="reference", choices=["reference", "triton"],
                    help="pytorch_mqa backend (triton runs under TRITON_INTERPRET=1 on the CPU)")
    ap.add_argument("--features", default=",".join(FEATURES[:5]),
                    help=f"comma-separated, any of {','.join(FEATURES)} (default: %(default)s)")
    ap.add_argument("--tests", default="", help="comma-separated test function names (default: all that use the API)")
    ap.add_argument("--dtypes", default="", help="comma-separated, e.g. float16,bfloat16 (default: all)")
    ap.add_argument("--per-feature", type=int, default=20,
                    help="parametrizations drawn (fixed seed) per test function and feature")
    ap.add_argument("--small-work", type=float, default=0, help="parametrizations this cheap all run")
    ap.add_argument("--max-work", type=float, default=2e10, help="nothing costlier runs")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per parametrization")
    ap.add_argument("--batch-idx", action="store_true",
                    help="also parametrize the kvcache test with has_batch_idx=True (FlashAttention pins it to False)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pytorch_mqa_fa_tests"),
                    help="where the CPU copy of the test file and the results go (default: %(default)s)")
    ap.add_argument("--collect-only", action="store_true", help="only list the selected parametrizations")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    a = ap.parse_args(argv)
    features = [f for f in a.features.split(",") if f]
    bad = [f for f in features if f not in FEATURES]
    if bad:
        raise SystemExit(f"--features: expected names from {FEATURES}, got {bad}")
    if a.workdir.resolve().is_relative_to(REPO):
        raise SystemExit(f"--workdir: expected a folder outside this repository (FlashAttention's code is not "
                         f"committed here), got {a.workdir}")
    a.workdir.mkdir(parents=True, exist_ok=True)
    (a.workdir / "test_flash_attn.py").write_text(prepare(read_test_file(a.fa), a.batch_idx))
    results = a.workdir / f"results_{a.backend}.jsonl"
    if results.exists():
        results.unlink()
    cfg = dict(features=features, tests=[t for t in a.tests.split(",") if t], per_feature=max(0, a.per_feature),
               small_work=a.small_work, max_work=a.max_work, timeout=a.timeout, results=str(results),
               dtypes=[d for d in a.dtypes.split(",") if d])
    (a.workdir / "select.json").write_text(json.dumps(cfg))
    env = dict(os.environ, FA_SELECT_CONFIG=str(a.workdir / "select.json"), PYTORCH_MQA_FA_BACKEND=a.backend,
               PYTHONPATH=os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    if a.backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    names = cfg["tests"] or list(TESTS)
    cmd = [sys.executable, "-m", "pytest", *(f"test_flash_attn.py::{n}" for n in names), "-p", "fa_select", "-q",
           "-p", "no:cacheprovider", "--rootdir", str(a.workdir), "-o", "addopts=", "-rN", "--tb=line"]
    cmd += ["--collect-only"] if a.collect_only else []
    cmd += a.pytest_args
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, env=env, cwd=a.workdir).returncode
    if a.collect_only:
        return rc
    return summarise(results, features) or (rc if rc not in (0, 1, 5) else 0)


if __name__ == "__main__":
    sys.exit(main())
