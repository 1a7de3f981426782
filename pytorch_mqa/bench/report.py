"""Formatting benchmark results: aligned text tables, Markdown for BENCHMARKS.md, PNG charts."""

from __future__ import annotations

import math
import os

from pytorch_mqa.bench.suites import SUITES


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return f"{value:g}"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Aligned text table; columns are (row key, header). A skipped row shows its reason."""
    cells = [[h for _, h in columns] + ["note"]]
    for r in rows:
        note = r.get("reason") or ""
        if r.get("max_abs_err") is not None:
            note = f"err {r['max_abs_err']:.1e}" + (f"; {note}" if note else "")
        cells.append([_fmt(r.get(k)) for k, _ in columns] + [note[:90]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i < len(row) - 1 else c for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """The same table in Markdown, for BENCHMARKS.md."""
    head = [h for _, h in columns] + ["note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        note = r.get("reason") or ""
        if r.get("max_abs_err") is not None:
            note = f"err {r['max_abs_err']:.1e}" + (f"; {note}" if note else "")
        lines.append("| " + " | ".join([_fmt(r.get(k)) for k, _ in columns] + [note]) + " |")
    return "\n".join(lines)


def markdown_report(result: dict) -> str:
    """The run's environment, calibration and tables in Markdown."""
    env, cal = result["environment"], result["calibration"]
    lines = [f"Device: {env['device_name']}; torch {env['torch']}, triton {env['triton'] or '-'}, "
             f"git {env['git_revision'] or '-'}, {env['time_utc']}; dtype {result['dtype']}"
             f"{'; --quick' if result['quick'] else ''}; 1-minute load average at start "
             f"{env['load_average_1min'] or 0:.1f} on {env['cpu_count']} CPUs.", "",
             f"Calibration: copy {cal['copy_gbs']:.2f} GB/s (bytes read + written, {cal['copy_bytes'] >> 20} MiB), "
             f"{cal['matmul_dtype']} matmul {cal['matmul_tflops']:.4f} TFLOP/s ({cal['matmul_n']}^3).", ""]
    for name, secs in result.get("suite_seconds", {}).items():
        suite = SUITES[name]
        rows = [r for r in result["rows"] if r["suite"] == name]
        lines += [f"### {name} ({secs:.0f} s)", "", markdown_table(rows, suite.columns), ""]
        text = suite.summary(rows) if suite.summary else ""
        if text:
            lines += [text.replace("\n", "  \n"), ""]
    return "\n".join(lines)


def write_plots(result: dict, out_dir: str) -> list[str]:
    """One PNG per suite that ran (needs matplotlib)."""
    paths = []
    for name, suite in SUITES.items():
        rows = [r for r in result["rows"] if r["suite"] == name and (r.get("ms") or r.get("tokens_per_s"))]
        if rows:
            path = os.path.join(out_dir, f"bench_{name}.png")
            suite.module.plot(rows, result, path)
            paths.append(path)
    return paths
