"""The compiled decode step of `generate(compile=True)`.

One step is `GPT.logits` on one token per sequence, the same body as every other mode, under
`torch.compile(fullgraph=True, dynamic=False)`: the attention of each layer is the registered op
`torch.ops.pytorch_mqa.attention_with_kv_cache` inside the graph (its CPU kernel on CPU, Triton
or csrc on CUDA). The op declares its writes to `k_cache` and `v_cache`; as each layer's buffers
are graph inputs of their own (a KVCache has one K and one V buffer per layer), inductor keeps
the write in place instead of copying the buffers. Positions and lengths are read from the
int32 device tensor `cache_seqlens`, so every step runs the same graph; the host-side length
mirror, the overflow check (before the write) and the advance stay outside it. At batch 1 on CPU
the products are `linear`'s multiply-and-sum, which inductor fuses with the layer norms and GELU
into one kernel between attention calls, on one thread when it is small (see
MIN_ELEMENTS_PER_THREAD).

On CUDA the compiled step is also captured in a CUDA graph (`torch.cuda.CUDAGraph`) over static
buffers: the cache, its lengths and a token buffer. Two eager warm-up calls on a side stream run
first, so compilation and the kernels' autotuning happen before capture; they write the row the
first real step then overwrites. A graph holds the addresses of one cache, so each generate call
captures its own (milliseconds); the compiled code is reused.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from pytorch_mqa.model.cache import KVCache
from pytorch_mqa.ops.backends import resolve_backend, unavailable_reason


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, except for one float32 row on CPU inside a compiled graph (the batch-1 decode
    step of `generate(compile=True)`), where it is a multiply and a row sum,
    `(weight * x).sum(-1) + bias`, which inductor turns into one fused pass over the weight.

    A decode step's products are matrix-vector products that stream their weights once, so their
    time is the bytes read. On the 2-core CPU measured (BENCHMARKS.md, generation) BLAS's one-row
    sgemm reads them at 7-14 GB/s where a plain read gets 22-30 GB/s (more from L3); the fused
    reduction also takes the layer norm and GELU around it into the same kernel, and runs on one
    thread (see MIN_ELEMENTS_PER_THREAD). Outside a graph the multiply and the sum would be two
    parallel regions and a weight-sized temporary: faster than BLAS on an idle machine, up to 3x
    slower on an oversubscribed one, so eager calls (and every other input: training, prefill,
    several sequences, other dtypes or devices) are F.linear.
    """
    if (
        torch.compiler.is_compiling()
        and x.dtype is torch.float32
        and x.device.type == "cpu"
        and weight.dim() == 2
        and x.numel() == weight.shape[1]
    ):
        # Row-major for the fused reduction: inductor reduces each output over its input row,
        # and a column-major weight (the eager layout, see column_major_) would make that walk
        # down columns, one cache line per element. Under freezing this copy is constant-folded
        # at compile time: the graph holds a row-major copy of the weights, not a copy per call.
        w = weight if weight.is_contiguous() else weight.contiguous()
        y = (w * x.reshape(1, -1)).sum(-1)
        if bias is not None:
            y = y + bias
        return y.view(x.shape[:-1] + (weight.shape[0],))
    return F.linear(x, weight, bias)


def column_major_(weights) -> int:
    """Store each 2-D tensor of `weights` (parameters, changed in place) column-major: shape
    (out, in) kept, memory laid out as its transpose (in, out) row-major, Hugging Face GPT-2's
    Conv1D layout. Returns how many were changed (those already column-major are left alone).

    Why: an eager decode step's products are one-row `F.linear(x, W)` calls, i.e. `x @ W.t()`.
    With W row-major (nn.Linear's default) BLAS runs its one-row sgemm over a transposed B, which
    streams the weight at a third of the machine's read rate on the 2-core CPU measured; with W
    column-major, `W.t()` is a contiguous (in, out) matrix and the same call is BLAS's plain
    row-times-matrix product, about 1.5x faster (BENCHMARKS.md, generation). Many-row products
    (training, prefill) run at the same rate either way. The parameter itself holds the layout:
    no second copy of any weight, and a weight changed in place (an optimizer step,
    load_state_dict) is what the next step reads. `.to(device, dtype)` keeps the layout.
    """
    changed = 0
    with torch.no_grad():
        for w in weights:
            # plain tensors only: a sharded parameter (FSDP2's DTensor) keeps the layout FSDP gave it
            if type(w.data) is not torch.Tensor or w.dim() != 2 or w.stride() == (1, w.shape[0]):
                continue
            new = torch.empty_strided(w.shape, (1, w.shape[0]), dtype=w.dtype, device=w.device)
            w.data = new.copy_(w)  # the same Parameter object: optimizers and ties keep pointing at it
            changed += 1
    return changed


def _decode_step(model, tokens: Tensor, k_caches, v_caches, cache_seqlens: Tensor, backend: str,
                 block_table: Tensor | None = None) -> Tensor:
    """tokens (B,) -> next-token logits (B, V); appends each layer's K/V at cache_seqlens (through
    block_table when the cache is paged)."""
    return model.logits(tokens[:, None], k_caches, v_caches, cache_seqlens, backend, block_table)[:, -1]


