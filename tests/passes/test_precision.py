"""compiler/passes/precision.py: the ONNX-to-ONNX precision pass (fp32 / fp16 / hybrid).

Tiny graphs built with onnx.helper check each rule and the type-agreement machinery (Casts,
initializer copies, graph outputs); the real MiniLM export checks the hybrid rule's pins and
the share of MatMul work that runs in FP16.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.errors import PrecisionError
from compiler.passes.precision import convert_precision
from compiler.settings import PrecisionSettings
from compiler.eval.fp16_reference import fp16_emulation
from tests.models import (consumers, f32, make_model, minilm_dir, minilm_variant, nodes_of, ort_run,
                          producers, tensor_types)

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16


def rand(*shape: int, scale: float = 0.3, seed: int | None = None) -> np.ndarray:
    """Normal(0, scale) float32 values, the same for the same (shape, scale, seed); seed
    defaults to a hash of the shape so that different-shaped weights differ."""
    rng = np.random.default_rng(seed if seed is not None else abs(hash(shape)) % 2**32)
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def convert(model, mode: str, **kwargs):
    return convert_precision(model, PrecisionSettings(mode=mode, **kwargs))


def block_model():
    """X -> Identity -> MatMul -> Add(bias) -> LayerNormalization -> MatMul -> Softmax -> Mul(LN) -> Y.

    (The Identity keeps the MatMul off the graph input: see test_mac_count_of_matmul_on_graph_io.)
    """
    nodes = [
        helper.make_node("Identity", ["X"], ["x"], name="in"),
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
        helper.make_node("Add", ["h1", "b1"], ["h2"], name="bias1"),
        helper.make_node("LayerNormalization", ["h2", "gamma", "beta"], ["ln"], name="ln", axis=-1,
                         epsilon=1e-5),
        helper.make_node("MatMul", ["ln", "W2"], ["q"], name="mm2"),
        helper.make_node("Softmax", ["q"], ["p"], name="softmax", axis=-1),
        helper.make_node("Mul", ["p", "ln"], ["Y"], name="gate"),
    ]
    inits = {"W1": rand(8, 8, seed=1), "b1": rand(8), "gamma": 1 + rand(8, scale=0.1, seed=2),
             "beta": rand(8, scale=0.1, seed=3), "W2": rand(8, 8, seed=4)}
    return make_model(nodes, [f32("X", ["batch", "sequence", 8])], [f32("Y", ["batch", "sequence", 8])], inits)


X_BLOCK = {"X": rand(2, 5, 8, scale=1.0)}


def float_tensors(model, dtype: int) -> set[str]:
    return {name for name, t in tensor_types(model).items() if t == dtype}


def io_names(model) -> set[str]:
    return {v.name for v in [*model.graph.input, *model.graph.output]}


# --------------------------------------------------------------------------------------------
# fp32 and fp16 modes


def test_fp32_mode_returns_graph_unchanged():
    model = block_model()
    out, report = convert(model, "fp32")
    assert [n.SerializeToString() for n in out.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert [(t.name, t.data_type, t.raw_data) for t in out.graph.initializer] == \
        [(t.name, t.data_type, t.raw_data) for t in model.graph.initializer]
    assert float_tensors(out, FLOAT16) == set()
    assert report.mode == "fp32" and report.fp32_nodes == [] and report.casts_inserted == 0
    assert report.nodes == {"fp32": 7, "fp16": 0}
    assert report.matmul_fp16_fraction == 0.0
    assert model.graph.node[1].input == ["x", "W1"]  # the caller's model is not modified


def test_fp32_mode_keeps_constant_nodes():
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32(2.0), "c")),
             helper.make_node("Mul", ["X", "c"], ["Y"])]
    model = make_model(nodes, [f32("X", [3])], [f32("Y", [3])])
    out, _ = convert(model, "fp32")
    assert [n.op_type for n in out.graph.node] == ["Constant", "Mul"]


def test_fp16_mode_leaves_no_fp32_tensor_but_graph_inputs_and_outputs():
    model = block_model()
    out, report = convert(model, "fp16")
    onnx.checker.check_model(out, full_check=True)
    assert float_tensors(out, FLOAT) == io_names(out) == {"X", "Y"}
    assert all(t.data_type == FLOAT16 for t in out.graph.initializer)
    assert [v.type.tensor_type.elem_type for v in [*out.graph.input, *out.graph.output]] == [FLOAT, FLOAT]
    assert report.nodes == {"fp32": 0, "fp16": 7} and report.fp32_nodes == []
    # One Cast in (X feeds one node) and one out (Y renamed and cast back).
    casts = nodes_of(out, "Cast")
    assert report.casts_inserted == len(casts) == 2
    assert {(c.input[0], c.output[0]) for c in casts} == {("X", "X__to_fp16"), ("Y__fp16", "Y")}


@pytest.mark.parametrize("mode", ["fp16", "hybrid"])
def test_converted_graph_runs_on_onnxruntime_close_to_fp32(mode):
    model = block_model()
    out, _ = convert(model, mode)
    onnx.checker.check_model(out, full_check=True)
    (ref,) = ort_run(model, X_BLOCK)
    (got,) = ort_run(out, X_BLOCK)
    (emu,) = ort_run(fp16_emulation(out), X_BLOCK, optimize=False)
    assert got.dtype == np.float32 and got.shape == ref.shape == (2, 5, 8)
    np.testing.assert_allclose(got, ref, atol=1e-2)
    np.testing.assert_allclose(emu, ref, atol=1e-2)
    assert np.abs(emu - ref).max() > 0  # it did compute in FP16 somewhere


def test_control_flow_is_refused():
    branch = helper.make_graph([helper.make_node("Identity", ["X"], ["o"])], "b", [], [f32("o", [1])])
    nodes = [helper.make_node("If", ["cond"], ["Y"], then_branch=branch, else_branch=branch)]
    model = make_model(nodes, [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), f32("X", [1])],
                       [f32("Y", [1])])
    with pytest.raises(PrecisionError, match="subgraph"):
        convert(model, "hybrid")


def test_contrib_ops_and_an_already_fp16_graph_are_refused():
    """An ONNX Runtime transformer-optimizer graph (com.microsoft fusions) failed with "shape
    inference gives no type"; an FP16 graph came back as it was, softmax in FP16, exit 0."""
    from tests.models import fused_onnx_model

    model = fused_onnx_model()
    with pytest.raises(PrecisionError, match=r"outside the standard ONNX domain \(com.microsoft.SkipLayerNormalization x1\)"):
        convert(model, "hybrid")
    half = [helper.make_node("MatMul", ["X", "W"], ["h"]), helper.make_node("Softmax", ["h"], ["Y"])]
    x16 = helper.make_tensor_value_info("X", TensorProto.FLOAT16, [2, 4])
    model = make_model(half, [x16], [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [2, 4])],
                       {"W": np.eye(4, dtype=np.float16)})
    for mode in ("hybrid", "fp16"):
        with pytest.raises(PrecisionError, match="not FP32: 3 tensor.*e.g. W \\(float16\\)"):
            convert(model, mode)


