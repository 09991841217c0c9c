"""Typed stage results: what each pipeline stage returns, and the run that holds them.

Each result holds its artifact paths and its section of `report.json`; `PipelineRun.report`
assembles the report from them (no stage writes into a shared dict).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from compiler.artifacts import release_freed_memory
from compiler.settings import BuildSettings

if TYPE_CHECKING:  # annotations only: importing them here would load torch
    import torch

    from compiler.training.models import LoadedModel

log = logging.getLogger("compiler.pipeline")

STAGES = ("export", "sparsity", "quantize", "vocab", "precision", "verify", "build")


@dataclass
class ExportResult:
    """The dense FP32 export: every fidelity figure's reference.

    Attributes:
        loaded: `compiler.training.models.LoadedModel` (tokenizer, input names; `module` is None
            when the export ran in a child process and no later stage needs PyTorch).
        onnx: the FP32 ONNX file, inputs (batch, sequence) int64, outputs FP32.
        output_names: graph outputs, the first the headline of every fidelity figure.
        heldout_texts: held-out real text (read once, here).
        report: the `model` and `export` sections of report.json.
    """

    loaded: LoadedModel
    onnx: Path
    output_names: list[str]
    heldout_texts: list[str]
    report: dict[str, Any]


@dataclass
class SparsityResult:
    """SPARSITY=2:4: the pruned, recovered model and its FP32 export.

    Attributes:
        onnx: the sparse FP32 ONNX file (the graph the variant derives from).
        student: the pruned PyTorch module (kept only for INT8 QAT, else None).
        masks: {module name: bool mask} held during QAT.
        report: the `sparsity` section.
    """

    onnx: Path
    student: torch.nn.Module | None
    masks: dict[str, torch.Tensor]
    report: dict[str, Any]


@dataclass
class QuantizeResult:
    """PRECISION=int8 / int8-qat: the FP32 + INT8 Q/DQ graph, before the precision pass."""

    qdq_onnx: Path
    report: dict[str, Any]  # the `quantization` section (the summary)


@dataclass
class VocabResult:
    """`--prune-vocab`: the graph with the smaller embedding table and the id remap in front of it."""

    onnx: Path
    report: dict[str, Any]  # the `vocabulary` section


@dataclass
class PrecisionResult:
    """The TensorRT-ready, strongly typed graph."""

    onnx: Path
    sha256: str  # of the ONNX and its external data: ties report.json to this exact graph
    report: dict[str, Any]  # the `precision` section


@dataclass
class VerifyResult:
    """Fidelity against the dense FP32 graph on real text and random ids."""

    fidelity: dict[str, Any]  # the `fidelity` section
    variant_check: dict[str, Any] | None  # 2:4 check of the variant (sparse runs only)


@dataclass
class BuildResult:
    plan: Path
    manifest: dict[str, Any]


@dataclass
class PipelineRun:
    """What `run_pipeline` returns: each stage's result (None when not run or not asked for),
    the wall time (s) and process peak RSS (MiB) after each stage."""

    settings: BuildSettings
    export: ExportResult | None = None
    sparsity: SparsityResult | None = None
    quantize: QuantizeResult | None = None
    vocab: VocabResult | None = None
    precision: PrecisionResult | None = None
    verify: VerifyResult | None = None
    build: BuildResult | None = None
    build_status: dict[str, Any] | None = None  # the last build attempt: status, exit code
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, int] = field(default_factory=dict)

    @property
    def loaded(self) -> LoadedModel | None:
        return self.export.loaded if self.export else None

    @property
    def output_names(self) -> list[str]:
        return self.export.output_names if self.export else []

    @property
    def reference_onnx(self) -> Path | None:
        """The dense FP32 export."""
        return self.export.onnx if self.export else None

    @property
    def fp32_onnx(self) -> Path | None:
        """The FP32 graph the variant derives from (dense, or the 2:4 sparse export)."""
        return self.sparsity.onnx if self.sparsity else self.reference_onnx

    @property
    def qdq_onnx(self) -> Path | None:
        return self.quantize.qdq_onnx if self.quantize else None

    @property
    def variant_onnx(self) -> Path | None:
        return self.precision.onnx if self.precision else None

    @property
    def plan(self) -> Path | None:
        return self.build.plan if self.build else None

    @property
    def report(self) -> dict[str, Any]:
        """report.json: the sections of the stages that ran, then the settings."""
        out: dict[str, Any] = {}
        if self.export:
            out.update(self.export.report)
        if self.sparsity:
            out["sparsity"] = dict(self.sparsity.report)
        if self.quantize:
            out["quantization"] = self.quantize.report
        if self.vocab:
            out["vocabulary"] = self.vocab.report
        if self.precision:
            out.update({"variant": self.settings.precision.mode, "onnx": str(self.precision.onnx),
                        "onnx_sha256": self.precision.sha256, "precision": self.precision.report})
        if self.verify:
            out["fidelity"] = self.verify.fidelity
            if self.verify.variant_check is not None:
                out["sparsity"]["variant_check"] = self.verify.variant_check
        if self.build_status:
            out["build"] = self.build_status
        # wall time (s) and process peak RSS (MiB) after each stage that ran (benchmarks.compile_cost)
        out["timings"] = {"seconds": dict(self.seconds), "peak_rss_mib": dict(self.peak_rss_mib)}
        out["settings"] = dataclasses.asdict(self.settings)
        return out

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Log a stage's start and end with its wall time and the peak RSS so far."""
        log.info("stage %s: start", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            release_freed_memory()
            self.seconds[name] = round(time.perf_counter() - start, 2)
            self.peak_rss_mib[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux: KiB
            log.info("stage %s: %.1f s, peak RSS so far %d MiB", name, self.seconds[name], self.peak_rss_mib[name])
