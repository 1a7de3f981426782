"""Packaging for pytorch_mqa.

`kernels/` (Triton) is installed as `pytorch_mqa.kernels`; the CUDA sources in `csrc/` ship as
package data (`pytorch_mqa.csrc`) so the JIT build in `pytorch_mqa/_build.py` finds them in an
installed copy. Nothing is compiled at install time.
"""

import os

from setuptools import setup

setup(
    name="pytorch_mqa",
    version="0.1.0",
    description="Fused multi-query / grouped-query attention for PyTorch (reference, Triton, CUDA)",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["pytorch_mqa", "pytorch_mqa.kernels", "pytorch_mqa.csrc"],
    package_dir={
        "pytorch_mqa": "pytorch_mqa",
        "pytorch_mqa.kernels": "kernels",
        "pytorch_mqa.csrc": "csrc",
    },
    package_data={"pytorch_mqa.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"]},
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
)