# --------------------------------------------------------------------------------------------
# hybrid rules


def test_hybrid_pins_softmax_and_layer_norm_and_runs_matmuls_in_fp16():
    out, report = convert(block_model(), "hybrid")
    onnx.checker.check_model(out, full_check=True)
    types = tensor_types(out)
    pinned = {(p.name, p.op_type, p.rule) for p in report.fp32_nodes}
    assert pinned == {("ln", "LayerNormalization", "layer-norm"), ("softmax", "Softmax", "softmax")}
    assert report.nodes == {"fp32": 2, "fp16": 5}
    assert report.by_op["MatMul"] == {"fp32": 0, "fp16": 2}
    assert report.by_op["Softmax"] == {"fp32": 1, "fp16": 0}
    for n in out.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax"):
            assert [types[t] for t in [*n.input, *n.output]] == [FLOAT] * (len(n.input) + len(n.output)), n.name
        if n.op_type in ("MatMul", "Gemm", "Add"):
            assert [types[t] for t in [*n.input, *n.output]] == [FLOAT16] * 3, n.name
    # the pinned LN keeps FP32 gamma/beta; the FP16 MatMuls get FP16 weights
    inits = {t.name: t.data_type for t in out.graph.initializer}
    assert inits == {"W1__fp16": FLOAT16, "b1__fp16": FLOAT16, "gamma": FLOAT, "beta": FLOAT, "W2__fp16": FLOAT16}
    assert report.matmul_fp16_fraction == 1.0


