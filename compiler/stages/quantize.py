"""The quantize stage (PRECISION=int8 / int8-qat): an FP32 + INT8 Q/DQ graph, by PTQ within an
accuracy budget or by quantization-aware training.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from calibration.layout import TokenSets
from compiler.artifacts import cached, write_json
from compiler.graph.onnx_io import onnx_sha256, save_onnx
from compiler.quant.budget import quantize_within_budget
from compiler.results import ExportResult, QuantizeResult, SparsityResult
from compiler.settings import INT8_MODES, BuildSettings, settings_hash
from compiler.stages.export import export_opset
from compiler.training.prune import hold_masks


def stage_quantize(settings: BuildSettings, export: ExportResult, sparsity: SparsityResult | None,
                   tokens: TokenSets) -> QuantizeResult | None:
    """PRECISION=int8 (PTQ) or int8-qat: an FP32 + INT8 Q/DQ graph (reused when unchanged).

    Raises:
        compiler.errors.CompilerError: calibration or QAT failed (see `compiler.quant.budget`,
            `compiler.training.qat`).
    """
    mode = settings.precision.mode
    if mode not in INT8_MODES:
        return None

    fp32_onnx = sparsity.onnx if sparsity else export.onnx
    out, report_path = settings.variant_dir() / "model.qdq.onnx", settings.variant_dir() / "quant_report.json"
    base_sha = onnx_sha256(fp32_onnx)
    ref_sha = base_sha if fp32_onnx == export.onnx else onnx_sha256(export.onnx)
    version = "quantize-v2" if mode == "int8-qat" else "quantize-v1"  # v2: QAT may fall back to PTQ
    key = settings_hash(version, base_sha, ref_sha,
                        mode, settings.quant, settings.data, settings.train if mode == "int8-qat" else None)

    def compute() -> None:
        model, quant = _quantize(settings, export, sparsity, tokens, fp32_onnx)
        save_onnx(model, out, external=True)
        write_json(report_path, quant)

    cached(key, [out, report_path], compute, "quantize")
    quant = json.loads(report_path.read_text())
    return QuantizeResult(out, quant.get("summary", quant))


def _quantize(settings: BuildSettings, export: ExportResult, sparsity: SparsityResult | None,
              tokens: TokenSets, fp32_onnx: Path) -> tuple[Any, dict[str, Any]]:
    float_precision = replace(settings.precision, mode=settings.quant.float_mode)
    if settings.precision.mode == "int8":

        data = settings.data
        model, rep = quantize_within_budget(fp32_onnx, tokens.calibration, tokens.heldout,
                                            export.loaded.input_names, export.output_names, settings.quant,
                                            data.cache_dir, data.batch_size, precision=float_precision)
        summary = {**rep.summary(), "budget_min_cosine": settings.quant.min_cosine, "budget_met": rep.budget["met"],
                   "float_mode": float_precision.mode, "smoothquant_alpha": rep.smoothquant_alpha}
        return model, {"summary": summary, "ptq": rep.to_dict()}
    from compiler.training.qat import QatInputs, int8_qat

    loaded = export.loaded
    student = sparsity.student if sparsity and sparsity.student is not None else copy.deepcopy(loaded.module)
    inputs = QatInputs(student=student, teacher=loaded.module, loaded=loaded, fp32_path=fp32_onnx,
                       reference_path=export.onnx, calib=tokens.calibration, heldout=tokens.heldout,
                       train=tokens.training, output_names=export.output_names, texts=export.heldout_texts,
                       after_step=hold_masks(sparsity.masks, student) if sparsity else None)
    return int8_qat(inputs, settings, replace(settings.export, opset=export_opset(settings)),
                    settings.variant_dir() / "model.qat.fp32.onnx")
