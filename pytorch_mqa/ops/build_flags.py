"""Sources and compiler flags of the csrc/ builds, in one place for the JIT builds (ops/build.py)
and the ahead-of-time build (setup.py, which reads this file without importing the package).

Two libraries: the CUDA kernels (csrc/*.cu, *.cpp) and the CPU kernels (csrc/cpu/), JIT-built on
the machine that runs them (so -march=native: the host's vector ISA)."""

SOURCES = ("attention_with_kv_cache.cu", "bindings.cpp")  # compiled; headers are hashed too
SOURCE_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")
CXX_FLAGS = ["-O3"]  # the C++ standard is torch's choice
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]

CPU_SUBDIR = "cpu"  # csrc/cpu/
CPU_SOURCES = ("attention.cpp", "attention_with_kv_cache.cpp")
CPU_SOURCE_SUFFIXES = (".cpp", ".h")
# -fopenmp: at::parallel_for is a header template over `#pragma omp parallel` (serial without it);
# the library then uses the libgomp.so.1 torch has loaded already (same soname, one runtime).
CPU_CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
CPU_LD_FLAGS = ["-fopenmp"]
