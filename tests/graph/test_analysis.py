"""compiler/graph/analysis.py: MAC counts, shapes, types and consumers, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.errors import PrecisionError
from compiler.graph.analysis import array, attr, matmul_macs, tensor_consumers, tensor_shapes, tensor_types
from tests.models import f32, make_model


def two_matmuls():
    """X (batch, sequence, 8) -> MatMul W1 (8, 16) -> Reshape (-1, 16) -> Transpose (16, N)
    -> Gemm(transA=1, W2 (16, 4)) -> Y (N, 4), N = batch x sequence."""
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h"], name="mm"),
        helper.make_node("Reshape", ["h", "flat"], ["h2"], name="flatten"),
        helper.make_node("Transpose", ["h2"], ["hT"], name="t", perm=[1, 0]),
        helper.make_node("Gemm", ["hT", "W2"], ["Y"], name="gemm", transA=1),
    ]
    inits = {"W1": np.ones((8, 16), np.float32), "flat": np.array([-1, 16], np.int64),
             "W2": np.ones((16, 4), np.float32)}
    return make_model(nodes, [f32("X", ["batch", "sequence", 8])], [f32("Y", [None, 4])], inits)


@pytest.mark.parametrize("shape", [(2, 5), (1, 128)])
def test_matmul_macs_by_hand(shape):
    model = two_matmuls()
    nodes = list(model.graph.node)
    b, s = shape
    # MatMul: (b, s, 8) x (8, 16): b*s*16 outputs, 8 MACs each. Gemm with transA: A is (16, N),
    # so K = 16 (A's first dim), not N: N*4 outputs, 16 MACs each.
    assert matmul_macs(model, nodes, shape) == {0: b * s * 16 * 8, 3: b * s * 4 * 16}


def test_matmul_macs_at_a_shorter_sequence_where_the_model_has_fewer_positions():
    # position ids 0..sequence-1 gathered from a table of 48 rows, as DistilBERT's export does;
    # the MatMul's input shape is known only at run time (a slice as long as a NonZero count),
    # so it is measured by running, and at 128 or 64 tokens the Gather is out of the table
    nodes = [
        helper.make_node("Shape", ["X"], ["seq1"], name="shape", start=1, end=2),
        helper.make_node("Squeeze", ["seq1"], ["seq"], name="squeeze"),
        helper.make_node("Range", ["zero", "seq", "one"], ["ids"], name="range"),
        helper.make_node("Gather", ["pos", "ids"], ["p"], name="positions"),
        helper.make_node("Add", ["X", "p"], ["h"], name="add"),
        helper.make_node("NonZero", ["X"], ["nz"], name="nonzero"),
        helper.make_node("Shape", ["nz"], ["k"], name="count", start=1, end=2),
        helper.make_node("Slice", ["h", "zero1", "k", "two"], ["h2"], name="slice"),
        helper.make_node("MatMul", ["h2", "W"], ["Y"], name="mm"),
    ]
    inits = {"pos": np.ones((48, 8), np.float32), "zero": np.array(0, np.int64), "one": np.array(1, np.int64),
             "zero1": np.array([0], np.int64), "two": np.array([2], np.int64), "W": np.ones((8, 4), np.float32)}
    model = make_model(nodes, [f32("X", ["batch", "sequence", 8])], [f32("Y", ["batch", "sequence", None])], inits)
    macs = matmul_macs(model, list(model.graph.node), (1, 128))
    assert macs.shape == (1, 32) and macs == {8: 32 * 4 * 8}
    assert matmul_macs(model, list(model.graph.node), (2, 40)).shape == (2, 40)  # within the table: as asked


def test_tensor_shapes_fix_batch_and_sequence():
    model = two_matmuls()
    shapes = tensor_shapes(model, ["X", "h", "h2", "hT", "Y"], (2, 5))
    assert shapes == {"X": (2, 5, 8), "h": (2, 5, 16), "h2": (10, 16), "hT": (16, 10), "Y": (10, 4)}


def test_tensor_shapes_computed_at_run_time():
    # NonZero's output length depends on the data: inference leaves it unknown, one ONNX Runtime
    # run (graph inputs fed with ones) measures it: every one of the 2 x 5 positions is nonzero.
    nodes = [helper.make_node("NonZero", ["X"], ["nz"], name="nz"),
             helper.make_node("Cast", ["nz"], ["Y"], to=TensorProto.FLOAT, name="cast")]
    model = make_model(nodes, [f32("X", ["batch", "sequence"])], [f32("Y", [2, None])])
    assert tensor_shapes(model, ["nz", "Y"], (2, 5)) == {"nz": (2, 10), "Y": (2, 10)}


def test_tensor_types_and_consumers():
    model = two_matmuls()
    types = tensor_types(model)
    assert {t: types[t] for t in ("X", "h", "flat", "h2", "Y")} == {
        "X": TensorProto.FLOAT, "h": TensorProto.FLOAT, "flat": TensorProto.INT64,
        "h2": TensorProto.FLOAT, "Y": TensorProto.FLOAT}
    nodes = list(model.graph.node)
    assert dict(tensor_consumers(nodes)) == {"X": [0], "W1": [0], "h": [1], "flat": [1], "h2": [2],
                                             "hT": [3], "W2": [3]}
    assert attr(nodes[3], "transA") == 1 and attr(nodes[3], "transB") == 0 and attr(nodes[3], "transB", 7) == 7
    np.testing.assert_array_equal(array(model.graph.initializer[1]), [-1, 16])


def test_tensor_types_refuse_an_untyped_tensor():
    # An op without a schema: inference cannot type its output, which no declaration names either.
    nodes = [helper.make_node("Mystery", ["X"], ["m"], domain="example.custom", name="mystery"),
             helper.make_node("Identity", ["m"], ["Y"], name="id")]
    graph = helper.make_graph(nodes, "g", [f32("X", [2])], [f32("Y", [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("example.custom", 1)])
    with pytest.raises(PrecisionError, match=r"no type for \['m'\]"):
        tensor_types(model)


def test_tensor_shapes_of_a_model_with_large_weights():
    # Weights >= 1 KiB become typed graph inputs for inference (without_weights); shapes stay exact.
    w = numpy_helper.from_array(np.ones((256, 3), np.float32), "W")
    node = helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")
    graph = helper.make_graph([node], "g", [f32("X", ["batch", "sequence", 256])], [f32("Y", ["batch", "sequence", 3])],
                              initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert tensor_shapes(model, ["Y"], (3, 7)) == {"Y": (3, 7, 3)}
    assert matmul_macs(model, list(model.graph.node), (3, 7)) == {0: 3 * 7 * 3 * 256}
