"""Packaging for pytorch_mqa.

`kernels/` (Triton) is installed as `pytorch_mqa.kernels`; the CUDA sources in `csrc/` ship as
package data (`pytorch_mqa.csrc`) so the JIT build in `pytorch_mqa/ops/build.py` finds them in an
installed copy. Nothing is compiled at install time, unless PYTORCH_MQA_BUILD_CUDA=1 asks for an
ahead-of-time build of csrc/ as `pytorch_mqa._C` (needs torch, nvcc and ninja in the build
environment: `PYTORCH_MQA_BUILD_CUDA=1 pip install --no-build-isolation .`).
"""

import os
import runpy

from setuptools import setup


def _cuda_extension_kwargs() -> dict:
    """ext_modules / cmdclass of the ahead-of-time CUDA build (same sources as pytorch_mqa/ops/build.py)."""
    if os.environ.get("PYTORCH_MQA_BUILD_CUDA", "0") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # The same sources and flags as the JIT build, read without importing the package.
    flags = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pytorch_mqa", "ops", "build_flags.py"))
    ext = CUDAExtension(
        "pytorch_mqa._C",
        sources=[f"csrc/{name}" for name in flags["SOURCES"]],
        extra_compile_args={"cxx": flags["CXX_FLAGS"], "nvcc": flags["NVCC_FLAGS"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="pytorch_mqa",
    version="0.1.0",
    description="Fused multi-query / grouped-query attention for PyTorch (reference, Triton, CUDA)",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=[
        "pytorch_mqa",
        "pytorch_mqa.core",
        "pytorch_mqa.ops",
        "pytorch_mqa.testing",
        "pytorch_mqa.model",
        "pytorch_mqa.training",
        "pytorch_mqa.study",
        "pytorch_mqa.bench",
        "pytorch_mqa.cli",
        "pytorch_mqa.kernels",
        "pytorch_mqa.csrc",
    ],
    package_dir={
        "pytorch_mqa": "pytorch_mqa",
        "pytorch_mqa.kernels": "kernels",
        "pytorch_mqa.csrc": "csrc",
    },
    package_data={"pytorch_mqa.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h"]},
    include_package_data=True,
    install_requires=["torch>=2.6", "numpy", "tqdm", "tiktoken", "regex", "safetensors", "matplotlib"],
    extras_require={
        "triton": ["triton>=3.6"],
        "cuda": ["ninja"],
        "text": ["tiktoken"],
        "hf": ["transformers", "safetensors"],
        "plot": ["matplotlib"],
        "test": ["pytest", "triton>=3.6", "ninja", "tiktoken", "transformers", "safetensors", "matplotlib"],
    },
    entry_points={"console_scripts": ["pytorch-mqa = pytorch_mqa.cli:main"]},
    **_cuda_extension_kwargs(),
)
