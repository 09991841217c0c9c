"""The export stage: load the model, check the requested shapes against its position limit,
export FP32 ONNX with dynamic batch and sequence, check parity against PyTorch.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from calibration.layout import heldout_texts
from compiler.artifacts import fix_mmap_threshold, run_in_child, write_json
from compiler.errors import CompilerError
from compiler.results import ExportResult
from compiler.settings import INT8_MODES, BuildSettings
from compiler.training.export import onnx_from_torch
from compiler.training.models import load_model
from compiler.training.models import max_positions
from compiler.training.tasks import check_training


def check_shapes(settings: BuildSettings, limit: int | None, cache: bool = False) -> None:
    """Refuse sequences past the model's position limit before any work: in an optimization
    profile they fail inside TensorRT, as `--max-length` they fail inside ONNX Runtime. With a
    KV cache (`cache`), a decode step's past plus its one new token must fit too.

    Raises:
        CompilerError: a profile shape, `--max-past` or `data.max_length` past `limit`, naming
            the flag to change.
    """
    if limit is None:
        return
    problems = [f"--{k}-shape {s[0]}x{s[1]}: sequence {s[1]} > {limit}; use --{k}-shape {s[0]}x{limit} or less"
                for p in settings.engine.profiles
                for k, s in (("min", p.min_shape), ("opt", p.opt_shape), ("max", p.max_shape)) if s[1] > limit]
    problems += [f"--max-past {p.max_past}: a decode step at that past holds {p.max_past + 1} positions > {limit}; "
                 f"use --max-past {limit - 1} or less" for p in settings.engine.profiles
                 if cache and p.max_past + 1 > limit]
    if settings.data.max_length > limit:
        problems.append(f"--max-length {settings.data.max_length} > {limit}; use --max-length {limit} or less")
    if problems:
        raise CompilerError(f"{settings.model.name} has {limit} positions (its position embeddings); "
                            "these shapes would fail:\n  " + "\n  ".join(problems))


def export_opset(settings: BuildSettings) -> int:
    """The opset of the FP32 export: INT8 Q/DQ with FP16 scales need opset 19."""
    return max(settings.export.opset, 19) if settings.precision.mode in INT8_MODES else settings.export.opset


def fp32_name(settings: BuildSettings) -> str:
    """`model.fp32.onnx`, or `model.fp32.opset<N>.onnx` for an export above opset 17."""
    opset = export_opset(settings)
    return "model.fp32.onnx" if opset == 17 else f"model.fp32.opset{opset}.onnx"


def _export(settings: BuildSettings, in_child: bool = False) -> tuple[Any, list[str], Path, Any]:
    """Load the model and held-out text, export FP32 ONNX, check parity (see `stage_export`)."""
    if in_child:
        # The exporter copies every weight several times (constant folding, serialization); with
        # glibc's adaptive threshold the freed copies stay resident and the next ones stack on them.
        fix_mmap_threshold()
    loaded = load_model(settings.model)
    check_shapes(settings, max_positions(loaded.module.config, loaded.module),  # before any export work
                 cache=getattr(loaded, "cache", None) is not None)
    texts = heldout_texts(settings.data)
    export = replace(settings.export, opset=export_opset(settings))
    path, report = onnx_from_torch(loaded, export, settings.model_dir() / fp32_name(settings), texts)
    if in_child:
        loaded.module = None  # the weights stay in the child; the tokenizer travels back
    return loaded, texts, path, report


def stage_export(settings: BuildSettings) -> ExportResult:
    """Load the model and real text, export FP32 ONNX and check parity against PyTorch.

    Unless a later stage needs the PyTorch module (2:4 sparsity, QAT), this runs in a child
    process: PyTorch, the weights and the exporter's allocations (1.9 GB resident after the
    BERT-large export even with the module freed) leave with it, and the later stages' peak
    does not stack on them.

    Raises:
        compiler.errors.ExportParityError: an output differs from PyTorch beyond `parity_atol`.
        compiler.errors.UnknownModelError, DataError: from loading the model or the text.
    """
    check_training(settings)  # a tied LM head cannot lose vocabulary
    keep_module = settings.sparsity.pattern is not None or settings.precision.mode == "int8-qat"
    if keep_module:
        loaded, texts, path, report = _export(settings)
    else:
        loaded, texts, path, report = run_in_child(_export, settings, True, what="export")
    report_json = settings.model_dir() / fp32_name(settings).replace("model.fp32", "export_report").replace(".onnx", ".json")
    if not report.reused or not report_json.is_file():  # a reused export keeps the report of the run that made it
        write_json(report_json, report.to_dict())
    section = {
        "model": {"name": settings.model.name, "weights": settings.model.weights, "source": loaded.source,
                  "family": loaded.family, "tokenizer_note": loaded.tokenizer_note},
        "export": {"onnx": str(path), "opset": report.opset, "nodes": report.nodes, "reused": report.reused,
                   "parity_atol": report.parity_atol, "parity": [vars(p) for p in report.parity]},
    }
    return ExportResult(loaded, path, report.outputs, texts, section)
