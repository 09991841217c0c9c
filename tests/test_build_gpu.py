"""Engine builds through compiler.build.engine_from_onnx; needs TensorRT 11 and a CUDA GPU."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.artifacts import sha256_file
from compiler.build.engine import engine_from_onnx
from compiler.errors import EngineBuildError
from compiler.settings import (
    BuildSettings,
    EngineSettings,
    ModelSettings,
    PrecisionSettings,
    ProfileSettings,
)


def _skip_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"TensorRT does not import: {exc}"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible to PyTorch"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

HIDDEN, OUT = 8, 4
PROFILES = (
    ProfileSettings(min_shape=(1, 1), opt_shape=(2, 8), max_shape=(4, 16)),
    ProfileSettings(min_shape=(1, 1), opt_shape=(8, 32), max_shape=(16, 64)),
)


def _matmul_add_onnx(path):
    """y = Cast32(Cast16(x) @ W + b): FP16 weights, FP32 I/O, dynamic batch and sequence.

    Saved with external data so that parsing from the file must find `model.onnx.data`.
    """
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((HIDDEN, OUT)).astype(np.float16), "W")
    bias = numpy_helper.from_array(rng.standard_normal(OUT).astype(np.float16), "b")
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], name="cast_in", to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["x16", "W"], ["xw"], name="matmul"),
        helper.make_node("Add", ["xw", "b"], ["y16"], name="add"),
        helper.make_node("Cast", ["y16"], ["y"], name="cast_out", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "matmul_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", OUT])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return path


def _settings(tmp_path, **engine) -> BuildSettings:
    return BuildSettings(
        model=ModelSettings(name="tiny-matmul", weights="random"),
        precision=PrecisionSettings(mode="fp16"),
        engine=EngineSettings(
            profiles=PROFILES, workspace_mib=256, optimization_level=1,
            timing_cache_dir=str(tmp_path / "timing_cache"), **engine,
        ),
        output_dir=str(tmp_path / "engines"),
    )


def test_engine_and_manifest(tmp_path):
    import tensorrt as trt
    import torch

    onnx_path = _matmul_add_onnx(tmp_path / "model.onnx")
    settings = _settings(tmp_path)
    report = {"precision": {"mode": "fp16"}, "fidelity": {"max_abs_diff": 0.01}}

    plan_path, manifest = engine_from_onnx(onnx_path, settings, report)

    assert plan_path == onnx_path.parent / "model.plan"
    assert plan_path.is_file() and plan_path.stat().st_size > 0
    manifest_path = plan_path.parent / "manifest.json"
    assert json.loads(manifest_path.read_text()) == manifest

    assert manifest["model"] == {"name": "tiny-matmul", "weights": "random"}
    assert manifest["variant"] == "fp16"
    assert manifest["tensorrt_version"] == trt.__version__
    major, minor = torch.cuda.get_device_capability()
    assert manifest["gpu"] == {"name": torch.cuda.get_device_name(),
                               "compute_capability": f"{major}.{minor}"}
    assert manifest["profiles"] == [
        {"x": {"min": [1, 1, HIDDEN], "opt": [2, 8, HIDDEN], "max": [4, 16, HIDDEN]}},
        {"x": {"min": [1, 1, HIDDEN], "opt": [8, 32, HIDDEN], "max": [16, 64, HIDDEN]}},
    ]
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, -1, HIDDEN]}]
    assert manifest["outputs"] == [{"name": "y", "dtype": "float32", "shape": [-1, -1, OUT]}]
    assert manifest["plan"]["sha256"] == sha256_file(plan_path)
    assert manifest["plan"]["bytes"] == plan_path.stat().st_size
    assert manifest["onnx"]["sha256"] == sha256_file(onnx_path)
    assert manifest["build_seconds"] > 0
    assert manifest["builder"] == {
        "workspace_mib": 256, "optimization_level": 1, "sparse_weights": False,
        "strongly_typed": True, "timing_cache": manifest["builder"]["timing_cache"],
    }
    assert manifest["precision"] == report["precision"]
    assert manifest["fidelity"] == report["fidelity"]

    cache_files = list((tmp_path / "timing_cache").iterdir())
    assert [str(p) for p in cache_files] == [manifest["builder"]["timing_cache"]]
    assert cache_files[0].stat().st_size > 0

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    assert engine.num_optimization_profiles == len(PROFILES)


def test_rebuild_reuses_timing_cache_and_sparse_flag(tmp_path):
    onnx_path = _matmul_add_onnx(tmp_path / "model.onnx")
    engine_from_onnx(onnx_path, _settings(tmp_path), {})
    cache = next((tmp_path / "timing_cache").iterdir())

    plan_path, manifest = engine_from_onnx(onnx_path, _settings(tmp_path, sparse_weights=True), {})

    assert manifest["builder"]["sparse_weights"] is True
    assert manifest["builder"]["timing_cache"] == str(cache)
    assert manifest["precision"] is None and manifest["fidelity"] is None
    assert manifest["plan"]["sha256"] == sha256_file(plan_path)


def test_parser_errors_name_the_node(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery_node", domain="com.example")],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    onnx_path = tmp_path / "bad.onnx"
    onnx.save_model(model, str(onnx_path))

    with pytest.raises(EngineBuildError, match=r"mystery_node.*NoSuchOp") as excinfo:
        engine_from_onnx(onnx_path, _settings(tmp_path), {})
    assert "node #0" in str(excinfo.value)
    assert not (tmp_path / "engines").exists()
