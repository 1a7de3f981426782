"""The generation timer shared by the study and the benchmarks: runs of several providers taken
round-robin, so a change in machine load hits all of them alike."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence


def time_round_robin(
    runs: Sequence[Callable[[], Any]],
    repeats: int,
    *,
    warmups: Optional[Sequence[Optional[Callable[[], Any]]]] = None,
    sync: Optional[Callable[[], None]] = None,
) -> list[tuple[list[float], Any]]:
    """Per run: (seconds of each of `repeats` calls, the last call's result).

    runs: one zero-argument callable per provider. warmups: per provider, a callable run once
    before any timing (a short generation: prefill and a few decode steps), or None for a
    provider that needs none. sync: called before starting and after stopping each clock (a
    device synchronize; None on CPU). The timed calls go round-robin over the providers.
    """
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats: expected an int >= 1, got {repeats!r}")
    if warmups is not None and len(warmups) != len(runs):
        raise ValueError(f"warmups: expected {len(runs)} entries (one per run), got {len(warmups)}")
    for warm in warmups or ():
        if warm is not None:
            warm()
    times: list[list[float]] = [[] for _ in runs]
    results: list[Any] = [None] * len(runs)
    for _ in range(repeats):
        for i, fn in enumerate(runs):
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            results[i] = fn()
            if sync is not None:
                sync()
            times[i].append(time.perf_counter() - t0)
    return list(zip(times, results))


__all__ = ["time_round_robin"]
