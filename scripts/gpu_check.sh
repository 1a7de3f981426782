#!/usr/bin/env bash
# One prepared GPU run (under 8 minutes on an H100/H200, no network): install, build csrc, run the
# CUDA-marked tests, compute-sanitizer memcheck on a small subset, a trimmed benchmark of
# attention_with_kv_cache and attention, and write one JSON + one Markdown file that set the
# measurements beside the roofline predictions of scripts/roofline.py.
#
#   scripts/gpu_check.sh                  # writes $OUT/gpu_check.{json,md} (OUT default: runs/gpu_check)
#   BUDGET_S=420 scripts/gpu_check.sh     # total seconds; every step is cut to what is left
#
# Every step runs under `timeout` and the run continues past a failing step; the exit status is
# non-zero if any step failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_check}
BUDGET_S=${BUDGET_S:-450}
mkdir -p "$OUT"
LOG="$OUT/steps.log"
: >"$LOG"
start=$(date +%s)
steps_json="$OUT/steps.jsonl"
: >"$steps_json"
failed=0

step() {  # name max_seconds command...
    local name=$1 max=$2
    shift 2
    local left=$(( BUDGET_S - ($(date +%s) - start) ))
    local lim=$(( max < left ? max : left ))
    if [ "$lim" -lt 10 ]; then
        echo "{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"note\": \"skipped: time budget spent\"}" >>"$steps_json"
        failed=1
        return
    fi
    echo "==== $name (limit ${lim}s)" | tee -a "$LOG"
    local t0=$(date +%s)
    timeout --kill-after=10 "$lim" "$@" >>"$LOG" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    echo "==== $name: rc=$rc in ${dt}s" | tee -a "$LOG"
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $dt}" >>"$steps_json"
    [ "$rc" -eq 0 ] || failed=1
}

export PYTORCH_MQA_CACHE_DIR=${PYTORCH_MQA_CACHE_DIR:-$PWD/.cache/pytorch_mqa}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}

step install 90 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
step env 30 "$PYTHON" -c "import torch, triton, sys; print(sys.version); print(torch.__version__, triton.__version__, torch.version.cuda); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
step build_csrc 150 "$PYTHON" -c "from pytorch_mqa.ops import build; build.load_extension(); print('csrc loaded')"
step tests_decode 150 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider --junitxml="$OUT/tests_decode.xml" \
    tests/kernels/test_attention_with_kv_cache_cuda.py tests/kernels/test_attention_with_kv_cache_triton.py
step tests_attention 90 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider --junitxml="$OUT/tests_attention.xml" \
    tests/kernels/test_attention_triton.py -k "float16 or bfloat16"
if command -v compute-sanitizer >/dev/null 2>&1; then
    step memcheck 90 env PYTHON="$PYTHON" scripts/sanitize_cuda.sh -k "guard or preallocated and 192"
else
    echo '{"step": "memcheck", "rc": null, "seconds": 0, "note": "compute-sanitizer not on PATH"}' >>"$steps_json"
    failed=1
fi
step bench 120 "$PYTHON" - "$OUT" <<'EOF'
import json, sys
import torch
from pytorch_mqa.bench.runner import run_bench
from pytorch_mqa.bench.report import markdown_report

out = sys.argv[1]
shapes = {
    "attention_with_kv_cache": dict(Hq=32, D=128, Hkv=(1, 8), batch=(1, 16), lengths=(4096, 16384),
                                    capacity=(1, 8), budget_s=0.05),
    "attention": dict(Hq=32, D=128, Hkv=(8, 1), seqlens=(2048,), tokens=16384, budget_s=0.05),
}
result = run_bench(("attention_with_kv_cache", "attention"), torch.device("cuda"), torch.bfloat16, True,
                   shapes=shapes)
with open(f"{out}/bench.json", "w") as f:
    json.dump(result, f, indent=1)
with open(f"{out}/bench.md", "w") as f:
    f.write(markdown_report(result))
EOF

"$PYTHON" - "$OUT" "$(( $(date +%s) - start ))" <<'EOF'
"""Merge the steps, the test counts, the bench rows and the roofline into gpu_check.{json,md}."""
import json, os, subprocess, sys
import xml.etree.ElementTree as ET

out, total = sys.argv[1], int(sys.argv[2])
steps = [json.loads(line) for line in open(f"{out}/steps.jsonl") if line.strip()]
tests = {}
for name in ("tests_decode", "tests_attention"):
    path = f"{out}/{name}.xml"
    if os.path.exists(path):
        s = ET.parse(path).getroot()
        s = s if s.tag == "testsuite" else s[0]
        tests[name] = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        tests[name]["failed"] = [c.get("classname", "") + "::" + c.get("name", "") for c in s.iter("testcase")
                                 if c.find("failure") is not None or c.find("error") is not None][:30]
bench = json.load(open(f"{out}/bench.json")) if os.path.exists(f"{out}/bench.json") else None
roof = subprocess.run([sys.executable, "scripts/roofline.py", "--json"], capture_output=True, text=True)
roofline = json.loads(roof.stdout) if roof.returncode == 0 else []
compare = []
if bench:
    for r in bench.get("rows", []):
        if r.get("suite") != "attention_with_kv_cache" or not r.get("ms"):
            continue
        for p in roofline:
            if (p["B"], p["L"], p["S"], p["Hkv"]) == (r.get("B"), r.get("L"), r.get("S"), r.get("Hkv")):
                key = {"mqa.triton": "triton", "mqa.cuda": "cuda"}.get(r["provider"])
                if key:
                    compare.append(dict(B=r["B"], L=r["L"], S=r["S"], Hkv=r["Hkv"], provider=r["provider"],
                                        measured_us=1e3 * r["ms"], measured_pct=r.get("pct_peak"),
                                        predicted_us=p[key]["pred_us"], predicted_pct=p[key]["pred_pct"]))
report = dict(total_seconds=total, steps=steps, tests=tests, roofline_vs_measured=compare,
              bench_environment=(bench or {}).get("environment"))
json.dump(dict(report, bench=bench, roofline=roofline), open(f"{out}/gpu_check.json", "w"), indent=1)
md = [f"# GPU check ({total} s)", "", "| step | rc | s |", "|---|---:|---:|"]
md += [f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in steps]
for name, t in tests.items():
    md += ["", f"**{name}**: {t['tests']} tests, {t['failures']} failures, {t['errors']} errors, {t['skipped']} skipped"]
    md += [f"- {f}" for f in t["failed"]]
if compare:
    md += ["", "| B | L | S | Hkv | provider | measured µs | measured % | predicted µs | predicted % |",
           "|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    md += [f"| {c['B']} | {c['L']} | {c['S']} | {c['Hkv']} | {c['provider']} | {c['measured_us']:.2f} | "
           f"{c['measured_pct'] or 0:.0f}% | {c['predicted_us']:.2f} | {c['predicted_pct']:.0f}% |" for c in compare]
if os.path.exists(f"{out}/bench.md"):
    md += ["", open(f"{out}/bench.md").read()]
open(f"{out}/gpu_check.md", "w").write("\n".join(md) + "\n")
print(f"wrote {out}/gpu_check.json and {out}/gpu_check.md")
EOF
echo "gpu_check: $(( $(date +%s) - start )) s, $([ $failed -eq 0 ] && echo ok || echo 'some steps failed')"
exit $failed
