"""One frozen settings tree for the whole pipeline.

`BuildSettings` is built once (by the CLI or by a caller of `compiler.pipeline`), logged once,
and passed down to every stage, which reads only its own nested dataclass. Each default is
defined once, in its field. Make variants with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

PRECISION_MODES = ("fp32", "fp16", "hybrid", "auto")
WEIGHT_MODES = ("pretrained", "random")


@dataclass(frozen=True)
class ModelSettings:
    """Which transformer to compile.

    Attributes:
        name: a registered name (`bert-base`, `bert-large`, `gpt2`, `minilm`), a Hugging Face
            model id, or a local directory holding `config.json` and weights.
        weights: `pretrained` loads real weights; `random` builds the published architecture
            with `seed` (for structure and speed work where weights are not at hand).
        seed: RNG seed for `random` weights.
        trust_remote_code: passed to transformers only when the user asks for it.
    """

    name: str = "minilm"
    weights: str = "pretrained"
    seed: int = 0
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"weights={self.weights!r}: expected one of {WEIGHT_MODES}")


@dataclass(frozen=True)
class ExportSettings:
    """PyTorch -> ONNX export.

    Attributes:
        opset: ONNX opset; 17 is the first with a native LayerNormalization.
        parity_atol: FP32 max abs difference allowed between ONNX Runtime and PyTorch.
        parity_batches / parity_sequences: shapes the parity check runs at (odd sizes on purpose).
    """

    opset: int = 17
    parity_atol: float = 1e-4
    parity_batches: tuple[int, ...] = (1, 3)
    parity_sequences: tuple[int, ...] = (8, 33, 128)

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ValueError(f"opset={self.opset}: need 17 or newer for native LayerNormalization")


@dataclass(frozen=True)
class PrecisionSettings:
    """ONNX-to-ONNX precision pass (strongly typed output for TensorRT 11).

    Attributes:
        mode: `fp32` (unchanged), `fp16` (everything ONNX allows), `hybrid` (softmax, layer
            norm and accumulating reductions in FP32, the rest in FP16), `auto` (the fewest
            FP32 nodes that meet the budget below, measured; see compiler.auto_precision).
        fp16_clamp: magnitude that out-of-range FP32 constants are clamped to. Half of FP16's
            maximum (65504) so that adding a bounded activation to a clamped mask fill value
            (-3.4e38 in Hugging Face attention masks) stays finite.
        min_cosine / max_nonfinite: `auto`'s budget on held-out real text.
        overflow_margin: `auto` pins a node when observed absmax x margin >= 65504.
        percentile: the high percentile of |x| recorded per tensor.
        max_search_steps: nodes `auto` may move to FP32 by measured sensitivity.
        sensitivity_samples: calibration samples per sensitivity measurement.
    """

    mode: str = "hybrid"
    fp16_clamp: float = 32768.0
    # `auto` only: the accuracy budget on held-out real text and the search's knobs.
    min_cosine: float = 0.9998  # the published hybrid figure on BERT-base and GPT-2
    max_nonfinite: int = 0
    overflow_margin: float = 2.0  # pin when observed absmax * margin >= 65504
    percentile: float = 99.99
    max_search_steps: int = 32
    sensitivity_samples: int = 8  # calibration samples per sensitivity measurement

    def __post_init__(self) -> None:
        if self.mode not in PRECISION_MODES:
            raise ValueError(f"precision={self.mode!r}: expected one of {PRECISION_MODES}")
        if not -1.0 <= self.min_cosine <= 1.0 or self.max_nonfinite < 0 or self.overflow_margin < 1.0:
            raise ValueError("need -1 <= min_cosine <= 1, max_nonfinite >= 0, overflow_margin >= 1")


@dataclass(frozen=True)
class DataSettings:
    """Real text for verification (and later calibration).

    Attributes:
        path: a plain text file (one sample a line) or a TSV/CSV file with a header; None
            means WikiText-2 test from `../shared/data` when it exists.
        text_column: column of a TSV/CSV file; None picks `sentence` or `text`.
        samples: held-out samples for verification and the `auto` budget (taken after the
            calibration samples, never overlapping them).
        calib_samples: calibration samples (activation statistics), from the start of the text.
        max_length: tokens per sample, after truncation.
        min_words: lines with fewer whitespace-separated words are skipped (WikiText-2 has
            empty lines and `= Heading =` lines).
        batch_size: samples per inference batch (padded to the longest in the batch).
        cache_dir: where tokenized sets are cached by content hash.
    """

    path: str | None = None
    text_column: str | None = None
    samples: int = 64
    calib_samples: int = 128
    max_length: int = 128
    min_words: int = 8
    batch_size: int = 8
    cache_dir: str = "calibration/cache"

    def __post_init__(self) -> None:
        if self.samples < 1 or self.calib_samples < 1 or self.max_length < 2 or self.batch_size < 1:
            raise ValueError("samples, calib_samples, batch_size must be >= 1 and max_length >= 2")


@dataclass(frozen=True)
class ProfileSettings:
    """One TensorRT optimization profile over (batch, sequence) for every input.

    Attributes:
        min_shape / opt_shape / max_shape: (batch, sequence) triples; all three are required
            together and must satisfy min <= opt <= max per axis.
    """

    min_shape: tuple[int, int] = (1, 1)
    opt_shape: tuple[int, int] = (1, 128)
    max_shape: tuple[int, int] = (32, 512)

    def __post_init__(self) -> None:
        for axis in range(2):
            lo, mid, hi = self.min_shape[axis], self.opt_shape[axis], self.max_shape[axis]
            if not 1 <= lo <= mid <= hi:
                raise ValueError(
                    f"profile axis {('batch', 'sequence')[axis]}: need 1 <= min ({lo}) <= "
                    f"opt ({mid}) <= max ({hi})"
                )


@dataclass(frozen=True)
class EngineSettings:
    """TensorRT builder settings.

    Attributes:
        profiles: optimization profiles, one engine context each.
        workspace_mib: workspace memory pool limit in MiB.
        optimization_level: builder optimization level 0..5 (TensorRT default 3).
        sparse_weights: set `BuilderFlag.SPARSE_WEIGHTS` (2:4 structured sparsity).
        timing_cache_dir: timing caches are kept here, one file per GPU and TensorRT version.
    """

    profiles: tuple[ProfileSettings, ...] = (ProfileSettings(),)
    workspace_mib: int = 4096
    optimization_level: int = 3
    sparse_weights: bool = False
    timing_cache_dir: str = "engines/timing_cache"

    def __post_init__(self) -> None:
        if not self.profiles:
            raise ValueError("need at least one optimization profile")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level={self.optimization_level}: expected 0..5")
        if self.workspace_mib < 1:
            raise ValueError("workspace_mib must be >= 1")


@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides the artifacts of one `compiler` run."""

    model: ModelSettings = field(default_factory=ModelSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    precision: PrecisionSettings = field(default_factory=PrecisionSettings)
    data: DataSettings = field(default_factory=DataSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    output_dir: str = "engines"

    def model_dir(self) -> Path:
        """`engines/<model-slug>/<weights>`: where this model's artifacts live."""
        slug = self.model.name.strip("/").replace("/", "--").replace("\\", "--")
        slug = slug.lstrip(".-") or "model"
        return Path(self.output_dir) / slug / self.model.weights

    def variant_dir(self) -> Path:
        """`engines/<model-slug>/<weights>/<precision>`: one precision variant's artifacts."""
        return self.model_dir() / self.precision.mode


def settings_hash(*parts: object) -> str:
    """sha256 over dataclasses / JSON-able values, canonicalized (sorted keys) first."""

    def canon(obj: object) -> object:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {k: canon(v) for k, v in sorted(dataclasses.asdict(obj).items())}
        if isinstance(obj, (list, tuple)):
            return [canon(v) for v in obj]
        if isinstance(obj, dict):
            return {str(k): canon(v) for k, v in sorted(obj.items())}
        return obj

    blob = json.dumps([canon(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
