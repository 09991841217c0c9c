"""Benchmark: MiniLM through the pipeline's INT8 and 2:4 options, held-out WikiText-2 fidelity.

    python -m benchmarks.int8_minilm [--samples 64] [--calib-samples 128] [--train-samples 2048]
                                     [--qat-steps 200] [--recover-steps 1000] [--sparsity-method magnitude]
                                     [--only NAME ...]

Every row is one `compiler.pipeline.run_pipeline(..., until="verify")` on MiniLM (real
weights): the same code as `make onnx MODEL=minilm PRECISION=... SPARSITY=...`. Text layout of
WikiText-2 test: calibration lines, then held-out lines (every figure here), then training
lines (QAT and recovery), never overlapping. Fidelity: cosine per sample of last_hidden_state at
valid tokens against the dense FP32 model on ONNX Runtime CPU; FP16 parts run on the faithful
FP16 reference. Rows:

- hybrid: FP16 with softmax / layer norm in FP32 (no INT8), the float baseline.
- int8-{max,entropy,percentile}: PTQ per calibration method (SmoothQuant 0.8, budget 0.99).
- int8-max-nosq: PTQ without SmoothQuant and without the budget loop (every eligible MatMul
  INT8: the placement of the issue's "MatMul inputs only" anchor).
- int8-qat: QAT at the placement of int8-max.
- sparse-noft / sparse-wanda-noft: 2:4 by magnitude / by Wanda's |w| x input norm, no recovery.
- sparse / sparse-int8-qat: 2:4 (`--sparsity-method`) with recovery, and sparse QAT on top.
- sparse-mixed / sparse-mixed-int8-qat: the same, recovered on a mix of texts (`--mix-text`,
  repeatable; default the deployment text, SST-2 train sentences unlabeled, and the calibration
  text after its held-out lines: `--train-text DEPLOY --train-text CALIB` in the CLI), each an
  even share of `--train-samples`.

Prints a markdown table, writes `<out>/int8_minilm.json` with the ONNX path per row (input of
`python -m benchmarks.sst2_probe` and `python -m benchmarks.ort_latency`); rows not rerun
(`--only`) keep their figures from the JSON already there.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common import add_out_argument, markdown_table, write_result
from calibration.readers import default_text_path, shared_data_path
from compiler.pipeline import run_pipeline
from compiler.settings import (BuildSettings, DataSettings, ModelSettings, PrecisionSettings, QuantSettings,
                               SparsitySettings, TrainSettings)

TRAINING_LOGGERS = ("compiler.training.qat", "compiler.training.distill")  # a line per 5 % of the steps


def rows(args: argparse.Namespace) -> dict[str, BuildSettings]:
    """{row name: the pipeline settings of that row} (see the module docstring for the rows)."""
    base = BuildSettings(model=ModelSettings(name="minilm"),
                         data=DataSettings(samples=args.samples, calib_samples=args.calib_samples,
                                           train_samples=args.train_samples),
                         sparsity=SparsitySettings(recover_lr=args.recover_lr, method=args.sparsity_method,
                                                   recover_schedule=args.recover_schedule,
                                                   recover_from=args.recover_from),
                         train=TrainSettings(steps=args.qat_steps, lr=args.lr, bf16=args.train_bf16),
                         output_dir=args.engines)
    prec = lambda mode: PrecisionSettings(mode=mode)  # noqa: E731
    sparse = replace(base.sparsity, pattern="2:4", recover_steps=args.recover_steps)
    mix = args.mix_text or (shared_data_path("sst2/train.tsv"), default_text_path())
    mixed = replace(base.data, train_path=tuple(str(p) for p in mix))
    return {
        "hybrid": replace(base, precision=prec("hybrid")),
        "int8-max": replace(base, precision=prec("int8")),
        "int8-entropy": replace(base, precision=prec("int8"), quant=QuantSettings(method="entropy"),
                                output_dir=f"{args.engines}/entropy"),
        "int8-percentile": replace(base, precision=prec("int8"), quant=QuantSettings(method="percentile"),
                                   output_dir=f"{args.engines}/percentile"),
        "int8-max-nosq": replace(base, precision=prec("int8"),
                                 quant=QuantSettings(smoothquant_alpha=None, max_excluded=0),
                                 output_dir=f"{args.engines}/nosq"),
        "int8-qat": replace(base, precision=prec("int8-qat")),
        "sparse-noft": replace(base, precision=prec("hybrid"), sparsity=replace(sparse, recover_steps=0),
                               output_dir=f"{args.engines}/noft"),
        "sparse-wanda-noft": replace(base, precision=prec("hybrid"),
                                     sparsity=replace(sparse, recover_steps=0, method="wanda"),
                                     output_dir=f"{args.engines}/wanda-noft"),
        "sparse": replace(base, precision=prec("hybrid"), sparsity=sparse),
        "sparse-int8-qat": replace(base, precision=prec("int8-qat"), sparsity=sparse),
        "sparse-mixed": replace(base, precision=prec("hybrid"), sparsity=sparse, data=mixed,
                                output_dir=f"{args.engines}/mixed"),
        "sparse-mixed-int8-qat": replace(base, precision=prec("int8-qat"), sparsity=sparse, data=mixed,
                                         output_dir=f"{args.engines}/mixed"),
    }


def summarize(name: str, state: Any, seconds: float, settings: BuildSettings) -> dict[str, Any]:
    """One row from a pipeline run's state (`report`, `variant_onnx`): held-out and random-id
    fidelity, INT8 and 2:4 figures, fine-tuning steps and seconds."""
    r = state.report
    real, rand = r["fidelity"]["real"], r["fidelity"]["random"]
    q = r.get("quantization") or {}
    sp = r.get("sparsity") or {}
    row = {"row": name, "onnx": str(state.variant_onnx), "seconds": round(seconds, 1),
           "cosine_min": real["cosine_min"], "cosine_mean": real["cosine_mean"], "max_abs_err": real["max_abs_err"],
           "nonfinite": real["nonfinite_count"], "random_cosine_min": rand["cosine_min"],
           "quantized_matmuls": q.get("quantized_matmuls", 0), "int8_mac_fraction": q.get("int8_mac_fraction", 0.0),
           "budget_met": q.get("budget_met"), "ptq_cosine_min_same_placement": q.get("ptq_cosine_min"),
           "training_steps": q.get("training_steps"), "training_seconds": q.get("training_seconds")}
    if sp:
        check = sp.get("variant_check") or {}
        row.update({"sparsity_method": (sp.get("prune") or {}).get("method", "magnitude"),
                    "train_samples": (sp.get("recovery") or {}).get("train_samples"),
                    "train_text": list(settings.data.train_path),
                    "sparse_eligible_gemms": check.get("eligible"), "sparse_ineligible_gemms": check.get("ineligible"),
                    "sparse_mac_fraction": check.get("sparse_mac_fraction"),
                    "sparse_weights_flag": check.get("sparse_weights_flag"),
                    "recover_steps": (sp.get("recovery") or {}).get("steps", 0),
                    "recover_seconds": (sp.get("recovery") or {}).get("seconds", 0.0)})
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--train-samples", type=int, default=DataSettings.train_samples)
    ap.add_argument("--qat-steps", type=int, default=TrainSettings.steps)
    ap.add_argument("--lr", type=float, default=TrainSettings.lr)
    ap.add_argument("--train-bf16", action="store_true", help="QAT and recovery under bfloat16 autocast (TrainSettings.bf16)")
    ap.add_argument("--recover-steps", type=int, default=SparsitySettings.recover_steps)
    ap.add_argument("--recover-lr", type=float, default=SparsitySettings.recover_lr)
    ap.add_argument("--recover-schedule", default=SparsitySettings.recover_schedule)
    ap.add_argument("--recover-from", default=None, help="student.safetensors of an earlier 2:4 run to start from")
    ap.add_argument("--sparsity-method", default=SparsitySettings.method)
    ap.add_argument("--mix-text", action="append", default=None, metavar="PATH",
                    help="recovery text of the sparse-mixed rows, repeatable (default: SST-2 train + WikiText-2 test)")
    ap.add_argument("--only", nargs="*", default=None, help="row names to run")
    ap.add_argument("--engines", default="engines")
    add_out_argument(ap)
    return ap.parse_args(argv)


def rows_on_disk(path: Path) -> dict[str, dict[str, Any]]:
    """{row name: row} of an earlier `int8_minilm.json`, or {} when there is none."""
    return {r["row"]: r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}


def print_table(results: list[dict[str, Any]]) -> None:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = []
    for r in results:
        steps = r.get("training_steps") or r.get("recover_steps")
        secs = r.get("training_seconds") or r.get("recover_seconds")
        lines.append([r["row"], fmt(r["cosine_min"], ".5f"), fmt(r["cosine_mean"], ".5f"), fmt(r["max_abs_err"], ".4f"),
                      r["nonfinite"], r["quantized_matmuls"], fmt(r["int8_mac_fraction"], ".3f"),
                      fmt(r.get("sparse_eligible_gemms"), "d"), fmt(r.get("sparse_mac_fraction"), ".3f"),
                      f"{steps} / {secs}" if steps else "-"])
    print("\n" + markdown_table(["row", "cosine min", "cosine mean", "max abs err", "nonfinite", "INT8 MatMuls",
                                 "INT8 MAC share", "sparse GEMMs", "sparse MAC share", "fine-tune steps / s"], lines))


def merged(results: list[dict[str, Any]], on_disk: dict[str, dict[str, Any]], only: list[str] | None) -> list[dict]:
    """This run's rows, with the rows it did not run taken from what is on disk now (another
    run may have written them meanwhile), and the rows only on disk appended."""
    ran = {r["row"] for r in results if not only or r["row"] in only}
    results = [r if r["row"] in ran else on_disk.get(r["row"], r) for r in results]
    return results + [r for name, r in on_disk.items() if name not in {x["row"] for x in results}]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in TRAINING_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    out_json = args.out / "int8_minilm.json"
    previous = rows_on_disk(out_json)
    results = []
    for name, settings in rows(args).items():
        if args.only and name not in args.only:
            if name in previous:
                results.append(previous[name])
            continue
        start = time.perf_counter()
        state = run_pipeline(settings, until="verify")
        results.append(summarize(name, state, time.perf_counter() - start, settings))
        print(f"  {name}: cosine_min {results[-1]['cosine_min']:.5f} ({results[-1]['seconds']} s)", flush=True)
    print_table(results)
    results = merged(results, rows_on_disk(out_json), args.only)
    write_result(args.out, "int8_minilm", {"settings": vars(args) | {"out": str(args.out)}, "rows": results})


if __name__ == "__main__":
    main()
