#!/usr/bin/env bash
# Compile-check every .cu / .cpp in csrc/ with nvcc against the installed torch's headers (the CPU
# wheel is enough: nothing is linked), for sm_80 and sm_90a, one nvcc job per (file, arch) in
# parallel. Prints ptxas resource usage (registers, spills, shared memory) of every kernel, and
# checks the sm_90a SASS of the decode kernels: the tensor-core kernel must contain HMMA
# (mma.sync) and LDGSTS (cp.async) instructions. Exits non-zero if nvcc is missing, any file
# fails, any kernel spills, or the SASS check fails.
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
    if "$NVCC" -c "$src" -o "$out/$(basename "$src").$arch.o" -std=c++17 -O3 --expt-relaxed-constexpr \
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

# Spills: any "N bytes spill stores" with N > 0.
if cat "$out"/*.log 2>/dev/null | grep -E "[1-9][0-9]* bytes spill stores" >/dev/null; then
    echo "check_cuda_compile: a kernel spills registers (see the resource usage above)" >&2
    status=1
fi

# SASS of the sm_90a object: instruction counts per decode kernel.
# cuobjdump: $CUOBJDUMP, else next to the real nvcc, else the one in Triton's wheel.
if [ -z "${CUOBJDUMP:-}" ]; then
    CUOBJDUMP=$(dirname "$(readlink -f "$(command -v "$NVCC")")")/cuobjdump
    nvcc_home=$(sed -n 's|^exec \(.*\)/nvcc .*|\1|p' "$(command -v "$NVCC")" 2>/dev/null | head -1)
    [ -x "$CUOBJDUMP" ] || CUOBJDUMP="$nvcc_home/cuobjdump"
    [ -x "$CUOBJDUMP" ] || CUOBJDUMP=$("$PYTHON" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))' 2>/dev/null)
fi
obj="$out/attention_with_kv_cache.cu.90a.o"
if [ -e "$obj" ] && [ -x "$CUOBJDUMP" ]; then
    echo "---- sm_90a SASS: HMMA / LDGSTS / LDG / FFMA per kernel"
    "$CUOBJDUMP" -sass "$obj" | awk '
        /Function :/ { name = $3 }
        name != "" && /HMMA/ { hmma[name]++ }
        name != "" && /LDGSTS/ { ldgsts[name]++ }
        name != "" && /LDG\./ && !/LDGSTS/ { ldg[name]++ }
        name != "" && /FFMA/ { ffma[name]++ }
        /Function :/ { seen[name] = 1 }
        END { for (n in seen) printf "%s HMMA=%d LDGSTS=%d LDG=%d FFMA=%d\n", n, hmma[n], ldgsts[n], ldg[n], ffma[n] }' |
        (command -v c++filt >/dev/null && c++filt || cat) | sort | tee "$out/sass.txt"
    if ! grep "mma_kernel" "$out/sass.txt" | grep -vq "HMMA=0\|LDGSTS=0"; then
        echo "check_cuda_compile: the tensor-core decode kernel lacks HMMA or LDGSTS in its SASS" >&2
        status=1
    fi
    if grep "mma_kernel" "$out/sass.txt" | grep -q "HMMA=0\|LDGSTS=0"; then
        echo "check_cuda_compile: an instantiation of the tensor-core decode kernel lacks HMMA or LDGSTS" >&2
        status=1
    fi
else
    echo "check_cuda_compile: no sm_90a object or no cuobjdump ($CUOBJDUMP): SASS not checked" >&2
    status=1
fi

echo "check_cuda_compile: $(( $(date +%s) - start )) s"
if [ $status -ne 0 ]; then
    echo "check_cuda_compile: FAILED" >&2
    exit 1
fi
echo "check_cuda_compile: all files compiled"
