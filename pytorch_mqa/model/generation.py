"""Autoregressive generation: `GenerationConfig` and the prefill/decode loop (sampling helpers are
in model/sampling.py, the compiled decode step in model/decode.py).

With the cache, each prompt is prefilled into its own rows of one `KVCache` (prompts of
different lengths waste no padding: every sequence has its own `cache_seqlens`), then all
sequences decode together, one token per step (Tq = 1). Every mode runs the same `GPT.logits`
body; `use_cache=False` recomputes the whole prefix every step, for comparison, and
`compile=True` runs the decode step as one compiled graph. All give the same greedy tokens.

Past the context (nanoGPT's rule): the model always sees the last `block_size` tokens of each
sequence, so a prompt longer than the context, or prompt + new tokens past it, keeps going with
the oldest tokens dropped; `generate` says so once (a `ContextCropWarning`). A sequence of
`block_size` tokens predicts its next token (the last new token is never fed back, so prompt +
max_new_tokens - 1 <= block_size needs no crop). With the cache, a sequence whose cache is full is
re-filled from its cropped window (the last block_size tokens) before its next step: with
learned absolute positions every token's keys and values change when the window moves, so
rolling the cache would not compute what the uncached model computes; past the context each
step therefore costs one full window, as without the cache, and the greedy tokens stay the same.

Any model that maps ids (B, T) to logits (B, T, V) can generate: through a KVCache when it
supports one (`supports_cache`), else recomputing its window every step; `model.config.block_size`
is its context when it has one.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from pytorch_mqa.model.cache import KVCache
from pytorch_mqa.model.decode import DecodeStep
from pytorch_mqa.model.sampling import REPETITION_RULES, apply_repetition_penalty, next_token

Prompts = Union[Tensor, Sequence[Sequence[int]]]


class ContextCropWarning(UserWarning):
    """Generation goes past the model's context: the oldest tokens drop out of it (nanoGPT's rule)."""


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate; validated once, when built.

    temperature = 0 is greedy; top_k / top_p filter before sampling; repetition_penalty > 1
    penalises every token already in the prompt or the output, by `repetition_rule` ("ctrl": a
    positive logit divided by the penalty, a negative one multiplied; "divide": every seen logit
    divided; see apply_repetition_penalty).
    A sequence stops after emitting eos_id (included in its output). seed makes sampling
    reproducible (a torch.Generator on the model's device). use_cache=False recomputes the
    whole prefix each step; compile=True runs each decode step as one compiled graph (see
    model/decode.py) and needs the cache.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0
    repetition_rule: str = "ctrl"
    eos_id: Optional[int] = None
    use_cache: bool = True
    seed: Optional[int] = None
    compile: bool = False

    def __post_init__(self):
        def _is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def _is_real(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: expected a number >= 0 (0 is greedy), got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k: expected None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and (not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p: expected None or a float in (0, 1], got {self.top_p!r}")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty: expected a number > 0 (1.0 = none), got {self.repetition_penalty!r}")
        if self.repetition_rule not in REPETITION_RULES:
            raise ValueError(f"repetition_rule: expected one of {REPETITION_RULES}, got {self.repetition_rule!r}")
        if self.eos_id is not None and (not _is_int(self.eos_id) or self.eos_id < 0):
            raise ValueError(f"eos_id: expected None or an int >= 0, got {self.eos_id!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed: expected None or an int, got {self.seed!r}")
        for name in ("use_cache", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.compile and not self.use_cache:
            raise ValueError(
                "compile: expected use_cache=True (the compiled step is the cached decode step), got use_cache=False"
            )


def _config(config: Optional[GenerationConfig], max_new_tokens: Optional[int], options: dict) -> GenerationConfig:
    """A GenerationConfig from a config, max_new_tokens and keyword options (which override it)."""
    if config is None:
        if max_new_tokens is None:
            raise ValueError("max_new_tokens: expected an int >= 0 (or config=GenerationConfig(...)), got None")
        return GenerationConfig(max_new_tokens, **options)
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config: expected a GenerationConfig or None, got {type(config).__name__}")
    if max_new_tokens is not None:
        options = dict(options, max_new_tokens=max_new_tokens)
    return dataclasses.replace(config, **options) if options else config


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


def supports_cache(model) -> bool:
    """Whether `model` decodes through a KVCache (the package's GPT does; a bigram model does not)."""
    return callable(getattr(model, "logits", None)) and hasattr(getattr(model, "config", None), "n_kv_head")


def _block_size(model) -> Optional[int]:
    return getattr(getattr(model, "config", None), "block_size", None)


def _logits(model, idx: Tensor) -> Tensor:
    out = model(idx)
    return out[0] if isinstance(out, tuple) else out


def _device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_prompts(model, prompts: list[list[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got none")
    V = getattr(getattr(model, "config", None), "vocab_size", None)
    for b, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompts[{b}]: expected at least one token, got an empty prompt")
        if min(p) < 0 or (V is not None and max(p) >= V):
            raise ValueError(f"prompts[{b}]: expected token ids in [0, {V}), got one of {min(p)}..{max(p)}")
    block, longest = _block_size(model), max(len(p) for p in prompts)
    # The last new token is never fed back: prompt + max_new_tokens - 1 positions are used.
    if block is not None and max_new_tokens > 0 and longest + max_new_tokens - 1 > block:
        warnings.warn(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} pass the model's context of {block} "
            f"tokens: the context is cropped to the last {block} tokens (nanoGPT's rule), so the oldest tokens "
            "drop out of it", ContextCropWarning, stacklevel=5)


class _Stepper:
    """Produces next-token logits (B, V) for the running sequences, with or without a cache.

    Each sequence is kept whole in one preallocated device buffer (no host sync and no per-sequence
    copy per step); the model sees its last `block` tokens.
    """

    def __init__(self, model, prompts: list[list[int]], config: GenerationConfig, device):
        self.model, self.device = model, device
        self.block = _block_size(model)
        self.use_cache = config.use_cache and supports_cache(model)
        # Every sequence's ids in one preallocated buffer (row b holds lens[b] ids), so a step writes
        # its tokens with one indexed store instead of growing B tensors.
        B, longest = len(prompts), max(len(p) for p in prompts)
        self.ids = torch.zeros(B, longest + config.max_new_tokens, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            self.ids[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        self.lens = [len(p) for p in prompts]  # host-side lengths: no sync to read them
        # Where each row's next id goes: one column while the prompts have one length (a slice
        # store per step), else a per-row position tensor (an indexed store and an add per step).
        self._col = self.lens[0] if len(set(self.lens)) == 1 else None
        if self._col is None:
            self._rows = torch.arange(B, device=device)
            self._pos = torch.tensor(self.lens, device=device)
        self.step = None
        if self.use_cache:
            # Positions ever used: the longest prompt + max_new_tokens - 1, at most the context.
            S = min(max(len(p) for p in prompts) + max(config.max_new_tokens - 1, 0), self.block)
            self.cache = KVCache.for_model(model, len(prompts), max(S, 1))
            if config.compile:
                self.step = DecodeStep(model, self.cache)

    def _windows(self, rows) -> list[Tensor]:
        """The ids each sequence in `rows` feeds the model: all of them, or the last `block`."""
        out = []
        for b in rows:
            n = self.lens[b]
            out.append(self.ids[b, : n] if self.block is None else self.ids[b, max(0, n - self.block) : n])
        return out

    def _fill(self, rows: list[int]) -> Tensor:
        """Re-fill the cache rows `rows` from their windows (prefill); their last logits (len(rows), V)."""
        m, c = self.model, self.cache
        windows = self._windows(rows)
        if len(rows) == c.batch_size and len({len(w) for w in windows}) == 1:
            c.reset()
            return m(torch.stack(windows), cache=c)[:, -1]
        out = []
        for b, w in zip(rows, windows):
            view = c.rows(b, b + 1)
            view.reset()
            out.append(m(w[None], cache=view)[:, -1])
        return torch.cat(out)

    def prefill(self) -> Tensor:
        if self.use_cache:
            return self._fill(list(range(len(self.lens))))
        return self._recompute()

    def decode(self, tokens: Tensor) -> Tensor:
        if self._col is not None:
            self.ids[:, self._col] = tokens
            self._col += 1
        else:
            self.ids[self._rows, self._pos] = tokens
            self._pos += 1
        self.lens = [n + 1 for n in self.lens]
        if not self.use_cache:
            return self._recompute()
        c = self.cache
        full = [b for b, L in enumerate(c.lengths) if L >= c.max_seqlen]  # the host mirror: no sync
        if len(full) == c.batch_size:
            return self._fill(full)
        if full:  # some sequences move their window: re-fill those, step the others one token
            rows = dict(zip(full, self._fill(full)))
            for b in range(c.batch_size):
                if b not in rows:
                    rows[b] = self.model(tokens[b : b + 1, None], cache=c.rows(b, b + 1))[0, -1]
            return torch.stack([rows[b] for b in range(c.batch_size)])
        if self.step is not None:
            return self.step(tokens)
        return self.model(tokens[:, None], cache=c)[:, -1]

    def _recompute(self) -> Tensor:
        windows = self._windows(range(len(self.lens)))
        if len({len(w) for w in windows}) == 1:
            return _logits(self.model, torch.stack(windows))[:, -1]
        return torch.cat([_logits(self.model, w[None])[:, -1] for w in windows])


@torch.inference_mode()  # no autograd or version-counter work per op: nothing here is differentiated
def _generate_steps(model, prompts: Prompts, config: GenerationConfig) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
    """Yields (tokens (B,), done_before (B,) bool or None) per step, on the model's device."""
    lists = _as_lists(prompts)
    _check_prompts(model, lists, config.max_new_tokens)
    n_new, temperature, top_k, top_p = config.max_new_tokens, config.temperature, config.top_k, config.top_p
    penalty, rule, eos_id = config.repetition_penalty, config.repetition_rule, config.eos_id
    if n_new == 0:
        return
    device = _device(model)
    generator = None
    if config.seed is not None and temperature != 0:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    B = len(lists)
    seen = None
    done = torch.zeros(B, dtype=torch.bool, device=device) if eos_id is not None else None
    rows = torch.arange(B, device=device)
    was_training = model.training
    model.eval()
    try:
        stepper = _Stepper(model, lists, config, device)
        logits = stepper.prefill()
        if penalty != 1.0:  # the vocabulary is the logits' width (any model)
            seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device)
            for b, p in enumerate(lists):
                seen[b, torch.tensor(p, device=device)] = True
        for step in range(n_new):
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, penalty, rule)
            tokens = next_token(logits, temperature, top_k, top_p, generator)
            if seen is not None:
                seen[rows, tokens] = True
            done_before = None if done is None else done.clone()
            yield tokens, done_before
            if done is not None:
                done |= tokens == eos_id
                if bool(done.all()):
                    return
            if step + 1 < n_new:
                logits = stepper.decode(tokens)
    finally:
        model.train(was_training)


def stream_generate(
    model, prompts: Prompts, max_new_tokens: Optional[int] = None, *, config: Optional[GenerationConfig] = None, **options
) -> Iterator[tuple[int, list]]:
    """Like `generate`, but yields (step, token_ids) as each step is sampled.

    token_ids has one entry per sequence: the new token id, or None for a sequence that already
    emitted eos_id at an earlier step.
    """
    config = _config(config, max_new_tokens, options)
    for step, (tokens, done_before) in enumerate(_generate_steps(model, prompts, config)):
        ids = tokens.tolist()
        if done_before is not None:
            ids = [None if d else t for t, d in zip(ids, done_before.tolist())]
        yield step, ids


def generate(
    model,
    prompts: Prompts,
    max_new_tokens: Optional[int] = None,
    *,
    config: Optional[GenerationConfig] = None,
    on_token: Optional[Callable[[int, list], None]] = None,
    **options,
) -> list[list[int]]:
    """Generate up to max_new_tokens per prompt; returns the new ids per sequence (prompt excluded).

    prompts: a (B, T) LongTensor or a list of token-id lists (lengths may differ). How to
    generate is a `GenerationConfig`: pass `config=`, or its fields as keywords (temperature,
    top_k, top_p, repetition_penalty, eos_id, use_cache, seed, compile), which also override the
    fields of a given config. on_token(step, token_ids) is called after each step (see
    stream_generate). compile=True runs each decode step as one compiled graph (see
    model/decode.py); the first call for a model pays the compilation (seconds), later ones
    with the same cache shape (batch, longest prompt + max_new_tokens) reuse it. The compiled
    step holds the weights as constants: after changing them in place, call
    torch.compiler.reset(). max_new_tokens is never cut short: past the model's block_size the
    context is cropped to its last block_size tokens (a ContextCropWarning, once; see the module
    docstring). `model` may be any module mapping ids (B, T) to logits (B, T, V); one without a
    KV cache (see supports_cache) recomputes its window every step.
    """
    config = _config(config, max_new_tokens, options)
    if on_token is not None or config.eos_id is not None:
        out: list[list[int]] = [[] for _ in range(len(_as_lists(prompts)))]
        for step, ids in stream_generate(model, prompts, config=config):
            for b, t in enumerate(ids):
                if t is not None:
                    out[b].append(t)
            if on_token is not None:
                on_token(step, ids)
        return out
    # No per-step host work needed: keep the tokens on the device and read them once at the end.
    steps = [tokens for tokens, _ in _generate_steps(model, prompts, config)]
    if not steps:
        return [[] for _ in range(len(_as_lists(prompts)))]
    return torch.stack(steps, dim=1).tolist()


__all__ = ["GenerationConfig", "generate", "stream_generate", "supports_cache", "ContextCropWarning"]
