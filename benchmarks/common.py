"""What the benchmarks share: NAME=PATH arguments, graphs and tokenizers, tables, JSON and plots.

Nothing here measures anything; each benchmark module does its own measuring and calls these
for the plumbing around it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

DEFAULT_OUT = Path("engines/benchmarks")
FIDELITY_KEYS = ("cosine_min", "cosine_mean", "max_abs_err", "nonfinite_count")


def named_path(spec: str) -> tuple[str, Path]:
    """An argparse type for `NAME=PATH` (one graph of a comparison).

    Raises:
        argparse.ArgumentTypeError: no `=`, or an empty name or path.
    """
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=PATH")
    return name, Path(path)


def add_out_argument(ap: argparse.ArgumentParser) -> None:
    """`--out FOLDER`: where the benchmark writes its JSON (and PNG); default engines/benchmarks."""
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"folder for the JSON result and plot (default {DEFAULT_OUT})")


def load_tokenizer(model: str, weights: str = "pretrained") -> Any:
    """The tokenizer of a model (`compiler.training.models.load_model`); the weights are dropped.

    Raises:
        compiler.errors.UnknownModelError: the model cannot be loaded.
    """
    from compiler.settings import ModelSettings
    from compiler.training.models import load_model

    return load_model(ModelSettings(name=model, weights=weights)).tokenizer


def graph_without_weights(path: Path) -> Any:
    """The onnx.ModelProto at `path` with its external weights unread (inputs, nodes, types).

    Raises:
        compiler.errors.InvalidOnnxError: no file at `path`.
    """
    import onnx

    from compiler.errors import InvalidOnnxError

    if not path.is_file():
        raise InvalidOnnxError(f"{path}: no such ONNX file. Run `python -m compiler export` first.")
    return onnx.load(str(path), load_external_data=False)


def fidelity_row(fidelity: Mapping[str, Any]) -> dict[str, Any]:
    """The headline figures of a fidelity dict (`compiler.eval.fidelity.Fidelity.to_dict()` or a
    verify report set): cosine min / mean, max abs error, non-finite count."""
    return {k: fidelity[k] for k in FIDELITY_KEYS}


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A markdown table; `align` holds one `l` or `r` per column (default: all left)."""
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


def write_result(out: Path, name: str, result: Any) -> Path:
    """Write `<out>/<name>.json` atomically (`compiler.artifacts.write_json`) and say so."""
    from compiler.artifacts import write_json

    path = write_json(out / f"{name}.json", result)
    seconds = result.get("seconds") if isinstance(result, dict) else None
    print(f"\nwrote {path}" + (f" ({seconds} s)" if seconds is not None else ""))
    return path


def save_plot(path: Path, draw: Callable[[Any], None], size: tuple[float, float] = (8.0, 4.5)) -> Path | None:
    """Draw on one matplotlib Axes and save it as PNG at `path`, if matplotlib is installed.

    matplotlib is optional (the `bench` extra) and imported here, on first use, with the
    non-interactive Agg backend.

    Args:
        path: the PNG file; its folder is created.
        draw: called with the Axes; sets data, labels and title.
        size: figure size in inches.

    Returns:
        The path written, or None when matplotlib is missing (a line says so).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed (pip install matplotlib, or the `bench` extra): no plot {path.name}")
        return None
    fig, ax = plt.subplots(figsize=size)
    try:
        draw(ax)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    print(f"wrote {path}")
    return path


def grouped_bars(ax: Any, groups: Sequence[str], series: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Bars of several series side by side over `groups` on `ax` (a matplotlib Axes); a NaN
    value draws no bar.

    Returns:
        {series label: its bars' x offset from the group's tick} (to annotate a bar).
    """
    width = 0.8 / max(len(series), 1)
    offsets = {label: (k - (len(series) - 1) / 2) * width for k, label in enumerate(series)}
    for label, values in series.items():
        ax.bar([i + offsets[label] for i in range(len(groups))], values, width, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.legend()
    return offsets


def run_main(run: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> None:
    """Call `run(args)`; a `compiler.errors.CompilerError` (missing text or ONNX file, a graph
    input text cannot fill) ends the process with its one-line message instead of a traceback."""
    from compiler.errors import CompilerError

    try:
        run(args)
    except CompilerError as e:
        sys.exit(f"error: {e}")
