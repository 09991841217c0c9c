"""The spec expanded: shared stages, variants and cells.

    shared stage  (model, weights, sparsity, export opset): the FP32 export, and for 2:4 the
                  pruned, recovered student; run once, every variant below reuses it through
                  the pipeline's content-hash caches (`compiler.artifacts.cached`).
    variant       one `BuildSettings` (a precision of a shared stage): precision pass,
                  statistics, verification, the prepared bundle (CPU work).
    cell          a variant and one GPU target (its TensorRT build); a spec without targets
                  has one cell per variant, done when its bundle is prepared.

Keys are `settings_hash`es of everything that decides the result, so a rerun knows a finished
cell by its key (`compiler.matrix.report.reusable`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compiler.errors import CompilerError
from compiler.matrix.spec import MatrixSpec, settings_for
from compiler.matrix.targets import Target
from compiler.settings import (INT8_MODES, BuildSettings, PrecisionSettings, QuantSettings, TrainSettings,
                               VocabSettings, settings_hash)


@dataclass(frozen=True)
class SharedStage:
    """Work several variants share, run once before them.

    Attributes:
        key: content key (the shared settings and `until`).
        label: for people, e.g. "minilm/pretrained dense, export opset 17".
        settings: the settings it runs with (a variant's, its precision reduced to what the
            export depends on: INT8 variants export at opset 19).
        until: the pipeline's last stage: `export`, or `sparsity` for a 2:4 model.
    """

    key: str
    label: str
    settings: BuildSettings
    until: str


@dataclass(frozen=True)
class Variant:
    """One precision variant: CPU work up to a prepared bundle."""

    id: str
    key: str
    settings: BuildSettings
    shared: SharedStage
    gpu_training: bool  # QAT: trains on a GPU worker when the cluster has one (2:4 recovery: the shared stage)


@dataclass(frozen=True)
class Cell:
    """A variant built for one target (or, without targets, the variant alone)."""

    id: str
    key: str
    variant: Variant
    target: Target | None


def shared_stage(settings: BuildSettings) -> SharedStage:
    """The shared stage a variant with `settings` depends on."""
    int8 = settings.precision.mode in INT8_MODES
    sparse = settings.sparsity.pattern is not None
    reduced = dataclasses.replace(settings, precision=PrecisionSettings(mode="int8" if int8 else "fp32"),
                                  quant=QuantSettings(), vocab=VocabSettings(),
                                  train=settings.train if sparse else TrainSettings())
    until = "sparsity" if sparse else "export"
    label = (f"{settings.model.name}/{settings.model.weights} {settings.sparsity.pattern or 'dense'}, "
             f"export opset {max(settings.export.opset, 19) if int8 else settings.export.opset}")
    return SharedStage(settings_hash("matrix-shared-v1", reduced, until), label, reduced, until)


def expand(spec: MatrixSpec, output_dir: str | None = None) -> tuple[list[SharedStage], list[Variant], list[Cell]]:
    """Every shared stage, variant and cell of `spec`, in spec order (models, sparsity, precisions,
    targets). Variants that share an export point at one `SharedStage`.

    Raises:
        CompilerError: a cell's settings are invalid (`settings_for`).
    """
    shared: dict[str, SharedStage] = {}
    variants: list[Variant] = []
    cells: list[Cell] = []
    for entry in spec.models:
        for sparsity in spec.sparsity:
            for precision in entry.precisions or spec.precisions:
                settings = settings_for(spec, entry, precision, sparsity, output_dir)
                stage = shared.setdefault(shared_stage(settings).key, shared_stage(settings))
                vid = f"{entry.name}/{entry.weights}/{sparsity or 'dense'}/{precision}"
                gpu_training = precision == "int8-qat"
                variant = Variant(vid, settings_hash("matrix-variant-v1", settings), settings, stage, gpu_training)
                variants.append(variant)
                for target in spec.targets or (None,):
                    cid = vid if target is None else f"{vid}@{target.name}"
                    key = settings_hash("matrix-cell-v1", variant.key, target.cc if target else None)
                    cells.append(Cell(cid, key, variant, target))
    ids = [v.id for v in variants]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise CompilerError(f"matrix spec: models: {duplicates} listed twice; list each model and weights once")
    return list(shared.values()), variants, cells
