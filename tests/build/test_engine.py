"""compiler/build/engine.py against the real TensorRT 11 Python API, without a GPU.

The TensorRT 11 Python extension (`tensorrt.so` of the `tensorrt-cu13-bindings` wheel) is
installed but cannot be imported here (its builder libraries are missing), so its exported
names are read from the binary's strings instead: every class, enum member, method and
property that engine.py uses on TensorRT objects must appear there, and none of the APIs that
TensorRT 10/11 removed (weak typing, INT8 calibration) may appear in engine.py. engine.py is
the only module of compiler/build that imports TensorRT (checked), so the scan covers them all.

The second half tests engine.py's TensorRT-free parts: the timing cache name, parser error
lines, the 2:4 flag, the manifest, and `check_tensorrt` on this machine.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.build import engine as build
from compiler.build.device import GpuInfo, find_gpu
from compiler.errors import TensorRTUnavailableError
from compiler.settings import (BuildSettings, EngineSettings, ModelSettings, PrecisionSettings,
                               ProfileSettings)

BUILD_PY = Path(build.__file__)

# Removed in TensorRT 10/11 and absent from TensorRT 11's tensorrt.so (checked below, so that
# a scanner that finds everything cannot pass the conformance tests).
REMOVED_ABSENT_FROM_TRT11 = {
    "OBEY_PRECISION_CONSTRAINTS",
    "PREFER_PRECISION_CONSTRAINTS",
    "int8_calibrator",
    "set_int8_calibrator",
    "platform_has_fast_fp16",
    "platform_has_fast_int8",
    "set_quantization_flag",
    "get_calibration_profile",
    "EXPLICIT_BATCH",
    "set_output_type",
}
# Removed builder precision flags whose short names still occur in tensorrt.so (DataType.HALF
# docs, DataType.INT8, ...), so only their use in engine.py can be checked.
REMOVED_BUILDER_FLAGS = {"FP16", "INT8", "BF16", "FP8", "INT4", "FP4"}

# Attribute names that engine.py uses on non-TensorRT objects (stdlib, torch, onnx, our
# settings) and that tensorrt.so does not contain. Any other attribute name in engine.py must
# be exported by tensorrt.so. Add a name here only if it is truly not a TensorRT API.
NON_TENSORRT_ATTRIBUTES = {
    # importlib, logging, time, str, pathlib
    "util", "find_spec", "CRITICAL", "getLogger", "perf_counter", "join", "strip",
    "is_file", "read_bytes",
    # compiler.settings
    "sparse_weights", "timing_cache_dir", "workspace_mib",
    "hardware_compat", "version_compatible", "exclude_lean_runtime",
    # compiler.graph.sparsity.SparsityCheck
    "has_eligible", "to_dict",
    # compiler.build.device.GpuInfo, engine.BuiltEngine
    "compute_capability", "gpu", "build_seconds", "plan_bytes", "plan_path", "plan_header", "cuda_version",
}

# Names a working scanner must find in TensorRT 11's tensorrt.so.
KNOWN_TRT11_NAMES = {
    "build_serialized_network", "create_network", "OnnxParser", "parse_from_file",
    "STRONGLY_TYPED", "SPARSE_WEIGHTS", "set_memory_pool_limit", "num_io_tensors",
    "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "HardwareCompatibilityLevel", "AMPERE_PLUS",
    "SAME_COMPUTE_CAPABILITY", "hardware_compatibility_level",
    "INPUT",  # TensorIOMode.INPUT: stored only as the tail of CONDITIONAL_INPUT etc.
}


# --- reading tensorrt.so and engine.py --------------------------------------------------------


@lru_cache(maxsize=1)
def _trt_tokens() -> frozenset[str]:
    """Identifier-like strings ([A-Za-z0-9_]{3,}) of the TensorRT 11 Python extension."""
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "tensorrt-cu13-bindings is not installed; it is a declared test dependency: "
            "pip install tensorrt-cu13-bindings"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    libraries = sorted(package_dir.glob("tensorrt*.so"))
    if not libraries:
        pytest.fail(f"no tensorrt*.so in {package_dir}: pip install tensorrt-cu13-bindings")
    data = libraries[0].read_bytes()
    return frozenset(m.decode() for m in re.findall(rb"[A-Za-z0-9_]{3,}", data))


@lru_cache(maxsize=None)
def _exported(name: str) -> bool:
    """True when `name` is a string of tensorrt.so.

    The linker merges a string literal into the tail of a longer one ("INPUT" lives only as
    the end of "CONDITIONAL_INPUT"), so a name may appear as a token's suffix.
    """
    tokens = _trt_tokens()
    return name in tokens or any(token.endswith(name) for token in tokens)


@lru_cache(maxsize=1)
def _build_tree() -> ast.Module:
    return ast.parse(BUILD_PY.read_text(), filename=str(BUILD_PY))


def _tensorrt_aliases() -> set[str]:
    """Names bound by `import tensorrt [as X]` anywhere in engine.py."""
    return {
        alias.asname or alias.name
        for node in ast.walk(_build_tree()) if isinstance(node, ast.Import)
        for alias in node.names if alias.name == "tensorrt"
    }


def _attribute_chains(root_names: set[str]) -> set[tuple[str, ...]]:
    """Attribute chains rooted at one of `root_names`: trt.A.B -> ("A", "B")."""
    chains = set()
    for node in ast.walk(_build_tree()):
        if not isinstance(node, ast.Attribute):
            continue
        parts = []
        current: ast.expr = node
        while isinstance(current, ast.Attribute):
            parts.append(current.attr)
            current = current.value
        if isinstance(current, ast.Name) and current.id in root_names:
            chains.add(tuple(reversed(parts)))
    return chains


def _all_attribute_names() -> set[str]:
    return {n.attr for n in ast.walk(_build_tree()) if isinstance(n, ast.Attribute)}


# --- the scanner itself -----------------------------------------------------------------------


def test_scanner_finds_known_tensorrt11_names():
    missing = sorted(n for n in KNOWN_TRT11_NAMES if not _exported(n))
    assert not missing, f"scanner does not find names TensorRT 11 exports: {missing}"


def test_scanner_does_not_find_removed_names():
    found = sorted(n for n in REMOVED_ABSENT_FROM_TRT11 if _exported(n))
    assert not found, f"names removed by TensorRT 10/11 found in tensorrt.so: {found}"


# --- engine.py against tensorrt.so ------------------------------------------------------------


def test_engine_is_the_only_build_module_that_imports_tensorrt():
    others = []
    for path in sorted(BUILD_PY.parent.glob("*.py")):
        if path == BUILD_PY:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        imports = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imports += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        others += [f"{path.name}: {m}" for m in imports if m.split(".")[0] == "tensorrt"]
    assert BUILD_PY.parent.joinpath("device.py").is_file()  # the glob does see the package
    assert not others, f"TensorRT imported outside engine.py (not scanned): {others}"


def test_tensorrt_is_imported_only_inside_functions():
    aliases = _tensorrt_aliases()
    assert aliases == {"trt"}, f"expected `import tensorrt as trt`, found aliases {aliases}"
    module_level = [
        node.lineno for node in _build_tree().body
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.If, ast.Try))
        and any(
            isinstance(n, ast.Import) and any(a.name.startswith("tensorrt") for a in n.names)
            or isinstance(n, ast.ImportFrom) and (n.module or "").startswith("tensorrt")
            for n in ast.walk(node)
        )
    ]
    assert not module_level, f"module-level tensorrt import at line(s) {module_level}"
    module = importlib.import_module("compiler.build.engine")
    assert "trt" not in vars(module) and "tensorrt" not in vars(module)


def test_every_trt_attribute_chain_exists_in_tensorrt11():
    chains = _attribute_chains(_tensorrt_aliases())
    assert ("BuilderFlag", "SPARSE_WEIGHTS") in chains  # the walk does find chains
    missing = sorted(
        ".".join(("trt",) + chain) for chain in chains
        if not all(_exported(part) for part in chain)
    )
    assert not missing, f"not exported by TensorRT 11's tensorrt.so: {missing}"


def test_deployment_options_use_tensorrt11_names():
    chains = _attribute_chains(_tensorrt_aliases())
    for chain in (("BuilderFlag", "VERSION_COMPATIBLE"), ("BuilderFlag", "EXCLUDE_LEAN_RUNTIME"),
                  ("HardwareCompatibilityLevel", "AMPERE_PLUS"),
                  ("HardwareCompatibilityLevel", "SAME_COMPUTE_CAPABILITY")):
        assert chain in chains, f"engine.py no longer sets trt.{'.'.join(chain)}"
        assert all(_exported(part) for part in chain)
    assert "hardware_compatibility_level" in _all_attribute_names()
    assert _exported("hardware_compatibility_level")
    # a misspelt level would not pass: the scan tells these apart
    assert not _exported("AMPERE_PLUS_ONLY") and not _exported("SAME_COMPUTE_CAPABILITIES")


def test_every_other_attribute_is_tensorrt11_or_allowlisted():
    names = _all_attribute_names()
    for expected in ("create_network", "build_serialized_network", "set_memory_pool_limit",
                     "builder_optimization_level", "create_timing_cache", "set_shape",
                     "add_optimization_profile"):
        assert expected in names, f"engine.py no longer uses .{expected}"
    unknown = sorted(n for n in names - NON_TENSORRT_ATTRIBUTES if not _exported(n))
    assert not unknown, (
        f"attributes used in engine.py that TensorRT 11 does not export: {unknown} "
        "(if one is not a TensorRT API, add it to NON_TENSORRT_ATTRIBUTES)"
    )
    stale = sorted(NON_TENSORRT_ATTRIBUTES - names)
    assert not stale, f"NON_TENSORRT_ATTRIBUTES entries no longer used in engine.py: {stale}"
    assert not NON_TENSORRT_ATTRIBUTES & (REMOVED_ABSENT_FROM_TRT11 | REMOVED_BUILDER_FLAGS)


def test_engine_uses_no_removed_api():
    source = BUILD_PY.read_text()
    text_hits = sorted(
        n for n in REMOVED_ABSENT_FROM_TRT11 if re.search(rf"\b{re.escape(n)}\b", source)
    )
    assert not text_hits, f"engine.py mentions removed TensorRT APIs: {text_hits}"
    # trt.BuilderFlag.X as well as getattr(trt.BuilderFlag, "X")
    flag_hits = set(re.findall(r"BuilderFlag\s*(?:\.|,)\s*[\"']?(\w+)", source))
    assert flag_hits, "the BuilderFlag scan finds nothing (engine.py sets SPARSE_WEIGHTS)"
    assert not flag_hits & REMOVED_BUILDER_FLAGS, f"removed builder flags: {sorted(flag_hits)}"
    removed = REMOVED_ABSENT_FROM_TRT11 | REMOVED_BUILDER_FLAGS
    attr_hits = sorted(_all_attribute_names() & removed)
    assert not attr_hits, f"engine.py uses removed attributes: {attr_hits}"


# --- TensorRT-free parts ----------------------------------------------------------------------


def test_timing_cache_name_has_gpu_capability_and_version():
    name = build.timing_cache_name("NVIDIA H100 80GB HBM3", "9.0", "11.4.0.106")
    assert name == "nvidia-h100-80gb-hbm3_cc9.0_trt11.4.0.106.cache"
    assert build.timing_cache_name("NVIDIA A100-SXM4-40GB", "8.0", "11.4.0.106") == (
        "nvidia-a100-sxm4-40gb_cc8.0_trt11.4.0.106.cache")
    assert build.timing_cache_name("GPU/odd name", "12.0", "11.4") == "gpu-odd-name_cc12.0_trt11.4.cache"
    assert build.timing_cache_name("", "9.0", "11.4") == "unknown_cc9.0_trt11.4.cache"


def test_describe_parser_error_names_node_and_op():
    line = build.describe_parser_error(7, "/encoder/Softmax", "Softmax", "unsupported type")
    assert line == "  node #7 '/encoder/Softmax' (Softmax): unsupported type"
    assert build.describe_parser_error(0, "", "", "bad") == "  node #0 '<unnamed>' (?): bad"
    assert build.describe_parser_error(-1, "", "", "bad model") == "  (no node): bad model"


def _one_gemm_onnx(path: Path, weight: np.ndarray) -> Path:
    """y = x @ W for x (batch, sequence, K): a single MatMul with a constant (K, N) weight."""
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="gemm")], "one_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", n])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_sparse_weights_flag_follows_the_2_4_pattern_along_k(tmp_path):
    dense = np.arange(1, 33, dtype=np.float32).reshape(8, 4)  # K = 8: two groups of 4 per column
    sparse = dense.copy()
    sparse[[0, 3, 5, 6], :] = 0.0  # rows 0-3 keep 1 and 2, rows 4-7 keep 4 and 7: 2 of 4 zero
    across_n = dense.copy()
    across_n[:, [0, 1]] = 0.0  # 2 zeros in every group of 4 along N, none along K

    flag, check = build.sparse_weights_flag(_one_gemm_onnx(tmp_path / "s.onnx", sparse), EngineSettings())
    assert flag is True
    assert check == {"eligible": 1, "ineligible": 0, "sparse_mac_fraction": 1.0,
                     "has_eligible": True, "forced": False}
    flag, check = build.sparse_weights_flag(_one_gemm_onnx(tmp_path / "n.onnx", across_n), EngineSettings())
    assert flag is False and check["eligible"] == 0 and check["ineligible"] == 1
    forced_off = build.sparse_weights_flag(tmp_path / "s.onnx", EngineSettings(sparse_weights=False))
    assert forced_off[0] is False and forced_off[1]["forced"] is True
    forced_on = build.sparse_weights_flag(tmp_path / "n.onnx", EngineSettings(sparse_weights=True))
    assert forced_on[0] is True and forced_on[1]["eligible"] == 0


def test_engine_manifest_records_the_build(tmp_path):
    plan_path = tmp_path / build.PLAN_NAME
    plan_path.write_bytes(b"not really a plan")
    onnx_path = _one_gemm_onnx(tmp_path / "model.onnx", np.ones((4, 2), np.float32))
    shapes = {"x": {"min": (1, 1, 4), "opt": (2, 8, 4), "max": (4, 16, 4)}}
    built = build.BuiltEngine(
        plan_path=plan_path, plan_bytes=17, build_seconds=1.23456, profiles=[shapes],
        inputs=[{"name": "x", "dtype": "float32", "shape": [-1, -1, 4]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": [-1, -1, 2]}],
        sparse_weights=False, sparsity={"eligible": 0, "forced": False},
        timing_cache=tmp_path / "cache" / "gpu.cache", tensorrt_version="11.4.0.106",
        gpu=GpuInfo("NVIDIA H200", "9.0", "13.0"), plan_header={"version": [11, 4, 0, 106]},
        cuda_version="13.0",
    )
    settings = BuildSettings(
        model=ModelSettings(name="minilm"), precision=PrecisionSettings(mode="hybrid"),
        engine=EngineSettings(workspace_mib=512, optimization_level=2, hardware_compat="ampere+",
                              version_compatible=True, exclude_lean_runtime=True),
    )
    report = {"precision": {"mode": "hybrid"}, "quantization": None, "fidelity": {"cos": 0.99}}

    manifest = build.engine_manifest(built, onnx_path, settings, report)

    assert manifest == {
        "model": {"name": "minilm", "weights": settings.model.weights},
        "variant": "hybrid",
        "tensorrt_version": "11.4.0.106",
        "cuda_version": "13.0",
        "gpu": {"name": "NVIDIA H200", "compute_capability": "9.0", "driver_version": "13.0"},
        "plan_header": {"version": [11, 4, 0, 106]},
        "build_options": {"hardware_compat": "ampere+", "version_compatible": True,
                          "exclude_lean_runtime": True, "workspace_mib": 512, "optimization_level": 2},
        "profiles": [{"x": {"min": [1, 1, 4], "opt": [2, 8, 4], "max": [4, 16, 4]}}],
        "inputs": built.inputs,
        "outputs": built.outputs,
        "plan": {"file": "model.plan", "bytes": 17,
                 "sha256": hashlib.sha256(b"not really a plan").hexdigest()},
        "onnx": {"path": str(onnx_path), "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest()},
        "build_seconds": 1.235,
        "builder": {"workspace_mib": 512, "optimization_level": 2, "sparse_weights": False,
                    "strongly_typed": True, "timing_cache": str(tmp_path / "cache" / "gpu.cache")},
        "precision": {"mode": "hybrid"},
        "quantization": None,
        "sparsity": {"eligible": 0, "forced": False},
        "fidelity": {"cos": 0.99},
    }
    assert build.engine_manifest(built, onnx_path, settings, {})["precision"] is None


# --- check_tensorrt on this machine -----------------------------------------------------------


def _tensorrt_and_gpu_present() -> bool:
    return build.tensorrt_problem() is None and isinstance(find_gpu(), GpuInfo)


needs_missing_tensorrt_or_gpu = pytest.mark.skipif(
    _tensorrt_and_gpu_present(), reason="TensorRT and a GPU are present: nothing to report")


@needs_missing_tensorrt_or_gpu
def test_check_tensorrt_raises_with_onnx_path_and_next_steps(tmp_path):
    onnx_path = tmp_path / "engines" / "minilm" / "pretrained" / "hybrid" / "model.onnx"
    with pytest.raises(TensorRTUnavailableError) as excinfo:
        build.check_tensorrt(onnx_path)
    error = excinfo.value
    message = str(error)
    assert error.exit_code == 2
    assert f"The TensorRT-ready ONNX is at {onnx_path}" in message
    assert f"python -m compiler build --onnx {onnx_path}" in message
    assert f"trtexec --onnx={onnx_path} --stronglyTyped" in message


@needs_missing_tensorrt_or_gpu
def test_check_tensorrt_says_why_tensorrt_does_not_import(tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ModuleNotFoundError:
        expected = "module is missing"
    except (ImportError, OSError):
        expected = "builder libraries are missing"
    else:
        pytest.skip("tensorrt imports; only the GPU is missing")
    with pytest.raises(TensorRTUnavailableError, match=expected) as excinfo:
        build.check_tensorrt(tmp_path / "model.onnx")
    assert "pip install '.[gpu]'" in str(excinfo.value)


@needs_missing_tensorrt_or_gpu
def test_check_tensorrt_says_why_there_is_no_gpu(tmp_path):
    reason = find_gpu()
    if isinstance(reason, GpuInfo):
        pytest.skip(f"the driver reports {reason.name}; only TensorRT is missing")
    with pytest.raises(TensorRTUnavailableError) as excinfo:
        build.check_tensorrt(tmp_path / "model.onnx")
    assert f"  - no usable GPU: {reason}\n" in str(excinfo.value)


@needs_missing_tensorrt_or_gpu
def test_engine_from_onnx_checks_the_file_then_tensorrt_and_writes_nothing(tmp_path):
    from compiler.errors import InvalidOnnxError

    settings = BuildSettings(
        engine=EngineSettings(timing_cache_dir=str(tmp_path / "timing_cache")),
        output_dir=str(tmp_path / "engines"),
    )
    # A missing ONNX is bad input (exit 1) on any machine: checked before TensorRT (exit 2).
    with pytest.raises(InvalidOnnxError, match="no such ONNX file") as missing:
        build.engine_from_onnx(tmp_path / "missing.onnx", settings, {})
    assert missing.value.exit_code == 1
    onnx_path = _one_gemm_onnx(tmp_path / "model.onnx", np.ones((4, 2), np.float32))
    with pytest.raises(TensorRTUnavailableError):
        build.engine_from_onnx(onnx_path, settings, {})
    # The builder writes model.plan and manifest.json beside the ONNX and a timing cache into
    # timing_cache_dir: none of them exists.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_the_build_later_hint_keeps_the_requested_profile(tmp_path):
    from compiler.settings import ProfileSettings

    onnx_path = _one_gemm_onnx(tmp_path / "model.onnx", np.ones((4, 2), np.float32))
    with pytest.raises(TensorRTUnavailableError) as err:
        build.check_tensorrt(onnx_path, (ProfileSettings(opt_shape=(4, 128), max_shape=(8, 256)),))
    assert f"python -m compiler build --onnx {onnx_path} --min-shape 1x1 --opt-shape 4x128 --max-shape 8x256" \
        in str(err.value)
    with pytest.raises(TensorRTUnavailableError) as err:
        build.check_tensorrt(onnx_path, (ProfileSettings(),))  # the default profile needs no flags
    assert f"python -m compiler build --onnx {onnx_path}\n" in str(err.value)
    (tmp_path / "my dir").mkdir()
    spaced = _one_gemm_onnx(tmp_path / "my dir" / "model.onnx", np.ones((4, 2), np.float32))
    with pytest.raises(TensorRTUnavailableError) as err:
        build.check_tensorrt(spaced, (ProfileSettings(),))
    assert f"python -m compiler build --onnx '{spaced}'\n" in str(err.value)  # one shell argument
    assert f"trtexec --onnx='{spaced}' --stronglyTyped" in str(err.value)


def test_the_build_later_hint_keeps_several_profiles_and_the_deployment_options(tmp_path):
    onnx_path = _one_gemm_onnx(tmp_path / "model.onnx", np.ones((4, 2), np.float32))
    eng = EngineSettings(profiles=(ProfileSettings((1, 1), (1, 128), (1, 128)),
                                   ProfileSettings((1, 1), (16, 128), (32, 512))),
                         hardware_compat="same-cc", version_compatible=True, exclude_lean_runtime=True)
    with pytest.raises(TensorRTUnavailableError) as err:
        build.check_tensorrt(onnx_path, engine=eng)
    assert (f"python -m compiler build --onnx {onnx_path} --profile 1x1:1x128:1x128 --profile 1x1:16x128:32x512"
            " --hardware-compat same-cc --version-compatible --exclude-lean-runtime\n") in str(err.value)
    with pytest.raises(TensorRTUnavailableError) as err:
        build.check_tensorrt(onnx_path, engine=EngineSettings())
    assert f"python -m compiler build --onnx {onnx_path}\n" in str(err.value)


def test_onnx_runtime_fused_ops_are_refused_before_tensorrt(tmp_path):
    import onnx

    from compiler.build.engine import engine_from_onnx
    from compiler.errors import InvalidOnnxError
    from compiler.settings import BuildSettings
    from tests.models import fused_onnx_model

    onnx.save(fused_onnx_model(), tmp_path / "fused.onnx")
    with pytest.raises(InvalidOnnxError, match=r"com\.microsoft\.SkipLayerNormalization.*takes standard ops only"):
        engine_from_onnx(tmp_path / "fused.onnx", BuildSettings(output_dir=str(tmp_path)), {})  # was exit 2 here,
        # a parser failure on the GPU host
