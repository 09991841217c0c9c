"""Stage 4: build a TensorRT engine (`model.plan`) from the TensorRT-ready ONNX.

The ONNX written by the precision stage already carries every tensor's type (FP32, FP16 or a
hybrid of both), so the network is parsed as a strongly typed network: TensorRT 11 keeps the
types of the graph and has no builder precision flags. This stage:

1. checks that TensorRT imports and a CUDA GPU is visible (`check_tensorrt`); if not, it raises
   `TensorRTUnavailableError` (exit code 2), which names the ONNX that can be built later;
2. parses the ONNX from its file (so external weights next to it are found) and reports every
   parser error with the ONNX node it concerns;
3. adds one optimization profile per `EngineSettings.profiles` entry: for every network input,
   a dynamic axis 0 takes the profile's batch sizes and a dynamic axis 1 its sequence lengths;
4. builds with the workspace limit, optimization level, optional 2:4 sparse weights and a
   timing cache kept per GPU model, compute capability and TensorRT version;
5. writes `model.plan` beside the ONNX and, beside it, `manifest.json`: what was built, from
   which ONNX, on which GPU, with which settings, and the engine's I/O tensors as TensorRT
   stores them.

TensorRT is imported only inside functions: `import compiler.build.engine` works without it.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compiler.artifacts import sha256_file, write_bytes, write_json
from compiler.errors import EngineBuildError, InvalidOnnxError, TensorRTUnavailableError
from compiler.settings import BuildSettings, ProfileSettings

log = logging.getLogger(__name__)

PLAN_NAME = "model.plan"
MANIFEST_NAME = "manifest.json"
INSTALL_HINT = (
    "`pip install '.[gpu]'` (tensorrt-cu13; run it where NVIDIA's package index, "
    "pypi.nvidia.com, is reachable)"
)

# Axes of a transformer input that an optimization profile may vary.
_PROFILE_AXES = ("batch", "sequence")

# TensorRT DataType names -> the usual NumPy/PyTorch spelling, for the manifest.
_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}

Dim = int | str | None
"""One input dimension: a static size, or dynamic (-1, None, or an ONNX `dim_param` name)."""


def check_tensorrt(onnx_path: str | Path) -> None:
    """Check that an engine can be built here: TensorRT imports and a CUDA GPU is visible.

    Args:
        onnx_path: the TensorRT-ready ONNX that would be built; named in the error so that it
            can be built later on another machine.

    Raises:
        TensorRTUnavailableError: (exit code 2) `import tensorrt` fails (the module is missing,
            or its builder libraries are) or no CUDA GPU is visible to PyTorch. The message
            says which, how to install TensorRT, where the ONNX lies and the commands that
            build it later.
    """
    problems = [p for p in (_tensorrt_problem(), _gpu_problem()) if p]
    if not problems:
        return
    onnx_path = Path(onnx_path)
    raise TensorRTUnavailableError(
        "cannot build a TensorRT engine on this machine:\n"
        + "\n".join(f"  - {p}" for p in problems)
        + f"\nThe TensorRT-ready ONNX is at {onnx_path}\n"
        "Build it later on a machine with TensorRT 11 and an NVIDIA GPU:\n"
        f"  python -m compiler build --onnx {onnx_path}\n"
        f"  trtexec --onnx={onnx_path} --stronglyTyped"
    )


def sparse_weights_flag(onnx_path: str | Path, eng: Any) -> tuple[bool, dict[str, Any] | None]:
    """Whether to set `BuilderFlag.SPARSE_WEIGHTS`, and the 2:4 pattern check behind it.

    `EngineSettings.sparse_weights` None (the default) sets the flag exactly when the graph has
    at least one GEMM whose constant weight is 2:4 along the reduction axis
    (`compiler.graph.sparsity.check_2_4`); True / False force it (the check still runs for the
    manifest). Runs on the CPU: no TensorRT needed.

    Returns:
        (flag, {"eligible_gemms", "ineligible_gemms", "sparse_mac_fraction", "forced"}).
    """
    from compiler.graph.onnx_io import load_onnx
    from compiler.graph.sparsity import check_2_4

    check = check_2_4(load_onnx(onnx_path, check=False))
    d = check.to_dict()
    summary = {k: d.get(k) for k in ("eligible", "ineligible", "sparse_mac_fraction", "has_eligible")}
    summary["forced"] = eng.sparse_weights is not None
    flag = check.has_eligible if eng.sparse_weights is None else bool(eng.sparse_weights)
    return flag, summary


def engine_from_onnx(
    onnx_path: str | Path, settings: BuildSettings, report: dict
) -> tuple[Path, dict]:
    """Build `model.plan` and its `manifest.json` from a strongly typed ONNX model.

    Args:
        onnx_path: the TensorRT-ready ONNX (external data files, if any, beside it).
        settings: run settings; reads `settings.engine`, `settings.model`,
            `settings.precision.mode`; the plan and manifest go beside `onnx_path`.
        report: the pipeline's report so far; its `precision` and `fidelity` entries (None
            when absent) are copied into the manifest.

    Returns:
        (path of `model.plan`, the manifest dict that was written to `manifest.json`).

    Raises:
        TensorRTUnavailableError: TensorRT or a CUDA GPU is missing (see `check_tensorrt`).
        InvalidOnnxError: `onnx_path` is not a file.
        EngineBuildError: the ONNX parser fails (every error is listed with its node), an
            input has a dynamic axis other than 0 (batch) or 1 (sequence), an optimization
            profile is rejected, or the builder returns no engine.
    """
    onnx_path = Path(onnx_path)
    check_tensorrt(onnx_path)
    if not onnx_path.is_file():
        raise InvalidOnnxError(f"no ONNX file at {onnx_path}: run the export stage first")

    import tensorrt as trt

    eng = settings.engine
    trt_logger = _make_logger(trt)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)  # owns the weights: keep it until the build
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineBuildError(_parser_failure(parser, onnx_path))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, eng.workspace_mib << 20)
    config.builder_optimization_level = eng.optimization_level
    sparse_weights, sparse_check = sparse_weights_flag(onnx_path, eng)
    if sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)

    profile_shapes = _add_profiles(builder, network, config, eng.profiles)

    gpu = _gpu_info()
    cache_path = Path(eng.timing_cache_dir) / _timing_cache_name(
        gpu["name"], gpu["compute_capability"], trt.__version__
    )
    _attach_timing_cache(config, cache_path)

    log.info("building TensorRT engine from %s (%d profile(s), optimization level %d)",
             onnx_path, len(profile_shapes), eng.optimization_level)
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
    write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))

    plan = bytes(serialized)
    del serialized
    engine_inputs, engine_outputs = _engine_io(trt, trt_logger, plan)
    plan_path = write_bytes(onnx_path.parent / PLAN_NAME, plan)

    manifest: dict[str, Any] = {
        "model": {"name": settings.model.name, "weights": settings.model.weights},
        "variant": settings.precision.mode,
        "tensorrt_version": trt.__version__,
        "gpu": gpu,
        "profiles": [
            {name: {k: list(v) for k, v in s.items()} for name, s in shapes.items()}
            for shapes in profile_shapes
        ],
        "inputs": engine_inputs,
        "outputs": engine_outputs,
        "plan": {"file": PLAN_NAME, "bytes": len(plan), "sha256": sha256_file(plan_path)},
        "onnx": {"path": str(onnx_path), "sha256": sha256_file(onnx_path)},
        "build_seconds": round(build_seconds, 3),
        "builder": {
            "workspace_mib": eng.workspace_mib,
            "optimization_level": eng.optimization_level,
            "sparse_weights": sparse_weights,
            "strongly_typed": True,
            "timing_cache": str(cache_path),
        },
        "precision": report.get("precision"),
        "quantization": report.get("quantization"),
        "sparsity": sparse_check,
        "fidelity": report.get("fidelity"),
    }
    write_json(plan_path.parent / MANIFEST_NAME, manifest)
    return plan_path, manifest


# --- TensorRT-free helpers (unit-tested without TensorRT) -------------------------------------


def _onnx_input_dims(model: Any) -> list[tuple[str, tuple[Dim, ...]]]:
    """The graph inputs of an `onnx.ModelProto` (initializers excluded) and their dims.

    Args:
        model: an `onnx.ModelProto`.

    Returns:
        (input name, dims) per input; a dim is its `dim_value` (int), its `dim_param` (str),
        or None when neither is set.
    """
    initializers = {init.name for init in model.graph.initializer}
    result = []
    for value_info in model.graph.input:
        if value_info.name in initializers:
            continue
        dims: list[Dim] = []
        for d in value_info.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        result.append((value_info.name, tuple(dims)))
    return result


def _is_dynamic(dim: Dim) -> bool:
    return dim is None or isinstance(dim, str) or dim < 0


def _profile_shapes(
    network_inputs: Sequence[tuple[str, Sequence[Dim]]], profile: ProfileSettings
) -> dict[str, dict[str, tuple[int, ...]]]:
    """The min/opt/max shape of every input for one optimization profile.

    A dynamic axis 0 takes the profile's batch sizes, a dynamic axis 1 its sequence lengths;
    static dims are kept as they are.

    Args:
        network_inputs: (name, dims) per input, as TensorRT reports them (-1 = dynamic) or as
            `_onnx_input_dims` returns them (dim_param name or None = dynamic).
        profile: the (batch, sequence) min/opt/max triples.

    Returns:
        {input name: {"min": shape, "opt": shape, "max": shape}}, shapes as int tuples.

    Raises:
        EngineBuildError: an input has a dynamic dim at an axis other than 0 or 1.
    """
    corners = {"min": profile.min_shape, "opt": profile.opt_shape, "max": profile.max_shape}
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, dims in network_inputs:
        for axis, dim in enumerate(dims):
            if _is_dynamic(dim) and axis >= len(_PROFILE_AXES):
                raise EngineBuildError(
                    f"input {name!r} has a dynamic dimension {dim!r} at axis {axis} (shape "
                    f"{list(dims)}); only axis 0 (batch) and axis 1 (sequence) may be dynamic. "
                    "Export the model with a static size for that axis."
                )
        shapes[name] = {
            corner: tuple(
                int(values[axis]) if _is_dynamic(dim) else int(dim)  # type: ignore[arg-type]
                for axis, dim in enumerate(dims)
            )
            for corner, values in corners.items()
        }
    return shapes


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"


def _timing_cache_name(gpu_name: str, compute_capability: str, trt_version: str) -> str:
    """File name of the timing cache for one GPU model and TensorRT version.

    Args:
        gpu_name: e.g. "NVIDIA H100 80GB HBM3".
        compute_capability: e.g. "9.0".
        trt_version: e.g. "11.4.0.106".

    Returns:
        e.g. "nvidia-h100-80gb-hbm3_cc9.0_trt11.4.0.106.cache".
    """
    return f"{_slug(gpu_name)}_cc{_slug(compute_capability)}_trt{_slug(trt_version)}.cache"


def _describe_parser_error(node_index: int, node_name: str, op_type: str, desc: str) -> str:
    """One line for one ONNX parser error; node_index < 0 means the error has no node."""
    if node_index < 0:
        return f"  (no node): {desc}"
    return f"  node #{node_index} {node_name or '<unnamed>'!r} ({op_type or '?'}): {desc}"


def _tensorrt_problem() -> str | None:
    """Why `import tensorrt` fails here, or None when it works."""
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


def _gpu_problem() -> str | None:
    """Why no CUDA GPU can be used here, or None when one is visible."""
    try:
        import torch
    except ImportError as exc:
        return f"cannot check for a CUDA GPU: PyTorch does not import ({exc})"
    if not torch.cuda.is_available():
        build = "CPU-only PyTorch build" if torch.version.cuda is None else "no device visible"
        return f"no CUDA GPU is visible to PyTorch ({build}); TensorRT builds need an NVIDIA GPU"
    return None


def _gpu_info() -> dict[str, str]:
    """Name and compute capability ("9.0") of the current CUDA device."""
    import torch

    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


# --- TensorRT helpers --------------------------------------------------------------------------


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


def _parser_failure(parser: Any, onnx_path: Path) -> str:
    """The EngineBuildError message for a failed parse: every parser error with its node."""
    lines = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        lines.append(_describe_parser_error(
            error.node(), error.node_name(), error.node_operator(), error.desc()
        ))
    return (
        f"TensorRT's ONNX parser failed on {onnx_path} with {len(lines)} error(s):\n"
        + "\n".join(lines)
        + "\nThe nodes above use an op, type or attribute that TensorRT does not support; "
        "check the precision pass output or re-export with another opset."
    )


def _add_profiles(
    builder: Any, network: Any, config: Any, profiles: Sequence[ProfileSettings]
) -> list[dict[str, dict[str, tuple[int, ...]]]]:
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
        shapes = _profile_shapes(input_dims, profile_settings)
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
