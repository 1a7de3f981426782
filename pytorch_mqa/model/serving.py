"""Continuous batching over a paged KV cache: sequences join and leave one running batch.

`ContinuousBatcher` keeps `max_batch` slots of one paged `KVCache` and a queue of requests
(Orca's iteration-level scheduling, Yu et al., OSDI 2022; vLLM's paged memory, Kwon et al.,
SOSP 2023). Each `step()`:
1. admits waiting requests, first come first served, into free slots: the prompt is prefilled
   into its slot's pages alone (`GPT.forward` on a one-sequence view, Tq = len(prompt)) and its
   first token sampled;
2. runs one batched decode step (Tq = 1) over every active slot, each at its own length (ragged
   `cache_seqlens`, one `block_table` row per slot);
3. retires sequences that emitted their `eos_id` or `max_new_tokens` tokens: their pages go
   back to the pool, so a waiting prompt can take the slot in the next step.

A request is admitted only when the pool can hold its whole life (prompt + max_new_tokens - 1
rows, as `generate` uses) beside the lives of the running ones, so the pool is never exhausted
mid-sequence and nothing is preempted; the pages themselves are taken as the rows are appended.
Each request has its own `GenerationConfig` (temperature, top_k, top_p, eos_id); sampling is
`pytorch_mqa.model.sampling.next_token`, with one generator for the whole batch (`seed`), so a
sampled request depends on its batch mates, while greedy outputs equal generating each prompt
alone. Requests must fit the model's context (no cropping, unlike `generate`).
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from pytorch_mqa.model.cache import KVCache
from pytorch_mqa.model.generation import GenerationConfig, Prompts, _as_lists, _device
from pytorch_mqa.model.sampling import next_token


@dataclass
class _Sequence:
    rid: int
    prompt: list[int]
    config: GenerationConfig
    slot: int = -1
    out: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """Cache rows this sequence uses over its life (the last new token is never fed back)."""
        return len(self.prompt) + max(self.config.max_new_tokens - 1, 0)

    def done(self) -> bool:
        c = self.config
        return len(self.out) >= c.max_new_tokens or (c.eos_id is not None and bool(self.out) and self.out[-1] == c.eos_id)


@dataclass
class StepResult:
    """What one `step()` did: requests prefilled, tokens emitted per request, requests finished."""

    admitted: list[int]
    tokens: dict[int, list[int]]
    finished: list[int]


class ContinuousBatcher:
    """A running batch of up to `max_batch` sequences over a paged KV cache (see the module).

    model: a GPT (anything with the KVCache interface of `GPT.forward(idx, cache=)`).
    page_size / num_pages: the cache's pages (num_pages defaults to every slot reaching
    max_seqlen; fewer is what paging is for). max_seqlen: rows per sequence, default block_size.
    seed: the generator of sampled requests.
    """

    def __init__(
        self, model, *, max_batch: int = 4, page_size: int = 16, num_pages: Optional[int] = None,
        max_seqlen: Optional[int] = None, seed: Optional[int] = None,
    ):
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch: expected an int >= 1, got {max_batch!r}")
        self.model = model
        self.device = _device(model)
        self.cache = KVCache.for_model(model, max_batch, max_seqlen, page_size=page_size, num_pages=num_pages)
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.slots: list[Optional[_Sequence]] = [None] * max_batch
        self.waiting: collections.deque[_Sequence] = collections.deque()
        self.outputs: dict[int, list[int]] = {}  # every request's tokens so far (finished or not)
        self.finished: set[int] = set()
        self._next_id = 0

    # ---- requests -----------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], max_new_tokens: Optional[int] = None, *,
               config: Optional[GenerationConfig] = None, **options) -> int:
        """Queue a prompt (a list of token ids); returns its request id. How to generate is a
        GenerationConfig (config=, or its fields as keywords: max_new_tokens, temperature, top_k,
        top_p, eos_id); temperature defaults to 0 (greedy) here."""
        if config is None:
            options.setdefault("temperature", 0.0)
            if max_new_tokens is None:
                raise ValueError("max_new_tokens: expected an int >= 0 (or config=GenerationConfig(...)), got None")
            config = GenerationConfig(max_new_tokens, **options)
        else:
            if not isinstance(config, GenerationConfig):
                raise TypeError(f"config: expected a GenerationConfig or None, got {type(config).__name__}")
            if max_new_tokens is not None:
                options["max_new_tokens"] = max_new_tokens
            config = dataclasses.replace(config, **options) if options else config
        for name, default in (("repetition_penalty", 1.0), ("seed", None), ("compile", False), ("use_cache", True)):
            if getattr(config, name) != default:
                raise ValueError(
                    f"config.{name}: expected {default!r} (not supported by continuous batching; the batch has one "
                    f"generator, ContinuousBatcher(seed=)), got {getattr(config, name)!r}"
                )
        (ids,) = _as_lists([prompt])
        V = self.model.config.vocab_size
        if not ids or min(ids) < 0 or max(ids) >= V:
            raise ValueError(f"prompt: expected at least one token id in [0, {V}), got {ids[:8]}{' ...' if len(ids) > 8 else ''}")
        seq = _Sequence(self._next_id, ids, config)
        limit = min(self.cache.max_seqlen, self.model.config.block_size)
        if seq.rows > limit:
            raise ValueError(
                f"prompt: {len(ids)} tokens + max_new_tokens {config.max_new_tokens} - 1 = {seq.rows} rows, expected at "
                f"most {limit} (the cache's max_seqlen and the model's block_size)"
            )
        if self.cache.pages_for(seq.rows) > self.cache.num_pages:
            raise ValueError(
                f"prompt: needs {self.cache.pages_for(seq.rows)} pages, expected at most num_pages = {self.cache.num_pages}"
            )
        self._next_id += 1
        self.outputs[seq.rid] = seq.out
        self.waiting.append(seq)
        return seq.rid

    @property
    def busy(self) -> bool:
        """Whether any request is running or waiting."""
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def occupancy(self) -> dict:
        """slots (each a running request id or None), waiting (count), pages_used, pages_free, num_pages."""
        c = self.cache
        return dict(
            slots=[None if s is None else s.rid for s in self.slots], waiting=len(self.waiting),
            pages_used=c.num_pages - c.num_free_pages, pages_free=c.num_free_pages, num_pages=c.num_pages,
        )

    # ---- the loop -----------------------------------------------------------------------------

    def _committed(self) -> int:
        """Pages the running sequences hold or will hold by their last row."""
        return sum(self.cache.pages_for(s.rows) for s in self.slots if s is not None)

    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
        """One token per row of logits (n, V), each sequence by its own config (rows sharing a
        config sampled together)."""
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(seqs):
            c = s.config
            groups.setdefault((c.temperature, c.top_k, c.top_p), []).append(i)
        out = [0] * len(seqs)
        for (temperature, top_k, top_p), rows in groups.items():
            part = logits if len(rows) == len(seqs) else logits[torch.tensor(rows, device=logits.device)]
            for i, t in zip(rows, next_token(part, temperature, top_k, top_p, self.generator).tolist()):
                out[i] = t
        return out

    def _retire(self, seq: _Sequence, result: StepResult) -> None:
        self.cache.free(seq.slot)
        self.slots[seq.slot] = None
        self.finished.add(seq.rid)
        result.finished.append(seq.rid)

    @torch.inference_mode()
    def step(self) -> StepResult:
        """Admit (prefill) what fits, decode every running sequence one token, retire the finished."""
        result = StepResult([], {}, [])
        model, cache = self.model, self.cache
        was_training = model.training
        model.eval()
        try:
            while self.waiting and None in self.slots:
                seq = self.waiting[0]
                if self._committed() + cache.pages_for(seq.rows) > cache.num_pages:
                    break  # first come first served: wait for pages to come back
                self.waiting.popleft()
                seq.slot = self.slots.index(None)
                self.slots[seq.slot] = seq
                result.admitted.append(seq.rid)
                if seq.config.max_new_tokens == 0:
                    self._retire(seq, result)
                    continue
                prompt = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)
                logits = model(prompt, cache=cache.select([seq.slot]))[:, -1]
                (tok,) = self._sample(logits, [seq])
                seq.out.append(tok)
                result.tokens[seq.rid] = [tok]
                if seq.done():
                    self._retire(seq, result)
            running = [s for s in self.slots if s is not None]
            if running:
                tokens = torch.tensor([s.out[-1] for s in running], dtype=torch.long, device=self.device)
                logits = model(tokens[:, None], cache=cache.select([s.slot for s in running]))[:, -1]
                for seq, tok in zip(running, self._sample(logits, running)):
                    seq.out.append(tok)
                    result.tokens.setdefault(seq.rid, []).append(tok)
                    if seq.done():
                        self._retire(seq, result)
        finally:
            model.train(was_training)
        return result

    def run(self) -> dict[int, list[int]]:
        """Step until every request has finished; returns each request's new tokens by id."""
        while self.busy:
            self.step()
        return {rid: list(out) for rid, out in self.outputs.items()}


def serve(model, prompts: Prompts, max_new_tokens: int, *, max_batch: int = 4, page_size: int = 16,
          num_pages: Optional[int] = None, seed: Optional[int] = None, **options) -> list[list[int]]:
    """Generate for every prompt through a ContinuousBatcher of max_batch slots; returns the new
    ids per prompt, in order (as `generate` does). options: GenerationConfig fields (temperature
    defaults to 0, greedy). Prompts beyond max_batch wait for a slot and pages."""
    engine = ContinuousBatcher(model, max_batch=max_batch, page_size=page_size, num_pages=num_pages, seed=seed)
    ids = [engine.submit(p, max_new_tokens, **options) for p in _as_lists(prompts)]
    out = engine.run()
    return [out[i] for i in ids]


__all__ = ["ContinuousBatcher", "StepResult", "serve"]
