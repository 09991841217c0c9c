"""The deployment build options on a real GPU: a tiny engine built with each one, its header read
with `read_plan_header` (no TensorRT) and compared with `tensorrt.__version__`, its manifest
record, and how TensorRT's runtime loads it.

Needs TensorRT 11 and an NVIDIA GPU (found as the builder finds them); skipped with the reason
where either is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.build.device import find_gpu
from compiler.build.engine import MANIFEST_NAME, engine_from_onnx
from compiler.build.plan_header import parse_version, read_plan_header
from compiler.settings import BuildSettings, EngineSettings, ModelSettings, PrecisionSettings, ProfileSettings
from tests.build.gpu_tier import gpu_marks


pytestmark = gpu_marks()

HIDDEN, OUT = 8, 4
PROFILES = (ProfileSettings((1, 1), (1, 8), (1, 8)), ProfileSettings((1, 1), (4, 8), (8, 16)))


def _onnx(path: Path) -> Path:
    """y = Cast32(Cast16(x) @ W16): FP16 compute, FP32 I/O, dynamic batch and sequence."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((HIDDEN, OUT)).astype(np.float16), "W")
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["x16", "W"], ["y16"]),
             helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", OUT])], initializer=[weight])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _build(tmp_path: Path, name: str, **engine) -> tuple[Path, dict]:
    settings = BuildSettings(
        model=ModelSettings(name="tiny", weights="random"), precision=PrecisionSettings(mode="fp16"),
        engine=EngineSettings(**{"profiles": PROFILES[:1], "workspace_mib": 256, "optimization_level": 0,
                                 "timing_cache_dir": str(tmp_path / "timing_cache"), **engine}),
        output_dir=str(tmp_path / "engines"))
    plan, manifest = engine_from_onnx(_onnx(tmp_path / name / "model.onnx"), settings, {})
    assert json.loads((plan.parent / MANIFEST_NAME).read_text()) == manifest
    return plan, manifest


def _deserialize(plan: Path, host_code_allowed: bool):
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    runtime.engine_host_code_allowed = host_code_allowed
    return runtime.deserialize_cuda_engine(plan.read_bytes())


OPTIONS = {
    "default": {},
    "ampere_plus": {"hardware_compat": "ampere+"},
    "same_cc": {"hardware_compat": "same-cc"},
    "version_compatible": {"version_compatible": True},
    "lean_runtime_excluded": {"version_compatible": True, "exclude_lean_runtime": True},
    "two_profiles": {"profiles": PROFILES},
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_each_option_builds_and_its_header_names_the_installed_tensorrt(tmp_path, name):
    import tensorrt as trt

    cc = tuple(int(v) for v in find_gpu().compute_capability.split("."))
    if OPTIONS[name].get("hardware_compat") == "ampere+" and cc < (8, 0):
        pytest.skip("ampere+ needs an Ampere or later build GPU")
    plan, manifest = _build(tmp_path, name, **OPTIONS[name])
    header = read_plan_header(plan)
    assert header.version == parse_version(trt.__version__)[:4]
    assert manifest["plan_header"] == header.to_dict() and manifest["tensorrt_version"] == trt.__version__
    expected = {"hardware_compat": "none", "version_compatible": False, "exclude_lean_runtime": False,
                **{k: v for k, v in OPTIONS[name].items() if k != "profiles"}}
    assert {k: manifest["build_options"][k] for k in expected} == expected
    assert len(manifest["profiles"]) == len(OPTIONS[name].get("profiles", PROFILES[:1]))
    assert manifest["cuda_version"] is None or manifest["cuda_version"].split(".")[0].isdigit()
    engine = _deserialize(plan, host_code_allowed=True)
    assert engine is not None
    assert engine.num_optimization_profiles == len(manifest["profiles"])


def test_a_version_compatible_plan_with_the_lean_runtime_needs_host_code_allowed(tmp_path):
    """What `compiler.deploy.checks.check_host_code` guards: TensorRT itself refuses the plan."""
    plan, _ = _build(tmp_path, "vc", version_compatible=True)
    assert _deserialize(plan, host_code_allowed=False) is None
    assert _deserialize(plan, host_code_allowed=True) is not None
