"""`python -m compiler inspect`: a tiny ONNX, a plan header (written from the documented layout),
a hand-made bundle (manifest per docs/deploy.md), and the exit codes 0 / 1 / 4."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.cli import main
from compiler.deploy.inspect import format_report, inspect_bundle, inspect_onnx, inspect_path
from compiler.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_REFUSED, CompilerError
from tests.deploy.plan_headers import write_header

K, N = 8, 4


def _tiny_onnx(path: Path) -> Path:
    """x -> Cast16 -> MatMul(W16, 2:4 along K) -> Cast32 -> y, and x -> Q -> DQ -> MatMul(DQ(W8)) -> z."""
    sparse = np.arange(1, K * N + 1, dtype=np.float32).reshape(K, N)
    sparse[[0, 3, 5, 6], :] = 0.0  # two zeros in every group of 4 along K
    inits = [numpy_helper.from_array(sparse.astype(np.float16), "W16"),
             numpy_helper.from_array(np.ones((K, N), np.int8), "W8"),
             numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
             numpy_helper.from_array(np.array(0, np.int8), "zero")]
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], name="cast_in", to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["x16", "W16"], ["y16"], name="gemm_fp16"),
        helper.make_node("Cast", ["y16"], ["y"], name="cast_out", to=TensorProto.FLOAT),
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xdq"], name="dq"),
        helper.make_node("DequantizeLinear", ["W8", "scale", "zero"], ["wdq"], name="dq_w"),
        helper.make_node("MatMul", ["xdq", "wdq"], ["z"], name="gemm_int8"),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", N]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", "sequence", N])], initializer=inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["-q", "inspect", *argv])
    return code, out.getvalue(), err.getvalue()


def test_onnx_opset_io_precisions_qdq_and_2_4(tmp_path):
    report = inspect_onnx(_tiny_onnx(tmp_path / "tiny.onnx"))
    assert report["opset"] == {"ai.onnx": 17}
    assert report["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", "sequence", K]}]
    assert [o["name"] for o in report["outputs"]] == ["y", "z"]
    p = report["precision"]
    assert p["nodes"] == 7
    assert p["compute"] == {"fp16": 1, "fp32": 1}
    assert p["matmuls"] == {"fp16": 1, "int8": 1}
    assert p["casts"] == {"to fp16": 1, "to fp32": 1}
    assert p["qdq"] == {"quantize": 1, "dequantize": 2, "pairs": 1, "weight_dequantize": 1}
    sparse = report["sparsity_2_4"]
    assert (sparse["eligible"], sparse["ineligible"], sparse["eligible_nodes"]) == (1, 1, ["gemm_fp16"])
    assert report["tensorrt_ready"] is None


def test_an_onnx_runtime_fused_graph_is_named_not_tensorrt_ready(tmp_path):
    from tests.models import fused_onnx_model

    onnx.save(fused_onnx_model(), tmp_path / "fused.onnx")
    assert "com.microsoft.SkipLayerNormalization" in inspect_onnx(tmp_path / "fused.onnx")["tensorrt_ready"]
    code, out, _ = _cli(str(tmp_path / "fused.onnx"))
    assert code == EXIT_OK and "not TensorRT-ready: ops outside the standard ONNX domain" in out


def test_inspect_onnx_on_the_command_line(tmp_path):
    path = _tiny_onnx(tmp_path / "tiny.onnx")
    code, out, _ = _cli(str(path))
    assert code == EXIT_OK
    assert "compute nodes by precision: fp16 1, fp32 1" in out and "1 Q->DQ pairs" in out
    assert "2:4-eligible GEMMs: 1 of 2" in out and "x: float32 [batch, sequence, 8]" in out
    code, out, _ = _cli(str(path), "--json")
    assert code == EXIT_OK and json.loads(out)["precision"]["matmuls"] == {"fp16": 1, "int8": 1}


def test_inspect_a_plan_header(tmp_path):
    path = write_header(tmp_path / "model.plan", (11, 4, 0, 106))
    report = inspect_path(path)
    assert report["kind"] == "plan" and report["tensorrt_version"] == "11.4.0.106"
    assert report["header"] == {"version": [11, 4, 0, 106]} and report["bytes"] == 28
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    code, out, _ = _cli(str(path))
    assert code == EXIT_OK and "built by TensorRT 11.4.0.106" in out


def test_not_a_plan_is_bad_input(tmp_path):
    path = tmp_path / "model.plan"
    path.write_bytes(b"PK\x03\x04 a zip file, not a plan" * 2)
    code, _, err = _cli(str(path))
    assert code == EXIT_BAD_INPUT and f"{path} is not a TensorRT 8.6+ plan" in err
    code, _, err = _cli(str(tmp_path / "absent.plan"))
    assert code == EXIT_BAD_INPUT and "no such file or folder" in err
    code, _, err = _cli(str(tmp_path))
    assert code == EXIT_BAD_INPUT and "not a bundle" in err


# --- a bundle laid out as the manifest contract says -----------------------------------------------


def _bundle(tmp_path: Path, **engine) -> Path:
    root = tmp_path / "bundle"
    (root / "m/1").mkdir(parents=True)
    (root / "m_onnxruntime/1").mkdir(parents=True)
    write_header(root / "m/1/model.plan", (11, 4, 0, 106))  # a header: enough for every check here
    _tiny_onnx(root / "m_onnxruntime/1/model.onnx")
    (root / "m/config.pbtxt").write_text('name: "m"\nplatform: "tensorrt_plan"\n')
    files = {p.relative_to(root).as_posix(): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                              "bytes": p.stat().st_size} for p in root.rglob("*") if p.is_file()}
    entry = {"file": "m/1/model.plan", "compute_capability": "9.0", "tensorrt_version": "11.4.0.106",
             "gpu": {"name": "NVIDIA H200", "compute_capability": "9.0", "driver_version": "13.0"},
             "hardware_compat": "none", "version_compatible": False, "exclude_lean_runtime": False,
             "plan_header": {"version": [11, 4, 0, 106]}, **engine}
    manifest = {"format": "trt-compiler-bundle/1", "status": "built", "name": "m",
                "model": {"name": "tiny", "weights": "random"}, "variant": "hybrid", "files": files,
                "io": {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, -1, K]}], "outputs": []},
                "profiles": [{"x": {"min": [1, 1, K], "opt": [2, 8, K], "max": [4, 16, K]}}],
                "build_options": {"hardware_compat": entry["hardware_compat"], "version_compatible":
                                  entry["version_compatible"], "exclude_lean_runtime": entry["exclude_lean_runtime"]},
                "engines": [entry], "onnxruntime": {"file": "m_onnxruntime/1/model.onnx", "precision": "hybrid"},
                "precision": {"mode": "hybrid", "fp32_nodes": [{"node": "a"}]},
                "fidelity": {"real": {"samples": 4, "cosine_min": 0.99999, "cosine_mean": 0.999995,
                                      "max_abs_err": 0.01, "nonfinite_count": 0}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _host(tensorrt="11.4.0.106", cc="9.0") -> dict:
    return {"tensorrt": tensorrt, "tensorrt_problem": None, "gpu_problem": None,
            "gpu": {"name": "NVIDIA H200", "compute_capability": cc, "driver_version": "13.0"},
            "onnxruntime": "1.32.0", "onnxruntime_providers": ["CPUExecutionProvider"]}


def test_bundle_hashes_summary_and_what_a_matching_host_runs(tmp_path):
    report = inspect_bundle(_bundle(tmp_path), host=_host())
    assert report["hashes"] == {"ok": True, "files": 3, "bytes": report["hashes"]["bytes"], "message": None}
    (engine,) = report["engines"]
    assert engine["runs_here"] and engine["problems"] == [] and engine["plan_version"] == [11, 4, 0, 106]
    assert report["selected_engine"] == "m/1/model.plan" and report["onnxruntime"]["runs_here"]
    text = format_report(report)
    assert "every sha256 matches the manifest" in text and "runs here (selected)" in text
    assert "profile 0: x 1x1x8..2x8x8..4x16x8" in text and "precision hybrid: 1 FP32 nodes" in text


def test_bundle_on_hosts_that_cannot_run_its_engine(tmp_path):
    root = _bundle(tmp_path)
    (engine,) = inspect_bundle(root, host=_host(tensorrt="11.5.0.1", cc="8.6"))["engines"]
    assert not engine["runs_here"]
    assert any("TensorRT 11.4.0.106 exactly" in p for p in engine["problems"])
    assert any("compute capability 8.6 (Ampere)" in p for p in engine["problems"])
    host = _host()
    host.update(tensorrt=None, tensorrt_problem="no module named tensorrt", gpu=None, gpu_problem="no driver")
    (engine,) = inspect_bundle(root, host=host)["engines"]
    assert engine["problems"] == ["no TensorRT here: no module named tensorrt", "no GPU here: no driver"]


def test_bundle_with_host_code_says_so(tmp_path):
    root = _bundle(tmp_path, version_compatible=True, hardware_compat="ampere+")
    (engine,) = inspect_bundle(root, host=_host(tensorrt="11.5.0.1", cc="12.0"))["engines"]
    assert engine["runs_here"] and engine["notes"] == ["carries host code (lean runtime): loads only with "
                                                       "--allow-host-code"]


def test_a_tampered_bundle_exits_4(tmp_path):
    root = _bundle(tmp_path)
    assert _cli(str(root))[0] == EXIT_OK
    (root / "m/config.pbtxt").write_text('name: "m"\nplatform: "onnxruntime_onnx"\n')
    code, out, err = _cli(str(root))
    assert code == EXIT_REFUSED
    assert "HASH CHECK FAILED" in out and "refused (file hash)" in err and "m/config.pbtxt" in err
    code, out, _ = _cli(str(root), "--json")
    assert code == EXIT_REFUSED and json.loads(out)["hashes"]["ok"] is False


def test_inspect_path_raises_compiler_error_for_a_folder_without_manifest(tmp_path):
    with pytest.raises(CompilerError, match="not a bundle"):
        inspect_path(tmp_path)
