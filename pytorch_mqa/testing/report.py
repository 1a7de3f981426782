"""The structured result of a check: per case the error, the tolerance and their ratio."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from pytorch_mqa.testing.tolerance import Comparison


@dataclass
class CaseResult:
    """One case of the matrix. `comparisons` holds one entry per checked tensor (out, lse, dq, ...);
    `problems` lists what is wrong beyond tolerances (an exception, a stray cache write)."""

    name: str
    case: dict  # the case's fields (shape, dtype, causal, scale, seed, ...)
    tags: list
    comparisons: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and all(c.passed for c in self.comparisons)

    @property
    def ratio(self) -> float:
        """The worst error / tolerance over the tensors compared (inf when something else failed)."""
        if self.problems:
            return float("inf")
        return max((c.ratio for c in self.comparisons), default=0.0)

    def worst(self) -> Comparison | None:
        return max(self.comparisons, key=lambda c: c.ratio, default=None)

    def messages(self) -> list[str]:
        return list(self.problems) + [c.message for c in self.comparisons if not c.passed]

    def to_dict(self) -> dict:
        return {"name": self.name, "case": self.case, "tags": self.tags, "passed": self.passed,
                "ratio": _finite_or_none(self.ratio), "problems": self.problems,
                "comparisons": [{k: _finite_or_none(v) for k, v in c.to_dict().items()} for c in self.comparisons]}


def _finite_or_none(x):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return str(x)
    return x


@dataclass
class Report:
    """All cases of one check of `impl` (a name) for `op` on `device`."""

    op: str
    impl: str
    device: str
    results: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    @property
    def worst_ratio(self) -> float:
        return max((r.ratio for r in self.results if r.passed), default=0.0)

    def summary(self) -> str:
        n, f = len(self.results), len(self.failures)
        verdict = "PASS" if f == 0 else "FAIL"
        return (f"{verdict}: {self.impl} {self.op} on {self.device}: {n - f} of {n} cases pass"
                f" (worst passing error/tolerance {self.worst_ratio:.3f})" + (f", {f} fail" if f else ""))

    def table(self, failures_only: bool = False) -> str:
        """A fixed-width table: one row per case with the worst tensor's error, tolerance and ratio."""
        rows = [r for r in self.results if not failures_only or not r.passed]
        if not rows:
            return "(no failing cases)" if failures_only else "(no cases)"
        width = max([len(r.name) for r in rows] + [4])
        lines = [f"{'case':<{width}}  {'tensor':<6} {'error':>10} {'tolerance':>10} {'ratio':>8}  status"]
        for r in rows:
            w = r.worst()
            if r.problems or w is None:
                what = r.problems[0] if r.problems else "no tensor compared"
                lines.append(f"{r.name:<{width}}  {'-':<6} {'-':>10} {'-':>10} {'-':>8}  FAIL  {what}")
                continue
            status = "ok" if r.passed else "FAIL  " + ", ".join(r.tags)
            lines.append(f"{r.name:<{width}}  {w.name:<6} {w.error:>10.2e} {w.tolerance:>10.2e} {w.ratio:>8.3f}  {status}")
        return "\n".join(lines)

    def failure_details(self) -> str:
        """Each failing case with its shape, what it covers and every message."""
        out = []
        for r in self.failures:
            out.append(f"- {r.name}  [{', '.join(r.tags)}]")
            out.extend(f"    {m}" for m in r.messages())
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {"op": self.op, "impl": self.impl, "device": self.device, "passed": self.passed,
                "n_cases": len(self.results), "n_failed": len(self.failures),
                "worst_passing_ratio": self.worst_ratio,
                "failures": [{"name": r.name, "case": r.case, "tags": r.tags, "messages": r.messages()}
                             for r in self.failures],
                "cases": [r.to_dict() for r in self.results]}

    def write_json(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path


__all__ = ["CaseResult", "Report"]
