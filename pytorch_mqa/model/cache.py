"""KVCache: static, preallocated key/value buffers for decoding, with per-sequence lengths.

Buffers are allocated once, `(n_layer, B, S, Hkv, D)`, so every decode step sees the same shapes
and addresses (CUDA-graph capture, `torch.compile(fullgraph=True)`). `cache_seqlens` is an int32
`(B,)` device tensor: the valid rows of each sequence, what `attention_with_kv_cache` reads. A
Python list mirrors it on the host, so a write past `S` raises before anything is launched and
without a device sync. The model advances the lengths once per forward, after its last layer.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer K/V caches `(B, S, Hkv, D)` plus the lengths of each sequence.

    n_layer, batch_size, max_seqlen (S), n_kv_head (Hkv), head_dim (D): the buffer shape.
    `rows(start, stop)` is a view of some sequences (shared storage and lengths), used to
    prefill prompts of different lengths one by one before decoding them together.
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
        for name, val, lo in (
            ("n_layer", n_layer, 1),
            ("batch_size", batch_size, 1),
            ("max_seqlen", max_seqlen, 1),
            ("n_kv_head", n_kv_head, 1),
            ("head_dim", head_dim, 1),
        ):
            if not isinstance(val, int) or isinstance(val, bool) or val < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {val!r}")
        shape = (n_layer, batch_size, max_seqlen, n_kv_head, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self._host = [0] * batch_size  # host mirror of cache_seqlens, shared with views
        self._lo, self._hi = 0, batch_size
        self._layers = [(self.k[i], self.v[i]) for i in range(n_layer)]  # views made once, not per step

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
        return self.k.shape[0]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_seqlen(self) -> int:
        return self.k.shape[2]

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """(k_cache, v_cache) of layer i, each (B, S, Hkv, D)."""
        return self._layers[i]

    # ---- lengths ------------------------------------------------------------------------------

    @property
    def lengths(self) -> list[int]:
        """The valid rows of each sequence, read from the host mirror (no device sync)."""
        return self._host[self._lo : self._hi]

    def check_room(self, n: int) -> None:
        """Raise ValueError if appending n rows to every sequence would pass max_seqlen."""
        lens = self.lengths
        if lens:
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
        for b in range(self._lo, self._hi):
            self._host[b] += n

    def append(self, k: Tensor, v: Tensor) -> None:
        """Write one step's keys and values, each (n_layer, B, T, Hkv, D), after every sequence's
        rows, and advance the lengths (what GPT.decode_step leaves to the caller)."""
        T = k.shape[2]
        self.check_room(T)
        lens = self.lengths
        if len(set(lens)) == 1:
            self.k[:, :, lens[0] : lens[0] + T] = k
            self.v[:, :, lens[0] : lens[0] + T] = v
        else:
            for b, L in enumerate(lens):
                self.k[:, b, L : L + T] = k[:, b]
                self.v[:, b, L : L + T] = v[:, b]
        self.advance(T)

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
        view.k = self.k[:, start:stop]
        view.v = self.v[:, start:stop]
        view.cache_seqlens = self.cache_seqlens[start:stop]
        view._host = self._host
        view._lo, view._hi = self._lo + start, self._lo + stop
        view._layers = [(view.k[i], view.v[i]) for i in range(view.k.shape[0])]
        return view

    def __repr__(self) -> str:
        n, B, S, H, D = self.k.shape
        return (
            f"KVCache(n_layer={n}, batch_size={B}, max_seqlen={S}, n_kv_head={H}, head_dim={D}, "
            f"dtype={self.k.dtype}, device={self.k.device}, lengths={self.lengths})"
        )


__all__ = ["KVCache"]
