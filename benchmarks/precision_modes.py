"""Benchmark: fp16 vs hybrid vs auto on MiniLM and on a planted FP16 hazard, real text vs random ids.

    python -m benchmarks.precision_modes [--samples 64] [--calib-samples 128] [--out engines/benchmarks]

For each model and mode it runs the pipeline up to verify (export, precision, verify on held-out
WikiText-2 and on random ids of the same shapes, FP16 measured on the faithful reference), prints
one table, writes `<out>/precision_modes.json` and (with matplotlib) `<out>/precision_modes.png`:
1 - cosine min per model and mode (log scale), real text against random ids. The planted model
(`tests/models.py`, `planted_hazard_bert`: a 4-layer BERT whose layer-1 feed-forward output
reaches ~1.2e5 on frequent tokens) is saved as a local checkpoint first, so it goes through the
same CLI path a user's checkpoint does.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchmarks.common import add_out_argument, fidelity_row, grouped_bars, save_plot, write_result
from compiler.pipeline import run_pipeline
from compiler.settings import BuildSettings, DataSettings, ExportSettings, ModelSettings, PrecisionSettings

MODES = ("fp16", "hybrid", "auto")
SETS = ("real", "random")  # held-out text, random ids of the same shapes


def planted_checkpoint(directory: Path) -> Path:
    """Save `tests.models.planted_hazard_bert` (MiniLM's tokenizer) at `directory` once; return it."""
    from compiler.training.models import load_model
    from tests.models import planted_hazard_bert

    if not (directory / "config.json").is_file():
        tok = load_model(ModelSettings(name="minilm")).tokenizer
        planted_hazard_bert(tok).save_pretrained(directory)
        tok.save_pretrained(directory)
    return directory


def row(model: str, mode: str, report: dict[str, Any]) -> dict[str, Any]:
    """One table row from a pipeline report: FP32 node count, casts, FP16 MatMul share, fidelity per set."""
    prec, fid = report["precision"], report["fidelity"]
    out = {"model": model, "mode": mode, "fp32_nodes": prec["nodes"]["fp32"], "casts": prec["casts_inserted"],
           "matmul_fp16_fraction": round(prec["matmul_fp16_fraction"], 4)}
    for key in SETS:
        out[key] = {**fidelity_row(fid[key]), "samples": fid[key]["samples"]}
    return out


def settings_for(label: str, name: str, mode: str, args: argparse.Namespace) -> BuildSettings:
    # The planted model carries ~1.2e5 activations: FP32 rounding alone moves its outputs
    # by ~1e-3 between PyTorch and ONNX Runtime, so its parity tolerance is wider.
    export = ExportSettings(parity_atol=1e-4 if label == "minilm" else 1e-2)
    # the table shows what each mode gives, NaN included: verify's refusal would stop the run
    precision = PrecisionSettings(mode=mode, allow_nonfinite=True)
    return BuildSettings(model=ModelSettings(name=name), precision=precision, export=export,
                         data=DataSettings(samples=args.samples, calib_samples=args.calib_samples),
                         output_dir=str(args.out))


def print_table(rows: list[dict[str, Any]]) -> None:
    fmt = lambda v: "nan" if v is None else f"{v:.6f}"  # noqa: E731
    print(f"{'model':<15} {'mode':<7} {'fp32':>5} {'casts':>5} {'mm_fp16':>7} | {'real cos_min':>12} "
          f"{'cos_mean':>9} {'nonfin':>7} | {'rand cos_min':>12} {'cos_mean':>9} {'nonfin':>7}")
    for r in rows:
        re, ra = r["real"], r["random"]
        print(f"{r['model']:<15} {r['mode']:<7} {r['fp32_nodes']:>5} {r['casts']:>5} {r['matmul_fp16_fraction']:>7.4f} | "
              f"{fmt(re['cosine_min']):>12} {fmt(re['cosine_mean']):>9} {re['nonfinite_count']:>7} | "
              f"{fmt(ra['cosine_min']):>12} {fmt(ra['cosine_mean']):>9} {ra['nonfinite_count']:>7}")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """1 - cosine min per model and mode (log scale), real text next to random ids; a set with a
    non-finite output has no bar and a `non-finite` label instead."""
    groups = [f"{r['model']} {r['mode']}" for r in rows]
    deficit = lambda c: float("nan") if c is None else max(1.0 - c, 1e-9)  # noqa: E731
    series = {key: [deficit(r[key]["cosine_min"]) for r in rows] for key in SETS}

    def draw(ax: Any) -> None:
        offsets = grouped_bars(ax, groups, series)
        ax.set_yscale("log")
        ax.set_ylabel("1 - cosine min vs FP32 (lower is better)")
        ax.set_title("Precision modes: held-out text (real) vs random ids")
        for i, r in enumerate(rows):
            for key in SETS:
                if r[key]["cosine_min"] is None:
                    ax.annotate("non-finite", (i + offsets[key], 0.02), xycoords=("data", "axes fraction"),
                                ha="center", rotation=90, fontsize=8)

    save_plot(path, draw)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=128)
    add_out_argument(ap)
    args = ap.parse_args(argv)
    models = {"minilm": "minilm", "planted-hazard": str(planted_checkpoint(args.out / "planted-hazard-ckpt"))}
    rows = []
    for label, name in models.items():
        for mode in MODES:
            start = time.perf_counter()
            state = run_pipeline(settings_for(label, name, mode, args), until="verify")
            rows.append({**row(label, mode, state.report), "seconds": round(time.perf_counter() - start, 1)})
    print_table(rows)
    write_result(args.out, "precision_modes", rows)
    plot(rows, args.out / "precision_modes.png")


if __name__ == "__main__":
    main()
