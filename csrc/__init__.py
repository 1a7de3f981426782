"""CUDA C++ sources of pytorch_mqa, shipped as package data for the JIT build in pytorch_mqa/ops/build.py."""
