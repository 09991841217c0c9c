"""The GPU tier's skip: one reason string for every `gpu`-marked module (TensorRT and a GPU)."""

from __future__ import annotations

import pytest

from compiler.build.device import GpuInfo, find_gpu
from compiler.build.engine import tensorrt_problem


def gpu_skip_reason() -> str | None:
    """Why the GPU tier cannot run here (TensorRT's import problem, no usable GPU), or None."""
    gpu = find_gpu()
    problems = [tensorrt_problem(), None if isinstance(gpu, GpuInfo) else f"no usable GPU: {gpu}"]
    return "; ".join(p for p in problems if p) or None


def gpu_marks() -> list:
    """`pytestmark` for a module of GPU tests: the `gpu` marker, skipped with the reason."""
    reason = gpu_skip_reason()
    return [pytest.mark.gpu, pytest.mark.skipif(reason is not None, reason=reason or "")]
