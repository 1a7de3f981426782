"""Shared test helpers: the DESIGN §5 tolerance rule, the seeded case matrices, input makers."""

from __future__ import annotations

import random

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# atol(dtype) of the tolerance rule: a few ulps at magnitude 1.
ATOL = {torch.float32: 2e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3, torch.float64: 1e-12}

# Worst error/bound ratio seen per (label, dtype); printed at the end of the run by conftest.
ERROR_RATIOS: dict[str, tuple[float, str]] = {}


def _finite_part(got: torch.Tensor, ref: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Check that infinities (LSE of rows with no key) match exactly; return the finite entries."""
    got, ref = got.double(), ref.double()
    assert not torch.isnan(got).any(), f"{name}: {int(torch.isnan(got).sum())} NaN values"
    ref_inf = torch.isinf(ref)
    bad = (torch.isinf(got) != ref_inf) | (ref_inf & (got != ref))
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} entries differ in infinity, first at {idx}")
    keep = ~ref_inf
    return got[keep], ref[keep]


def assert_close(got, ref32, ref_lp, dtype, name: str = "out", label: str = "") -> float:
    """DESIGN §5: max|got - ref32| <= 2 * max|ref_lp - ref32| + atol(dtype). Returns the ratio."""
    assert got.shape == ref32.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref32.shape)}"
    g, r = _finite_part(got, ref32, name)
    lp, _ = _finite_part(ref_lp, ref32, name + " (low-precision reference)")
    if g.numel() == 0:
        return 0.0
    err = (g - r).abs()
    bound = 2 * (lp - r).abs().max().item() + ATOL[dtype]
    worst = err.max().item()
    ratio = worst / bound
    key = f"{label or 'unlabelled'} {name} {str(dtype).replace('torch.', '')}"
    if ratio > ERROR_RATIOS.get(key, (-1.0, ""))[0]:
        ERROR_RATIOS[key] = (ratio, f"max err {worst:.2e}, bound {bound:.2e}")
    if not worst <= bound:
        full = (got.double() - ref32.double()).abs()
        full = torch.nan_to_num(full, nan=0.0, posinf=0.0)
        over = full > bound
        first = over.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name} ({dtype}): max error {worst:.3e} > bound {bound:.3e} "
            f"(2 x low-precision error {(lp - r).abs().max().item():.3e} + atol {ATOL[dtype]:.0e}); "
            f"{int(over.sum())} of {full.numel()} elements over, first at {first}"
        )
    return ratio


# --------------------------------------------------------------------------------------------
# Case matrices (DESIGN §5): non-multiples of every block size, Tq = 1, Tq > Tk, G in
# {1, 2, 3, 4, 8}, odd head dims. Seeded, so a failure names a case that reproduces.
# --------------------------------------------------------------------------------------------

# (B, Tq, Tk, Hq, Hkv, D)
ATTENTION_SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 17, 17, 4, 1, 64),  # MQA, odd length
    (1, 33, 65, 8, 2, 40),  # GQA G=4, odd D, Tq < Tk
    (2, 65, 31, 6, 2, 72),  # G=3, Tq > Tk
    (1, 1, 130, 8, 1, 128),  # decode-like, G=8
    (1, 130, 130, 4, 4, 96),  # MHA, beyond one 128 block
    (1, 20, 20, 16, 2, 32),  # G=8
    (1, 9, 12, 2, 1, 256),  # largest D
    (1, 5, 3, 2, 2, 7),  # tiny odd D, Tq > Tk
]

# (B, Tq, S, Hq, Hkv, D, lengths): lengths per sequence before the call; "full" = S - Tq.
KV_CACHE_SHAPES = [
    (3, 1, 64, 8, 1, 64, [0, 17, "full"]),  # MQA decode, ragged incl. empty and full
    (2, 1, 300, 8, 2, 128, [299, 130]),  # long enough for several splits
    (2, 4, 50, 6, 2, 40, [0, 13]),  # Tq > 1 (speculative/chunked), G=3, odd D
    (1, 7, 7, 4, 4, 32, [0]),  # MHA, Tq = S, cache filled exactly
    (2, 1, 33, 16, 2, 72, [32, 5]),  # G=8, odd D
    (2, 3, 1000, 4, 1, 16, [997, 500]),  # long cache
]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, gen, device="cpu") -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def attention_inputs(shape, dtype, seed=0, device="cpu", strided=False):
    """q, k, v for (B, Tq, Tk, Hq, Hkv, D); strided=True slices them out of one fused buffer."""
    B, Tq, Tk, Hq, Hkv, D = shape
    gen = seeded(seed)
    if strided:
        # Like the output of a fused QKV projection: non-contiguous views with a row stride > H*D.
        T = max(Tq, Tk)
        buf = randn((B, T, Hq + 2 * Hkv + 1, D), dtype, gen, device)
        q = buf[:, :Tq, :Hq]
        k = buf[:, :Tk, Hq : Hq + Hkv]
        v = buf[:, :Tk, Hq + Hkv : Hq + 2 * Hkv]
        return q, k, v
    return (
        randn((B, Tq, Hq, D), dtype, gen, device),
        randn((B, Tk, Hkv, D), dtype, gen, device),
        randn((B, Tk, Hkv, D), dtype, gen, device),
    )


def kv_cache_inputs(case, dtype, seed=0, device="cpu", with_new=True):
    """q, k_cache, v_cache, k, v, cache_seqlens for a KV_CACHE_SHAPES row (caches filled with noise)."""
    B, Tq, S, Hq, Hkv, D, lengths = case
    gen = seeded(seed)
    lens = [S - Tq if x == "full" else x for x in lengths]
    q = randn((B, Tq, Hq, D), dtype, gen, device)
    k_cache = randn((B, S, Hkv, D), dtype, gen, device)
    v_cache = randn((B, S, Hkv, D), dtype, gen, device)
    k = randn((B, Tq, Hkv, D), dtype, gen, device) if with_new else None
    v = randn((B, Tq, Hkv, D), dtype, gen, device) if with_new else None
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, k, v, seqlens


def random_case(seed: int):
    """An extra attention shape drawn from a seeded generator (for fuzz-style coverage)."""
    r = random.Random(seed)
    Hkv = r.choice([1, 2, 3])
    G = r.choice([1, 2, 3, 4, 8])
    return (r.randint(1, 2), r.randint(1, 70), r.randint(1, 70), Hkv * G, Hkv, r.choice([8, 24, 40, 64, 80, 128]))
