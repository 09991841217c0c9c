"""Command-line interface: `python -m compiler <stage> ...`; the Makefile calls it.

Subcommands:
    export      PyTorch -> FP32 ONNX, parity-checked.
    precision   FP32 ONNX -> strongly typed FP32/FP16 ONNX (any ONNX file, or the pipeline's).
    verify      export + precision + fidelity on real text and random ids (report.json).
    build       TensorRT engine from a TensorRT-ready ONNX file.
    compile     the whole pipeline; --no-build stops after verify (what `make onnx` runs).

Errors the tool can explain print one message and exit 1 (2 where TensorRT or a GPU is
missing: the TensorRT-ready ONNX and report are written first).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from compiler.errors import CompilerError
from compiler.settings import (LR_SCHEDULES, PRECISION_MODES, QUANT_METHODS, SPARSITY_METHODS, WEIGHT_MODES,
                               BuildSettings, DataSettings,
                               EngineSettings, ExportSettings, ModelSettings, PrecisionSettings, ProfileSettings,
                               QuantSettings, SparsitySettings, TrainSettings)

log = logging.getLogger("compiler")


def _shape(text: str) -> tuple[int, int]:
    try:
        b, s = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BATCHxSEQUENCE, e.g. 1x128") from None
    return b, s


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm",
                   help="bert-base, bert-large, gpt2, minilm, a Hugging Face id or a local directory")
    p.add_argument("--weights", choices=WEIGHT_MODES, default="pretrained",
                   help="random: the published architecture with seeded random weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code")
    p.add_argument("--opset", type=int, default=ExportSettings.opset)
    p.add_argument("--parity-atol", type=float, default=ExportSettings.parity_atol)
    p.add_argument("--calib", default=None,
                   help="text file (one sample a line), TSV/CSV with a header, or a HF dataset name; "
                        "default ../shared/data/wikitext-2/test.txt")
    p.add_argument("--text-column", default=None)
    p.add_argument("--samples", type=int, default=DataSettings.samples,
                   help="held-out samples for verification and the auto budget")
    p.add_argument("--calib-samples", type=int, default=DataSettings.calib_samples,
                   help="calibration samples (activation statistics for --precision auto)")
    p.add_argument("--max-length", type=int, default=DataSettings.max_length)
    p.add_argument("--batch-size", type=int, default=DataSettings.batch_size)
    p.add_argument("--output-dir", default="engines")


def _add_precision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=PRECISION_MODES, default="hybrid")
    p.add_argument("--min-cosine", type=float, default=None,
                   help="auto: cosine similarity budget on held-out real text")
    p.add_argument("--max-nonfinite", type=int, default=PrecisionSettings.max_nonfinite,
                   help="auto: NaN/Inf values allowed on held-out real text")
    p.add_argument("--overflow-margin", type=float, default=PrecisionSettings.overflow_margin,
                   help="auto: pin a node when absmax x margin >= 65504")


def _add_option_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("INT8 (--precision int8 / int8-qat) and 2:4 sparsity")
    g.add_argument("--quant-method", choices=QUANT_METHODS, default=QuantSettings.method,
                   help="activation calibration (ONNX Runtime's calibrators)")
    g.add_argument("--smoothquant-alpha", type=_alpha, default=QuantSettings.smoothquant_alpha,
                   help="SmoothQuant strength, or 'off' (default %(default)s)")
    g.add_argument("--quantize-attention-bmm", action="store_true",
                   help="also quantize the Q.K^T and probs.V batched matmuls")
    g.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="fnmatch pattern on node names kept float (repeatable)")
    g.add_argument("--max-excluded", type=int, default=QuantSettings.max_excluded,
                   help="MatMuls the INT8 budget loop may leave float")
    g.add_argument("--float-mode", choices=("fp32", "fp16", "hybrid"), default=QuantSettings.float_mode,
                   help="precision of what INT8 does not cover")
    g.add_argument("--train-samples", type=int, default=DataSettings.train_samples,
                   help="fine-tuning samples, at most (after the calibration and held-out ones, or from --train-text)")
    g.add_argument("--train-text", action="append", default=None, metavar="PATH",
                   help="text/TSV file for fine-tuning (default: the rest of --calib's text); repeat it to mix "
                        "texts, e.g. the deployment text and the calibration text (read after its held-out lines)")
    g.add_argument("--train-steps", type=int, default=TrainSettings.steps, help="QAT distillation steps")
    g.add_argument("--lr", type=float, default=TrainSettings.lr, help="fine-tuning learning rate")
    g.add_argument("--train-bf16", action="store_true",
                   help="QAT and 2:4 recovery under bfloat16 autocast (FP32 master weights): recovery ~1.4x faster "
                        "on CPUs with AVX512-BF16/AMX and on Ampere+ GPUs; no gain for QAT")
    g.add_argument("--train-device", default=TrainSettings.device, metavar="DEVICE",
                   help="where QAT and 2:4 recovery train: cpu, cuda, cuda:N, or auto (a GPU when PyTorch sees one)")
    g.add_argument("--sparsity", choices=("2:4",), default=None, help="2:4 structured sparsity of block linears")
    g.add_argument("--sparsity-method", choices=SPARSITY_METHODS, default=SparsitySettings.method,
                   help="which 2 of every 4 weights stay: magnitude |w|, or wanda |w| x input norm")
    g.add_argument("--sparse-layers", action="append", default=[], metavar="PATTERN",
                   help="fnmatch pattern on module names to prune (default: every block linear)")
    g.add_argument("--recover-steps", type=int, default=SparsitySettings.recover_steps,
                   help="distillation steps after pruning, masks held (0: none)")
    g.add_argument("--recover-lr", type=float, default=SparsitySettings.recover_lr,
                   help="peak learning rate of the recovery")
    g.add_argument("--recover-from", default=None, metavar="SAFETENSORS",
                   help="start the 2:4 recovery from the student.safetensors of an earlier 2:4 run (its zeros are the masks)")
    g.add_argument("--recover-schedule", choices=LR_SCHEDULES, default=SparsitySettings.recover_schedule,
                   help="learning-rate schedule of the recovery")


def _alpha(text: str) -> float | None:
    if text.lower() in ("off", "none", "0"):
        return None
    return float(text)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-shape", type=_shape, default=ProfileSettings.min_shape, help="BxS, default 1x1")
    p.add_argument("--opt-shape", type=_shape, default=ProfileSettings.opt_shape, help="BxS, default 1x128")
    p.add_argument("--max-shape", type=_shape, default=ProfileSettings.max_shape, help="BxS, default 32x512")
    p.add_argument("--workspace-mib", type=int, default=EngineSettings.workspace_mib)
    p.add_argument("--optimization-level", type=int, default=EngineSettings.optimization_level)
    p.add_argument("--sparse-weights", action="store_true",
                   help="force BuilderFlag.SPARSE_WEIGHTS (default: set exactly when the graph has 2:4 weights)")


def settings_from_args(args: argparse.Namespace) -> BuildSettings:
    """One BuildSettings from parsed arguments (defaults live in the dataclasses)."""
    get = lambda name, default: getattr(args, name, default)  # noqa: E731  (subcommands differ)
    try:
        return BuildSettings(
            model=ModelSettings(name=get("model", "minilm"), weights=get("weights", "pretrained"),
                                seed=get("seed", 0), trust_remote_code=get("trust_remote_code", False)),
            export=ExportSettings(opset=get("opset", ExportSettings.opset),
                                  parity_atol=get("parity_atol", ExportSettings.parity_atol)),
            precision=PrecisionSettings(mode=get("precision", "hybrid"),
                                        min_cosine=_or(get("min_cosine", None), PrecisionSettings.min_cosine),
                                        max_nonfinite=get("max_nonfinite", PrecisionSettings.max_nonfinite),
                                        overflow_margin=get("overflow_margin", PrecisionSettings.overflow_margin)),
            data=DataSettings(path=get("calib", None), text_column=get("text_column", None),
                              samples=get("samples", DataSettings.samples),
                              calib_samples=get("calib_samples", DataSettings.calib_samples),
                              train_samples=get("train_samples", DataSettings.train_samples),
                              train_path=get("train_text", None) or (),
                              max_length=get("max_length", DataSettings.max_length),
                              batch_size=get("batch_size", DataSettings.batch_size)),
            quant=QuantSettings(method=get("quant_method", QuantSettings.method),
                                smoothquant_alpha=get("smoothquant_alpha", QuantSettings.smoothquant_alpha),
                                quantize_attention_bmm=get("quantize_attention_bmm", False),
                                exclude=tuple(get("exclude", [])),
                                min_cosine=_or(get("min_cosine", None), QuantSettings.min_cosine),
                                max_excluded=get("max_excluded", QuantSettings.max_excluded),
                                float_mode=get("float_mode", QuantSettings.float_mode)),
            train=TrainSettings(steps=get("train_steps", TrainSettings.steps), lr=get("lr", TrainSettings.lr),
                                bf16=get("train_bf16", TrainSettings.bf16),
                                device=get("train_device", TrainSettings.device)),
            sparsity=SparsitySettings(pattern=get("sparsity", None),
                                      method=get("sparsity_method", SparsitySettings.method),
                                      layers=tuple(get("sparse_layers", [])),
                                      recover_steps=get("recover_steps", SparsitySettings.recover_steps),
                                      recover_lr=get("recover_lr", SparsitySettings.recover_lr),
                                      recover_schedule=get("recover_schedule", SparsitySettings.recover_schedule),
                                      recover_from=get("recover_from", None)),
            engine=EngineSettings(
                profiles=(ProfileSettings(get("min_shape", ProfileSettings.min_shape),
                                          get("opt_shape", ProfileSettings.opt_shape),
                                          get("max_shape", ProfileSettings.max_shape)),),
                workspace_mib=get("workspace_mib", EngineSettings.workspace_mib),
                optimization_level=get("optimization_level", EngineSettings.optimization_level),
                sparse_weights=True if get("sparse_weights", False) else None),
            output_dir=get("output_dir", "engines"),
        )
    except ValueError as e:
        raise CompilerError(f"invalid settings: {e}") from e


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compiler",
                                     description="Compile a PyTorch transformer into a TensorRT engine.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="PyTorch -> FP32 ONNX with dynamic batch/sequence, parity-checked")
    _add_model_args(p)

    p = sub.add_parser("precision", help="ONNX -> strongly typed FP32/FP16 ONNX")
    p.add_argument("--onnx", type=Path, required=True, help="FP32 ONNX file")
    p.add_argument("--out", type=Path, default=None, help="default: <onnx stem>.<precision>.onnx beside it")
    _add_precision_args(p)

    p = sub.add_parser("verify", help="export + precision + fidelity on real text and random ids")
    _add_model_args(p)
    _add_precision_args(p)
    _add_option_args(p)

    p = sub.add_parser("build", help="TensorRT engine from a TensorRT-ready ONNX file")
    p.add_argument("--onnx", type=Path, required=True)
    p.add_argument("--model", default="unknown", help="model name for the manifest")
    _add_precision_args(p)
    _add_engine_args(p)
    p.add_argument("--output-dir", default="engines")

    p = sub.add_parser("compile", help="the whole pipeline: export, precision, verify, build")
    _add_model_args(p)
    _add_precision_args(p)
    _add_option_args(p)
    _add_engine_args(p)
    p.add_argument("--no-build", action="store_true", help="stop after verify (exit 0)")
    return parser


def format_table(report: dict[str, Any]) -> str:
    """The short table printed after verify: precision and fidelity per input set."""
    prec, fid = report.get("precision", {}), report.get("fidelity", {})
    nodes = prec.get("nodes", {})
    lines = [f"model {report.get('model', {}).get('name')} ({report.get('model', {}).get('weights')}), "
             f"variant {report.get('variant')}: nodes fp32={nodes.get('fp32')} fp16={nodes.get('fp16')}, "
             f"casts inserted={prec.get('casts_inserted')}, "
             f"matmul_fp16_fraction={prec.get('matmul_fp16_fraction', 0):.4f}",
             f"reference: {fid.get('reference')}",
             f"{'inputs':<8} {'samples':>7} {'cosine_min':>12} {'cosine_mean':>12} {'max_abs_err':>12} {'nonfinite':>10}"]
    search = prec.get("search") or {}
    if search:
        b = search["budget"]
        lines.insert(1, f"auto: budget cosine_min >= {b['min_cosine']} and nonfinite <= {b['max_nonfinite']} on "
                        f"{b['heldout_samples']} held-out samples: {'met' if b['met'] else 'NOT MET'} after "
                        f"{search['evaluations']} evaluations; overflow pins real/random: "
                        f"{search['overflow_pins']['real']}/{search['overflow_pins']['random']}")
    q = report.get("quantization")
    if q:
        lines.insert(1, f"INT8 {q.get('method')}: {q.get('quantized_matmuls')} MatMuls quantized, "
                        f"{100 * q.get('int8_mac_fraction', 0):.1f} % of MatMul MACs in INT8, excluded "
                        f"{len(q.get('excluded', []))}, budget cosine_min >= {q.get('budget_min_cosine')}: "
                        f"{'met' if q.get('budget_met') else 'NOT MET'}; the rest {q.get('float_mode')}")
    sp = report.get("sparsity")
    if sp:
        c = sp.get("variant_check") or {}
        lines.insert(1, f"sparsity {sp.get('pattern')}: {c.get('eligible')} GEMMs 2:4-eligible, "
                        f"{c.get('ineligible')} not, sparse MAC share {c.get('sparse_mac_fraction', 0):.3f}; "
                        f"SPARSE_WEIGHTS {'on' if c.get('sparse_weights_flag') else 'off'}")
    fmt = lambda v: "nan" if v is None else f"{v:.6f}"  # noqa: E731
    for key in ("real", "random"):
        f = fid.get(key)
        if f:
            lines.append(f"{key:<8} {f['samples']:>7} {fmt(f['cosine_min']):>12} {fmt(f['cosine_mean']):>12} "
                         f"{fmt(f['max_abs_err']):>12} {f['nonfinite_count']:>10}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")  # an unreachable hub fails fast
    try:
        return _run(args)
    except CompilerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def _run(args: argparse.Namespace) -> int:
    from compiler import pipeline

    settings = settings_from_args(args)
    if args.command == "precision":
        return _precision_only(args, settings)
    if args.command == "build":
        from compiler.build.engine import engine_from_onnx

        report_path = args.onnx.parent / "report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        plan, _ = engine_from_onnx(args.onnx, settings, report)
        print(f"engine: {plan}")
        return 0
    until = {"export": "export", "verify": "verify", "compile": "build"}[args.command]
    if args.command == "compile" and args.no_build:
        until = "verify"
    if until == "build":
        state = pipeline.run_pipeline(settings, until="verify")
        print(format_table(state.report))
        print(f"TensorRT-ready ONNX: {state.variant_onnx}\nreport: {settings.variant_dir() / 'report.json'}")
        pipeline.stage_build(settings, state)
        print(f"engine: {state.plan}")
        return 0
    state = pipeline.run_pipeline(settings, until=until)
    if until == "export":
        parity = state.report["export"]["parity"]
        worst = max(p["max_abs_diff"] for p in parity)
        print(f"FP32 ONNX: {state.fp32_onnx} (parity: {len(parity)} checks, worst max abs diff {worst:.3g})")
    else:
        print(format_table(state.report))
        print(f"TensorRT-ready ONNX: {state.variant_onnx}\nreport: {settings.variant_dir() / 'report.json'}")
    return 0


def _precision_only(args: argparse.Namespace, settings: BuildSettings) -> int:
    from compiler.artifacts import write_json
    from compiler.graph.onnx_io import load_onnx, save_onnx
    from compiler.passes.precision import convert_precision

    if settings.precision.mode == "auto":
        raise CompilerError("--precision auto measures on real text with the model's tokenizer: run "
                            "`python -m compiler verify --model NAME --precision auto` instead")
    model = load_onnx(args.onnx)
    out = args.out or args.onnx.with_name(f"{args.onnx.stem}.{settings.precision.mode}.onnx")
    converted, report = convert_precision(model, settings.precision)
    save_onnx(converted, out)
    write_json(out.with_suffix(".precision.json"), report.to_dict())
    print(f"{out}: nodes {report.nodes}, casts inserted {report.casts_inserted}, "
          f"matmul_fp16_fraction {report.matmul_fp16_fraction:.4f}")
    return 0
