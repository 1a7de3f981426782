#!/usr/bin/env bash
# Run the CUDA decoding tests under compute-sanitizer memcheck (needs a GPU). The caching
# allocator is switched off so every tensor is its own allocation and an out-of-bounds access is
# reported instead of landing in a neighbouring block of a cached segment. CUDA-graph capture is
# left out (the sanitizer does not support capturing every API call it intercepts).
#
#   scripts/sanitize_cuda.sh                 # uses $PYTHON, else python3
#   scripts/sanitize_cuda.sh -k guard        # extra pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SANITIZER=${SANITIZER:-compute-sanitizer}
command -v "$SANITIZER" >/dev/null 2>&1 || { echo "sanitize_cuda: $SANITIZER not found on PATH" >&2; exit 1; }

# Build (or load) the extension first, outside the sanitizer: nvcc under memcheck is slow.
"$PYTHON" -c "from pytorch_mqa.ops import build; build.load_extension()"

PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 --print-limit 20 \
    "$PYTHON" -m pytest -q -x tests/kernels/test_attention_with_kv_cache_cuda.py -m cuda -k "not graph" -p no:cacheprovider "$@"
