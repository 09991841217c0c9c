"""The build stage: the TensorRT engine and its manifest.
"""

from __future__ import annotations

from typing import Any

from compiler.build.engine import engine_from_onnx
from compiler.results import BuildResult, PrecisionResult
from compiler.settings import BuildSettings


def stage_build(settings: BuildSettings, precision: PrecisionResult, report: dict[str, Any]) -> BuildResult:
    """Build the TensorRT engine (stops with exit status 2 where TensorRT or a GPU is missing)."""
    plan, manifest = engine_from_onnx(precision.onnx, settings, report)
    return BuildResult(plan, manifest)
