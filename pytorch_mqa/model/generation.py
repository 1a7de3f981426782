"""Autoregressive generation: the prefill/decode loop (sampling helpers are in model/sampling.py).

With the cache, each prompt is prefilled into its own rows of one `KVCache` (prompts of
different lengths waste no padding: every sequence has its own `cache_seqlens`), then all
sequences decode together, one token per step (Tq = 1). `use_cache=False` recomputes the whole
prefix every step, for comparison; both give the same greedy tokens.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from pytorch_mqa.model.cache import KVCache
from pytorch_mqa.model.sampling import apply_repetition_penalty, next_token

# --------------------------------------------------------------------------------------------
# Generation loop.
# --------------------------------------------------------------------------------------------

Prompts = Union[Tensor, Sequence[Sequence[int]]]


def _as_lists(prompts: Prompts) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"prompts: expected a (B, T) integer tensor or a list of token-id lists, got "
                f"{prompts.dtype} of shape {tuple(prompts.shape)}"
            )
        return prompts.tolist()
    try:
        out = [[int(t) for t in p] for p in prompts]
    except TypeError as e:
        raise TypeError(f"prompts: expected a (B, T) LongTensor or a list of token-id lists ({e})") from None
    return out


def _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected None or a float in (0, 1], got {top_p!r}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty: expected > 0 (1.0 = none), got {repetition_penalty}")
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got none")
    V, block = model.config.vocab_size, model.config.block_size
    for b, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompts[{b}]: expected at least one token, got an empty prompt")
        if min(p) < 0 or max(p) >= V:
            raise ValueError(f"prompts[{b}]: expected token ids in [0, {V}), got one of {min(p)}..{max(p)}")
        if len(p) + max_new_tokens > block:
            raise ValueError(
                f"prompts[{b}]: prompt length {len(p)} + max_new_tokens {max_new_tokens} = "
                f"{len(p) + max_new_tokens} exceeds the model's block_size {block}; shorten the "
                f"prompt or ask for fewer tokens"
            )


def _decode_step(model, tokens: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor):
    return model.decode_step(tokens[:, None], k_cache, v_cache, cache_seqlens)


@functools.cache
def compiled_decode_step():
    """`_decode_step` under torch.compile: one graph for every step (static shapes, positions and
    lengths read from the device tensor), compiled on a model's first call (see _freezing)."""
    return torch.compile(_decode_step, fullgraph=True, dynamic=False)


def _freezing():
    """Inductor freezing, scoped to the compiled call (compile options do not reach it): the
    weights become constants, so inductor packs them for its CPU matmuls (~30% of a step here).
    Each model gets its own graph, and a weight changed in place afterwards is not seen."""
    import torch._inductor.config

    return torch._inductor.config.patch(freezing=True)


class _Stepper:
    """Produces next-token logits (B, V) for the running sequences, with or without a cache."""

    def __init__(self, model, prompts: list[list[int]], max_new_tokens: int, use_cache: bool, device, compile=False):
        self.model, self.use_cache, self.device = model, use_cache, device
        self.step_fn = compiled_decode_step() if compile else None
        self.prompts = prompts
        self.same_length = len({len(p) for p in prompts}) == 1
        if use_cache:
            S = max(len(p) for p in prompts) + max_new_tokens
            self.cache = KVCache.for_model(model, len(prompts), max(S, 1))
        else:
            self.seqs = [torch.tensor(p, dtype=torch.long, device=device) for p in prompts]

    def prefill(self) -> Tensor:
        m, dev = self.model, self.device
        if self.use_cache:
            if self.same_length:
                return m(torch.tensor(self.prompts, dtype=torch.long, device=dev), cache=self.cache)[:, -1]
            rows = []
            for b, p in enumerate(self.prompts):
                idx = torch.tensor([p], dtype=torch.long, device=dev)
                rows.append(m(idx, cache=self.cache.rows(b, b + 1))[:, -1])
            return torch.cat(rows)
        return self._recompute()

    def decode(self, tokens: Tensor) -> Tensor:
        if self.step_fn is not None:
            c = self.cache
            with _freezing():
                logits, k, v = self.step_fn(self.model, tokens, c.k, c.v, c.cache_seqlens)
            c.append(k, v)  # host-side lengths and the overflow check stay outside the graph
            return logits
        if self.use_cache:
            return self.model(tokens[:, None], cache=self.cache)[:, -1]
        self.seqs = [torch.cat([s, t[None]]) for s, t in zip(self.seqs, tokens)]
        return self._recompute()

    def _recompute(self) -> Tensor:
        if self.same_length:
            return self.model(torch.stack(self.seqs))[:, -1]
        return torch.cat([self.model(s[None])[:, -1] for s in self.seqs])


