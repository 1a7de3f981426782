"""KVCache: static, preallocated key/value buffers for decoding, with per-sequence lengths.

Contiguous mode (the default): each layer owns one K and one V buffer, `(B, S, Hkv, D)`,
allocated once, so every decode step sees the same shapes and addresses (CUDA-graph capture,
`torch.compile(fullgraph=True)`). One buffer per layer, not views of one `(n_layer, ...)` tensor,
is what lets the attention op's declared in-place write stay in place inside a compiled graph: a
write into a view of a larger graph input is functionalized into a copy of the whole base.

Paged mode (`page_size=`, vLLM's layout): each layer owns a pool of pages, K and V each
`(num_pages, page_size, Hkv, D)`, shared by all sequences, and an int32 `block_table` (B,
max_blocks) says which page holds each sequence's rows: logical row j of sequence b is
`k[layer][block_table[b, j // page_size], j % page_size]` (FlashAttention's `block_table`). Pages
are taken from a host-side free list when rows are appended (`allocate`, called by the model
before the op writes; the op itself never allocates) and returned per sequence (`free(b)`), so a
finished sequence's pages serve the next one. Pages no sequence points to are never written.

`cache_seqlens` is an int32 `(B,)` device tensor: the valid rows of each sequence, what
`attention_with_kv_cache` reads. A Python list mirrors it on the host, so a write past `S` (or a
pool with too few free pages) raises before anything is launched and without a device sync. The
model advances the lengths once per forward, after its last layer.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def _check_positive(name: str, val) -> None:
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {val!r}")


class KVCache:
    """Per-layer K/V caches plus the lengths of each sequence; contiguous or paged.

    n_layer, batch_size (B), max_seqlen (S), n_kv_head (Hkv), head_dim (D): the shapes. Contiguous
    (page_size=None): `k[i]`, `v[i]` (also `layer(i)`) are layer i's `(B, S, Hkv, D)` buffers.
    Paged (page_size a multiple of 16): they are layer i's page pools `(num_pages, page_size, Hkv,
    D)` and `block_table` (B, ceil(S / page_size)) int32 maps sequences to pages; num_pages
    defaults to B * ceil(S / page_size) (every sequence can reach S at once); fewer pages than
    that is the point of paging (sequences take pages as they grow). `block_table` is None in
    contiguous mode.

    `rows(start, stop)` is a view of some sequences (shared storage and lengths), used to prefill
    prompts one by one before decoding them together; a paged cache also has `select(slots)`,
    any set of sequences (a batch of the active ones). Sequence indices (b) are the view's own.
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
        page_size: int | None = None,
        num_pages: int | None = None,
    ):
        for name, val in (
            ("n_layer", n_layer),
            ("batch_size", batch_size),
            ("max_seqlen", max_seqlen),
            ("n_kv_head", n_kv_head),
            ("head_dim", head_dim),
        ):
            _check_positive(name, val)
        self.block_table: Tensor | None = None
        if page_size is None:
            if num_pages is not None:
                raise ValueError(f"num_pages: expected None without page_size (a contiguous cache), got {num_pages!r}")
            shape = (batch_size, max_seqlen, n_kv_head, head_dim)
        else:
            if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 16 or page_size % 16:
                raise ValueError(f"page_size: expected a positive multiple of 16 (16 ... 256 ...), got {page_size!r}")
            max_blocks = math.ceil(max_seqlen / page_size)
            if num_pages is None:
                num_pages = batch_size * max_blocks
            _check_positive("num_pages", num_pages)
            shape = (num_pages, page_size, n_kv_head, head_dim)
            self.block_table = torch.zeros(batch_size, max_blocks, dtype=torch.int32, device=device)
            self._pages: list[list[int]] = [[] for _ in range(batch_size)]  # host: the pages of each sequence
            self._free = list(range(num_pages - 1, -1, -1))  # host free list; pop() gives the lowest id
        self.k: tuple[Tensor, ...] = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer))
        self.v: tuple[Tensor, ...] = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer))
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self._host = [0] * batch_size  # host mirror of cache_seqlens, shared with views
        self._max_seqlen = max_seqlen
        self._root = self
        self._slots: Sequence[int] = range(batch_size)  # the root's sequences this view holds (a range for slices)
        self._idx: Tensor | None = None  # a gather view's slots on the device (None: a slice)

    @classmethod
    def for_model(
        cls, model, batch_size: int, max_seqlen: int | None = None, *, dtype=None, device=None,
        page_size: int | None = None, num_pages: int | None = None,
    ) -> "KVCache":
        """A cache shaped for `model` (a GPT); max_seqlen defaults to its block_size; page_size and
        num_pages make it paged (see the class)."""
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
            page_size=page_size,
            num_pages=num_pages,
        )

    # ---- shape --------------------------------------------------------------------------------

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def n_layer(self) -> int:
        return len(self.k)

    @property
    def batch_size(self) -> int:
        return len(self._slots)

    @property
    def max_seqlen(self) -> int:
        return self._max_seqlen

    @property
    def page_size(self) -> int | None:
        return self.k[0].shape[1] if self.paged else None

    @property
    def num_pages(self) -> int | None:
        return self.k[0].shape[0] if self.paged else None

    @property
    def num_free_pages(self) -> int | None:
        """Pages in the pool no sequence holds (None for a contiguous cache)."""
        return len(self._root._free) if self.paged else None

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def nbytes(self) -> int:
        """Bytes of all K and V buffers (every layer, every row; a paged cache's whole pool)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """(k_cache, v_cache) of layer i: (B, S, Hkv, D) buffers, or a paged cache's page pools."""
        return self.k[i], self.v[i]

    def pages(self, b: int) -> list[int]:
        """The pool pages sequence b holds, in row order (a paged cache only)."""
        self._need_paged("pages")
        return list(self._root._pages[self._slot(b)])

    def pages_for(self, n_rows: int) -> int:
        """Pages a sequence of n_rows rows occupies (ceil(n_rows / page_size)); paged only."""
        self._need_paged("pages_for")
        return -(-n_rows // self.page_size)

    # ---- lengths ------------------------------------------------------------------------------

    @property
    def lengths(self) -> list[int]:
        """The valid rows of each sequence, read from the host mirror (no device sync)."""
        host, slots = self._root._host, self._slots
        if isinstance(slots, range):
            return host[slots.start : slots.stop]
        return [host[s] for s in slots]

    def check_room(self, n: int) -> None:
        """Raise ValueError if appending n rows to every sequence would pass max_seqlen."""
        lens = self.lengths
        hi = max(lens)
        if hi + n > self.max_seqlen:
            b = lens.index(hi)
            raise ValueError(
                f"KVCache overflow: sequence {self._slots[b]} holds {hi} of {self.max_seqlen} rows and {n} more were "
                f"given (cache_seqlens[b] + T must be <= max_seqlen = {self.max_seqlen}); "
                f"allocate a larger cache or call reset()"
            )

    def allocate(self, n: int) -> None:
        """Make room for n more rows in every sequence, before they are written: a paged cache takes
        the pages they land in from the free list and enters them in block_table (all or nothing:
        a pool with too few free pages raises ValueError and changes nothing). Contiguous: nothing to
        do (its rows are preallocated; `check_room` is the check)."""
        if not self.paged:
            return
        self.check_room(n)
        root = self._root
        ps = self.page_size
        want = [(s, len(root._pages[s]), -(-(root._host[s] + n) // ps)) for s in self._slots]
        need = sum(max(0, hi - lo) for _, lo, hi in want)
        if need > len(root._free):
            raise ValueError(
                f"KVCache page pool exhausted: appending {n} rows to sequences {list(self._slots)} needs {need} more "
                f"pages of {ps} rows, got {len(root._free)} free of num_pages = {self.num_pages}; free finished "
                "sequences (free(b)) or build the cache with more num_pages"
            )
        if need == 0:
            return
        rows, cols, ids = [], [], []
        for s, lo, hi in want:
            for j in range(lo, hi):
                page = root._free.pop()
                root._pages[s].append(page)
                rows.append(s)
                cols.append(j)
                ids.append(page)
        dev = root.block_table.device
        root.block_table[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = torch.tensor(
            ids, dtype=torch.int32, device=dev
        )
        self._refresh()

    def advance(self, n: int) -> None:
        """Count n new rows in every sequence (the K/V were already written by the attention op)."""
        self.check_room(n)
        root = self._root
        if self._idx is None:
            self.cache_seqlens.add_(n)
        else:
            root.cache_seqlens.index_add_(0, self._idx, torch.full_like(self._idx, n, dtype=torch.int32))
            self._refresh()
        for s in self._slots:
            root._host[s] += n

    def free(self, b: int) -> None:
        """Forget sequence b: its length goes to 0 and a paged cache returns its pages to the pool
        (the pages are not cleared; whoever takes them next overwrites them before reading)."""
        s = self._slot(b)
        root = self._root
        if self.paged:
            root._free.extend(reversed(root._pages[s]))
            root._pages[s] = []
            root.block_table[s].zero_()
        root.cache_seqlens[s] = 0
        root._host[s] = 0
        self._refresh()

    def reset(self) -> None:
        """Forget every sequence of this view (lengths back to 0, a paged cache's pages back to the
        pool); the buffers are reused, not cleared."""
        if self.paged:
            for b in range(self.batch_size):
                self.free(b)
            return
        self.cache_seqlens.zero_()
        for s in self._slots:
            self._root._host[s] = 0

    # ---- views --------------------------------------------------------------------------------

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of sequences [start, stop): same storage, same lengths (device and host)."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows: expected 0 <= start < stop <= {self.batch_size}, got ({start}, {stop})")
        if self._idx is not None:
            return self.select(range(start, stop))
        view = self._view(self._slots[start:stop])
        view.cache_seqlens = self.cache_seqlens[start:stop]
        if self.paged:
            view.block_table = self.block_table[start:stop]
        else:
            view.k = tuple(t[start:stop] for t in self.k)
            view.v = tuple(t[start:stop] for t in self.v)
        return view

    def select(self, slots) -> "KVCache":
        """A paged cache's view of any distinct sequences `slots` (in that order), e.g. the active
        ones of a batch: the same pools and host state; its block_table and cache_seqlens are
        device copies kept current by this view's own allocate/advance/free (use a view for one
        step, then select again)."""
        self._need_paged("select")
        slots = [int(b) for b in slots]
        if not slots or len(set(slots)) != len(slots) or not all(0 <= b < self.batch_size for b in slots):
            raise ValueError(f"slots: expected distinct sequence indices in [0, {self.batch_size}), got {slots}")
        view = self._view([self._slots[b] for b in slots])
        view._idx = torch.tensor(view._slots, dtype=torch.long, device=self.device)
        view._refresh()
        return view

    def _view(self, slots: Sequence[int]) -> "KVCache":
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.block_table = self.k, self.v, self.block_table
        view.cache_seqlens = self.cache_seqlens
        view._root, view._slots, view._idx, view._max_seqlen = self._root, slots, None, self._max_seqlen
        return view

    def _refresh(self) -> None:
        if self._idx is not None:  # a gather view: re-read its rows of the root's device tensors
            self.cache_seqlens = self._root.cache_seqlens[self._idx]
            self.block_table = self._root.block_table[self._idx]

    def _slot(self, b: int) -> int:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < self.batch_size:
            raise ValueError(f"b: expected a sequence index in [0, {self.batch_size}), got {b!r}")
        return self._slots[b]

    def _need_paged(self, what: str) -> None:
        if not self.paged:
            raise ValueError(f"{what}: expected a paged KVCache (built with page_size=), got a contiguous one")

    def __repr__(self) -> str:
        H, D = self.k[0].shape[2:]
        paged = f", page_size={self.page_size}, num_pages={self.num_pages}, free_pages={self.num_free_pages}" if self.paged else ""
        return (
            f"KVCache(n_layer={self.n_layer}, batch_size={self.batch_size}, max_seqlen={self.max_seqlen}, "
            f"n_kv_head={H}, head_dim={D}{paged}, dtype={self.dtype}, device={self.device}, lengths={self.lengths})"
        )


__all__ = ["KVCache"]
