"""Host emulation of the tensor-core CUDA decode kernel (tests/kernels/csrc_emulation.cpp, built
with g++ from csrc/decode_index.h) against the reference, without a GPU.

The emulator runs the kernel's blocks, warps and lanes with the same index helpers as the CUDA
code: mma.sync m16n8k16 fragments (checked against the PTX ISA layout), the cp.async stage ring,
live-length splits, the new-row write and the split combine. Values are fp32, so this checks the
index math and the algorithm, not fp16/bf16 rounding or the PTX itself.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import KV_CACHE_SHAPES, assert_close, kv_cache_inputs

from pytorch_mqa import reference

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "csrc_emulation.cpp"

# Beyond the shared matrix: preallocated caches (S >= 4 L) with ragged lengths 0, 1, S - 1,
# S - Tq, G up to 32, Tq 1-4, D = 256 (2 stages) and D not a multiple of 16, many splits.
EXTRA = [
    (5, 1, 512, 8, 1, 128, [0, 1, 511, 60, 100]),
    (4, 4, 300, 32, 1, 64, [0, 1, 299, 296]),
    (3, 2, 700, 6, 3, 40, [0, 150, 698]),
    (2, 3, 256, 4, 2, 256, [1, 200]),
    (2, 1, 4096, 16, 2, 72, [1000, 4095]),
]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler (g++)")
    exe = tmp_path_factory.mktemp("emu") / "csrc_emulation"
    subprocess.run([cxx, "-O2", "-std=c++17", "-Wall", "-Werror", str(SOURCE), "-o", str(exe)], check=True,
                   timeout=300)
    return exe


def test_fragment_maps_match_ptx(emulator):
    res = subprocess.run([str(emulator), "selftest"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "selftest ok" in res.stdout, res.stderr


def _emulate(exe, tmp_path, q, kc, vc, k, v, seqlens, causal, scale, sms):
    B, Tq, Hq, D = q.shape
    S, Hkv = kc.shape[1], kc.shape[2]
    has_new = k is not None
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        f.write(np.array([B, Tq, S, Hq, Hkv, D, int(has_new), int(causal), sms], dtype=np.int32).tobytes())
        f.write(np.array([scale], dtype=np.float32).tobytes())
        f.write(seqlens.numpy().astype(np.int32).tobytes())
        for t in (q, kc, vc) + ((k, v) if has_new else ()):
            f.write(t.contiguous().numpy().astype(np.float32).tobytes())
    res = subprocess.run([str(exe), str(inp), str(outp)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    raw = np.fromfile(outp, dtype=np.float32)
    ns = int(raw[:1].view(np.int32)[0])
    sizes = [B * Tq * Hq * D, B * Hq * Tq, B * S * Hkv * D, B * S * Hkv * D]
    parts, off = [], 1
    for n in sizes:
        parts.append(torch.from_numpy(raw[off : off + n].copy()))
        off += n
    out = parts[0].view(B, Tq, Hq, D)
    lse = parts[1].view(B, Hq, Tq)
    return out, lse, parts[2].view(B, S, Hkv, D), parts[3].view(B, S, Hkv, D), ns


# 132 SMs: many splits of one or two tiles; 2 SMs: one or two splits, long tile loops through
# every stage of the cp.async ring.
@pytest.mark.parametrize("sms", [132, 2])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("with_new", [True, False], ids=["append", "no_new"])
@pytest.mark.parametrize("case", KV_CACHE_SHAPES + EXTRA, ids=str)
def test_emulated_mma_kernel_matches_reference(emulator, tmp_path, case, with_new, causal, sms):
    q, kc, vc, k, v, seqlens = kv_cache_inputs(case, torch.float32, seed=5, with_new=with_new)
    if with_new and case[6][0] == case[2]:
        pytest.skip("a cache already at capacity takes no new rows")
    scale = q.shape[-1] ** -0.5
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref, ref_lse = reference.attention_with_kv_cache(q, kc_ref, vc_ref, k, v, seqlens, causal=causal, scale=scale)
    out, lse, kc_out, vc_out, ns = _emulate(emulator, tmp_path, q, kc, vc, k, v, seqlens, causal, scale, sms)
    assert_close(out, ref, ref, torch.float32, "out", "cuda mma emulation")
    assert_close(lse, ref_lse, ref_lse, torch.float32, "lse", "cuda mma emulation")
    assert torch.equal(kc_out, kc_ref) and torch.equal(vc_out, vc_ref)


def test_emulated_lengths_past_capacity(emulator, tmp_path):
    """Device lengths past S and below 0 write only inside [0, S); many live-length splits."""
    B, Tq, S, Hq, Hkv, D = 4, 3, 600, 4, 2, 64
    gen = torch.Generator().manual_seed(11)
    q = torch.randn((B, Tq, Hq, D), generator=gen)
    kc, vc = torch.randn((B, S, Hkv, D), generator=gen), torch.randn((B, S, Hkv, D), generator=gen)
    k, v = torch.randn((B, Tq, Hkv, D), generator=gen), torch.randn((B, Tq, Hkv, D), generator=gen)
    seqlens = torch.tensor([S - 1, S + 5, -2, 257], dtype=torch.int32)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref, ref_lse = reference.attention_with_kv_cache(q, kc_ref, vc_ref, k, v, seqlens, causal=True, scale=0.125)
    out, lse, kc_out, vc_out, ns = _emulate(emulator, tmp_path, q, kc, vc, k, v, seqlens, True, 0.125, sms=132)
    assert ns == 10  # ceil(600 / 64) splits: at most one per 64 cache rows
    assert_close(out, ref, ref, torch.float32, "out", "cuda mma emulation")
    assert_close(lse, ref_lse, ref_lse, torch.float32, "lse", "cuda mma emulation")
    assert torch.equal(kc_out, kc_ref) and torch.equal(vc_out, vc_ref)
