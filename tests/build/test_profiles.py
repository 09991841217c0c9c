"""compiler/build/profiles.py: input dims of an ONNX graph and optimization profile shapes."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from compiler.build.profiles import is_dynamic, onnx_input_dims, profile_shapes
from compiler.errors import EngineBuildError
from compiler.settings import ProfileSettings


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
    assert onnx_input_dims(model) == [
        ("input_ids", ("batch", "sequence")),
        ("x", (None, 4)),
    ]


def test_is_dynamic_for_each_spelling():
    assert [is_dynamic(d) for d in (None, "batch", -1, 0, 7)] == [True, True, True, False, False]


def test_profile_shapes_from_onnx_inputs():
    model = _tiny_onnx([("input_ids", ["batch", "sequence"]),
                        ("attention_mask", ["batch", "sequence"])])
    profile = ProfileSettings(min_shape=(1, 1), opt_shape=(4, 128), max_shape=(32, 512))
    shapes = profile_shapes(onnx_input_dims(model), profile)
    expected = {"min": (1, 1), "opt": (4, 128), "max": (32, 512)}
    assert shapes == {"input_ids": expected, "attention_mask": expected}


def test_profile_shapes_keep_static_dims_and_accept_tensorrt_dims():
    profile = ProfileSettings(min_shape=(1, 2), opt_shape=(2, 8), max_shape=(8, 64))
    shapes = profile_shapes(
        [("hidden", (-1, -1, 16)), ("fixed_batch", (1, "sequence")), ("lengths", (-1,))],
        profile,
    )
    assert shapes["hidden"] == {"min": (1, 2, 16), "opt": (2, 8, 16), "max": (8, 64, 16)}
    assert shapes["fixed_batch"] == {"min": (1, 2), "opt": (1, 8), "max": (1, 64)}
    assert shapes["lengths"] == {"min": (1,), "opt": (2,), "max": (8,)}


def test_profile_shapes_reject_dynamic_axis_beyond_sequence():
    model = _tiny_onnx([("features", ["batch", "sequence", "hidden"])])
    with pytest.raises(EngineBuildError, match=r"'features'.*'hidden'.*axis 2"):
        profile_shapes(onnx_input_dims(model), ProfileSettings())
