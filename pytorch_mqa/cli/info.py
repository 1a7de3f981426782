"""`pytorch-mqa info`: versions, devices, and which backends are available (and why not)."""

from __future__ import annotations

import argparse
import json
import platform

import torch

from pytorch_mqa.ops import cpu_ext
from pytorch_mqa.ops.backends import backend_names, unavailable_reason
from pytorch_mqa.testing.backends import load_backend_plugins
from pytorch_mqa.version import __version__


def collect() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"]
    gpus = []
    if torch.cuda.is_available():
        devices.append("cuda")
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                         "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count})
    backends = {
        dev: {b: unavailable_reason(b, dev) or "available" for b in backend_names()} for dev in ("cpu", "cuda")
    }
    return {
        "pytorch_mqa": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "devices": devices,
        "gpus": gpus,
        "backends": backends,
        "cpu_kernels": _cpu_kernels(),
    }


def _cpu_kernels() -> str:
    """Whether the C++ CPU kernels (csrc/cpu/) load here: builds them the first time."""
    if cpu_ext.unavailable_reason() is None:
        cpu_ext.load()
    reason = cpu_ext.unavailable_reason()
    return "available" if reason is None else reason


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    load_backend_plugins()
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"pytorch_mqa {info['pytorch_mqa']}  python {info['python']}")
    print(f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'})  triton {info['triton'] or 'not installed'}")
    if info["gpus"]:
        for g in info["gpus"]:
            print(f"cuda:{g['index']}  {g['name']}  sm_{g['capability'].replace('.', '')}  {g['memory_gib']} GiB  {g['sms']} SMs")
    else:
        print("GPU: none (CUDA not available)")
    print(f"C++ CPU kernels (csrc/cpu/): {info['cpu_kernels']}")
    for dev, table in info["backends"].items():
        print(f"\nbackends for {dev} tensors:")
        for name, status in table.items():
            print(f"  {name:<10} {status}")
    return 0
