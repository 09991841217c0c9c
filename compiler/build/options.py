"""The builder options a deployment asks for, as the manifest records them and the CLI spells them.

`compiler.build.engine` sets them on TensorRT's builder config (hardware-compatibility level,
`BuilderFlag.VERSION_COMPATIBLE`, `BuilderFlag.EXCLUDE_LEAN_RUNTIME`, one optimization profile per
`EngineSettings.profiles` entry); this module holds their TensorRT-free side: the manifest's
`build_options` record, the command-line flags that repeat a build elsewhere (the build-later hint),
and the CUDA version of the installed TensorRT wheel. Runs without TensorRT.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import re

from compiler.settings import EngineSettings, ProfileSettings

# libcudart sonames tried for cudaRuntimeGetVersion (TensorRT 11 wheels: CUDA 13, or 12).
CUDART_LIBRARIES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")


def build_options(eng: EngineSettings) -> dict:
    """The manifest's `build_options`: {"hardware_compat", "version_compatible",
    "exclude_lean_runtime", "workspace_mib", "optimization_level"}."""
    return {"hardware_compat": eng.hardware_compat, "version_compatible": eng.version_compatible,
            "exclude_lean_runtime": eng.exclude_lean_runtime, "workspace_mib": eng.workspace_mib,
            "optimization_level": eng.optimization_level}


def shape_text(shape: tuple[int, int]) -> str:
    """(batch, sequence) -> "BxS"."""
    return f"{shape[0]}x{shape[1]}"


def profile_text(profile: ProfileSettings) -> str:
    """A profile as `--profile` reads it: "MIN:OPT:MAX", e.g. "1x1:16x128:32x512"."""
    return ":".join(shape_text(s) for s in (profile.min_shape, profile.opt_shape, profile.max_shape))


def build_flags(eng: EngineSettings) -> str:
    """The `python -m compiler build` flags that repeat `eng`'s profiles and deployment options.

    One non-default profile becomes ` --min-shape BxS --opt-shape BxS --max-shape BxS`; several
    become one ` --profile MIN:OPT:MAX` each; then ` --hardware-compat LEVEL`,
    ` --version-compatible`, ` --exclude-lean-runtime` where set. "" for the defaults.
    """
    flags = ""
    if len(eng.profiles) > 1:
        flags += "".join(f" --profile {profile_text(p)}" for p in eng.profiles)
    elif eng.profiles[0] != ProfileSettings():
        p = eng.profiles[0]
        flags += "".join(f" --{k}-shape {shape_text(v)}" for k, v in
                         (("min", p.min_shape), ("opt", p.opt_shape), ("max", p.max_shape)))
    if eng.hardware_compat != "none":
        flags += f" --hardware-compat {eng.hardware_compat}"
    if eng.version_compatible:
        flags += " --version-compatible"
    if eng.exclude_lean_runtime:
        flags += " --exclude-lean-runtime"
    return flags


def cuda_version() -> str | None:
    """The CUDA runtime version TensorRT runs with here, e.g. "13.0", or None when unknown.

    From `cudaRuntimeGetVersion` (1000 * major + 10 * minor) of the first loadable libcudart,
    else the CUDA major of the installed TensorRT wheel's name (`tensorrt-cu13...` -> "13").
    """
    for name in CUDART_LIBRARIES:
        try:
            library = ctypes.CDLL(name)
            version = ctypes.c_int(0)
            if library.cudaRuntimeGetVersion(ctypes.byref(version)) == 0 and version.value > 0:
                return f"{version.value // 1000}.{(version.value % 1000) // 10}"
        except (OSError, AttributeError):
            continue
    for dist in importlib.metadata.distributions():
        match = re.fullmatch(r"tensorrt[-_]cu(\d+)(?:[-_].*)?", (dist.metadata.get("Name") or "").lower())
        if match:
            return match.group(1)
    return None
