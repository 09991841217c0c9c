"""The build stage: a TensorRT engine (`model.plan`) from the TensorRT-ready ONNX.

The ONNX written by the precision stage already carries every tensor's type (FP32, FP16, a
hybrid of both, or INT8 Q/DQ), so the network is parsed as a strongly typed network: TensorRT 11
keeps the types of the graph and has no builder precision flags. `engine_from_onnx` runs these
steps, one function each:

1. check: TensorRT imports and the NVIDIA driver reports a GPU (`check_tensorrt`, through
   `compiler.build.device`, no PyTorch); if not, `TensorRTUnavailableError` (exit code 2)
   names the ONNX that can be built later;
2. parse the ONNX from its file (so external weights beside it are found); every parser error
   is reported with the ONNX node it concerns (`_parse_network`);
3. configure: workspace limit, optimization level, 2:4 sparse weights when the graph has them,
   and the deployment options: hardware-compatibility level, version compatibility, lean runtime
   excluded (`_configure_builder`; their manifest record and CLI flags: `compiler.build.options`);
4. profiles: one optimization profile per `EngineSettings.profiles` entry; a dynamic axis 0
   takes the profile's batch sizes and a dynamic axis 1 its sequence lengths (`_add_profiles`);
5. timing cache: one file per GPU model, compute capability and TensorRT version
   (`_attach_timing_cache`), saved again after the build;
6. build the serialized engine (`_build_plan`) and read its I/O tensors back (`_engine_io`);
7. manifest: `model.plan` goes beside the ONNX and, beside it, `manifest.json`: what was built,
   from which ONNX, on which GPU, with which settings, and the engine's I/O tensors as TensorRT
   stores them, the plan's header (`compiler.build.plan_header`) and the CUDA version
   (`engine_manifest`).

TensorRT is imported only inside functions: `import compiler.build.engine` works without it.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from shlex import quote
from typing import Any

from compiler.artifacts import sha256_file, write_bytes, write_json
from compiler.build.device import GpuInfo, find_gpu
from compiler.build.options import build_flags, build_options, cuda_version
from compiler.build.plan_header import read_plan_header
from compiler.build.profiles import ProfileShapes, profile_shapes
from compiler.errors import EngineBuildError, TensorRTUnavailableError
from compiler.graph.onnx_io import check_onnx_file, check_standard_ops, load_onnx
from compiler.graph.sparsity import check_2_4
from compiler.settings import BuildSettings, EngineSettings, ProfileSettings

log = logging.getLogger(__name__)

PLAN_NAME = "model.plan"
MANIFEST_NAME = "manifest.json"
INSTALL_HINT = (
    "`pip install '.[gpu]'` (tensorrt-cu13; run it where NVIDIA's package index, "
    "pypi.nvidia.com, is reachable)"
)

# TensorRT DataType names -> the usual NumPy/PyTorch spelling, for the manifest.
_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}


def check_tensorrt(onnx_path: str | Path, profiles: tuple[ProfileSettings, ...] = (),
                   engine: EngineSettings | None = None) -> GpuInfo:
    """Check that an engine can be built here: TensorRT imports and the driver reports a GPU.

    Args:
        onnx_path: the TensorRT-ready ONNX that would be built; named in the error so that it
            can be built later on another machine.
        profiles: the requested optimization profiles: the build-later commands carry them.
        engine: all the builder settings (profiles and deployment options), instead of `profiles`.

    Returns:
        The GPU the engine will be built for (CUDA device 0).

    Raises:
        TensorRTUnavailableError: (exit code 2) `import tensorrt` fails (the module is missing,
            or its builder libraries are) or the NVIDIA driver reports no usable GPU
            (`compiler.build.device.find_gpu`). The message says which, how to fix it, where
            the ONNX lies and the commands that build it later.
    """
    gpu = find_gpu()
    problems = [tensorrt_problem(), None if isinstance(gpu, GpuInfo) else f"no usable GPU: {gpu}"]
    if isinstance(gpu, GpuInfo) and not any(problems):
        return gpu
    onnx_path = Path(onnx_path)
    arg = quote(str(onnx_path))  # a path with spaces stays one argument (shlex.quote)
    raise TensorRTUnavailableError(
        "cannot build a TensorRT engine on this machine:\n"
        + "\n".join(f"  - {p}" for p in problems if p)
        + f"\nThe TensorRT-ready ONNX is at {onnx_path}\n"
        "Build it later on a machine with TensorRT 11 and an NVIDIA GPU:\n"
        f"  python -m compiler build --onnx {arg}{build_flags(engine) if engine else _profile_flags(profiles)}\n"
        f"  trtexec --onnx={arg} --stronglyTyped"
    )


def _profile_flags(profiles: tuple[ProfileSettings, ...]) -> str:
    """The profile flags of `build_flags` ("" without profiles)."""
    return build_flags(EngineSettings(profiles=profiles)) if profiles else ""


def sparse_weights_flag(
    onnx_path: str | Path, eng: EngineSettings
) -> tuple[bool, dict[str, Any]]:
    """Whether to set `BuilderFlag.SPARSE_WEIGHTS`, and the 2:4 pattern check behind it.

    `EngineSettings.sparse_weights` None (the default) sets the flag exactly when the graph has
    at least one GEMM whose constant weight is 2:4 along the reduction axis
    (`compiler.graph.sparsity.check_2_4`); True / False force it (the check still runs for the
    manifest). Runs on the CPU: no TensorRT needed.

    Args:
        onnx_path: the TensorRT-ready ONNX (read with its weights, not checked).
        eng: reads `sparse_weights`.

    Returns:
        (flag, {"eligible", "ineligible": GEMM counts, "sparse_mac_fraction": eligible MACs /
        all MatMul/Gemm MACs, "has_eligible", "forced": whether `eng.sparse_weights` decided}).

    Raises:
        InvalidOnnxError: `onnx_path` is missing or not readable ONNX.
    """
    check = check_2_4(load_onnx(onnx_path, check=False))
    d = check.to_dict()
    summary = {k: d.get(k) for k in ("eligible", "ineligible", "sparse_mac_fraction", "has_eligible")}
    summary["forced"] = eng.sparse_weights is not None
    flag = check.has_eligible if eng.sparse_weights is None else bool(eng.sparse_weights)
    return flag, summary


@dataclass(frozen=True)
class BuiltEngine:
    """What one build produced, for the manifest.

    Attributes:
        plan_path: the written `model.plan`. plan_bytes: its size in bytes.
        build_seconds: wall time of `build_serialized_network`, in seconds.
        profiles: each optimization profile's input shapes, in profile order.
        inputs / outputs: the engine's I/O tensors: {"name", "dtype", "shape"} (-1 = dynamic).
        sparse_weights: whether `BuilderFlag.SPARSE_WEIGHTS` was set.
        sparsity: the 2:4 check behind it (`sparse_weights_flag`).
        timing_cache: the timing cache file used and updated.
        tensorrt_version: `tensorrt.__version__`. gpu: the GPU it was built on.
        plan_header: `PlanHeader.to_dict()` of the plan ({"version": [major, minor, patch, build]}).
        cuda_version: the CUDA runtime version (`compiler.build.options.cuda_version`), or None.
    """

    plan_path: Path
    plan_bytes: int
    build_seconds: float
    profiles: list[ProfileShapes]
    inputs: list[dict]
    outputs: list[dict]
    sparse_weights: bool
    sparsity: dict[str, Any]
    timing_cache: Path
    tensorrt_version: str
    gpu: GpuInfo
    plan_header: dict | None = None
    cuda_version: str | None = None


def engine_from_onnx(
    onnx_path: str | Path, settings: BuildSettings, report: dict
) -> tuple[Path, dict]:
    """Build `model.plan` and its `manifest.json` from a strongly typed ONNX model.

    Args:
        onnx_path: the TensorRT-ready ONNX (external data files, if any, beside it).
        settings: run settings; reads `settings.engine`, `settings.model`,
            `settings.precision.mode`; the plan and manifest go beside `onnx_path`.
        report: the pipeline's report so far; its `precision`, `quantization` and `fidelity`
            entries (None when absent) are copied into the manifest.

    Returns:
        (path of `model.plan`, the manifest dict that was written to `manifest.json`).

    Raises:
        TensorRTUnavailableError: TensorRT or a GPU is missing (see `check_tensorrt`).
        InvalidOnnxError: `onnx_path` is missing, empty, truncated or lacks its external data
            (checked first, before TensorRT: `compiler.graph.onnx_io.check_onnx_file`).
        EngineBuildError: the ONNX parser fails (every error is listed with its node), an
            input has a dynamic axis other than 0 (batch) or 1 (sequence), an optimization
            profile is rejected, or the builder returns no engine.
    """
    onnx_path = Path(onnx_path)
    check_onnx_file(onnx_path)  # a missing or broken file is bad input (exit 1), whatever the machine
    check_standard_ops(onnx_path)  # ONNX Runtime's fusions: TensorRT's parser would fail on the GPU host
    gpu = check_tensorrt(onnx_path, engine=settings.engine)

    import tensorrt as trt

    eng = settings.engine
    trt_logger = _make_logger(trt)
    builder = trt.Builder(trt_logger)
    network, parser = _parse_network(trt, builder, trt_logger, onnx_path)  # parser owns weights
    config, sparse_weights, sparsity = _configure_builder(trt, builder, eng, onnx_path)
    profiles = _add_profiles(builder, network, config, eng.profiles)
    cache_path = Path(eng.timing_cache_dir) / timing_cache_name(
        gpu.name, gpu.compute_capability, trt.__version__
    )
    _attach_timing_cache(config, cache_path)
    plan, build_seconds = _build_plan(builder, network, config, trt_logger, onnx_path,
                                     len(profiles), eng.optimization_level)
    del parser
    write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    inputs, outputs = _engine_io(trt, trt_logger, plan)
    built = BuiltEngine(
        plan_path=write_bytes(onnx_path.parent / PLAN_NAME, plan), plan_bytes=len(plan),
        build_seconds=build_seconds, profiles=profiles, inputs=inputs, outputs=outputs,
        sparse_weights=sparse_weights, sparsity=sparsity, timing_cache=cache_path,
        tensorrt_version=trt.__version__, gpu=gpu,
        plan_header=read_plan_header(plan, name=f"the plan built from {onnx_path}").to_dict(),
        cuda_version=cuda_version(),
    )
    manifest = engine_manifest(built, onnx_path, settings, report)
    write_json(built.plan_path.parent / MANIFEST_NAME, manifest)
    return built.plan_path, manifest


def engine_manifest(
    built: BuiltEngine, onnx_path: Path, settings: BuildSettings, report: dict
) -> dict[str, Any]:
    """The `manifest.json` of one build: what, from which ONNX, on which GPU, how.

    Args:
        built: the build's results; `built.plan_path` must exist (its SHA-256 is recorded).
        onnx_path: the ONNX it was built from (its SHA-256 is recorded).
        settings: reads `model`, `precision.mode` and `engine`.
        report: the pipeline's report; `precision`, `quantization` and `fidelity` are copied
            (None when absent).

    Returns:
        A JSON-ready dict with the keys model, variant, tensorrt_version, cuda_version, gpu,
        plan_header, build_options, profiles, inputs, outputs, plan, onnx, build_seconds,
        builder, precision, quantization, sparsity, fidelity.
    """
    eng = settings.engine
    return {
        "model": {"name": settings.model.name, "weights": settings.model.weights},
        "variant": settings.precision.mode,
        "tensorrt_version": built.tensorrt_version,
        "cuda_version": built.cuda_version,
        "gpu": built.gpu.to_dict(),
        "plan_header": built.plan_header,
        "build_options": build_options(eng),
        "profiles": [
            {name: {k: list(v) for k, v in s.items()} for name, s in shapes.items()}
            for shapes in built.profiles
        ],
        "inputs": built.inputs,
        "outputs": built.outputs,
        "plan": {"file": built.plan_path.name, "bytes": built.plan_bytes,
                 "sha256": sha256_file(built.plan_path)},
        "onnx": {"path": str(onnx_path), "sha256": sha256_file(onnx_path)},
        "build_seconds": round(built.build_seconds, 3),
        "builder": {
            "workspace_mib": eng.workspace_mib,
            "optimization_level": eng.optimization_level,
            "sparse_weights": built.sparse_weights,
            "strongly_typed": True,
            "timing_cache": str(built.timing_cache),
        },
        "precision": report.get("precision"),
        "quantization": report.get("quantization"),
        "sparsity": built.sparsity,
        "fidelity": report.get("fidelity"),
    }


# --- TensorRT-free helpers (unit-tested without TensorRT) -------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"


def timing_cache_name(gpu_name: str, compute_capability: str, trt_version: str) -> str:
    """File name of the timing cache for one GPU model and TensorRT version.

    TensorRT's timing cache holds kernel timings that are only valid on the GPU model and
    TensorRT version that measured them, so each pair gets its own file.

    Args:
        gpu_name: e.g. "NVIDIA H100 80GB HBM3".
        compute_capability: e.g. "9.0".
        trt_version: e.g. "11.4.0.106".

    Returns:
        e.g. "nvidia-h100-80gb-hbm3_cc9.0_trt11.4.0.106.cache" (no path separators).
    """
    return f"{_slug(gpu_name)}_cc{_slug(compute_capability)}_trt{_slug(trt_version)}.cache"


def describe_parser_error(node_index: int, node_name: str, op_type: str, desc: str) -> str:
    """One line for one ONNX parser error.

    Args:
        node_index: the failing node's index in the graph; < 0 when the error has no node.
        node_name / op_type: the node's name and op ("" when unknown).
        desc: TensorRT's description of the error.

    Returns:
        e.g. "  node #7 '/encoder/Softmax' (Softmax): unsupported type".
    """
    if node_index < 0:
        return f"  (no node): {desc}"
    return f"  node #{node_index} {node_name or '<unnamed>'!r} ({op_type or '?'}): {desc}"


def tensorrt_problem() -> str | None:
    """Why `import tensorrt` fails here (and how to install it), or None when it imports."""
    try:
        import tensorrt as trt  # noqa: F401
    except ModuleNotFoundError as exc:
        bindings_only = importlib.util.find_spec("tensorrt_bindings") is not None
        note = " (only the tensorrt-cu13-bindings extension is installed)" if bindings_only else ""
        return (f"the TensorRT Python module is missing ({exc}){note}; install it with "
                f"{INSTALL_HINT}")
    except (ImportError, OSError) as exc:
        return (f"TensorRT is installed but its builder libraries are missing ({exc}); "
                f"install the full package with {INSTALL_HINT}")
    return None


# --- TensorRT steps ----------------------------------------------------------------------------


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to `logging` and keeps the error messages."""
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class _ForwardingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.DEBUG)
            if level >= logging.ERROR:
                self.errors.append(msg)
            log.log(level, "TensorRT: %s", msg)

    return _ForwardingLogger()


