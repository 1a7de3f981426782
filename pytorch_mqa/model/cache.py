"""KVCache: static, preallocated key/value buffers for decoding, with per-sequence lengths.

Each layer owns one K and one V buffer, `(B, S, Hkv, D)`, allocated once, so every decode step
sees the same shapes and addresses (CUDA-graph capture, `torch.compile(fullgraph=True)`). One
buffer per layer, not views of one `(n_layer, ...)` tensor, is what lets the attention op's
declared in-place write stay in place inside a compiled graph: a write into a view of a larger
graph input is functionalized into a copy of the whole base.

`cache_seqlens` is an int32 `(B,)` device tensor: the valid rows of each sequence, what
`attention_with_kv_cache` reads. A Python list mirrors it on the host, so a write past `S` raises
before anything is launched and without a device sync. The model advances the lengths once per
forward, after its last layer.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer K/V caches `(B, S, Hkv, D)` plus the lengths of each sequence.

    n_layer, batch_size, max_seqlen (S), n_kv_head (Hkv), head_dim (D): the buffer shapes.
    `k[i]`, `v[i]` (also `layer(i)`) are layer i's buffers. `rows(start, stop)` is a view of some
    sequences (shared storage and lengths), used to prefill prompts of different lengths one by
    one before decoding them together.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        max_seqlen: int,
        n_kv_head: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        for name, val in (
            ("n_layer", n_layer),
            ("batch_size", batch_size),
            ("max_seqlen", max_seqlen),
            ("n_kv_head", n_kv_head),
            ("head_dim", head_dim),
        ):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {val!r}")
        shape = (batch_size, max_seqlen, n_kv_head, head_dim)
        self.k: tuple[Tensor, ...] = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer))
        self.v: tuple[Tensor, ...] = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer))
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self._host = [0] * batch_size  # host mirror of cache_seqlens, shared with views
        self._lo, self._hi = 0, batch_size

    @classmethod
    def for_model(cls, model, batch_size: int, max_seqlen: int | None = None, *, dtype=None, device=None) -> "KVCache":
        """A cache shaped for `model` (a GPT); max_seqlen defaults to its block_size."""
        cfg = model.config
        param = model.transformer.wte.weight
        S = cfg.block_size if max_seqlen is None else max_seqlen
        if S > cfg.block_size:
            raise ValueError(f"max_seqlen: expected at most block_size = {cfg.block_size}, got {S}")
        return cls(
            cfg.n_layer,
            batch_size,
            S,
            cfg.n_kv_head,
            cfg.n_embd // cfg.n_head,
            dtype=param.dtype if dtype is None else dtype,
            device=param.device if device is None else device,
        )

    # ---- shape --------------------------------------------------------------------------------

    @property
    def n_layer(self) -> int:
        return len(self.k)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seqlen(self) -> int:
        return self.k[0].shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def nbytes(self) -> int:
        """Bytes of all K and V buffers (every layer, every row)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """(k_cache, v_cache) of layer i, each (B, S, Hkv, D)."""
        return self.k[i], self.v[i]

    # ---- lengths ------------------------------------------------------------------------------

    @property
    def lengths(self) -> list[int]:
        """The valid rows of each sequence, read from the host mirror (no device sync)."""
        return self._host[self._lo : self._hi]

    def check_room(self, n: int) -> None:
        """Raise ValueError if appending n rows to every sequence would pass max_seqlen."""
        lens = self.lengths
        hi = max(lens)
        if hi + n > self.max_seqlen:
            b = lens.index(hi) + self._lo
            raise ValueError(
                f"KVCache overflow: sequence {b} holds {hi} of {self.max_seqlen} rows and {n} more were "
                f"given (cache_seqlens[b] + T must be <= max_seqlen = {self.max_seqlen}); "
                f"allocate a larger cache or call reset()"
            )

    def advance(self, n: int) -> None:
        """Count n new rows in every sequence (the K/V were already written by the attention op)."""
        self.check_room(n)
        self.cache_seqlens.add_(n)
        host = self._host
        for b in range(self._lo, self._hi):
            host[b] += n

    def reset(self) -> None:
        """Forget every sequence (lengths back to 0); the buffers are reused, not cleared."""
        self.cache_seqlens.zero_()
        for b in range(self._lo, self._hi):
            self._host[b] = 0

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of sequences [start, stop): same storage, same lengths (device and host)."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows: expected 0 <= start < stop <= {self.batch_size}, got ({start}, {stop})")
        view = KVCache.__new__(KVCache)
        view.k = tuple(t[start:stop] for t in self.k)
        view.v = tuple(t[start:stop] for t in self.v)
        view.cache_seqlens = self.cache_seqlens[start:stop]
        view._host = self._host
        view._lo, view._hi = self._lo + start, self._lo + stop
        return view

    def __repr__(self) -> str:
        B, S, H, D = self.k[0].shape
        return (
            f"KVCache(n_layer={self.n_layer}, batch_size={B}, max_seqlen={S}, n_kv_head={H}, head_dim={D}, "
            f"dtype={self.dtype}, device={self.device}, lengths={self.lengths})"
        )


__all__ = ["KVCache"]
