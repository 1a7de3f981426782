#!/usr/bin/env bash
# Compile-check every .cu / .cpp in csrc/ with nvcc against the installed torch's headers (the CPU
# wheel is enough: nothing is linked), for sm_80 and sm_90a, one nvcc job per (file, arch) in
# parallel. Prints ptxas resource usage (registers, spills, shared memory) of every kernel.
# Exits non-zero if nvcc is missing or any file fails.
#
#   scripts/check_cuda_compile.sh            # uses $PYTHON, else python3
#   JOBS=4 scripts/check_cuda_compile.sh     # parallel jobs (default: number of cores)
set -uo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "check_cuda_compile: nvcc not found on PATH (set NVCC=/path/to/nvcc); CI needs it to compile-check csrc/" >&2
    exit 1
fi
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

flags=$("$PYTHON" - <<'EOF'
import sysconfig
import torch.utils.cpp_extension as ext
incs = ext.include_paths() + [sysconfig.get_paths()["include"]]
print(" ".join(["-I" + p for p in incs] + ext.COMMON_NVCC_FLAGS))
EOF
) || { echo "check_cuda_compile: could not read torch's include paths with $PYTHON" >&2; exit 1; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
start=$(date +%s)

compile() {  # file arch
    local src=$1 arch=$2 log
    log="$out/$(basename "$src").$arch.log"
    local gencode=""
    case "$src" in
        *.cu) gencode="-gencode arch=compute_${arch},code=sm_${arch} -Xptxas -v" ;;
    esac
    # shellcheck disable=SC2086
    if "$NVCC" -c "$src" -o "$out/$(basename "$src").$arch.o" -std=c++17 -O3 \
        -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCH_EXTENSION_NAME=pytorch_mqa_check \
        -Xcompiler -fPIC $gencode $flags >"$log" 2>&1; then
        echo "ok   $src (${gencode:+sm_}$arch)"
    else
        echo "FAIL $src (${gencode:+sm_}$arch)"
        touch "$log.failed"
        return 1
    fi
}
export -f compile
export NVCC flags out

jobs_list=()
for src in csrc/*.cu csrc/*.cpp; do
    [ -e "$src" ] || continue
    case "$src" in
        *.cu) jobs_list+=("$src 80" "$src 90a") ;;
        *) jobs_list+=("$src host") ;;  # host code: one compile is enough
    esac
done

printf '%s\n' "${jobs_list[@]}" | xargs -P "$JOBS" -L 1 bash -c 'compile $0 $1'
status=$?

for log in "$out"/*.log; do
    [ -s "$log" ] || continue
    name=$(basename "$log" .log)
    if [ -e "$log.failed" ]; then
        echo "---- $name: FAILED, nvcc output:"
        cat "$log"
    else
        grep -i "warning" "$log" && echo "---- $name: compiler warnings above"
        echo "---- $name: ptxas resource usage"
        # One line per kernel: demangled name, then registers / spills / shared memory.
        grep -E "Compiling entry function|Used [0-9]+ registers|spill stores" "$log" |
            sed -E 's/ptxas info    : //' | (command -v c++filt >/dev/null && c++filt || cat)
    fi
done

echo "check_cuda_compile: $(( $(date +%s) - start )) s"
if [ $status -ne 0 ]; then
    echo "check_cuda_compile: FAILED" >&2
    exit 1
fi
echo "check_cuda_compile: all files compiled"
