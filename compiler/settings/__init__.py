"""One frozen settings tree for the whole pipeline.

`BuildSettings` is built once (by the CLI or a caller of `compiler.pipeline`), logged at DEBUG
and written into report.json; each stage reads its own nested dataclass. Each default is
defined once, in its field. Make variants with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from compiler.settings.engine import EngineSettings, ProfileSettings
from compiler.settings.sections import (
    FLOAT_MODES, INT8_MODES, LR_SCHEDULES, PRECISION_MODES, QUANT_METHODS, RECOVER_STEPS_BF16,
    RECOVER_STEPS_FP32, SPARSITY_METHODS, SPARSITY_PATTERNS, TASKS, WEIGHT_MODES, DataSettings, ExportSettings,
    ModelSettings, PrecisionSettings, QuantSettings, SparsitySettings, TrainSettings, VocabSettings,
)

__all__ = [
    "FLOAT_MODES", "INT8_MODES", "LR_SCHEDULES", "PRECISION_MODES", "QUANT_METHODS", "RECOVER_STEPS_BF16",
    "RECOVER_STEPS_FP32", "SPARSITY_METHODS",
    "SPARSITY_PATTERNS", "TASKS", "WEIGHT_MODES", "BuildSettings", "DataSettings", "EngineSettings", "ExportSettings",
    "ModelSettings", "PrecisionSettings", "ProfileSettings", "QuantSettings", "SparsitySettings",
    "TrainSettings", "VocabSettings", "settings_hash",
]


@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides the artifacts of one `compiler` run.

    Attributes:
        model, export, precision, data, quant, train, sparsity, vocab, engine: each stage's settings.
        output_dir: the artifacts' root (`engines/`); `data.cache_dir` defaults below it.
    """

    model: ModelSettings = field(default_factory=ModelSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    precision: PrecisionSettings = field(default_factory=PrecisionSettings)
    data: DataSettings = field(default_factory=DataSettings)
    quant: QuantSettings = field(default_factory=QuantSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    sparsity: SparsitySettings = field(default_factory=SparsitySettings)
    vocab: VocabSettings = field(default_factory=VocabSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    output_dir: str = "engines"

    def __post_init__(self) -> None:
        if self.data.cache_dir is None:  # caches live beside the artifacts
            object.__setattr__(self, "data", dataclasses.replace(self.data, cache_dir=str(Path(self.output_dir) / "cache")))

    def model_dir(self) -> Path:
        """`engines/<model-slug>/<weights>`: where this model's artifacts live (the dense FP32
        export, the reference of every variant); `.../<weights>/<task>` for a task other than
        the base model's `feature-extraction`."""
        slug = self.model.name.strip("/").replace("/", "--").replace("\\", "--")
        slug = slug.lstrip(".-") or "model"
        base = Path(self.output_dir) / slug / self.model.weights
        return base if self.model.task in (None, "feature-extraction") else base / self.model.task

    def base_dir(self) -> Path:
        """Where the FP32 graph the variants derive from lies: `model_dir()`, or its `sparse24`
        subfolder for a 2:4 sparse model."""
        if self.sparsity.pattern is None:
            return self.model_dir()
        return self.model_dir() / f"sparse{self.sparsity.pattern.replace(':', '')}"

    def variant_dir(self) -> Path:
        """`<base_dir()>/<precision>` (`<precision>-vocab` with vocabulary pruning): one variant's artifacts."""
        return self.base_dir() / (f"{self.precision.mode}-vocab" if self.vocab.texts else self.precision.mode)


def settings_hash(*parts: object) -> str:
    """sha256 over dataclasses / JSON-able values, canonicalized (sorted keys) first.

    A dataclass field with `metadata={"hash": False}` is left out (it says where work runs,
    not what it computes, e.g. `TrainSettings.device`), so caches survive a change of it; one
    with `metadata={"hash": "if-set"}` counts only when it differs from its default (a knob
    added later, e.g. `TrainSettings.bf16`: the caches made before it keep their keys).
    """

    def counts(f: dataclasses.Field, value: object) -> bool:
        rule = f.metadata.get("hash", True)
        return rule is True or (rule == "if-set" and value != f.default)

    def canon(obj: object) -> object:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: canon(getattr(obj, f.name)) for f in sorted(dataclasses.fields(obj), key=lambda f: f.name)
                    if counts(f, getattr(obj, f.name))}
        if isinstance(obj, (list, tuple)):
            return [canon(v) for v in obj]
        if isinstance(obj, dict):
            return {str(k): canon(v) for k, v in sorted(obj.items())}
        return obj

    blob = json.dumps([canon(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
