"""Command-line interface: `python -m compiler <stage> ...`; the Makefile calls it.

Subcommands:
    export      PyTorch -> FP32 ONNX, parity-checked.
    precision   FP32 ONNX -> strongly typed FP32/FP16 ONNX (any ONNX file, or the pipeline's).
    verify      export + precision + fidelity on real text and random ids (report.json).
    build       TensorRT engine from a TensorRT-ready ONNX file.
    compile     the whole pipeline; --no-build stops after verify (what `make onnx` runs).
    bundle      the pipeline up to verify, then a Triton model repository (docs/deploy.md);
                `build --bundle DIR` builds its plan on the GPU host.
    run         a bundle on TensorRT or ONNX Runtime, after its checks (exit 4 when refused).

Errors the tool can explain print one message and exit 1 (2 where TensorRT or a GPU is
missing: the TensorRT-ready ONNX and report are written first); the exit statuses are listed in
`compiler.errors`.
"""

from __future__ import annotations

import argparse
import json
import logging
import dataclasses
import os
import shlex
import sys
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from compiler.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, CompilerError
from compiler.settings import (FLOAT_MODES, INT8_MODES, LR_SCHEDULES, PRECISION_MODES, QUANT_METHODS, SPARSITY_METHODS, TASKS, WEIGHT_MODES,
                               BuildSettings, DataSettings, EngineSettings, ExportSettings, ModelSettings,
                               PrecisionSettings, ProfileSettings, QuantSettings, SparsitySettings, TrainSettings,
                               VocabSettings)
from compiler.settings.engine import HARDWARE_COMPAT_LEVELS

log = logging.getLogger("compiler")


def _shape(text: str) -> tuple[int, int]:
    try:
        b, s = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BATCHxSEQUENCE, e.g. 1x128") from None
    return b, s


def _profile(text: str) -> ProfileSettings:
    try:
        shapes = [_shape(part) for part in text.split(":")]
        if len(shapes) != 3:
            raise argparse.ArgumentTypeError("")
        return ProfileSettings(*shapes)
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MIN:OPT:MAX shapes BxS, e.g. 1x1:16x128:32x512"
                                         f"{f' ({e})' if isinstance(e, ValueError) else ''}") from None