def decomposed_layer_norm_model():
    """X -> MatMul -> [ReduceMean, Sub, Pow, ReduceMean, Add(eps), Sqrt, Div, Mul(g), Add(b)] -> MatMul -> Y."""
    island = [
        helper.make_node("ReduceMean", ["h"], ["mean"], name="ln_mean", axes=[-1], keepdims=1),
        helper.make_node("Sub", ["h", "mean"], ["d"], name="ln_sub"),
        helper.make_node("Pow", ["d", "two"], ["d2"], name="ln_pow"),
        helper.make_node("ReduceMean", ["d2"], ["var"], name="ln_var", axes=[-1], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="ln_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="ln_sqrt"),
        helper.make_node("Div", ["d", "std"], ["norm"], name="ln_div"),
        helper.make_node("Mul", ["norm", "gamma"], ["scaled"], name="ln_gamma"),
        helper.make_node("Add", ["scaled", "beta"], ["ln"], name="ln_beta"),
    ]
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h"], name="mm1"), *island,
             helper.make_node("MatMul", ["ln", "W2"], ["Y"], name="mm2")]
    inits = {"W1": rand(8, 8, seed=1), "W2": rand(8, 8, seed=2), "two": np.float32(2.0),
             "eps": np.float32(1e-12), "gamma": 1 + rand(8, scale=0.1, seed=3), "beta": rand(8, scale=0.1, seed=4)}
    model = make_model(nodes, [f32("X", ["batch", "sequence", 8])], [f32("Y", ["batch", "sequence", 8])], inits)
    return model, {n.name for n in island}


def test_decomposed_layer_norm_is_one_fp32_island():
    model, island = decomposed_layer_norm_model()
    out, report = convert(model, "hybrid")
    onnx.checker.check_model(out, full_check=True)
    assert {p.name for p in report.fp32_nodes} == island
    rules = {p.name: p.rule for p in report.fp32_nodes}
    assert {rules.pop("ln_mean"), rules.pop("ln_var")} <= {"layer-norm", "reduction"}  # reductions twice over
    assert set(rules.values()) == {"layer-norm"}
    types = tensor_types(out)
    prod, cons = producers(out), consumers(out)
    for n in out.graph.node:
        if n.name in island:
            assert all(types[t] == FLOAT for t in [*n.input, *n.output]), n.name
    casts = nodes_of(out, "Cast")
    into = [c for c in casts if any(u.name in island for u in cons.get(c.output[0], []))]
    out_of = [c for c in casts if c.input[0] in prod and prod[c.input[0]].name in island]
    assert len(into) == 1 and len(out_of) == 1
    assert into[0].input[0] == "h" and {u.name for u in cons[into[0].output[0]]} == {"ln_mean", "ln_sub"}
    assert out_of[0].input[0] == "ln" and [u.name for u in cons[out_of[0].output[0]]] == ["mm2"]
    for c in casts:  # no Cast between two island nodes
        src = prod.get(c.input[0])
        assert not (src is not None and src.name in island
                    and any(u.name in island for u in cons.get(c.output[0], []))), c.name
    # X -> FP16 for mm1, into the island, out of it, and Y back to FP32: nothing else
    assert report.casts_inserted == len(casts) == 4
    # ONNX Runtime's LayerNormFusion (default optimizations) fuses the island together with the
    # FP16 Cast in front of it and rejects the graph (T bound to float16 and float): run unoptimized.
    feeds = {"X": rand(2, 3, 8, scale=1.0)}
    (ref,) = ort_run(model, feeds)
    np.testing.assert_allclose(ort_run(out, feeds, optimize=False)[0], ref, atol=2e-2)
    np.testing.assert_allclose(ort_run(fp16_emulation(out), feeds, optimize=False)[0], ref, atol=2e-2)


def test_decomposed_layer_norm_in_fp16_mode_reports_flushed_epsilon():
    model, _ = decomposed_layer_norm_model()
    out, report = convert(model, "fp16")
    assert report.fp32_nodes == []
    eps = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "eps__fp16"))
    assert eps == 0  # 1e-12 is below FP16's smallest subnormal
    assert report.underflow_values == 1


def test_decomposed_softmax_is_pinned():
    nodes = [helper.make_node("Relu", ["X"], ["r"], name="relu"),
             helper.make_node("Exp", ["r"], ["e"], name="exp"),
             helper.make_node("ReduceSum", ["e", "axes"], ["s"], name="sum", keepdims=1),
             helper.make_node("Div", ["e", "s"], ["p"], name="div"),
             helper.make_node("Mul", ["p", "r"], ["Y"], name="mul")]
    model = make_model(nodes, [f32("X", ["batch", 4])], [f32("Y", ["batch", 4])],
                       {"axes": np.array([-1], np.int64)})
    out, report = convert(model, "hybrid")
    rules = {p.name: p.rule for p in report.fp32_nodes}
    assert rules.keys() == {"exp", "sum", "div"}
    assert rules["exp"] == rules["div"] == "softmax"
    types = tensor_types(out)
    assert types["r"] == FLOAT16 and types["e"] == types["s"] == types["p"] == FLOAT
    assert report.casts_inserted == 4  # X in, r into the island, p out of it, Y back
    feeds = {"X": rand(3, 4, scale=2.0)}
    np.testing.assert_allclose(ort_run(out, feeds)[0], ort_run(model, feeds)[0], atol=5e-3)