def _logged_errors(trt_logger: Any) -> str:
    errors = getattr(trt_logger, "errors", [])
    return ":\n" + "\n".join(f"  {e}" for e in errors) if errors else ""


def _parse_network(trt: Any, builder: Any, trt_logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """A strongly typed network parsed from `onnx_path`, and the parser (which owns the weights:
    keep it until the build is done)."""
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        lines = []
        for i in range(parser.num_errors):
            error = parser.get_error(i)
            lines.append(describe_parser_error(
                error.node(), error.node_name(), error.node_operator(), error.desc()
            ))
        raise EngineBuildError(
            f"TensorRT's ONNX parser failed on {onnx_path} with {len(lines)} error(s):\n"
            + "\n".join(lines)
            + "\nThe nodes above use an op, type or attribute that TensorRT does not support; "
            "check the precision pass output or re-export with another opset."
        )
    return network, parser


def _configure_builder(
    trt: Any, builder: Any, eng: EngineSettings, onnx_path: Path
) -> tuple[Any, bool, dict[str, Any]]:
    """A builder config with the workspace limit, optimization level, hardware-compatibility
    level, VERSION_COMPATIBLE / EXCLUDE_LEAN_RUNTIME where `eng` asks for them and, when the
    graph is 2:4 (or `eng.sparse_weights` forces it), `SPARSE_WEIGHTS`; and that flag with its check."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, eng.workspace_mib << 20)
    config.builder_optimization_level = eng.optimization_level
    levels = {"ampere+": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
              "same-cc": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY}
    if eng.hardware_compat in levels:
        config.hardware_compatibility_level = levels[eng.hardware_compat]
    if eng.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if eng.exclude_lean_runtime:
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    sparse_weights, sparse_check = sparse_weights_flag(onnx_path, eng)
    if sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    return config, sparse_weights, sparse_check


def _add_profiles(
    builder: Any, network: Any, config: Any, profiles: Sequence[ProfileSettings]
) -> list[ProfileShapes]:
    """Add one optimization profile per `profiles` entry; return each one's input shapes."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    shape_tensors = [t.name for t in inputs if t.is_shape_tensor]
    if shape_tensors:
        raise EngineBuildError(
            f"inputs {shape_tensors} are shape tensors; only execution tensors with dynamic "
            "batch/sequence axes are supported. Re-export so that shapes are computed in-graph."
        )
    input_dims = [(t.name, tuple(t.shape)) for t in inputs]
    all_shapes = []
    for index, profile_settings in enumerate(profiles):
        shapes = profile_shapes(input_dims, profile_settings)
        profile = builder.create_optimization_profile()
        for name, s in shapes.items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        if config.add_optimization_profile(profile) < 0:
            raise EngineBuildError(f"TensorRT rejected optimization profile {index}: {shapes}")
        all_shapes.append(shapes)
    return all_shapes


def _attach_timing_cache(config: Any, cache_path: Path) -> None:
    """Load the timing cache at `cache_path` (if any) into `config`; start empty otherwise."""
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s is unreadable or does not match this GPU and TensorRT; "
                    "starting a new one", cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    elif blob:
        log.info("using timing cache %s", cache_path)


def _build_plan(builder: Any, network: Any, config: Any, trt_logger: Any, onnx_path: Path,
                profiles: int, optimization_level: int) -> tuple[bytes, float]:
    """The serialized engine and the build's wall time in seconds; EngineBuildError if none."""
    log.info("building TensorRT engine from %s (%d profile(s), optimization level %d)",
             onnx_path, profiles, optimization_level)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - start
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT could not build an engine from {onnx_path} after {build_seconds:.1f} s"
            + _logged_errors(trt_logger)
            + "\nCheck TensorRT's messages; a larger workspace (EngineSettings.workspace_mib) "
            "or smaller profile max shapes may help."
        )
    log.info("built TensorRT engine in %.1f s", build_seconds)
    return bytes(serialized), build_seconds


def _engine_io(trt: Any, trt_logger: Any, plan: bytes) -> tuple[list[dict], list[dict]]:
    """The engine's input and output tensors (name, dtype, shape with -1 for dynamic dims)."""
    runtime = trt.Runtime(trt_logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineBuildError("TensorRT cannot deserialize the plan it just built"
                               + _logged_errors(trt_logger))
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = engine.get_tensor_dtype(name).name
        entry = {
            "name": name,
            "dtype": _DTYPE_NAMES.get(dtype, dtype.lower()),
            "shape": list(engine.get_tensor_shape(name)),
        }
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        (inputs if is_input else outputs).append(entry)
    return inputs, outputs