def _rows(text: str) -> int | None:
    """`all` -> None, else a positive int."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer or 'all'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer or 'all'")
    return value


def _alpha(text: str) -> float | None:
    if text.lower() in ("off", "none", "0"):
        return None
    return float(text)


# The settings section each option fills. Defaults live in the dataclasses only: an option not
# given is not in the namespace (argparse.SUPPRESS), so the field keeps its default.
SECTIONS = {"model": ModelSettings, "export": ExportSettings, "precision": PrecisionSettings,
            "data": DataSettings, "quant": QuantSettings, "train": TrainSettings,
            "sparsity": SparsitySettings, "vocab": VocabSettings, "profile": ProfileSettings,
            "engine": EngineSettings,
            "build": BuildSettings}

# (flag, targets "section.field" (several for one flag), argparse keywords)
MODEL_OPTIONS = [
    ("--model", "model.name", {"help": "bert-base, bert-large, gpt2, minilm, a Hugging Face id or a local directory"}),
    ("--weights", "model.weights", {"choices": WEIGHT_MODES,
                                    "help": "random: the published architecture with seeded random weights"}),
    ("--seed", "model.seed", {"type": int}),
    ("--trust-remote-code", "model.trust_remote_code", {"action": "store_true", "help": "allow the checkpoint's own code"}),
    ("--task", "model.task", {"choices": TASKS, "help": "what the graph answers (Optimum's names; docs/tasks.md); "
                                                        "None: the checkpoint's natural task"}),
    ("--opset", "export.opset", {"type": int}),
    ("--parity-atol", "export.parity_atol", {"type": float}),
    ("--calib", "data.path", {"help": "text file (one sample a line), TSV/CSV, JSON Lines (.jsonl), JSON, Parquet "
                                      "(with pyarrow), or a HF dataset name; None: ../shared/data/wikitext-2/test.txt"}),
    ("--text-column", "data.text_column", {"help": "the column or field of the texts; a number: the column of a "
                                                   "TSV/CSV without a header, from 1"}),
    ("--samples", "data.samples", {"type": int, "help": "held-out samples for verification and the budgets"}),
    ("--calib-samples", "data.calib_samples", {"type": int, "help": "calibration samples"}),
    ("--max-length", "data.max_length", {"type": int}),
    ("--min-words", "data.min_words", {"type": int, "help": "text lines with fewer words are skipped"}),
    ("--batch-size", "data.batch_size", {"type": int}),
    ("--profile-max-rows", "data.profile_max_rows", {"type": _rows, "metavar": "N|all",
     "help": "windows verified at the profile's max sequence length (default 8; 'all': the max batch)"}),
    ("--output-dir", "build.output_dir", {}),
]
PRECISION_OPTIONS = [
    ("--precision", "precision.mode", {"choices": PRECISION_MODES}),
    ("--min-cosine", "precision.min_cosine quant.min_cosine",
     {"type": float, "help": "cosine similarity budget on held-out real text (auto; INT8 default 0.99)"}),
    ("--max-nonfinite", "precision.max_nonfinite", {"type": int, "help": "auto: NaN/Inf values allowed"}),
    ("--overflow-margin", "precision.overflow_margin",
     {"type": float, "help": "auto: pin a node when absmax x margin >= 65504"}),
    ("--allow-nonfinite", "precision.allow_nonfinite",
     {"action": "store_true", "help": "keep a variant that gives NaN/Inf on real text where FP32 does not "
                                      "(default: stop after verify, exit 1)"}),
]
OPTION_OPTIONS = [
    ("--quant-method", "quant.method", {"choices": QUANT_METHODS, "help": "activation calibration (ONNX Runtime's)"}),
    ("--smoothquant-alpha", "quant.smoothquant_alpha", {"type": _alpha, "help": "SmoothQuant strength, or 'off'"}),
    ("--quantize-attention-bmm", "quant.quantize_attention_bmm",
     {"action": "store_true", "help": "also quantize the Q.K^T and probs.V batched matmuls"}),
    ("--exclude", "quant.exclude", {"action": "append", "metavar": "PATTERN",
                                    "help": "fnmatch pattern on node names kept float (repeatable)"}),
    ("--max-excluded", "quant.max_excluded", {"type": int, "help": "MatMuls the INT8 budget loop may leave float"}),
    ("--int8-sensitivity", "quant.sensitivity", {"choices": ["local", "end-to-end"],
     "help": "order of the MatMuls the INT8 budget leaves float: local error (one pass) or end-to-end (a pass per node)"}),
    ("--float-mode", "quant.float_mode", {"choices": FLOAT_MODES,
                                          "help": "precision of what INT8 does not cover"}),
    ("--no-qat-fallback", "quant.qat_fallback",
     {"action": "store_false", "help": "int8-qat: ship the fine-tuned graph even when PTQ's is better on held-out text"}),
    ("--train-samples", "data.train_samples", {"type": int, "help": "fine-tuning samples, at most"}),
    ("--train-text", "data.train_path",
     {"action": "append", "metavar": "PATH", "help": "text/TSV file for fine-tuning (default: the rest of --calib's "
                                                     "text); repeat it to mix texts in even shares"}),
    ("--train-windows", "data.train_windows",
     {"action": "store_true", "help": "a fine-tuning line longer than --max-length gives all its windows, "
                                      "not its first alone"}),
    ("--train-batch-size", "train.batch_size", {"type": int, "help": "QAT samples a step"}),
    ("--train-steps", "train.steps", {"type": int, "help": "QAT distillation steps"}),
    ("--lr", "train.lr", {"type": float, "help": "fine-tuning learning rate"}),
    ("--train-bf16", "train.bf16", {"action": "store_true",
                                    "help": "QAT and 2:4 recovery under bfloat16 autocast (FP32 master weights)"}),
    ("--train-device", "train.device", {"metavar": "DEVICE", "help": "auto (default: the first CUDA GPU PyTorch sees, else the CPU), cpu, cuda or cuda:N"}),
    ("--no-split-batches", "train.split_by_length",
     {"action": "store_false", "help": "QAT and 2:4 recovery: one padded forward per batch, not sub-batches of "
                                       "similar length (the same gradient; CPU training devices only)"}),
    ("--sparsity", "sparsity.pattern", {"choices": ("2:4",), "help": "2:4 structured sparsity of block linears"}),
    ("--sparsity-method", "sparsity.method", {"choices": SPARSITY_METHODS,
                                              "help": "which 2 of every 4 weights stay: magnitude, wanda or sparsegpt"}),
    ("--sparse-layers", "sparsity.layers", {"action": "append", "metavar": "PATTERN",
                                            "help": "fnmatch pattern on module names to prune (repeatable)"}),
    ("--recover-steps", "sparsity.recover_steps",
     {"type": int, "help": "distillation steps after pruning (0: none; default: 3000 in FP32, 6000 under BF16 autocast)"}),
    ("--recover-batch-size", "sparsity.recover_batch_size", {"type": int, "help": "samples a recovery step"}),
    ("--recover-lr", "sparsity.recover_lr", {"type": float, "help": "peak learning rate of the recovery"}),
    ("--recover-from", "sparsity.recover_from", {"metavar": "SAFETENSORS",
                                                 "help": "student.safetensors of an earlier 2:4 run to recover from"}),
    ("--recover-schedule", "sparsity.recover_schedule", {"choices": LR_SCHEDULES}),
    ("--recover-layerwise-weight", "sparsity.recover_layerwise_weight",
     {"type": float, "help": "2:4 recovery: weight of the intermediate block outputs' MSE in the loss"}),
    ("--recover-samples", "sparsity.recover_samples",
     {"type": int, "help": "samples of the default recovery text mix (SST-2 train + WikiText-2; without --train-text)"}),
    ("--recover-embeddings", "sparsity.recover_embeddings",
     {"action": "store_true", "help": "2:4 recovery: train the token-embedding table too (default: held)"}),
    ("--recover-bf16", "sparsity.recover_bf16",
     {"choices": ("auto", "on", "off"), "help": "2:4 recovery under bfloat16 autocast (auto: where BF16 is in hardware)"}),
    ("--prune-vocab", "vocab.texts", {"action": "append", "metavar": "FILE",
                                      "help": "keep only the embedding rows this domain text uses (repeatable)"}),
    ("--vocab-min-count", "vocab.min_count", {"type": int, "help": "keep tokens seen at least this often"}),
    ("--vocab-keep-top", "vocab.keep_top", {"type": int, "help": "also keep the N most frequent general-text tokens"}),
    ("--vocab-tied", "vocab.tied", {"action": "store_true",
                                    "help": "allow pruning an embedding shared with an output head (its logits shrink)"}),
]
ENGINE_OPTIONS = [
    ("--min-shape", "profile.min_shape", {"type": _shape, "help": "BxS"}),
    ("--opt-shape", "profile.opt_shape", {"type": _shape, "help": "BxS"}),
    ("--max-shape", "profile.max_shape", {"type": _shape, "help": "BxS"}),
    ("--max-past", "profile.max_past", {"type": int, "help": "KV-cache graphs: the decode profile's longest past "
                                                            "(0: the --max-shape sequence; docs/tasks.md)"}),
    ("--workspace-mib", "engine.workspace_mib", {"type": int}),
    ("--optimization-level", "engine.optimization_level", {"type": int}),
    ("--sparse-weights", "engine.sparse_weights",
     {"action": "store_true", "help": "force BuilderFlag.SPARSE_WEIGHTS (default: set exactly when the graph has 2:4 weights)"}),
    ("--profile", "engine.profiles", {"type": _profile, "action": "append", "metavar": "MIN:OPT:MAX",
                                      "help": "one optimization profile, e.g. 1x1:1x128:1x128 (repeatable: several "
                                              "profiles; instead of --min/--opt/--max-shape)"}),
    ("--hardware-compat", "engine.hardware_compat",
     {"choices": HARDWARE_COMPAT_LEVELS, "help": "GPUs the plan runs on: the build GPU's architecture, every "
                                                 "compute capability >= 8.0, or the build GPU's compute capability"}),
    ("--version-compatible", "engine.version_compatible",
     {"action": "store_true", "help": "BuilderFlag.VERSION_COMPATIBLE: later TensorRT releases load the plan "
                                      "(it embeds the lean runtime: loading needs --allow-host-code)"}),
    ("--exclude-lean-runtime", "engine.exclude_lean_runtime",
     {"action": "store_true", "help": "BuilderFlag.EXCLUDE_LEAN_RUNTIME (with --version-compatible)"}),
]


def _default(target: str) -> Any:
    section, name = target.split(".")
    f = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _add(p: argparse.ArgumentParser | Any, options: list[tuple[str, str, dict[str, Any]]]) -> None:
    for flag, targets, kw in options:
        kw = dict(kw)
        if kw.get("action") not in ("store_true", "append"):
            kw["help"] = f"{kw.get('help', '')} (default: {_default(targets.split()[0])})".lstrip()
        p.add_argument(flag, default=argparse.SUPPRESS, **kw)


def _value(target: str, value: Any) -> Any:
    if isinstance(value, list):  # repeatable options fill tuples
        return tuple(value)
    if target == "engine.sparse_weights":  # the flag forces it on; absent means "decide from the graph"
        return True if value else None
    return value


def settings_from_args(args: argparse.Namespace) -> BuildSettings:
    """One BuildSettings from parsed arguments: each given option fills its field, every other
    field keeps its dataclass default.

    Raises:
        CompilerError: a value the settings reject (their `__post_init__` checks), with the reason.
    """
    given = vars(args)
    parts: dict[str, dict[str, Any]] = defaultdict(dict)
    for flag, targets, _ in MODEL_OPTIONS + PRECISION_OPTIONS + OPTION_OPTIONS + ENGINE_OPTIONS:
        dest = flag.lstrip("-").replace("-", "_")
        if dest in given:
            for target in targets.split():
                section, name = target.split(".")
                parts[section][name] = _value(target, given[dest])
    try:
        if "profile" in parts and "profiles" in parts.get("engine", {}):
            raise CompilerError("give either --profile (repeatable) or --min-shape/--opt-shape/--max-shape, not both")
        engine_kw = {"profiles": (ProfileSettings.fitted(**parts.pop("profile", {})),), **parts.pop("engine", {})}
        engine = EngineSettings(**engine_kw)
        top = parts.pop("build", {})
        return BuildSettings(**{s: SECTIONS[s](**kw) for s, kw in parts.items()}, engine=engine, **top)
    except ValueError as e:
        raise CompilerError(f"invalid settings: {e}") from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compiler",
                                     description="Compile a PyTorch transformer into a TensorRT engine.")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="DEBUG logs (the settings, each step)")
    loud.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="PyTorch -> FP32 ONNX with dynamic batch/sequence, parity-checked")
    _add(p, MODEL_OPTIONS)

    p = sub.add_parser("precision", help="ONNX -> strongly typed FP32/FP16 ONNX")
    p.add_argument("--onnx", type=Path, required=True, help="FP32 ONNX file")
    p.add_argument("--out", type=Path, default=None, help="default: <onnx stem>.<precision>.onnx beside it")
    _add(p, PRECISION_OPTIONS)

    p = sub.add_parser("verify", help="export + precision + fidelity on real text and random ids")
    _add(p, MODEL_OPTIONS + PRECISION_OPTIONS)
    _add(p.add_argument_group("INT8 (--precision int8 / int8-qat), 2:4 sparsity, vocabulary"), OPTION_OPTIONS)

    p = sub.add_parser("build", help="TensorRT engine from a TensorRT-ready ONNX file, or into a bundle")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--onnx", type=Path)
    source.add_argument("--bundle", type=Path, help="a bundle (`bundle`): build its plan for this GPU into it")
    _add(p, [o for o in MODEL_OPTIONS if o[0] in ("--model", "--output-dir")] + PRECISION_OPTIONS + ENGINE_OPTIONS)

    p = sub.add_parser("compile", help="the whole pipeline: export, precision, verify, build")
    _add(p, MODEL_OPTIONS + PRECISION_OPTIONS)
    _add(p.add_argument_group("INT8 (--precision int8 / int8-qat), 2:4 sparsity, vocabulary"), OPTION_OPTIONS)
    _add(p.add_argument_group("TensorRT engine"), ENGINE_OPTIONS)
    p.add_argument("--no-build", action="store_true", help="stop after verify (exit 0)")

    p = sub.add_parser("bundle", help="a Triton model repository: pipeline up to verify, then the bundle "
                                      "(built here where TensorRT and a GPU are)")
    _add(p, MODEL_OPTIONS + PRECISION_OPTIONS)
    _add(p.add_argument_group("INT8 (--precision int8 / int8-qat), 2:4 sparsity, vocabulary"), OPTION_OPTIONS)
    _add(p.add_argument_group("TensorRT engine"), ENGINE_OPTIONS)
    p.add_argument("--out", type=Path, default=None, help="default: <variant folder>/bundle")
    p.add_argument("--ort-fp32", action="store_true", help="the ONNX Runtime model gets the FP32 graph "
                                                           "(a CPU-only serving host) instead of the verified one")

    from compiler.deploy.commands import add_run_arguments

    add_run_arguments(sub.add_parser("run", help="run a bundle (TensorRT or ONNX Runtime) after its checks"))

    from compiler.deploy.inspect import add_inspect_arguments

    add_inspect_arguments(sub.add_parser("inspect", help="what a plan, an ONNX or a bundle holds and what this "
                                                         "host runs of it (no TensorRT needed)"))

    from compiler.eval.generate import add_generate_arguments

    add_generate_arguments(sub.add_parser("generate", help="greedy generation on an ONNX graph (ONNX Runtime CPU), "
                                                           "with its KV cache when it has one"))

    from compiler.matrix.command import add_matrix_arguments

    add_matrix_arguments(sub.add_parser("matrix", help="models x precisions x GPU targets as Ray tasks "
                                                       "(local by default; docs/matrix.md)"))
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
    task = fid.get("task")
    if task:  # compiler.eval.task_agreement
        metrics = ", ".join(f"{k} {v:.6f}" for k, v in task.items() if isinstance(v, float))
        lines.append(f"task {task['task']} ({task['samples']} real samples): {metrics}")
        g = task.get("generation")
        if g:
            lines.append(f"greedy generation through the KV cache ({g['prompts']} prompts, {g['prompt_tokens']} + "
                         f"{g['new_tokens']} tokens): all agree {g['agree_all']:.3f}, token agreement "
                         f"{g['token_agreement']:.3f}, first divergence {g['first_divergence']}, logits cosine min "
                         f"{fmt(g['logits_cosine_min'])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 1 for a CompilerError, 2 where TensorRT
    or a GPU is missing: see compiler.errors)."""
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["python", "-m", "compiler", *(sys.argv[1:] if argv is None else argv)])
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")  # an unreachable hub fails fast
    try:
        return _run(args)
    except CompilerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C: artifacts are written atomically, nothing half-done stays
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # a bug, not bad input: the traceback helps whoever fixes it
        traceback.print_exc()
        print(f"internal error (a bug in trt-compiler, exit {EXIT_INTERNAL}): please report it with the "
              "traceback above and the command", file=sys.stderr)
        return EXIT_INTERNAL


