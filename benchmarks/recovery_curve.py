"""Held-out cosine against training minutes, read from the `sparsity_report.json` of 2:4 runs.

A `make onnx SPARSITY=2:4` run records its own curve (`recovery.curve`: step, training seconds
without the evaluations, held-out cosine mean on the first 64 verification samples;
`compiler.training.heldout`). This collects one or more runs into a table, a JSON and a plot,
so that variants tried for the one-command target (docs/sparsity.md) sit side by side.

    python -m benchmarks.recovery_curve LABEL=engines/.../sparsity_report.json [...] [--out DIR]

Writes `<out>/recovery_curve.json` and `.png`; rows of earlier labels in that JSON are kept
(a label given again replaces its row).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import add_out_argument, markdown_table, save_plot, write_result


def read_run(label: str, path: Path) -> dict[str, Any]:
    """One run's row: its label, recovery settings as recorded, and its curve in minutes.

    Raises:
        SystemExit: the file is missing or holds no recovery curve (a run without recovery, or
            one written before the curve was recorded).
    """
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; pass the sparsity_report.json of a 2:4 run")
    report = json.loads(path.read_text())
    rec = report.get("recovery") or {}
    if not rec.get("curve"):
        raise SystemExit(f"{path}: no recovery curve (recover_steps 0, or a run before the curve was recorded)")
    return {"label": label, "report": str(path), "method": report.get("prune", {}).get("method"),
            "steps": rec["steps"], "train_samples": rec.get("train_samples"), "train_text": rec.get("train_text"),
            "bf16": rec.get("bf16"), "seconds": rec["seconds"],
            "curve": [{"step": int(s), "train_minutes": round(t / 60, 2), "cosine_mean": c} for s, t, c in rec["curve"]]}


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n" + markdown_table(
        ["run", "method", "steps", "train minutes", "held-out cosine mean (64 samples)"],
        [[r["label"], r["method"], p["step"], f"{p['train_minutes']:.1f}", f"{p['cosine_mean']:.4f}"]
         for r in rows for p in r["curve"]], "lllrr"))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    def draw(ax: Any) -> None:
        for r in rows:
            ax.plot([p["train_minutes"] for p in r["curve"]], [p["cosine_mean"] for p in r["curve"]], marker="o",
                    markersize=3, label=f"{r['label']} ({r['method']}, {r['steps']} steps)")
        ax.axhline(0.97, color="grey", linestyle="--", linewidth=0.8, label="target 0.97")
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, max(hi, 0.975))
        ax.set_xlabel("training minutes (wall; evaluations left out)")
        ax.set_ylabel("held-out cosine mean vs dense FP32")
        ax.set_title("MiniLM 2:4 recovery, one command")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    save_plot(path, draw)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="LABEL=REPORT", help="a label and a sparsity_report.json")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    pairs = [r.split("=", 1) for r in args.runs]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit("runs are LABEL=PATH/sparsity_report.json")
    rows = [read_run(label, Path(path)) for label, path in pairs]
    out = args.out / "recovery_curve.json"
    labels = {r["label"] for r in rows}
    previous = [r for r in json.loads(out.read_text())["rows"] if r["label"] not in labels] if out.is_file() else []
    rows = previous + rows
    print_table(rows)
    write_result(args.out, "recovery_curve", {"rows": rows})
    plot(rows, args.out / "recovery_curve.png")


if __name__ == "__main__":
    main()
