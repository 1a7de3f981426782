"""Sources and compiler flags of the csrc/ build, in one place for the JIT build (ops/build.py)
and the ahead-of-time build (setup.py, which reads this file without importing the package)."""

SOURCES = ("attention_with_kv_cache.cu", "bindings.cpp")  # compiled; headers are hashed too
SOURCE_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")
CXX_FLAGS = ["-O3"]  # the C++ standard is torch's choice
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
