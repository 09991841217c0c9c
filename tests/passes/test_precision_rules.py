"""compiler/passes/precision_rules.py: each rule on node lists whose answer is known by hand."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from compiler.graph.analysis import tensor_consumers
from compiler.passes.precision_rules import (constant_absmax, rule_fp16_range, rule_layer_norm, rule_reduction,
                                             rule_softmax)


def node(op, inputs, outputs, **kw):
    return helper.make_node(op, inputs, outputs, **kw)


def layer_norm_chain(affine_readers: int = 1):
    """x -> ReduceMean -> Sub -> Pow -> ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul(gamma) -> Add(beta)."""
    nodes = [node("ReduceMean", ["x"], ["mean"]), node("Sub", ["x", "mean"], ["d"]),
             node("Pow", ["d", "two"], ["sq"]), node("ReduceMean", ["sq"], ["var"]),
             node("Add", ["var", "eps"], ["ve"]), node("Sqrt", ["ve"], ["std"]),
             node("Div", ["d", "std"], ["n"]), node("Mul", ["n", "gamma"], ["g"]),
             node("Add", ["g", "beta"], ["y"])]
    nodes += [node("Relu", ["n"], [f"r{k}"]) for k in range(affine_readers - 1)]
    return nodes


def test_decomposed_layer_norm_with_and_without_affine():
    nodes = layer_norm_chain()
    pins = rule_layer_norm(nodes, tensor_consumers(nodes))
    assert sorted(pins) == list(range(9))  # the chain and its gamma / beta
    assert {why[0] for why in pins.values()} == {"layer-norm"}
    # the normalized tensor has a second reader: the affine Mul is not part of the norm
    nodes = layer_norm_chain(affine_readers=2)
    assert sorted(rule_layer_norm(nodes, tensor_consumers(nodes))) == list(range(7))
    # Sub(mean, x) is not x - mean: no chain
    nodes = layer_norm_chain()
    nodes[1] = node("Sub", ["mean", "x"], ["d"])
    assert rule_layer_norm(nodes, tensor_consumers(nodes)) == {}


def test_softmax_ops_and_decomposed_softmax():
    nodes = [node("Softmax", ["a"], ["p"]), node("Exp", ["b"], ["e"]), node("ReduceSum", ["e"], ["s"]),
             node("Div", ["e", "s"], ["q"]), node("Exp", ["c"], ["lonely"]), node("Relu", ["lonely"], ["r"])]
    pins = rule_softmax(nodes, tensor_consumers(nodes))
    assert sorted(pins) == [0, 1, 2, 3]  # the Exp without ReduceSum and Div is not a softmax
    assert pins[0][1] == "Softmax exponentiates and normalizes over a row"
    assert pins[2][1] == "decomposed softmax: Exp -> ReduceSum -> Div"


def test_reduction_rule_is_by_op_type():
    nodes = [node("ReduceSum", ["a"], ["b"]), node("ReduceMax", ["b"], ["c"]), node("CumSum", ["c", "ax"], ["d"])]
    assert rule_reduction(nodes, {}) == {0: ("reduction", "ReduceSum accumulates over a whole axis"),
                                         2: ("reduction", "CumSum accumulates over a whole axis")}  # max adds nothing


def test_fp16_range_ignores_mask_fill_values():
    big = numpy_helper.from_array(np.array([1.0, -70000.0, -3.4e38], np.float32), "big")
    fill = numpy_helper.from_array(np.array([0.0, -3.4e38], np.float32), "fill")
    ints = numpy_helper.from_array(np.array([100000], np.int64), "ints")
    nodes = [node("Add", ["x", "big"], ["y"]), node("Add", ["y", "fill"], ["z"]), node("Reshape", ["z", "ints"], ["w"])]
    pins, out_of_range = rule_fp16_range(nodes, {"big": big, "fill": fill, "ints": ints})
    assert pins == {0: ("fp16-range", "constant big holds |v| = 7e+04 > 65504")}
    assert out_of_range == {"big": nodes[0].name}
    assert constant_absmax(big) == np.float64(np.float32(3.4e38))  # every value counts without `below`
    assert constant_absmax(big, below=1e30) == 70000.0 and constant_absmax(fill, below=1e30) == 0.0


def test_constant_absmax_fast_path_agrees_with_the_filtered_one():
    rng = np.random.default_rng(0)
    for values in (rng.normal(0, 3, 1000), -np.abs(rng.normal(0, 3, 1000)), np.array([np.nan, 2.0, -5.0]),
                   np.array([np.inf, -7.0]), np.array([2e30, -9.0]), np.zeros(0)):
        t = numpy_helper.from_array(values.astype(np.float32), "w")
        v = np.abs(values.astype(np.float32).astype(np.float64))
        v = v[np.isfinite(v) & (v < 1e30)]
        assert constant_absmax(t, below=1e30) == (float(v.max()) if v.size else 0.0)