def test_adjacent_fp32_nodes_share_one_island():
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h"], name="mm1"),
        helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["ln"], name="ln", axis=-1),
        helper.make_node("Softmax", ["ln"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "W2"], ["Y"], name="mm2"),
    ]
    inits = {"W1": rand(8, 8, seed=1), "W2": rand(8, 8, seed=2), "gamma": np.ones(8, np.float32),
             "beta": np.zeros(8, np.float32)}
    model = make_model(nodes, [f32("X", ["batch", 8])], [f32("Y", ["batch", 8])], inits)
    out, report = convert(model, "hybrid")
    onnx.checker.check_model(out, full_check=True)
    softmax = nodes_of(out, "Softmax")[0]
    assert softmax.input[0] == "ln"  # straight from the LayerNorm, no Cast pair in between
    assert {p.name for p in report.fp32_nodes} == {"ln", "softmax"}
    casts = nodes_of(out, "Cast")
    assert sorted(c.input[0] for c in casts) == sorted(["X", "h", "p", "Y__fp16"])
    assert report.casts_inserted == 4


# --------------------------------------------------------------------------------------------
# constants beyond FP16's range


def mask_model():
    """scores X (batch, 4) + mask (1, 4) holding float32's minimum -> Softmax -> Y."""
    mask = np.array([[0, 0, np.finfo(np.float32).min, np.finfo(np.float32).min]], np.float32)
    nodes = [helper.make_node("Add", ["X", "mask"], ["masked"], name="add_mask"),
             helper.make_node("Softmax", ["masked"], ["Y"], name="softmax", axis=-1)]
    return make_model(nodes, [f32("X", ["batch", 4])], [f32("Y", ["batch", 4])], {"mask": mask})


@pytest.mark.parametrize("mode", ["fp16", "hybrid"])
@pytest.mark.parametrize("clamp", [32768.0, 1000.0])
def test_mask_fill_value_is_clamped_and_reported(mode, clamp):
    out, report = convert(mask_model(), mode, fp16_clamp=clamp)
    onnx.checker.check_model(out, full_check=True)
    half = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}["mask__fp16"]
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, np.array([[0, 0, -clamp, -clamp]], np.float16))
    assert np.isfinite(half).all()
    assert [p.name for p in report.fp32_nodes] == ([] if mode == "fp16" else ["softmax"])
    (entry,) = report.constants
    assert entry.tensor == "mask" and entry.values_out_of_range == 2
    assert entry.absmax == pytest.approx(3.4028234663852886e38)
    assert "clamp" in entry.action and f"{clamp:g}" in entry.action
    assert "mask" in entry.reason
    x = {"X": rand(3, 4, scale=5.0)}
    (ref,) = ort_run(mask_model(), x)
    for (got,) in (ort_run(out, x), ort_run(fp16_emulation(out), x, optimize=False)):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, atol=2e-3)
        assert got[:, 2:].max() < 1e-3


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_mask_fill_value_in_constant_of_shape_is_clamped():
    fill = numpy_helper.from_array(np.array([np.finfo(np.float32).min], np.float32), "fill")
    nodes = [helper.make_node("Shape", ["X"], ["shape"]),
             helper.make_node("ConstantOfShape", ["shape"], ["mask"], value=fill),
             helper.make_node("Add", ["X", "mask"], ["Y"])]
    model = make_model(nodes, [f32("X", ["batch", 4])], [f32("Y", ["batch", 4])])
    out, report = convert(model, "fp16")
    x = {"X": rand(2, 4)}
    (got,) = ort_run(fp16_emulation(out), x, optimize=False)
    assert np.isfinite(got).all()
    assert [c.tensor for c in report.constants]