def _guard_filter(entries) -> list[bool]:
    """Which of dynamo's guards the compiled step checks on every call (torch.compile's
    `guard_filter_fn`): all but those on the model's module structure (about 700 for a 4-layer
    GPT: hook dicts, types, attribute values), except the identity of each parameter and module
    (ID_MATCH), which is what ties a frozen graph to its model. So another model, or a weight
    replaced by a new tensor, still gets its own graph, and the cache, lengths and tokens keep
    their shape and dtype guards; what is no longer seen is a change to a module's attributes or
    a hook added after the first compiled call (torch.compiler.reset() forgets the graphs).
    Measured: dynamo's per-call lookup 440 -> 150 us on the 2-core CPU at load 4
    (BENCHMARKS.md, generation)."""
    return [e.guard_type == "ID_MATCH" or not e.orig_guard.source.is_unspecialized_nn_module() for e in entries]


@functools.cache
def compiled_decode_step():
    """`_decode_step` under torch.compile: one graph for every step (static shapes), compiled on
    a model's first call (see _inductor_options); dynamo keeps one graph per model and cache shape
    (see _guard_filter for what its guards check)."""
    return torch.compile(_decode_step, fullgraph=True, dynamic=False, options={"guard_filter_fn": _guard_filter})


# Inductor parallelises a kernel's loop over 2+ threads only if each thread gets at least this many
# elements of work. A decode step's kernels are small (a 768 x 256 product is 0.2 M elements, a few
# microseconds of streaming): split over threads, each pays an OpenMP barrier, and on a shared,
# oversubscribed machine every barrier waits for a descheduled thread (BENCHMARKS.md, generation).
# 128 K elements (512 KB of float32 weights per thread): with the attention calls in C++ (no
# parallel region of their own) the bench model's products gain from two threads' bandwidth at
# load ~1.3 (compiled / HF 2.90x against 2.51x with 1 M per thread, 2.80x with 256 K, one run).
MIN_ELEMENTS_PER_THREAD = 1 << 17


def _inductor_options():
    """Inductor options, scoped to the compiled call (compile options do not reach them).

    freezing: the weights become constants of the graph, folded into its kernels, and the step
    takes no parameters as inputs; each model gets its own graph, and a weight changed in place
    afterwards is not seen. cpp.min_chunk_size: see MIN_ELEMENTS_PER_THREAD."""
    import torch._inductor.config

    return torch._inductor.config.patch({"freezing": True, "cpp.min_chunk_size": MIN_ELEMENTS_PER_THREAD})


class DecodeStep:
    """The compiled decode step bound to one model and one KVCache: `step(tokens (B,))` -> logits
    (B, V), with the cache advanced by one row. CUDA tensors replay a captured CUDA graph."""

    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache
        self.fn = compiled_decode_step()
        self.graph = None
        self.compiled = False
        self.cuda = cache.device.type == "cuda"
        # "auto" resolved here, on the host (a `use_backend` block or the environment may choose);
        # the graph sees a constant name and recompiles if a later call resolves another.
        name = resolve_backend("attention_with_kv_cache", "auto", cache.device.type)
        if unavailable_reason(name, cache.device.type) is not None:  # "auto"'s fallback, as in the op
            name = "triton" if unavailable_reason("triton", cache.device.type) is None else "reference"
        self.backend = name

    def _table(self):
        """The paged cache's block table (a static copy under a CUDA graph, refreshed before each
        replay), or None for a contiguous cache."""
        c = self.cache
        if c.block_table is None or not self.cuda:
            return c.block_table
        if getattr(self, "table", None) is None:
            self.table = c.block_table.clone()
        return self.table

    def _call(self, tokens: Tensor) -> Tensor:
        c = self.cache
        if self.compiled:
            return self.fn(self.model, tokens, c.k, c.v, c.cache_seqlens, self.backend, self._table())
        # A step compiles (if dynamo has no graph for this model and shape) on its first call
        # only: the static shapes leave the guards nothing to fail on later, so the config patch
        # (tens of microseconds) is paid once, not per step.
        with _inductor_options():
            out = self.fn(self.model, tokens, c.k, c.v, c.cache_seqlens, self.backend, self._table())
        self.compiled = True
        return out

    def _capture(self, tokens: Tensor) -> None:
        self.tokens = tokens.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compile, autotune and allocate outside the capture
                self._call(self.tokens)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._call(self.tokens)

    def __call__(self, tokens: Tensor) -> Tensor:
        c = self.cache
        c.check_room(1)  # before anything is written
        c.allocate(1)  # a paged cache takes the pages the new rows land in (contiguous: nothing)
        if not self.cuda:
            logits = self._call(tokens)
        else:
            if self.graph is None:
                self._capture(tokens)
            self.tokens.copy_(tokens)
            if c.block_table is not None:
                self.table.copy_(c.block_table)
            self.graph.replay()
            logits = self.logits
        c.advance(1)
        return logits


__all__ = ["DecodeStep", "column_major_", "compiled_decode_step", "linear"]
