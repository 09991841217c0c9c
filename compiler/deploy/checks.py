"""The refusals made before a bundle, plan or request reaches TensorRT.

Each check raises `compiler.errors.DeploymentRefusedError(check, found, expected, fix)` (exit
code 4) and returns nothing (or the index it found); none returns a bool. The message names what
was found, what was expected and the command that fixes it. `bundle=` (where a check takes it)
puts the bundle's folder into that command.

The rules and where they come from:

- **File hashes** (`check_file_hashes`): every file the manifest lists must be there with its
  size and sha256. Never overridable: a changed file is not the file that was verified.
- **TensorRT version** (`check_tensorrt_version`): "By default, TensorRT engines are compatible
  only with the version of TensorRT used to build them" (TensorRT 11 docs, Engine Compatibility,
  https://docs.nvidia.com/deeplearning/tensorrt/11.1.0/inference-library/engine-compatibility.html);
  the standard runtime needs major, minor, patch and build to match. A plan built with
  `BuilderFlag.VERSION_COMPATIBLE` runs on a later TensorRT of the same major ("engines built with
  version compatibility enabled using TensorRT 11.0 will be compatible with TensorRT 11.1 and
  later 11.x versions", same page), never on an earlier one, and across majors only where the
  TensorRT 11.4 Support Matrix (Engine Portability,
  https://docs.nvidia.com/deeplearning/tensorrt/11.4.1/getting-started/support-matrix.html) says:
  "TensorRT 10 version-compatible engines can run with a TensorRT 11 runtime, and TensorRT 8
  version-compatible engines can run with a TensorRT 10 runtime. No other combination".
- **Compute capability** (`check_compute_capability`, `select_engine`): without hardware
  compatibility "engines are not portable across different GPU architectures" (Support Matrix);
  `HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY` runs on "GPUs that have the same Compute
  Capability ... as the one it was built on" and `AMPERE_PLUS` on "Ampere and newer GPUs"
  (`include/NvInfer.h`, enum HardwareCompatibilityLevel), i.e. compute capability >= 8.0.
- **Request shape** (`check_request_shape`): every input's shape must lie within min..max of one
  optimization profile, checked here rather than by TensorRT ("Supplied binding dimension ...
  exceed min ~ max range", NVIDIA/TensorRT#2739).
- **Host code** (`check_host_code`): a version-compatible plan embeds the lean runtime unless it
  was built with `BuilderFlag.EXCLUDE_LEAN_RUNTIME`; that is executable host code, which TensorRT
  deserializes only with `IRuntime.engine_host_code_allowed = True` ("the runtime is allowed to
  deserialize engines with host executable code", `include/NvInferRuntime.h`): refused unless
  the user opts in.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

from compiler.artifacts import sha256_file
from compiler.build.plan_header import parse_version
from compiler.errors import DeploymentRefusedError
from compiler.settings.engine import HARDWARE_COMPAT_LEVELS

log = logging.getLogger(__name__)

AMPERE = (8, 0)
# Documented cross-major pairs for version-compatible plans: plan major -> runtime majors.
CROSS_MAJOR = {10: (11,), 8: (10,)}
ARCHITECTURES = {(7, 0): "Volta", (7, 2): "Volta", (7, 5): "Turing", (8, 0): "Ampere", (8, 6): "Ampere",
                 (8, 7): "Ampere", (8, 9): "Ada", (9, 0): "Hopper", (10, 0): "Blackwell", (10, 3): "Blackwell",
                 (11, 0): "Blackwell", (12, 0): "Blackwell", (12, 1): "Blackwell"}


def _bundle_arg(bundle: str | Path | None) -> str:
    import shlex

    return shlex.quote(str(bundle)) if bundle is not None else "BUNDLE_DIR"  # a path with spaces: one argument


def _version(v: tuple[int, ...] | list[int] | str) -> tuple[int, ...]:
    return parse_version(v) if isinstance(v, str) else tuple(int(x) for x in v)


def _dotted(v: tuple[int, ...]) -> str:
    return ".".join(str(x) for x in v)


def check_file_hashes(root: Path, files: dict[str, dict]) -> None:
    """Every file of a bundle is present, with the size and sha256 its manifest records.

    Args:
        root: the bundle folder. files: the manifest's `files`: {relative posix path:
            {"sha256": hex, "bytes": int}}; paths must stay inside `root`.

    Raises:
        DeploymentRefusedError: (check "file hash"; never overridable) a path leaves `root`, a
            file is missing, or its size or sha256 differs; every such file is listed.
    """
    root = Path(root)
    problems = []
    for rel, entry in sorted(files.items()):
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts:
            problems.append(f"{rel}: a path outside the bundle")
            continue
        path = root / pure
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if "bytes" in entry and size != int(entry["bytes"]):
            problems.append(f"{rel}: {size} bytes, the manifest records {entry['bytes']}")
            continue
        digest = sha256_file(path)
        if digest != entry.get("sha256"):
            problems.append(f"{rel}: sha256 {digest[:16]}..., the manifest records {str(entry.get('sha256'))[:16]}...")
    if problems:
        raise DeploymentRefusedError(
            "file hash",
            f"{len(problems)} of {len(files)} files in {root} differ from the manifest:\n  " + "\n  ".join(problems),
            "every file with the size and sha256 that manifest.json records",
            "copy the bundle again from where it was made, or make it again with `python -m compiler bundle "
            "--model NAME --precision MODE` (and `python -m compiler build --bundle DIR` on the GPU host); "
            "a hash mismatch cannot be overridden",
        )


def check_tensorrt_version(plan_version: tuple[int, ...] | list[int], installed: str,
                           version_compatible: bool, *, bundle: str | Path | None = None) -> None:
    """The installed TensorRT can load a plan built by `plan_version` (TensorRT 11 docs rules).

    Args:
        plan_version: (major, minor, patch, build) from the plan header (`read_plan_header`).
        installed: `tensorrt.__version__` here, e.g. "11.4.0.106".
        version_compatible: the plan was built with `BuilderFlag.VERSION_COMPATIBLE` (manifest).
        bundle: named in the fix command.

    Raises:
        DeploymentRefusedError: (check "TensorRT version") not version-compatible and the four
            numbers differ; version-compatible and the installed TensorRT is older than the plan,
            or of another major than the same one or a documented pair (10 -> 11, 8 -> 10).
    """
    plan, here = _version(plan_version)[:4], _version(installed)[:4]
    rebuild = f"`python -m compiler build --bundle {_bundle_arg(bundle)}` on this host (TensorRT {_dotted(here)})"
    if not version_compatible:
        if plan == here:
            return
        raise DeploymentRefusedError(
            "TensorRT version", f"a plan built by TensorRT {_dotted(plan)} (not version-compatible); "
            f"TensorRT {_dotted(here)} is installed",
            f"TensorRT {_dotted(plan)} exactly: the standard runtime needs major, minor, patch and build to match",
            f"rebuild it with {rebuild}, adding `--version-compatible` so that later TensorRT "
            f"{plan[0] if plan[0] == here[0] else here[0]}.x releases load it too; or install TensorRT {_dotted(plan)}")
    same_major_later = plan[0] == here[0] and here >= plan
    if same_major_later or here[0] in CROSS_MAJOR.get(plan[0], ()):
        return
    why = "an older TensorRT never loads a newer plan" if here < plan else \
        f"a TensorRT {plan[0]} plan runs only on TensorRT {', '.join(map(str, (plan[0], *CROSS_MAJOR.get(plan[0], ()))))}"
    raise DeploymentRefusedError(
        "TensorRT version", f"a version-compatible plan built by TensorRT {_dotted(plan)}; TensorRT "
        f"{_dotted(here)} is installed ({why})",
        f"TensorRT {_dotted(plan)} or a later {plan[0]}.x"
        + "".join(f" or {m}.x" for m in CROSS_MAJOR.get(plan[0], ())),
        f"rebuild it with {rebuild}; or install TensorRT {plan[0]}.{plan[1]} or later")


def _cc(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(v) for v in str(text).split("."))
    except ValueError:
        raise DeploymentRefusedError("compute capability", f"{text!r}", "MAJOR.MINOR, e.g. 9.0",
                                     "check the manifest's compute_capability entries") from None
    return major, minor


def describe_cc(text: str) -> str:
    """e.g. "8.6 (Ampere)"; the architecture is left out where unknown."""
    arch = ARCHITECTURES.get(_cc(text))
    return f"{text} ({arch})" if arch else str(text)


def check_compute_capability(built_cc: str, device_cc: str, hardware_compat: str, *,
                             built_gpu: str | None = None, device_gpu: str | None = None,
                             bundle: str | Path | None = None) -> None:
    """This GPU can run a plan built on a GPU of compute capability `built_cc`.

    Args:
        built_cc / device_cc: "major.minor" of the build GPU (manifest) and of this GPU.
        hardware_compat: the plan's level: "none", "same-cc" (equal compute capability) or
            "ampere+" (this GPU's compute capability >= 8.0).
        built_gpu / device_gpu: GPU names; with "none", a different model than the build GPU
            is logged as a warning (TensorRT tunes kernels for the GPU model that built it).
        bundle: named in the fix command.

    Raises:
        DeploymentRefusedError: (check "compute capability") the rule of the level is not met,
            or `hardware_compat` is not one of the three levels.
    """
    if hardware_compat not in HARDWARE_COMPAT_LEVELS:
        raise DeploymentRefusedError("hardware compatibility", repr(hardware_compat),
                                     f"one of {', '.join(HARDWARE_COMPAT_LEVELS)}", "check the manifest's engines")
    built, here = _cc(built_cc), _cc(device_cc)
    fix = (f"build a plan on this GPU: `python -m compiler build --bundle {_bundle_arg(bundle)}` here adds one for "
           f"compute capability {device_cc} beside the others")
    if hardware_compat == "ampere+":
        if here >= AMPERE:
            return
        raise DeploymentRefusedError(
            "compute capability", f"a GPU of compute capability {describe_cc(device_cc)}",
            f"compute capability 8.0 or later (Ampere+) for a plan built with hardware compatibility "
            f"ampere+ on {describe_cc(built_cc)}", fix)
    if built == here:
        if hardware_compat == "none" and built_gpu and device_gpu and built_gpu != device_gpu:
            log.warning("the plan was built on %s and runs on %s (same compute capability %s): TensorRT tuned "
                        "it for the build GPU; rebuild here for best performance", built_gpu, device_gpu, device_cc)
        return
    raise DeploymentRefusedError(
        "compute capability", f"a GPU of compute capability {describe_cc(device_cc)}",
        f"compute capability {describe_cc(built_cc)}, that of the GPU the plan was built on (hardware "
        f"compatibility {hardware_compat})",
        fix + "; or build with `--hardware-compat ampere+` on an Ampere or later GPU to run on every CC >= 8.0")


def select_engine(engines: list[dict], device_cc: str, *, device_gpu: str | None = None,
                  bundle: str | Path | None = None) -> dict:
    """The manifest engine entry this GPU runs: one built for its compute capability first,
    else a hardware-compatible one (the highest compute capability that qualifies).

    Args:
        engines: the manifest's `engines` entries ({"file", "compute_capability",
            "hardware_compat", ...}). device_cc: this GPU's "major.minor".
        device_gpu: this GPU's name (for the same-model warning). bundle: named in the fix.

    Returns:
        One entry of `engines`.

    Raises:
        DeploymentRefusedError: (check "compute capability") no entry qualifies; the message
            lists what the bundle has and the command that adds a plan for this GPU.
    """
    here = _cc(device_cc)
    exact = [e for e in engines if _cc(e.get("compute_capability", "0.0")) == here]
    others = sorted((e for e in engines if e not in exact),
                    key=lambda e: _cc(e.get("compute_capability", "0.0")), reverse=True)
    for entry in exact + others:
        try:
            check_compute_capability(entry.get("compute_capability", "0.0"), device_cc,
                                     entry.get("hardware_compat", "none"),
                                     built_gpu=(entry.get("gpu") or {}).get("name"), device_gpu=device_gpu)
        except DeploymentRefusedError:
            continue
        return entry
    have = "; ".join(f"{e.get('file')} (compute capability {e.get('compute_capability')}, hardware compatibility "
                     f"{e.get('hardware_compat', 'none')})" for e in engines) or "no plan yet (a prepared bundle)"
    raise DeploymentRefusedError(
        "compute capability", f"a GPU of compute capability {describe_cc(device_cc)}; the bundle has {have}",
        f"a plan built for compute capability {device_cc}, or one built with hardware compatibility ampere+ "
        "(for compute capability >= 8.0)",
        f"`python -m compiler build --bundle {_bundle_arg(bundle)}` on this host adds a plan for compute capability "
        f"{device_cc}; or use the bundle's ONNX Runtime model (`--backend onnxruntime`)")


def _axes(shape: tuple[int, ...] | list[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


def check_request_shape(profiles: list[dict], shapes: dict[str, tuple[int, ...]], *,
                        bundle: str | Path | None = None) -> int:
    """The first optimization profile that admits every input's shape, before TensorRT sees it.

    Args:
        profiles: the manifest's `profiles`: [{input name: {"min": [...], "opt": [...],
            "max": [...]}}, ...]. shapes: {input name: shape}, e.g. {"input_ids": (4, 128)}.
        bundle: named in the fix command.

    Returns:
        The index of the profile (the execution context's optimization profile).

    Raises:
        DeploymentRefusedError: (check "request shape") an input the profiles do not know, a
            shape of another rank, or no profile with min <= shape <= max on every axis; names
            the input, the shape found and each profile's min..max.
    """
    if not profiles:
        raise DeploymentRefusedError("request shape", "a manifest without optimization profiles",
                                     "at least one profile", "make the bundle again with `python -m compiler bundle`")
    misses = []
    for index, profile in enumerate(profiles):
        unknown = sorted(set(shapes) - set(profile))
        if unknown:
            raise DeploymentRefusedError("request shape", f"input(s) {', '.join(unknown)}",
                                         f"the engine's inputs {', '.join(profile)}", "pass only the engine's inputs")
        bad = next((name for name, shape in shapes.items() if not _admits(profile[name], shape)), None)
        if bad is None:
            return index
        misses.append(bad)
    name = misses[0]
    found = tuple(int(v) for v in shapes[name])
    ranges = "; ".join(f"profile {i}: {_axes(p[name]['min'])} .. {_axes(p[name]['max'])}"
                       for i, p in enumerate(profiles) if name in p)
    limit = [max(int(p[name]["max"][a]) for p in profiles) for a in range(len(profiles[0][name]["max"]))]
    want = [max(a, b) for a, b in zip(limit, found)] if len(found) == len(limit) else found
    raise DeploymentRefusedError(
        "request shape", f"input {name!r} with shape {_axes(found)}",
        f"a shape within one optimization profile ({ranges})",
        f"send at most {_axes(limit)} (split the batch; truncate to the tokenizer's max_length: `run --truncate`), "
        "or rebuild "
        f"with a larger profile: `python -m compiler build --bundle {_bundle_arg(bundle)} --max-shape {_axes(want[:2])}` "
        "(or another `--profile MINxOPTxMAX`)")


def _admits(corners: dict, shape: tuple[int, ...]) -> bool:
    lo, hi = corners["min"], corners["max"]
    return len(shape) == len(lo) and all(int(a) <= int(s) <= int(b) for a, s, b in zip(lo, shape, hi))


def check_host_code(version_compatible: bool, exclude_lean_runtime: bool, allow_host_code: bool, *,
                    bundle: str | Path | None = None) -> None:
    """A plan that carries executable host code (its embedded lean runtime) loads only when the
    user allows it (TensorRT's `IRuntime.engine_host_code_allowed`).

    Args:
        version_compatible / exclude_lean_runtime: the plan's build flags (manifest); the plan
            carries host code exactly when it is version-compatible and the lean runtime was not
            excluded.
        allow_host_code: the user's opt-in (`--allow-host-code`).
        bundle: named in the fix command.

    Raises:
        DeploymentRefusedError: (check "host code") the plan carries host code and
            `allow_host_code` is False.
    """
    if not version_compatible or exclude_lean_runtime or allow_host_code:
        return
    raise DeploymentRefusedError(
        "host code", "a version-compatible plan with the lean runtime embedded (executable host code)",
        "--allow-host-code (TensorRT's IRuntime.engine_host_code_allowed) for a plan whose origin you trust",
        f"`python -m compiler run {_bundle_arg(bundle)} --allow-host-code ...` if you trust the bundle's source "
        "(its hashes are checked); or rebuild without `--version-compatible`, or with `--version-compatible "
        "--exclude-lean-runtime` and the lean runtime library installed on the host")
