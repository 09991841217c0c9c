"""compiler/build.py against the real TensorRT 11 Python API, without a GPU.

The TensorRT 11 Python extension (`tensorrt.so` of the `tensorrt-cu13-bindings` wheel) is
installed but cannot be imported here (its builder libraries are missing), so its exported
names are read from the binary's strings instead: every class, enum member, method and
property that build.py uses on TensorRT objects must appear there, and none of the APIs that
TensorRT 10/11 removed (weak typing, INT8 calibration) may appear in build.py.

The second half unit-tests build.py's TensorRT-free helpers and `check_tensorrt`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from compiler.build import engine as build
from compiler.errors import EngineBuildError, TensorRTUnavailableError
from compiler.settings import BuildSettings, ProfileSettings

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
# docs, DataType.INT8, ...), so only their use in build.py can be checked.
REMOVED_BUILDER_FLAGS = {"FP16", "INT8", "BF16", "FP8", "INT4", "FP4"}

# Attribute names that build.py uses on non-TensorRT objects (stdlib, torch, onnx, our
# settings) and that tensorrt.so does not contain. Any other attribute name in build.py must
# be exported by tensorrt.so. Add a name here only if it is truly not a TensorRT API.
NON_TENSORRT_ATTRIBUTES = {
    # importlib, logging, time, str, pathlib
    "util", "find_spec", "CRITICAL", "getLogger", "perf_counter", "join", "strip",
    "is_file", "read_bytes",
    # torch.cuda
    "is_available", "current_device", "get_device_capability", "get_device_name",
    # onnx protobuf
    "HasField", "dim_param", "dim_value", "tensor_type",
    # compiler.settings
    "min_shape", "opt_shape", "max_shape", "sparse_weights", "timing_cache_dir",
    "workspace_mib",
    # compiler.training.prune.SparsityCheck
    "has_eligible", "to_dict",
}

# Names a working scanner must find in TensorRT 11's tensorrt.so.
KNOWN_TRT11_NAMES = {
    "build_serialized_network", "create_network", "OnnxParser", "parse_from_file",
    "STRONGLY_TYPED", "SPARSE_WEIGHTS", "set_memory_pool_limit", "num_io_tensors",
    "INPUT",  # TensorIOMode.INPUT: stored only as the tail of CONDITIONAL_INPUT etc.
}


# --- reading tensorrt.so and build.py ---------------------------------------------------------


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
    """Names bound by `import tensorrt [as X]` anywhere in build.py."""
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


# --- build.py against tensorrt.so -------------------------------------------------------------


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


def test_every_other_attribute_is_tensorrt11_or_allowlisted():
    names = _all_attribute_names()
    for expected in ("create_network", "build_serialized_network", "set_memory_pool_limit",
                     "builder_optimization_level", "create_timing_cache", "set_shape",
                     "add_optimization_profile"):
        assert expected in names, f"build.py no longer uses .{expected}"
    unknown = sorted(n for n in names - NON_TENSORRT_ATTRIBUTES if not _exported(n))
    assert not unknown, (
        f"attributes used in build.py that TensorRT 11 does not export: {unknown} "
        "(if one is not a TensorRT API, add it to NON_TENSORRT_ATTRIBUTES)"
    )
    stale = sorted(NON_TENSORRT_ATTRIBUTES - names)
    assert not stale, f"NON_TENSORRT_ATTRIBUTES entries no longer used in build.py: {stale}"
    assert not NON_TENSORRT_ATTRIBUTES & (REMOVED_ABSENT_FROM_TRT11 | REMOVED_BUILDER_FLAGS)


def test_build_py_uses_no_removed_api():
    source = BUILD_PY.read_text()
    text_hits = sorted(
        n for n in REMOVED_ABSENT_FROM_TRT11 if re.search(rf"\b{re.escape(n)}\b", source)
    )
    assert not text_hits, f"build.py mentions removed TensorRT APIs: {text_hits}"
    # trt.BuilderFlag.X as well as getattr(trt.BuilderFlag, "X")
    flag_hits = set(re.findall(r"BuilderFlag\s*(?:\.|,)\s*[\"']?(\w+)", source))
    assert flag_hits, "the BuilderFlag scan finds nothing (build.py sets SPARSE_WEIGHTS)"
    assert not flag_hits & REMOVED_BUILDER_FLAGS, f"removed builder flags: {sorted(flag_hits)}"
    removed = REMOVED_ABSENT_FROM_TRT11 | REMOVED_BUILDER_FLAGS
    attr_hits = sorted(_all_attribute_names() & removed)
    assert not attr_hits, f"build.py uses removed attributes: {attr_hits}"


# --- TensorRT-free helpers --------------------------------------------------------------------


def _tiny_onnx(inputs: list[tuple[str, list]]) -> onnx.ModelProto:
    """A model whose int64 inputs (with the given dims) each feed an Identity."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [name], [f"{name}_out"]) for name, _ in inputs],
        "tiny",
        [helper.make_tensor_value_info(name, TensorProto.INT64, dims) for name, dims in inputs],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.INT64, dims)
         for name, dims in inputs],
        initializer=[helper.make_tensor("unused", TensorProto.INT64, [1], [0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_input_dims_reads_params_values_and_unknowns():
    model = _tiny_onnx([("input_ids", ["batch", "sequence"]), ("x", [None, 4])])
    # An initializer listed as a graph input (old exporters) is not a network input.
    model.graph.input.append(helper.make_tensor_value_info("unused", TensorProto.INT64, [1]))
    assert build._onnx_input_dims(model) == [
        ("input_ids", ("batch", "sequence")),
        ("x", (None, 4)),
    ]


def test_profile_shapes_from_onnx_inputs():
    model = _tiny_onnx([("input_ids", ["batch", "sequence"]),
                        ("attention_mask", ["batch", "sequence"])])
    profile = ProfileSettings(min_shape=(1, 1), opt_shape=(4, 128), max_shape=(32, 512))
    shapes = build._profile_shapes(build._onnx_input_dims(model), profile)
    expected = {"min": (1, 1), "opt": (4, 128), "max": (32, 512)}
    assert shapes == {"input_ids": expected, "attention_mask": expected}


def test_profile_shapes_keep_static_dims_and_accept_tensorrt_dims():
    profile = ProfileSettings(min_shape=(1, 2), opt_shape=(2, 8), max_shape=(8, 64))
    shapes = build._profile_shapes(
        [("hidden", (-1, -1, 16)), ("fixed_batch", (1, "sequence")), ("lengths", (-1,))],
        profile,
    )
    assert shapes["hidden"] == {"min": (1, 2, 16), "opt": (2, 8, 16), "max": (8, 64, 16)}
    assert shapes["fixed_batch"] == {"min": (1, 2), "opt": (1, 8), "max": (1, 64)}
    assert shapes["lengths"] == {"min": (1,), "opt": (2,), "max": (8,)}


def test_profile_shapes_reject_dynamic_axis_beyond_sequence():
    model = _tiny_onnx([("features", ["batch", "sequence", "hidden"])])
    with pytest.raises(EngineBuildError, match=r"'features'.*'hidden'.*axis 2"):
        build._profile_shapes(build._onnx_input_dims(model), ProfileSettings())


def test_timing_cache_name_has_gpu_capability_and_version():
    name = build._timing_cache_name("NVIDIA H100 80GB HBM3", "9.0", "11.4.0.106")
    assert name == "nvidia-h100-80gb-hbm3_cc9.0_trt11.4.0.106.cache"
    assert build._timing_cache_name("NVIDIA A100-SXM4-40GB", "8.0", "11.4.0.106") != name
    assert "/" not in build._timing_cache_name("GPU/odd name", "12.0", "11.4")


def test_describe_parser_error_names_node_and_op():
    line = build._describe_parser_error(7, "/encoder/Softmax", "Softmax", "unsupported type")
    assert "#7" in line and "/encoder/Softmax" in line and "Softmax" in line
    assert "unsupported type" in line
    assert "no node" in build._describe_parser_error(-1, "", "", "bad model")


# --- check_tensorrt on this machine -----------------------------------------------------------


def _tensorrt_and_gpu_present() -> bool:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_tensorrt_and_gpu_present(), reason="TensorRT and a CUDA GPU are present")
def test_check_tensorrt_raises_with_onnx_path_and_next_steps(tmp_path):
    onnx_path = tmp_path / "engines" / "minilm" / "pretrained" / "hybrid" / "model.onnx"
    with pytest.raises(TensorRTUnavailableError) as excinfo:
        build.check_tensorrt(onnx_path)
    error = excinfo.value
    message = str(error)
    assert error.exit_code == 2
    assert str(onnx_path) in message
    assert f"python -m compiler build --onnx {onnx_path}" in message
    assert f"trtexec --onnx={onnx_path} --stronglyTyped" in message
    assert "TensorRT" in message or "GPU" in message


@pytest.mark.skipif(_tensorrt_and_gpu_present(), reason="TensorRT and a CUDA GPU are present")
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


@pytest.mark.skipif(_tensorrt_and_gpu_present(), reason="TensorRT and a CUDA GPU are present")
def test_engine_from_onnx_checks_tensorrt_first(tmp_path):
    settings = BuildSettings(output_dir=str(tmp_path / "out"))
    with pytest.raises(TensorRTUnavailableError):
        build.engine_from_onnx(tmp_path / "missing.onnx", settings, {})
    assert not (tmp_path / "out").exists()