def two_matmul_model(gemm_weight_absmax: float | None):
    """X (batch, sequence, 8) @ W1 (8, 4) and Gemm(Z (6, 5), Wg (6, 3), transA=1) -> (5, 3).

    MACs at mac_shape (2, 3): MatMul 2*3*4 outputs x K=8 = 192; Gemm 5*3 outputs x K=6 = 90.
    Identity nodes keep both off the graph inputs and outputs (see
    test_mac_count_of_matmul_on_graph_io for why).
    """
    wg = rand(6, 3)
    if gemm_weight_absmax is not None:
        wg[1, 2] = gemm_weight_absmax
    nodes = [helper.make_node("Identity", ["X"], ["x"]), helper.make_node("Identity", ["Z"], ["z"]),
             helper.make_node("MatMul", ["x", "W1"], ["y1"], name="mm"),
             helper.make_node("Gemm", ["z", "Wg"], ["y2"], name="gemm", transA=1),
             helper.make_node("Identity", ["y1"], ["Y1"]), helper.make_node("Identity", ["y2"], ["Y2"])]
    return make_model(nodes, [f32("X", ["batch", "sequence", 8]), f32("Z", [6, 5])],
                      [f32("Y1", ["batch", "sequence", 4]), f32("Y2", [5, 3])], {"W1": rand(8, 4), "Wg": wg})


@pytest.mark.parametrize("mode, big, macs", [
    ("fp32", None, {"fp16": 0, "fp32": 282}),
    ("fp16", None, {"fp16": 282, "fp32": 0}),
    ("hybrid", None, {"fp16": 282, "fp32": 0}),  # hybrid never pins MatMul/Gemm by itself
    ("fp16", 1e5, {"fp16": 192, "fp32": 90}),  # 1e5 is no mask fill value: rule fp16-range pins the Gemm
    ("hybrid", 1e5, {"fp16": 192, "fp32": 90}),
])
def test_matmul_fp16_fraction_by_hand(mode, big, macs):
    model = two_matmul_model(big)
    out, report = convert_precision(model, PrecisionSettings(mode=mode), mac_shape=(2, 3))
    assert report.matmul_macs == macs
    assert report.mac_shape == {"batch": 2, "sequence": 3}
    assert report.matmul_fp16_fraction == pytest.approx(macs["fp16"] / 282)
    if big is not None:
        assert [(p.name, p.rule) for p in report.fp32_nodes] == [("gemm", "fp16-range")]
        wg = {t.name: t for t in out.graph.initializer}["Wg"]
        assert wg.data_type == FLOAT and numpy_helper.to_array(wg).max() == np.float32(big)
        assert [(c.tensor, c.action) for c in report.constants] == [("Wg", "kept FP32")]
        assert tensor_types(out)["y2"] == FLOAT
        feeds = {"X": rand(2, 3, 8), "Z": rand(6, 5)}
        # the Gemm computes in FP32 on FP16-rounded z; Y2 is rounded to FP16 by the FP16 Identity
        np.testing.assert_allclose(ort_run(out, feeds)[1], ort_run(model, feeds)[1], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("mode, big", [("fp32", None), ("fp16", 1e5)])
def test_mac_count_of_matmul_on_graph_io(mode, big):
    w = rand(8, 4)
    if big is not None:
        w[0, 0] = big  # rule fp16-range keeps the MatMul FP32 in fp16 mode too
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")],
                       [f32("X", ["batch", "sequence", 8])], [f32("Y", ["batch", "sequence", 4])], {"W": w})
    _, report = convert_precision(model, PrecisionSettings(mode=mode), mac_shape=(2, 3))
    assert report.matmul_macs == {"fp16": 0, "fp32": 2 * 3 * 4 * 8}


def test_fp16_range_report_names_the_out_of_range_constant():
    nodes = [helper.make_node("Identity", ["X"], ["x"]), helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm"),
             helper.make_node("Identity", ["y"], ["Y"])]
    model = make_model(nodes, [f32("X", [2, 4])], [f32("Y", [2, 3])],
                       {"W": rand(4, 3), "C": np.array([0.0, 1e5, 0.0], np.float32)})
    _, report = convert(model, "fp16")
    assert [(p.name, p.rule) for p in report.fp32_nodes] == [("gemm", "fp16-range")]
    (entry,) = report.constants
    assert (entry.tensor, entry.values_out_of_range, entry.absmax) == ("C", 1, 1e5)


# --------------------------------------------------------------------------------------------
# graph outputs and shared initializers