def _print_variant(run: Any) -> None:
    print(format_table(run.report))
    print(f"TensorRT-ready ONNX: {run.variant_onnx}\nreport: {run.settings.variant_dir() / 'report.json'}")


def _run(args: argparse.Namespace) -> int:
    if args.command == "matrix":
        from compiler.matrix.command import matrix_command

        return matrix_command(args)
    if args.command == "inspect":
        from compiler.deploy.inspect import inspect_command

        return inspect_command(args)
    from compiler import pipeline

    if args.command == "generate":
        from compiler.eval.generate import generate_command

        return generate_command(args)
    settings = settings_from_args(args)
    if args.command in ("export", "verify", "compile", "bundle"):
        from compiler.artifacts import output_folder
        from compiler.training.models import fit_to_positions, resolve_task

        output_folder(settings.output_dir)  # a folder that cannot hold artifacts: exit 1 before any work

        settings = fit_to_positions(settings, set(vars(args)))  # defaults past a small model's positions
        settings = resolve_task(settings)  # None: the checkpoint's natural task; KV-cache profiles
        from compiler.settings.effect import options_without_effect

        for line in options_without_effect(vars(args), settings):  # an option its stage never reads
            log.warning("%s", line)
        if settings.model.task == "sentence-embedding":
            from compiler.training.models import checkpoint_config
            from compiler.training.sentence_modules import library_notes

            longest = max(p.max_shape[1] for p in settings.engine.profiles)
            for note in library_notes(checkpoint_config(settings.model)[0], longest):
                log.warning("%s", note)
    if args.command == "precision":
        return _precision_only(args, settings)
    if args.command == "run":
        from compiler.deploy.commands import run_command

        return run_command(args)
    if args.command == "bundle":
        from compiler.deploy.commands import bundle_command

        return bundle_command(args, settings, _print_variant)
    if args.command == "build" and args.bundle is not None:
        from compiler.deploy.commands import build_bundle_command

        given = {f.lstrip("-").replace("-", "_") for f, _, _ in ENGINE_OPTIONS} & set(vars(args))
        return build_bundle_command(args, settings, bool(given))
    if args.command == "build":
        from compiler.build.engine import engine_from_onnx

        report = _report_of(args.onnx)
        if "model" not in vars(args):  # the manifest names the model the report names
            name = report.get("model", {}).get("name", "unknown")
            settings = dataclasses.replace(settings, model=dataclasses.replace(settings.model, name=name))
        plan, _ = engine_from_onnx(args.onnx, settings, report)
        print(f"engine: {plan}")
        return 0
    until = "build" if args.command == "compile" and not args.no_build else \
        "verify" if args.command in ("compile", "verify") else "export"
    # the table is printed as soon as verify is done: a build that stops (exit 2) still shows it
    run = pipeline.run_pipeline(settings, until=until,
                                after={"verify": _print_variant} if until != "export" else None)
    if until == "export":
        parity = run.report["export"]["parity"]
        worst = max(p["max_abs_diff"] for p in parity)
        print(f"FP32 ONNX: {run.fp32_onnx} (parity: {len(parity)} checks, worst max abs diff {worst:.3g})")
    if run.plan is not None:
        print(f"engine: {run.plan}")
    return 0


