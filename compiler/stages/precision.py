"""The precision stage: the FP32 (+ Q/DQ, + pruned vocabulary) graph into a strongly typed one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

from calibration.layout import TokenSets
from compiler.artifacts import cached, write_json
from compiler.graph.onnx_io import load_onnx, onnx_sha256, save_onnx
from compiler.passes.auto_precision import auto_precision
from compiler.passes.kv_cache import fp16_cache_io
from compiler.passes.precision import convert_precision
from compiler.results import ExportResult, PrecisionResult
from compiler.settings import BuildSettings, settings_hash


PASS_MODULES = ("compiler.passes.precision", "compiler.passes.precision_rules", "compiler.passes.auto_precision",
                 "compiler.passes.kv_cache")


@functools.lru_cache(maxsize=None)
def pass_digest() -> str:
    """sha256 (16 hex digits) of the precision pass's source (`PASS_MODULES`): part of a variant's
    content key, so a variant written by other rules (an older or newer toolchain in the same
    output folder) is made again, not reused. A rule added without it was reused silently."""
    digest = hashlib.sha256()
    for name in PASS_MODULES:
        digest.update(Path(sys.modules[name].__file__).read_bytes())
    return digest.hexdigest()[:16]


def stage_precision(settings: BuildSettings, export: ExportResult, source: Path, has_qdq: bool,
                    tokens: TokenSets) -> PrecisionResult:
    """Rewrite the FP32 graph (with INT8 Q/DQ, with a pruned vocabulary, as the earlier stages
    left it) into the requested precision; reused when unchanged.

    Raises:
        compiler.errors.PrecisionError: the graph cannot be typed (see `compiler.passes.precision`).
    """
    out, report_path = settings.variant_dir() / "model.onnx", settings.variant_dir() / "precision_report.json"
    graph_sha = onnx_sha256(source)
    prec = settings.precision
    if has_qdq:  # INT8: what is not quantized runs in quant.float_mode
        prec = replace(prec, mode=settings.quant.float_mode)
    auto = prec.mode == "auto"

    def compute() -> None:
        if auto:
            data, loaded = settings.data, export.loaded
            # auto takes the path: it reads the weights through ONNX Runtime where it can.
            model, report = auto_precision(source, prec, tokens.calibration, tokens.heldout, loaded.input_names,
                                           export.output_names, data.batch_size, loaded.vocab_size,
                                           graph_sha, data.cache_dir, settings.model.seed)
        else:
            model, report = convert_precision(load_onnx(source, check=False), prec)
        report = report.to_dict()
        if export.loaded.cache is not None and prec.mode != "fp32":  # the KV cache stays FP16 across steps
            model, report["kv_cache"] = fp16_cache_io(model)
        save_onnx(model, out)
        write_json(report_path, report)

    kv = ("kv-cache-fp16-v1",) if export.loaded.cache is not None and prec.mode != "fp32" else ()
    cached(settings_hash("precision-v2", graph_sha, prec, settings.data if auto else None, pass_digest(), *kv),
           [out, report_path], compute, "precision")
    return PrecisionResult(out, onnx_sha256(out), json.loads(report_path.read_text()))
