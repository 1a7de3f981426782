"""The seeded case matrix of DESIGN §5, as data, and the input makers that build each case.

Shapes cover non-multiples of every block size, `Tq = 1`, `Tq > Tk` (with `causal`, the first
`Tq - Tk` query rows see no key), `G = Hq / Hkv` in {1, 2, 3, 4, 8}, odd head dims, and for the
cache op ragged `cache_seqlens` including 0 and the capacity `S`. Every case carries its seed, so
a failure names a case that reproduces bit for bit.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

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

# Cache rows read without appending: a cache at capacity (L = S) and an empty one (L = 0, a query
# row that sees no key).
KV_CACHE_READ_ONLY_SHAPES = [
    (3, 1, 64, 8, 1, 64, [64, 0, 17]),
    (2, 3, 40, 6, 3, 24, [40, 2]),  # Tq > L: causal rows before the first key see nothing
]

# The subset `quick=True` runs: every feature above once, no long sequence.
QUICK_ATTENTION_SHAPES = [ATTENTION_SHAPES[i] for i in (0, 1, 2, 3, 6, 8)]
QUICK_KV_CACHE_SHAPES = [KV_CACHE_SHAPES[i] for i in (0, 2, 3, 4)]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shape_tags(Tq: int, Tk: int, Hq: int, Hkv: int, D: int) -> list[str]:
    G = Hq // Hkv
    tags = ["MQA" if Hkv == 1 and Hq > 1 else "MHA" if G == 1 else f"GQA G={G}"]
    if Tq == 1:
        tags.append("Tq=1")
    tags.append("Tq>Tk" if Tq > Tk else "Tq<Tk" if Tq < Tk else "Tq=Tk")
    if D & (D - 1):
        tags.append(f"D={D} not a power of 2")
    return tags


@dataclass(frozen=True)
class AttentionCase:
    """One call of `attention(q, k, v, causal=..., scale=...)`: q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D)."""

    B: int
    Tq: int
    Tk: int
    Hq: int
    Hkv: int
    D: int
    dtype: torch.dtype
    causal: bool
    scale: float | None = None  # None: the default 1/sqrt(D)
    strided: bool = False  # q, k, v as non-contiguous slices of one fused QKV buffer
    seed: int = 0

    @property
    def shape(self) -> tuple:
        return (self.B, self.Tq, self.Tk, self.Hq, self.Hkv, self.D)

    @property
    def tags(self) -> list[str]:
        tags = _shape_tags(self.Tq, self.Tk, self.Hq, self.Hkv, self.D)
        if self.causal and self.Tq != self.Tk:
            tags.append("causal bottom-right")
        if self.causal and self.Tq > self.Tk:
            tags.append("rows with no key")
        if self.scale is not None:
            tags.append(f"scale={self.scale}")
        if self.strided:
            tags.append("strided")
        return tags

    @property
    def name(self) -> str:
        B, Tq, Tk, Hq, Hkv, D = self.shape
        s = f"B={B} Tq={Tq} Tk={Tk} Hq={Hq} Hkv={Hkv} D={D} {_dtype_name(self.dtype)}"
        s += " causal" if self.causal else " full"
        if self.scale is not None:
            s += f" scale={self.scale}"
        return s + (" strided" if self.strided else "")

    def inputs(self, device="cpu"):
        """q, k, v for this case (seeded)."""
        return attention_inputs(self.shape, self.dtype, seed=self.seed, device=device, strided=self.strided)

    def to_dict(self) -> dict:
        return {"B": self.B, "Tq": self.Tq, "Tk": self.Tk, "Hq": self.Hq, "Hkv": self.Hkv, "D": self.D,
                "dtype": _dtype_name(self.dtype), "causal": self.causal, "scale": self.scale,
                "strided": self.strided, "seed": self.seed}


@dataclass(frozen=True)
class KVCacheCase:
    """One call of `attention_with_kv_cache`: q (B, Tq, Hq, D), caches (B, S, Hkv, D), per-sequence lengths."""

    B: int
    Tq: int
    S: int
    Hq: int
    Hkv: int
    D: int
    lengths: tuple  # cache_seqlens before the call, one per sequence
    dtype: torch.dtype
    causal: bool
    with_new: bool  # k, v (B, Tq, Hkv, D) are appended at rows [L_b, L_b + Tq)
    scale: float | None = None
    seed: int = 0

    @property
    def tags(self) -> list[str]:
        tags = _shape_tags(self.Tq, max(self.lengths) + (self.Tq if self.with_new else 0), self.Hq, self.Hkv, self.D)
        tags = [t for t in tags if not t.startswith("Tq")] + (["Tq=1"] if self.Tq == 1 else [f"Tq={self.Tq}"])
        if len(set(self.lengths)) > 1:
            tags.append("ragged")
        new = self.Tq if self.with_new else 0
        if 0 in self.lengths:
            tags.append("L=0")
        if any(L + new == self.S for L in self.lengths):
            tags.append("fills S")
        if self.causal and any(L + new != self.Tq for L in self.lengths if L + new > 0):
            tags.append("causal bottom-right")
        if not self.with_new and (0 in self.lengths or (self.causal and min(self.lengths) < self.Tq)):
            tags.append("rows with no key")
        return tags + ([] if self.with_new else ["no new k/v"])

    @property
    def name(self) -> str:
        lens = ",".join(str(x) for x in self.lengths)
        s = (f"B={self.B} Tq={self.Tq} S={self.S} Hq={self.Hq} Hkv={self.Hkv} D={self.D} L=[{lens}] "
             f"{_dtype_name(self.dtype)}")
        s += " causal" if self.causal else " full"
        s += " append" if self.with_new else " read-only"
        return s + (f" scale={self.scale}" if self.scale is not None else "")

    def inputs(self, device="cpu"):
        """q, k_cache, v_cache, k, v, cache_seqlens (int32) for this case (seeded; caches hold noise)."""
        row = (self.B, self.Tq, self.S, self.Hq, self.Hkv, self.D, list(self.lengths))
        return kv_cache_inputs(row, self.dtype, seed=self.seed, device=device, with_new=self.with_new)

    def to_dict(self) -> dict:
        return {"B": self.B, "Tq": self.Tq, "S": self.S, "Hq": self.Hq, "Hkv": self.Hkv, "D": self.D,
                "lengths": list(self.lengths), "dtype": _dtype_name(self.dtype), "causal": self.causal,
                "with_new": self.with_new, "scale": self.scale, "seed": self.seed}


def attention_cases(quick: bool = False, dtypes=DTYPES, seed: int = 0) -> list[AttentionCase]:
    """The attention matrix: every shape x dtype x (full, causal), plus an explicit scale on one shape.

    Batch-2 shapes run on strided inputs (slices of a fused QKV buffer).
    """
    shapes = QUICK_ATTENTION_SHAPES if quick else ATTENTION_SHAPES
    cases = []
    for i, shape in enumerate(shapes):
        for dtype in dtypes:
            for causal in (False, True):
                cases.append(AttentionCase(*shape, dtype, causal, strided=shape[0] == 2, seed=seed + i))
    for dtype in dtypes:
        for causal in (False, True):
            cases.append(AttentionCase(*ATTENTION_SHAPES[1], dtype, causal, scale=0.3, seed=seed + 100))
    return cases


def _resolve_lengths(row) -> tuple:
    Tq, S = row[1], row[2]
    return tuple(S - Tq if x == "full" else int(x) for x in row[6])


def kv_cache_cases(quick: bool = False, dtypes=DTYPES, seed: int = 0) -> list[KVCacheCase]:
    """The cache matrix: appending shapes x dtype x (causal, full), then read-only shapes x dtype x causal."""
    cases = []
    for i, row in enumerate(QUICK_KV_CACHE_SHAPES if quick else KV_CACHE_SHAPES):
        for dtype in dtypes:
            for causal in (True, False):
                cases.append(KVCacheCase(*row[:6], _resolve_lengths(row), dtype, causal, True, seed=seed + i))
    for i, row in enumerate(KV_CACHE_READ_ONLY_SHAPES):
        for dtype in dtypes:
            cases.append(KVCacheCase(*row[:6], _resolve_lengths(row), dtype, True, False, seed=seed + 50 + i))
    for dtype in dtypes:
        row = KV_CACHE_SHAPES[2]
        cases.append(KVCacheCase(*row[:6], _resolve_lengths(row), dtype, True, True, scale=0.3, seed=seed + 100))
    return cases


# --------------------------------------------------------------------------------------------
# Input makers
# --------------------------------------------------------------------------------------------


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, gen, device="cpu") -> torch.Tensor:
    """Standard normal values drawn in float32 on the CPU (the same on every device), then cast."""
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


__all__ = [
    "DTYPES", "ATTENTION_SHAPES", "KV_CACHE_SHAPES", "KV_CACHE_READ_ONLY_SHAPES",
    "QUICK_ATTENTION_SHAPES", "QUICK_KV_CACHE_SHAPES", "AttentionCase", "KVCacheCase",
    "attention_cases", "kv_cache_cases", "seeded", "randn", "attention_inputs", "kv_cache_inputs", "random_case",
]
