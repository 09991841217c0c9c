"""`latency.md` and the plots from a `latency.json` result: p50 per cell and backend with the
winner marked, the speed-up over the baseline, throughput, accuracy, and what was skipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table


def _cells(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return sorted({(r["batch"], r["sequence"]) for r in rows})


def _by_cell(rows: list[dict[str, Any]], key: str) -> dict[tuple, Any]:
    return {(r["backend"], r["batch"], r["sequence"]): r[key] for r in rows if r["status"] == "ok"}


def winners(rows: list[dict[str, Any]]) -> dict[tuple[int, int], str]:
    """{(batch, sequence): the backend with the lowest p50} over the timed rows."""
    best: dict[tuple[int, int], tuple[float, str]] = {}
    for r in rows:
        if r["status"] == "ok":
            cell = (r["batch"], r["sequence"])
            if cell not in best or r["p50_ms"] < best[cell][0]:
                best[cell] = (r["p50_ms"], r["backend"])
    return {c: b for c, (_, b) in best.items()}


def p50_table(rows: list[dict[str, Any]], backends: list[str]) -> str:
    """p50 ms per cell (rows) and backend (columns); the cell's fastest in bold; `-` not timed."""
    p50, win = _by_cell(rows, "p50_ms"), winners(rows)
    lines = []
    for b, s in _cells(rows):
        vals = [p50.get((n, b, s)) for n in backends]
        lines.append([f"{b}x{s}", *[("-" if v is None else f"**{v:.2f}**" if win.get((b, s)) == n else f"{v:.2f}")
                                    for n, v in zip(backends, vals)], win.get((b, s), "-")])
    return markdown_table(["batch x seq", *backends, "fastest"], lines, "l" + "r" * len(backends) + "l")


def speedup_table(rows: list[dict[str, Any]], backends: list[str], baseline: str) -> str:
    """Baseline p50 / backend p50 per cell, and the geometric mean over the cells both timed."""
    import math

    p50 = _by_cell(rows, "p50_ms")
    others = [n for n in backends if n != baseline]
    lines, logs = [], {n: [] for n in others}
    for b, s in _cells(rows):
        line = [f"{b}x{s}"]
        for n in others:
            base, mine = p50.get((baseline, b, s)), p50.get((n, b, s))
            if base and mine:
                logs[n].append(math.log(base / mine))
                line.append(f"{base / mine:.2f}x")
            else:
                line.append("-")
        lines.append(line)
    lines.append(["geomean", *[f"{math.exp(sum(v) / len(v)):.2f}x" if v else "-" for v in logs.values()]])
    return markdown_table(["batch x seq", *others], lines, "l" + "r" * len(others))


def throughput_table(rows: list[dict[str, Any]], backends: list[str]) -> str:
    """Tokens/s per cell and backend (at the mean latency)."""
    tok = _by_cell(rows, "throughput_tok_s")
    lines = [[f"{b}x{s}", *[("-" if tok.get((n, b, s)) is None else f"{tok[n, b, s]:,.0f}") for n in backends]]
             for b, s in _cells(rows)]
    return markdown_table(["batch x seq", *backends], lines, "l" + "r" * len(backends))


def accuracy_table(accuracy: list[dict[str, Any]]) -> str:
    """Cosine min / mean against PyTorch FP32, non-finite values, SST-2 dev where measured."""
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [[a["backend"], a["precision"], fmt(a.get("cosine_min"), ".6f"), fmt(a.get("cosine_mean"), ".6f"),
              fmt(a.get("nonfinite"), "d"), fmt(a.get("sst2_dev_accuracy"), ".4f"),
              fmt(a.get("sst2_delta_points"), "+.2f"), a.get("reason") or ""] for a in accuracy]
    return markdown_table(["backend", "precision", "cosine min", "cosine mean", "non-finite", "SST-2 dev",
                           "Δ points", "note"], lines, "llrrrrrl")


def skipped_table(rows: list[dict[str, Any]]) -> str:
    """The skipped cells, grouped by backend and reason."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["status"] != "ok":
            reason = r["reason"].split(": first iteration")[0] if r["reason"].startswith("over budget") else r["reason"]
            groups.setdefault((r["backend"], reason), []).append(f"{r['batch']}x{r['sequence']}")
    lines = [[b, ", ".join(cells), reason] for (b, reason), cells in groups.items()]
    return markdown_table(["backend", "cells", "reason"], lines) if lines else "none"


def markdown(result: dict[str, Any], backends: list[str]) -> str:
    """The whole latency.md."""
    m, rows = result["machine"], result["rows"]
    names = [n for n in backends if any(r["backend"] == n for r in rows)]
    names += [n for n in dict.fromkeys(r["backend"] for r in rows) if n not in names]
    timed = [n for n in names if any(r["backend"] == n and r["status"] == "ok" for r in rows)]
    pol = result["policy"]
    head = (f"# Latency: {result['model']} ({result['weights']} weights), grid {result['grid']}\n\n"
            f"{m['cpu']}, {m['usable_cores']} usable cores, {m['threads']} threads; GPU: {m['gpu'].get('name') or 'none'}"
            f"; load average {m['load_average_start']} at start, {m.get('load_average_end')} at end (a shared "
            f"machine: other jobs add noise). Warm-up {pol['warmup_s']} s, then >= {pol['duration_s']} s and >= "
            f"{pol['min_iterations']} iterations; cell budget {pol['budget_s']} s. Inputs: {result['inputs']}.\n")
    speedup = (speedup_table(rows, timed, result["baseline"]) if result["baseline"] in timed else
               f"not measured: {result['baseline']} was not timed in this run (e.g. a GPU-only run on another host)")
    return "\n\n".join([
        head, "## p50 latency (ms); fastest in bold", p50_table(rows, timed),
        f"## Speed-up over {result['baseline']} (p50)", speedup,
        "## Throughput (tokens/s)", throughput_table(rows, timed),
        "## Accuracy against PyTorch FP32 (held-out WikiText-2)", accuracy_table(result["accuracy"]),
        "## Not timed", skipped_table(rows)]) + "\n"


def write_outputs(folder: Path, result: dict[str, Any], backends: list[str]) -> None:
    """latency.md (printed too) and the two plots, beside latency.json."""
    from benchmarks.speed.plots import p50_by_sequence, speedup_heatmap
    from compiler.artifacts import write_bytes

    text = markdown(result, backends)
    print("\n" + text)
    write_bytes(folder / "latency.md", text.encode())
    title = f"{result['model']} ({result['weights']}), {result['machine']['threads']} threads"
    p50_by_sequence(result["rows"], folder / "latency_p50.png", f"p50 latency: {title}")
    speedup_heatmap(result["rows"], result["baseline"], folder / "latency_speedup.png",
                    f"speed-up over {result['baseline']}: {title}")
