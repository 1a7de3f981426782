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
import csrc_oracle
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


def _emulate(exe, tmp_path, q, kc, vc, k, v, seqlens, causal, scale, sms, window=(-1, -1), softcap=0.0,
             alibi=None, block_table=None, batch_idx=None, leftpad=None):
    """Run the emulator on one case; caches are (slots, S, Hkv, D), or (pages, page_size, Hkv, D)
    with a block table. Returns out, lse, the caches after the call and the split count."""
    B, Tq, Hq, D = q.shape
    Hkv = kc.shape[2]
    has_new = k is not None
    paged = block_table is not None
    alibi_kind = 0 if alibi is None else alibi.dim()
    hdr = [B, Tq, Hq, Hkv, D, int(has_new), int(causal), sms, window[0], window[1], alibi_kind,
           kc.shape[1] if paged else 0, kc.shape[0], kc.shape[1],
           block_table.shape[0] if paged else 0, block_table.shape[1] if paged else 0,
           int(batch_idx is not None), int(leftpad is not None)]
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        f.write(np.array(hdr, dtype=np.int32).tobytes())
        f.write(np.array([scale, softcap], dtype=np.float32).tobytes())
        for t in (seqlens, batch_idx, leftpad, block_table):
            if t is not None:
                f.write(t.contiguous().numpy().astype(np.int32).tobytes())
        if alibi is not None:
            f.write(alibi.contiguous().numpy().astype(np.float32).tobytes())
        for t in (q, kc, vc) + ((k, v) if has_new else ()):
            f.write(t.contiguous().numpy().astype(np.float32).tobytes())
    res = subprocess.run([str(exe), str(inp), str(outp)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    raw = np.fromfile(outp, dtype=np.float32)
    ns, tiles = (int(x) for x in raw[:2].view(np.int32))
    sizes = [B * Tq * Hq * D, B * Hq * Tq, kc.numel(), vc.numel()]
    parts, off = [], 2
    for n in sizes:
        parts.append(torch.from_numpy(raw[off : off + n].copy()))
        off += n
    out = parts[0].view(B, Tq, Hq, D)
    lse = parts[1].view(B, Hq, Tq)
    _emulate.tiles = tiles  # key tiles computed by all blocks (the work)
    return out, lse, parts[2].view(kc.shape), parts[3].view(vc.shape), ns


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


# ---- variants (window, softcap, ALiBi) and the cache indexing (paged, cache_batch_idx, left
# padding), against pytorch_mqa.reference through tests/kernels/csrc_oracle.py.

# (B, Tq, S, Hq, Hkv, D, lengths): MQA decode with many splits, GQA with Tq > 1 and odd D, MHA.
VARIANT_CASES = [
    (3, 1, 300, 8, 1, 64, [0, 17, 290]),
    (2, 4, 200, 6, 2, 40, [0, 130]),
    (2, 3, 150, 4, 4, 32, [100, 147]),
]
VARIANTS = {
    "window(0,0)": dict(window=(0, 0)),
    "window(1,0)": dict(window=(1, 0)),
    "window(70,3)": dict(window=(70, 3)),
    "window(500,-1)": dict(window=(500, -1)),  # larger than every length
    "window(-1,2)": dict(window=(-1, 2)),
    "softcap(large logits)": dict(softcap=5.0, q_mul=8.0),
    "alibi(Hq)": dict(alibi="h"),
    "alibi(B,Hq)+window(40,-1)": dict(alibi="bh", window=(40, -1)),
    "softcap+alibi+window(16,16)": dict(softcap=2.0, alibi="h", window=(16, 16)),
}


def _check_emulated(emulator, tmp_path, inputs, causal, sms, window=(-1, -1), softcap=0.0, alibi=None):
    q, kc, vc, k, v, seqlens, table, bidx, pad = inputs
    scale = q.shape[-1] ** -0.5
    ref, ref_lse, kc_ref, vc_ref = csrc_oracle.serving_reference(
        q, kc, vc, k, v, seqlens, causal, scale, window=window, softcap=softcap, alibi=alibi, block_table=table,
        batch_idx=bidx, leftpad=pad,
    )
    out, lse, kc_out, vc_out, ns = _emulate(
        emulator, tmp_path, q, kc, vc, k, v, seqlens, causal, scale, sms, window=window, softcap=softcap,
        alibi=alibi, block_table=table, batch_idx=bidx, leftpad=pad,
    )
    assert_close(out, ref, ref, torch.float32, "out", "cuda mma emulation")
    assert_close(lse, ref_lse, ref_lse, torch.float32, "lse", "cuda mma emulation")
    assert torch.equal(kc_out, kc_ref) and torch.equal(vc_out, vc_ref), "cache contents differ from the oracle's"
    return ns


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("variant", list(VARIANTS), ids=str)
@pytest.mark.parametrize("case", VARIANT_CASES, ids=str)
def test_emulated_variants_match_reference(emulator, tmp_path, case, variant, causal):
    """Causal cases with 132 SMs (many one-tile splits), full ones with 2 (long tile loops)."""
    sms = 132 if causal else 2
    opts = dict(VARIANTS[variant])
    q_mul = opts.pop("q_mul", 1.0)
    B, Tq, S, Hq, Hkv, D, lengths = case
    q, kc, vc, k, v, seqlens = kv_cache_inputs(case, torch.float32, seed=9)
    alibi = csrc_oracle.alibi_slopes(B, Hq, opts.pop("alibi", None))
    _check_emulated(emulator, tmp_path, (q * q_mul, kc, vc, k, v, seqlens, None, None, None), causal, sms,
                    alibi=alibi, **opts)


def test_emulated_window_skips_key_blocks(emulator, tmp_path):
    """The work span starts at the window's first key: with 4001 live keys and a 100-key window the
    blocks compute 3 key tiles of 64 (keys 3840..4000), not the 63 of the whole length."""
    case = (1, 1, 4096, 8, 1, 64, [4000])
    q, kc, vc, k, v, seqlens = kv_cache_inputs(case, torch.float32, seed=3)
    inputs = (q, kc, vc, k, v, seqlens, None, None, None)
    for sms in (132, 2):
        _check_emulated(emulator, tmp_path, inputs, True, sms, window=(100, 0))
        assert _emulate.tiles == 3
        _check_emulated(emulator, tmp_path, inputs, True, sms)
        assert _emulate.tiles == 63


# (B, Tq, S wanted, Hq, Hkv, D, lengths, leftpad): GQA Tq > 1 odd D; MQA decode with many splits.
SERVING_CASES = [
    (3, 2, 160, 4, 2, 40, [0, 33, 150], [0, 5, 70]),
    (2, 1, 700, 8, 1, 64, [650, 1], [600, 1]),
]


@pytest.mark.parametrize("with_new", [True, False], ids=["append", "no_new"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("leftpad", [False, True], ids=["", "leftpad"])
@pytest.mark.parametrize("batch_idx", [False, True], ids=["", "batch_idx"])
@pytest.mark.parametrize("page_size", [16, 48, 256])
@pytest.mark.parametrize("case", SERVING_CASES, ids=str)
def test_emulated_paged_cache(emulator, tmp_path, case, page_size, batch_idx, leftpad, causal, with_new):
    """Pages shuffled in a pool with sentinel pages no sequence points to (compared whole: none
    changes); optional cache_batch_idx (table rows) and left padding. Causal cases run with 132
    SMs (many one-tile splits), full ones with 2 (long tile loops: the block-table prefetch of
    the next tile is used)."""
    B, Tq, S, Hq, Hkv, D, lengths, pads = case
    rows = [B + 1 - b for b in range(B)] if batch_idx else None
    inputs = csrc_oracle.paged_inputs(B, Tq, S, Hq, Hkv, D, lengths, page_size, with_new=with_new, batch_rows=rows,
                                      leftpad=pads if leftpad else None, seed=page_size)
    _check_emulated(emulator, tmp_path, inputs, causal, 132 if causal else 2)


@pytest.mark.parametrize("window", [(-1, -1), (20, 0)], ids=["", "window(20,0)"])
@pytest.mark.parametrize("with_new", [True, False], ids=["append", "no_new"])
@pytest.mark.parametrize("leftpad", [False, True], ids=["", "leftpad"])
@pytest.mark.parametrize("case", SERVING_CASES, ids=str)
def test_emulated_cache_batch_idx_and_leftpad(emulator, tmp_path, case, leftpad, with_new, window):
    """Contiguous caches: cache_batch_idx slots (sentinel slots unused) and left padding, with a window."""
    B, Tq, S, Hq, Hkv, D, lengths, pads = case
    inputs = csrc_oracle.slot_inputs(B, Tq, S, Hq, Hkv, D, lengths, with_new=with_new, slots=[2 * b + 1 for b in range(B)],
                                     leftpad=pads if leftpad else None)
    _check_emulated(emulator, tmp_path, inputs, True, 132, window=window)


def test_emulated_leftpad_with_window_and_alibi_paged(emulator, tmp_path):
    """Left padding, a window and ALiBi (B, Hq) on paged caches: alignment on j - leftpad."""
    B, Tq, S, Hq, Hkv, D, lengths, pads = SERVING_CASES[0]
    inputs = csrc_oracle.paged_inputs(B, Tq, S, Hq, Hkv, D, lengths, 16, leftpad=pads)
    _check_emulated(emulator, tmp_path, inputs, True, 2, window=(9, 0), softcap=3.0,
                    alibi=csrc_oracle.alibi_slopes(B, Hq, "bh"))


def test_emulated_out_of_range_indices_touch_nothing(emulator, tmp_path):
    """Table entries outside the pool and a cache_batch_idx outside the table: no access outside
    the cache tensors (the emulator fails on any), no write to any page but the valid ones."""
    B, Tq, S, Hq, Hkv, D = 2, 2, 64, 4, 2, 32
    q, kc, vc, k, v, seqlens, table, bidx, pad = csrc_oracle.paged_inputs(
        B, Tq, S, Hq, Hkv, D, [20, 40], 16, batch_rows=[0, 1])
    table[0, 1] = kc.shape[0] + 5  # the page of rows 16..31 of sequence 0, where its new rows land
    table[1, 0] = -3
    bidx = torch.tensor([0, 1], dtype=torch.int32)
    before = kc.clone(), vc.clone()
    out, lse, kc_out, vc_out, ns = _emulate(emulator, tmp_path, q, kc, vc, k, v, seqlens, True, 0.2, 132,
                                            block_table=table, batch_idx=bidx)
    # Sequence 1 appends at rows 40, 41 (page table[1, 2], valid); sequence 0's rows 20, 21 would
    # go to the page outside the pool: skipped.
    changed = (kc_out != before[0]).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == [int(table[1, 2])]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    bidx_bad = torch.tensor([5, 1], dtype=torch.int32)  # table has 2 rows: sequence 0 is empty
    out, lse, kc_out, vc_out, ns = _emulate(emulator, tmp_path, q, before[0].clone(), before[1].clone(), k, v, seqlens,
                                            True, 0.2, 132, block_table=table, batch_idx=bidx_bad)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool(torch.isneginf(lse[0]).all())
