"""The pipeline: the stages in order, each taking its settings and typed inputs, returning a typed result.

    export -> sparsity -> quantize -> vocab -> precision -> verify -> build

`run_pipeline` below is that list, written out; each stage is one module of `compiler/stages/`.
`sparsity` (SPARSITY=2:4), `quantize` (PRECISION=int8 / int8-qat) and `vocab` (`--prune-vocab`)
run only when asked for. Each result (`compiler/results.py`) holds its artifact paths
and its section of `report.json`; the report is assembled from the results (`PipelineRun.report`).
Every reusable artifact goes through `compiler.artifacts.cached` (reused only when its content
key, a hash of input bytes, settings and texts, is unchanged).

Artifacts: the dense FP32 export (the reference of every fidelity figure) is
`engines/<model>/<weights>/model.fp32.onnx` (`model.fp32.opset19.onnx` for INT8, whose Q/DQ
need opset 19) with `export_report.json`. A 2:4 sparse model gets its own FP32 export in
`engines/<model>/<weights>/sparse24/`. Under `settings.variant_dir()` (the base folder plus
the precision): `model.onnx` (TensorRT-ready, strongly typed), `precision_report.json`,
`report.json`, for INT8 `model.qdq.onnx` (FP32 + Q/DQ) and `quant_report.json`, with a pruned
vocabulary `model.vocab.onnx` and `vocab_report.json` (the folder named `<precision>-vocab`), and
`model.plan` with `manifest.json` (build stage).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from calibration.layout import TokenSets
from compiler.artifacts import write_error, write_json
from compiler.errors import EXIT_INTERNAL, EXIT_NO_TENSORRT, CompilerError
from compiler.results import STAGES, BuildResult, ExportResult, PipelineRun
from compiler.settings import INT8_MODES, BuildSettings
from compiler.stages.build import stage_build
from compiler.stages.export import stage_export
from compiler.stages.precision import stage_precision
from compiler.stages.quantize import stage_quantize
from compiler.stages.sparsity import stage_sparsity
from compiler.stages.verify import profile_edge, refuse_low_cosine, refuse_nonfinite, stage_verify
from compiler.stages.vocab import stage_vocab

log = logging.getLogger(__name__)


def run_pipeline(settings: BuildSettings, until: str = "build",
                 after: dict[str, Callable[[PipelineRun], None]] | None = None,
                 export: ExportResult | None = None) -> PipelineRun:
    """Run the stages in order up to and including `until`.

    Args:
        settings: the one settings tree (logged at DEBUG, written into report.json).
        until: the last stage, one of `STAGES`.
        after: {stage name: callback} called with the run as soon as that stage is done (the CLI
            prints the fidelity table after verify, before a build that may stop).
        export: a finished export stage of these settings (model, weights, data, export opset)
            to start from instead of running it (the build matrix's shared stage hands it to
            every precision variant; `loaded.module` is needed only where 2:4 or QAT follow).

    Returns:
        PipelineRun with each stage's result; report.json is written after verify.

    Raises:
        ValueError: `until` is not a stage.
        compiler.errors.CompilerError: from any stage (exit status 1, or 2 where TensorRT or a
            GPU is missing); artifacts of finished stages remain. `VerificationError` (exit 1)
            after verify has written report.json: the variant gives NaN/Inf on real text where
            the FP32 graph gives none (`PrecisionSettings.allow_nonfinite` keeps it).
    """
    if until not in STAGES:
        raise ValueError(f"until={until!r}: expected one of {list(STAGES)}")
    log.debug("settings: %s", settings)
    last = STAGES.index(until)
    runs = lambda stage: STAGES.index(stage) <= last  # noqa: E731
    run = PipelineRun(settings)
    with run.timed("export"):
        run.export = export if export is not None else stage_export(settings)
    tokens = TokenSets(settings.data, run.export.loaded.tokenizer, settings.train.batch_size,
                       heldout=run.export.heldout_texts)
    edge = profile_edge(settings, run.export) if runs("verify") else None  # a short text fails here, not after the work
    if runs("sparsity") and settings.sparsity.pattern is not None:
        with run.timed("sparsity"):
            run.sparsity = stage_sparsity(settings, run.export, tokens)
        if settings.precision.mode != "int8-qat":
            run.export.loaded.module = None  # only QAT needs PyTorch after this
    if runs("quantize") and settings.precision.mode in INT8_MODES:
        with run.timed("quantize"):
            run.quantize = stage_quantize(settings, run.export, run.sparsity, tokens)
    if runs("quantize"):
        run.export.loaded.module = None  # no later stage needs PyTorch
        if run.sparsity:
            run.sparsity.student = None
    if runs("vocab") and settings.vocab.texts:
        with run.timed("vocab"):
            run.vocab = stage_vocab(settings, run.export, run.qdq_onnx or run.fp32_onnx, tokens)
    if runs("precision"):
        with run.timed("precision"):
            source = run.vocab.onnx if run.vocab else run.qdq_onnx or run.fp32_onnx
            run.precision = stage_precision(settings, run.export, source, run.qdq_onnx is not None, tokens)
    if runs("verify"):
        report_path = settings.variant_dir() / "report.json"
        _drop_stale_report(report_path, run.precision.sha256)
        with run.timed("verify"):
            run.verify = stage_verify(settings, run.export, run.precision, tokens, edge)
        write_report(report_path, run.report)
        if after and "verify" in after:
            after["verify"](run)
        # NaN/Inf on real text where FP32 has none: nothing is built or bundled from it
        refuse_nonfinite(run.verify.fidelity["nonfinite_check"], settings.precision.mode, report_path)
        refuse_low_cosine(run.verify.fidelity["cosine_check"], settings.precision.mode, report_path)
    if runs("build"):
        with run.timed("build"):
            run.build = _build_recorded(settings, run)
    return run


def _without_timings(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in ("seconds", "reused", "timings")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write report.json unless the file already says the same (wall times aside): a fully reused
    run needs no write, so it also runs from a read-only output folder.

    Raises:
        compiler.errors.CompilerError: the folder is not writable or the disk is full (the path
            and the fix; `compiler.artifacts.write_json`).
    """
    if path.is_file():
        try:
            if _without_timings(json.loads(path.read_text())) == _without_timings(json.loads(json.dumps(
                    report, default=str))):
                return
        except ValueError:  # unreadable: write it anew
            pass
    write_json(path, report)


def _drop_stale_report(path: Path, onnx_sha256: str) -> None:
    """Remove a report.json that describes another graph than the one now beside it (from an
    earlier run), so a failing verify never leaves it there to be copied into a manifest."""
    try:
        stale = path.is_file() and json.loads(path.read_text()).get("onnx_sha256") != onnx_sha256
    except ValueError:
        stale = True
    if stale:
        try:
            path.unlink()
        except OSError as e:
            raise write_error(path, e) or e


def _build_recorded(settings: BuildSettings, run: PipelineRun) -> BuildResult:
    """`stage_build`, its outcome recorded in report.json's `build` section (status and exit
    code), so a script behind `make` (which exits 2 on any failure) can tell them apart."""
    run.build_status = {"status": "failed", "exit_code": EXIT_INTERNAL}
    try:
        result = stage_build(settings, run.precision, run.report)
        run.build_status = {"status": "built", "exit_code": 0, "plan": str(result.plan)}
        return result
    except CompilerError as e:
        run.build_status = {"status": "no-tensorrt" if e.exit_code == EXIT_NO_TENSORRT else "failed",
                            "exit_code": e.exit_code, "message": str(e).splitlines()[0]}
        raise
    finally:
        write_report(settings.variant_dir() / "report.json", run.report)