def _report_of(onnx_path: Path) -> dict[str, Any]:
    """The report.json beside `onnx_path` when it describes that exact graph (its `onnx_sha256`),
    else {} with a warning: a report from another run never goes into a manifest."""
    from compiler.graph.onnx_io import check_onnx_file, onnx_sha256

    report_path = onnx_path.parent / "report.json"
    if not report_path.is_file():
        return {}
    check_onnx_file(onnx_path)  # a missing or broken ONNX: exit 1 before hashing
    try:
        report = json.loads(report_path.read_text())
    except ValueError:
        report = {}
    if report.get("onnx_sha256") != onnx_sha256(onnx_path):
        log.warning("%s describes another graph than %s (an earlier run's): left out of the manifest; "
                    "run `python -m compiler compile` again to verify this graph", report_path, onnx_path)
        return {}
    return report


def _precision_only(args: argparse.Namespace, settings: BuildSettings) -> int:
    from compiler.artifacts import write_json
    from compiler.graph.onnx_io import load_onnx, save_onnx
    from compiler.passes.precision import convert_precision

    if settings.precision.mode in ("auto", *INT8_MODES):
        raise CompilerError(f"--precision {settings.precision.mode} needs calibration text and the model's "
                            "tokenizer, which `precision` on a bare ONNX file has not: run `python -m compiler "
                            f"compile --no-build --model NAME --precision {settings.precision.mode}` instead")
    model = load_onnx(args.onnx)
    out = args.out or args.onnx.with_name(f"{args.onnx.stem}.{settings.precision.mode}.onnx")
    converted, report = convert_precision(model, settings.precision)
    save_onnx(converted, out)
    write_json(out.with_suffix(".precision.json"), report.to_dict())
    print(f"{out}: nodes {report.nodes}, casts inserted {report.casts_inserted}, "
          f"matmul_fp16_fraction {report.matmul_fp16_fraction:.4f}")
    return 0
