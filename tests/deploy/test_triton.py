"""compiler/deploy/triton.py: config.pbtxt written and parsed back with Triton's own protobuf schema
(tritonclient's model_config_pb2 + protobuf text_format), cross-checked against an ONNX graph's I/O."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as pb

from compiler.deploy import triton
from compiler.deploy.bundle import onnx_io
from compiler.errors import CompilerError
from tests.models import make_model


def profile(min_bs, opt_bs, max_bs, names=("input_ids", "attention_mask")):
    return {n: {"min": list(min_bs), "opt": list(opt_bs), "max": list(max_bs)} for n in names}


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    """int64 (batch, sequence) inputs; an FP16 (batch, sequence, 4) and an FP32 (batch, 4) output."""
    import numpy as np

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    hidden = helper.make_tensor_value_info("hidden", TensorProto.FLOAT16, ["batch", "sequence", 4])
    pooled = helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("Mul", ["input_ids", "attention_mask"], ["m"]),
             helper.make_node("Cast", ["m"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["f", "axis"], ["u"]),
             helper.make_node("Mul", ["u", "w"], ["h32"]),
             helper.make_node("Cast", ["h32"], ["hidden"], to=TensorProto.FLOAT16),
             helper.make_node("ReduceMean", ["h32"], ["pooled"], axes=[1], keepdims=0)]
    model = make_model(nodes, [ids, mask], [hidden, pooled],
                       {"axis": np.array([-1], np.int64), "w": np.ones(4, np.float32)})
    path = tmp_path_factory.mktemp("triton") / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_tensorrt_config_parses_with_tritons_schema_and_matches_the_onnx(onnx_file, tmp_path):
    io = onnx_io(onnx_file)
    assert [t["dtype"] for t in io["outputs"]] == ["float16", "float32"]
    config = triton.tensorrt_config("tiny_hybrid", io, [profile((1, 1), (8, 128), (32, 512))])
    path = triton.write_config(tmp_path / "tiny_hybrid" / "config.pbtxt", config)
    parsed = text_format.Parse(path.read_text(), pb.ModelConfig())  # Triton's own schema, independently
    assert parsed == triton.read_config(path) == config
    assert parsed.platform == "tensorrt_plan" and parsed.max_batch_size == 32
    assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in parsed.input] == [
        ("input_ids", "TYPE_INT64", [-1]), ("attention_mask", "TYPE_INT64", [-1])]
    assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in parsed.output] == [
        ("hidden", "TYPE_FP16", [-1, 4]), ("pooled", "TYPE_FP32", [4])]
    assert parsed.HasField("dynamic_batching") and parsed.default_model_filename == "model.plan"
    assert [g.kind for g in parsed.instance_group] == [pb.ModelInstanceGroup.KIND_GPU]
    assert list(parsed.instance_group[0].profile) == [] and not parsed.cc_model_filenames
    assert triton.io_mismatches(parsed, io) == []


def test_mismatch_with_the_graph_is_found(onnx_file):
    io = onnx_io(onnx_file)
    config = triton.tensorrt_config("m", io, [profile((1, 1), (1, 8), (4, 16))])
    config.output[0].data_type = pb.TYPE_FP32
    config.input[1].dims[:] = [8]
    problems = triton.io_mismatches(config, io)
    assert any("hidden" in p and "TYPE_FP32" in p for p in problems)
    assert any("attention_mask" in p and "dims [8]" in p for p in problems)


def test_several_profiles_give_one_instance_group_listing_each(onnx_file):
    io = onnx_io(onnx_file)
    profiles = [profile((1, 1), (1, 128), (1, 128)), profile((1, 1), (16, 128), (64, 256))]
    config = triton.tensorrt_config("m", io, profiles)
    assert config.max_batch_size == 64  # the largest batch any profile admits
    assert [list(g.profile) for g in config.instance_group] == [["0", "1"]]


def test_cc_model_filenames_map_each_compute_capability(onnx_file, tmp_path):
    io = onnx_io(onnx_file)
    files = {"8.6": "model.sm86.plan", "9.0": "model.sm90.plan"}
    path = triton.write_config(tmp_path / "config.pbtxt", triton.tensorrt_config(
        "m", io, [profile((1, 1), (1, 8), (4, 16))], files))
    parsed = triton.read_config(path)
    assert dict(parsed.cc_model_filenames) == files
    assert 'key: "9.0"' in path.read_text()  # the map as Triton's docs write it


def test_onnxruntime_config_and_no_batch_axis(onnx_file):
    io = onnx_io(onnx_file)
    config = triton.onnxruntime_config("m_onnxruntime", io, 8)
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    assert [g.kind for g in config.instance_group] == [pb.ModelInstanceGroup.KIND_CPU]
    static = {"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 16]}],
              "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4]}]}
    config = triton.tensorrt_config("s", static, [{"x": {"min": [1, 16], "opt": [1, 16], "max": [1, 16]}}])
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 16]  # full shape, no batching
    assert not config.HasField("dynamic_batching")


def test_read_config_refuses_what_triton_would(tmp_path):
    bad = tmp_path / "config.pbtxt"
    bad.write_text('name: "m"\nplatform: "tensorrt_plan"\nmax_batch_sise: 8\n')
    with pytest.raises(CompilerError, match="not a valid Triton ModelConfig"):
        triton.read_config(bad)
    with pytest.raises(CompilerError, match="no Triton data type"):
        triton.triton_dtype("complex64")