@torch.no_grad()
def _generate_steps(
    model,
    prompts: Prompts,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    eos_id: Optional[int] = None,
    use_cache: bool = True,
    seed: Optional[int] = None,
    compile: bool = False,
) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
    """Yields (tokens (B,), done_before (B,) bool or None) per step, on the model's device."""
    lists = _as_lists(prompts)
    _check_args(model, lists, max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if compile and not use_cache:
        raise ValueError(
            "compile: expected use_cache=True (the compiled step is the cached decode step), got use_cache=False"
        )
    if max_new_tokens == 0:
        return
    device = model.transformer.wte.weight.device
    generator = None
    if seed is not None and temperature != 0:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    B, V = len(lists), model.config.vocab_size
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        for b, p in enumerate(lists):
            seen[b, torch.tensor(p, device=device)] = True
    done = torch.zeros(B, dtype=torch.bool, device=device) if eos_id is not None else None
    rows = torch.arange(B, device=device)
    was_training = model.training
    model.eval()
    try:
        stepper = _Stepper(model, lists, max_new_tokens, use_cache, device, compile)
        logits = stepper.prefill()
        for step in range(max_new_tokens):
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            tokens = next_token(logits, temperature, top_k, top_p, generator)
            if seen is not None:
                seen[rows, tokens] = True
            done_before = None if done is None else done.clone()
            yield tokens, done_before
            if done is not None:
                done |= tokens == eos_id
                if bool(done.all()):
                    return
            if step + 1 < max_new_tokens:
                logits = stepper.decode(tokens)
    finally:
        model.train(was_training)


def stream_generate(model, prompts: Prompts, max_new_tokens: int, **kwargs) -> Iterator[tuple[int, list]]:
    """Like `generate`, but yields (step, token_ids) as each step is sampled.

    token_ids has one entry per sequence: the new token id, or None for a sequence that already
    emitted eos_id at an earlier step.
    """
    for step, (tokens, done_before) in enumerate(_generate_steps(model, prompts, max_new_tokens, **kwargs)):
        ids = tokens.tolist()
        if done_before is not None:
            ids = [None if d else t for t, d in zip(ids, done_before.tolist())]
        yield step, ids


def generate(
    model,
    prompts: Prompts,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    eos_id: Optional[int] = None,
    use_cache: bool = True,
    seed: Optional[int] = None,
    compile: bool = False,
    on_token: Optional[Callable[[int, list], None]] = None,
) -> list[list[int]]:
    """Generate up to max_new_tokens per prompt; returns the new ids per sequence (prompt excluded).

    prompts: a (B, T) LongTensor or a list of token-id lists (lengths may differ).
    temperature = 0 is greedy; top_k / top_p filter before sampling; repetition_penalty > 1
    penalises every token already in the prompt or the output (see apply_repetition_penalty).
    A sequence stops after emitting eos_id (which is included in its output). seed makes
    sampling reproducible (a torch.Generator on the model's device). on_token(step, token_ids)
    is called after each step (see stream_generate). compile=True runs each decode step through
    `torch.compile` (see compiled_decode_step); the first call for a model pays the compilation
    (seconds), later ones with the same cache shape (batch, longest prompt + max_new_tokens)
    reuse it. The compiled step holds the weights as constants: after changing them in place,
    call torch._dynamo.reset(). Raises ValueError when a prompt plus
    max_new_tokens is longer than the model's block_size.
    """
    kwargs = dict(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        eos_id=eos_id,
        use_cache=use_cache,
        seed=seed,
        compile=compile,
    )
    if on_token is not None or eos_id is not None:
        out: list[list[int]] = [[] for _ in range(len(_as_lists(prompts)))]
        for step, ids in stream_generate(model, prompts, max_new_tokens, **kwargs):
            for b, t in enumerate(ids):
                if t is not None:
                    out[b].append(t)
            if on_token is not None:
                on_token(step, ids)
        return out
    # No per-step host work needed: keep the tokens on the device and read them once at the end.
    steps = [tokens for tokens, _ in _generate_steps(model, prompts, max_new_tokens, **kwargs)]
    B = len(_as_lists(prompts))
    if not steps:
        return [[] for _ in range(B)]
    return torch.stack(steps, dim=1).tolist()


__all__ = ["generate", "stream_generate"]
