"""TensorRT builder settings: optimization profiles and the builder options. Re-exported by
`compiler.settings`."""

from __future__ import annotations

from dataclasses import dataclass


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
        sparse_weights: `BuilderFlag.SPARSE_WEIGHTS` (2:4 structured sparsity): None sets it
            exactly when the graph has 2:4-eligible GEMM weights (`compiler.graph.sparsity.check_2_4`);
            True / False force it.
        timing_cache_dir: timing caches are kept here, one file per GPU and TensorRT version.
    """

    profiles: tuple[ProfileSettings, ...] = (ProfileSettings(),)
    workspace_mib: int = 4096
    optimization_level: int = 3
    sparse_weights: bool | None = None
    timing_cache_dir: str = "engines/timing_cache"

    def __post_init__(self) -> None:
        if not self.profiles:
            raise ValueError("need at least one optimization profile")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level={self.optimization_level}: expected 0..5")
        if self.workspace_mib < 1:
            raise ValueError("workspace_mib must be >= 1")