@pytest.mark.parametrize("mode, consumer", [
    ("fp16", "Add"), ("hybrid", "Add"), ("fp16", "Softmax"),
    ("hybrid", "Softmax"),
])
def test_graph_output_that_also_feeds_other_nodes(mode, consumer):
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y1"], name="mm"),
             helper.make_node("Add", ["Y1", "B"], ["Y2"], name="add") if consumer == "Add"
             else helper.make_node("Softmax", ["Y1"], ["Y2"], name="softmax", axis=-1)]
    model = make_model(nodes, [f32("X", ["batch", 8])], [f32("Y1", ["batch", 4]), f32("Y2", ["batch", 4])],
                       {"W": rand(8, 4), "B": rand(4)} if consumer == "Add" else {"W": rand(8, 4)})
    out, _ = convert(model, mode)
    onnx.checker.check_model(out, full_check=True)
    assert [o.name for o in out.graph.output] == ["Y1", "Y2"]
    types = tensor_types(out)
    assert types["Y1"] == types["Y2"] == FLOAT
    assert types[producers(out)["Y1"].input[0]] == FLOAT16  # Y1 is the Cast back from the FP16 MatMul
    feeds = {"X": rand(3, 8, scale=1.0)}
    ref = ort_run(model, feeds)
    for got in (ort_run(out, feeds), ort_run(fp16_emulation(out), feeds, optimize=False)):
        assert [g.dtype for g in got] == [np.float32, np.float32]
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, atol=1e-2)


def test_initializer_shared_by_fp32_and_fp16_nodes_gets_two_copies():
    nodes = [helper.make_node("Add", ["X", "S"], ["h"], name="add"),  # FP16 user of S
             helper.make_node("LayerNormalization", ["h", "S", "beta"], ["Y"], name="ln", axis=-1)]  # FP32 user
    s = 1 + rand(8, scale=0.2, seed=1)
    model = make_model(nodes, [f32("X", ["batch", 8])], [f32("Y", ["batch", 8])],
                       {"S": s, "beta": rand(8, scale=0.1)})
    out, report = convert(model, "hybrid")
    onnx.checker.check_model(out, full_check=True)
    inits = {t.name: t for t in out.graph.initializer}
    assert inits["S"].data_type == FLOAT and inits["S__fp16"].data_type == FLOAT16
    np.testing.assert_array_equal(numpy_helper.to_array(inits["S__fp16"]), s.astype(np.float16))
    add, ln = nodes_of(out, "Add")[0], nodes_of(out, "LayerNormalization")[0]
    assert add.input[1] == "S__fp16" and ln.input[1] == "S"
    assert [p.name for p in report.fp32_nodes] == ["ln"]
    feeds = {"X": rand(4, 8, scale=1.0)}
    np.testing.assert_allclose(ort_run(out, feeds)[0], ort_run(model, feeds)[0], atol=1e-2)


# --------------------------------------------------------------------------------------------
# the real MiniLM export


@pytest.fixture(scope="module")
def minilm_export_dir(tmp_path_factory):
    return minilm_dir(tmp_path_factory)


def test_minilm_hybrid_pins_exactly_layer_norms_and_softmaxes(minilm_export_dir):
    out, report = minilm_variant(minilm_export_dir, "hybrid")
    pinned = sorted((p.op_type, p.rule) for p in report.fp32_nodes)
    assert pinned == sorted([("LayerNormalization", "layer-norm")] * 13 + [("Softmax", "softmax")] * 6)
    assert report.nodes["fp32"] == 19
    assert report.by_op["MatMul"]["fp32"] == 0 and report.by_op["Gemm"]["fp32"] == 0
    assert report.matmul_fp16_fraction >= 0.95
    assert report.matmul_macs["fp32"] == 0
    # the attention mask's finfo(float32).min is clamped, nothing else is out of range
    assert [(c.values_out_of_range, c.action) for c in report.constants] == [(1, "clamped to +-32768")]
    types = tensor_types(out)
    for n in out.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            assert types[n.input[0]] == FLOAT16 and types[n.input[1]] == FLOAT16, n.name
        if n.op_type in ("LayerNormalization", "Softmax"):
            assert types[n.input[0]] == FLOAT and types[n.output[0]] == FLOAT, n.name
    onnx.checker.check_model(out)


def test_minilm_fp16_pins_nothing(minilm_export_dir):
    out, report = minilm_variant(minilm_export_dir, "fp16")
    assert report.fp32_nodes == [] and report.nodes["fp32"] == 0
    assert report.matmul_fp16_fraction == 1.0
    assert float_tensors(out, FLOAT) == io_names(out) - {"input_ids", "attention_mask", "token_type_ids"}
    assert {v.name for v in out.graph.output} == {"last_hidden_state", "pooler_output"}
    onnx.checker.check_model(out)
