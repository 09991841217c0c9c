"""TensorRT builder settings: optimization profiles and the builder options. Re-exported by
`compiler.settings`."""

from __future__ import annotations

from dataclasses import dataclass, field

# TensorRT's HardwareCompatibilityLevel: kNONE, kAMPERE_PLUS, kSAME_COMPUTE_CAPABILITY.
HARDWARE_COMPAT_LEVELS = ("none", "ampere+", "same-cc")


@dataclass(frozen=True)
class ProfileSettings:
    """One TensorRT optimization profile over (batch, sequence) for every input.

    Attributes:
        min_shape / opt_shape / max_shape: (batch, sequence) triples; all three are required
            together and must satisfy min <= opt <= max per axis.
        min_past / opt_past / max_past: the KV-cache length (past tokens) of a graph with a
            cache (`text-generation-with-past`): axis 2 of `past_key_values.*`; its
            `attention_mask` spans past + sequence. 0 <= min <= opt <= max; past 0 is an empty
            tensor (the context phase). Graphs without a cache ignore them.
    """

    min_shape: tuple[int, int] = (1, 1)
    opt_shape: tuple[int, int] = (1, 128)
    max_shape: tuple[int, int] = (32, 512)
    min_past: int = field(default=0, metadata={"hash": "if-set"})  # keys of earlier profiles unchanged
    opt_past: int = field(default=0, metadata={"hash": "if-set"})
    max_past: int = field(default=0, metadata={"hash": "if-set"})

    @classmethod
    def fitted(cls, **given: object) -> ProfileSettings:
        """A profile from the shapes a user gave; each shape left out takes its default clamped
        into the given ones, per axis: `--max-shape 4x64` alone gives opt 1x64 and min 1x1, not
        the default opt 1x128 past the max; `--min-shape 1x200` alone gives opt 1x200. Shapes
        given are kept as given (and checked as in `__post_init__`).

        Raises:
            ValueError: the shapes given contradict each other (e.g. min past max).
        """
        bad = [f"{k.replace('_', ' ')} {v[0]}x{v[1]}" for k, v in given.items()
               if k.endswith("_shape") and min(v) < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)}: batch and sequence must be >= 1")
        default = cls()
        hi = given.get("max_shape", default.max_shape)
        lo = given.get("min_shape") or tuple(min(d, m) for d, m in zip(default.min_shape, hi))
        mid = given.get("opt_shape") or tuple(min(max(d, a), b) for d, a, b in zip(default.opt_shape, lo, hi))
        return cls(**{**given, "min_shape": tuple(lo), "opt_shape": tuple(mid), "max_shape": tuple(hi)})

    def __post_init__(self) -> None:
        if not 0 <= self.min_past <= self.opt_past <= self.max_past:
            raise ValueError(f"profile past: need 0 <= min ({self.min_past}) <= opt ({self.opt_past}) <= "
                             f"max ({self.max_past})")
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
        sparse_weights: `BuilderFlag.SPARSE_WEIGHTS` (2:4 structured sparsity): None sets it
            exactly when the graph has 2:4-eligible GEMM weights (`compiler.graph.sparsity.check_2_4`);
            True / False force it.
        timing_cache_dir: timing caches are kept here, one file per GPU and TensorRT version.
        hardware_compat: `HardwareCompatibilityLevel`: "none" (the build GPU's architecture only),
            "ampere+" (AMPERE_PLUS: every GPU of compute capability >= 8.0; build on one),
            "same-cc" (SAME_COMPUTE_CAPABILITY: GPUs of the build GPU's compute capability).
        version_compatible: `BuilderFlag.VERSION_COMPATIBLE`: later TensorRT releases of the same
            major (and TensorRT 11 for a TensorRT 10 plan) can load the plan; it embeds the lean
            runtime (host code) unless `exclude_lean_runtime`.
        exclude_lean_runtime: `BuilderFlag.EXCLUDE_LEAN_RUNTIME`; only with `version_compatible`.
    """

    profiles: tuple[ProfileSettings, ...] = (ProfileSettings(),)
    workspace_mib: int = 4096
    optimization_level: int = 3
    sparse_weights: bool | None = None
    timing_cache_dir: str = "engines/timing_cache"
    hardware_compat: str = field(default="none", metadata={"hash": "if-set"})
    version_compatible: bool = field(default=False, metadata={"hash": "if-set"})
    exclude_lean_runtime: bool = field(default=False, metadata={"hash": "if-set"})

    def __post_init__(self) -> None:
        if self.hardware_compat not in HARDWARE_COMPAT_LEVELS:
            raise ValueError(f"hardware_compat={self.hardware_compat!r}: expected one of {HARDWARE_COMPAT_LEVELS}")
        if self.exclude_lean_runtime and not self.version_compatible:
            raise ValueError("exclude_lean_runtime needs version_compatible (the lean runtime is embedded "
                             "only in version-compatible plans)")
        if not self.profiles:
            raise ValueError("need at least one optimization profile")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level={self.optimization_level}: expected 0..5")
        if self.workspace_mib < 1:
            raise ValueError("workspace_mib must be >= 1")
