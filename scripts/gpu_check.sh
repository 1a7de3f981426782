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
BUDGET_S=${BUDGET_S:-460}
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

# Most valuable first: every later step is cut to what is left of BUDGET_S. pytest writes its
# junit XML only when it finishes, so the tests are split into steps that each fit their limit.
step install 90 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
step env 30 "$PYTHON" -c "import torch, triton, sys; print(sys.version); print(torch.__version__, triton.__version__, torch.version.cuda); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
step build_csrc 150 "$PYTHON" -c "from pytorch_mqa.ops import build; build.load_extension(); print('csrc loaded')"
# Tests check results, not speed: one Triton config per specialisation (no autotuning compiles).
step tests_cuda 90 env PYTORCH_MQA_TRITON_AUTOTUNE=0 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider \
    --junitxml="$OUT/tests_cuda.xml" tests/kernels/test_attention_with_kv_cache_cuda.py
step bench 120 "$PYTHON" scripts/gpu_check_bench.py "$OUT"  # autotuned, as users run it
if command -v compute-sanitizer >/dev/null 2>&1; then
    step memcheck 60 env PYTHON="$PYTHON" PYTORCH_MQA_TRITON_AUTOTUNE=0 scripts/sanitize_cuda.sh -k "guard or preallocated and 192"
else
    echo '{"step": "memcheck", "rc": null, "seconds": 0, "note": "compute-sanitizer not on PATH"}' >>"$steps_json"
    failed=1
fi
step tests_triton_decode 120 env PYTORCH_MQA_TRITON_AUTOTUNE=0 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider \
    --junitxml="$OUT/tests_triton_decode.xml" tests/kernels/test_attention_with_kv_cache_triton.py \
    -k "preallocated or guard or past_capacity or graph or opcheck or (decode and not float32)"
step tests_attention 90 env PYTORCH_MQA_TRITON_AUTOTUNE=0 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider \
    --junitxml="$OUT/tests_attention.xml" tests/kernels/test_attention_triton.py -k "float16 or bfloat16"

"$PYTHON" scripts/gpu_check_report.py "$OUT" "$(( $(date +%s) - start ))"
echo "gpu_check: $(( $(date +%s) - start )) s, $([ $failed -eq 0 ] && echo ok || echo 'some steps failed')"
exit $failed
