"""The plots of `benchmarks.latency` (matplotlib, Agg backend, PNG).

- `p50_by_sequence`: p50 latency (ms, log scale) against sequence length, one line per backend,
  one panel per batch size;
- `speedup_heatmap`: the baseline's p50 over each backend's p50, backends x (batch, sequence)
  cells; a cell not timed is blank (grey).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install matplotlib, or the `bench` extra): no plots")
        return None
    return plt


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "ok"]


def p50_by_sequence(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """One panel per batch size: p50 (ms) against sequence length, a line per backend.

    Returns:
        The PNG written, or None (matplotlib missing, or no row timed).
    """
    plt, ok = _pyplot(), _ok(rows)
    if plt is None or not ok:
        return None
    batches = sorted({r["batch"] for r in ok})
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    cols = min(3, len(batches))
    nrows = (len(batches) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False, sharey=True)
    for ax, batch in zip(axes.flat, batches):
        for backend in backends:
            pts = sorted((r["sequence"], r["p50_ms"]) for r in ok if r["batch"] == batch and r["backend"] == backend)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=backend)
        ax.set_title(f"batch {batch}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("p50 latency (ms)")
    for ax in list(axes.flat)[len(batches):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) > 4), 1, 1))
    return _save(plt, fig, path)


def speedup_matrix(rows: list[dict[str, Any]], baseline: str) -> tuple[list[str], list[tuple[int, int]], np.ndarray]:
    """(backends, cells (batch, sequence), speed-up array backends x cells): baseline p50 over
    the backend's p50, NaN where either was not timed."""
    ok = _ok(rows)
    cells = sorted({(r["batch"], r["sequence"]) for r in ok})
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    p50 = {(r["backend"], r["batch"], r["sequence"]): r["p50_ms"] for r in ok}
    grid = np.full((len(backends), len(cells)), np.nan)
    for i, b in enumerate(backends):
        for j, (batch, seq) in enumerate(cells):
            base, mine = p50.get((baseline, batch, seq)), p50.get((b, batch, seq))
            if base and mine:
                grid[i, j] = base / mine
    return backends, cells, grid


def speedup_heatmap(rows: list[dict[str, Any]], baseline: str, path: Path, title: str) -> Path | None:
    """Heatmap of the speed-up over `baseline` (log colour scale centred on 1x, value in each cell).

    Returns:
        The PNG written, or None (matplotlib missing, or the baseline timed no cell).
    """
    plt = _pyplot()
    backends, cells, grid = speedup_matrix(rows, baseline)
    if plt is None or not np.isfinite(grid).any():
        return None
    from matplotlib.colors import LogNorm

    finite = grid[np.isfinite(grid)]
    span = max(float(np.max(finite)), 1.0 / float(np.min(finite)), 1.5)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(cells) + 3), 0.5 * len(backends) + 2.2))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=LogNorm(1 / span, span), aspect="auto")
    for i in range(len(backends)):
        for j in range(len(cells)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(backends)), backends)
    ax.set_xticks(range(len(cells)), [f"{b}x{s}" for b, s in cells], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("batch x sequence")
    fig.colorbar(image, ax=ax, label=f"speed-up over {baseline} (p50)")
    ax.set_title(title)
    fig.tight_layout()
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    from compiler.artifacts import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    print(f"wrote {path}")
    return path
