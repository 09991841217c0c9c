"""compiler/eval/fp16_reference.py: the faithful FP16 reference (fp16_emulation).

ONNX Runtime's CPU provider has no FP16 kernels for most ops: it computes them in FP32 and
drops the Cast pairs, so an FP16 overflow mid-graph never shows there. The emulation graph must.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from compiler.eval.fp16_reference import fp16_emulation, has_fp16, session
from compiler.passes.precision import convert_precision
from compiler.settings import PrecisionSettings
from tests.models import f32, make_model, ort_run, tensor_types

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16


def fp16_chain(*steps: tuple[str, float]):
    """X (FP32) -> Cast FP16 -> op(FP16 constant) for each (op, value) -> Cast FP32 -> Y."""
    nodes, inits, cur = [helper.make_node("Cast", ["X"], ["x16"], to=FLOAT16)], {}, "x16"
    for k, (op, value) in enumerate(steps):
        inits[f"c{k}"] = np.array([value], np.float16)
        nodes.append(helper.make_node(op, [cur, f"c{k}"], [f"t{k}"]))
        cur = f"t{k}"
    nodes.append(helper.make_node("Cast", [cur], ["Y"], to=FLOAT))
    return make_model(nodes, [f32("X", [1])], [f32("Y", [1])], inits)


def test_emulation_overflows_where_onnxruntime_does_not():
    model = fp16_chain(("Mul", 1000.0), ("Mul", 0.001))  # 100 * 1000 = 1e5 > 65504 in FP16
    feeds = {"X": np.array([100.0], np.float32)}
    emulation = fp16_emulation(model)
    assert has_fp16(model)
    assert {t.data_type for t in emulation.graph.initializer} == {FLOAT}  # widened exactly
    assert [v.type.tensor_type.elem_type for v in [*emulation.graph.input, *emulation.graph.output]] == \
        [FLOAT, FLOAT]
    (emulated,) = session(emulation, faithful_fp16=True).run(None, feeds)
    assert emulated.dtype == np.float32 and np.isposinf(emulated[0])
    # ONNX Runtime on the FP16 graph itself (with and without its graph optimizations)
    # ORT computes both Muls in FP32 and never holds 1e5 in FP16, with and without its graph
    # optimizations: the reason the emulation exists (ORT 1.2x CPU gives ~100.04 here). Should a
    # later ORT run FP16 for real, this fails and the emulation's reason should be re-measured.
    for optimize in (True, False):
        (direct,) = ort_run(model, feeds, optimize=optimize)
        assert np.isfinite(direct[0]) and direct[0] == pytest.approx(100.0, rel=1e-3), optimize


def test_emulation_rounds_every_fp16_tensor():
    model = fp16_chain(("Add", 1e-4))
    emulation = session(fp16_emulation(model), faithful_fp16=True)
    # 1 + 1e-4 is 1.0 in FP16 (half an ulp at 1.0 is 2**-11 ~ 4.9e-4)
    assert emulation.run(None, {"X": np.array([1.0], np.float32)})[0][0] == 1.0
    # the FP16 constant is widened exactly, not re-read as the FP32 1e-4
    assert emulation.run(None, {"X": np.array([0.0], np.float32)})[0][0] == np.float32(np.float16(1e-4))
    # 2049 is not an FP16 value: the Cast into FP16 rounds it to 2048
    assert emulation.run(None, {"X": np.array([2049.0], np.float32)})[0][0] == 2048.0


def test_emulation_rounds_tensors_the_precision_pass_typed_fp16():
    """No explicit Cast around the Add: the pass types its output FP16 and the emulation rounds it."""
    fp32 = make_model([helper.make_node("Add", ["X", "c"], ["Y"])], [f32("X", [2])], [f32("Y", [2])],
                      {"c": np.array([1e-4, 1e-4], np.float32)})
    converted, _ = convert_precision(fp32, PrecisionSettings(mode="fp16"))
    assert tensor_types(converted)["Y__fp16"] == FLOAT16
    emulation = fp16_emulation(converted)
    assert [o.type.tensor_type.elem_type for o in emulation.graph.output] == [FLOAT]
    feeds = {"X": np.array([1.0, 3.0], np.float32)}
    np.testing.assert_array_equal(ort_run(emulation, feeds, optimize=False)[0], [1.0, 3.0])
    np.testing.assert_allclose(ort_run(fp32, feeds)[0], [1.0001, 3.0001], rtol=1e-7)


def test_emulation_takes_fp16_graph_inputs_as_fp32_rounded_on_entry():
    """An FP16 input (a KV cache kept FP16, compiler.passes.kv_cache) becomes an FP32 input whose
    values are rounded to FP16 on entry: the variant takes the FP32 reference's feeds."""
    model = make_model([helper.make_node("Identity", ["X"], ["Y"])],
                       [helper.make_tensor_value_info("X", FLOAT16, [2])],
                       [helper.make_tensor_value_info("Y", FLOAT16, [2])])
    emulation = fp16_emulation(model)
    assert [i.type.tensor_type.elem_type for i in emulation.graph.input] == [FLOAT]
    got = ort_run(emulation, {"X": np.array([1.0001, 3.3e-8], np.float32)}, optimize=False)[0]
    np.testing.assert_array_equal(got, np.array([1.0001, 3.3e-8], np.float32).astype(np.float16).astype(np.float32))




def test_widened_weights_in_memory_give_the_same_outputs():
    """`fp16_emulation(model, weights)` hands large FP16 weights out as float32 arrays (the graph
    only names them) and `session(..., weights=)` gives them to ONNX Runtime without a file:
    bit for bit the outputs of the weights-in-graph emulation, with FP32 weights kept inline."""
    rng = np.random.default_rng(0)
    w16 = (rng.standard_normal((128, 256)) * 0.1).astype(np.float16)  # 64 KiB: handed out
    b16 = rng.standard_normal(256).astype(np.float16)  # 512 B: stays in the graph
    w32 = rng.standard_normal((256, 64)).astype(np.float32)  # FP32 island weight: copied as is
    nodes = [helper.make_node("Cast", ["X"], ["x16"], to=FLOAT16),
             helper.make_node("MatMul", ["x16", "W16"], ["h16"]),
             helper.make_node("Add", ["h16", "B16"], ["a16"]),
             helper.make_node("Cast", ["a16"], ["a32"], to=FLOAT),
             helper.make_node("MatMul", ["a32", "W32"], ["Y"])]
    model = make_model(nodes, [f32("X", [2, 128])], [f32("Y", [2, 64])], {"W16": w16, "B16": b16, "W32": w32})
    x = {"X": rng.standard_normal((2, 128)).astype(np.float32)}
    (inline,) = session(fp16_emulation(model), faithful_fp16=True).run(None, x)
    weights: dict[str, np.ndarray] = {}
    emulation = fp16_emulation(model, weights)
    assert list(weights) == ["W16"] and weights["W16"].dtype == np.float32
    assert np.array_equal(weights["W16"], w16.astype(np.float32))
    held = {t.name: t for t in emulation.graph.initializer}
    assert held["W16"].data_location == TensorProto.EXTERNAL and not held["W16"].raw_data
    sess = session(emulation, faithful_fp16=True, consume=True, weights=weights)
    weights.clear()  # ONNX Runtime holds its own copy
    (got,) = sess.run(None, x)
    assert np.array_equal(got, inline)
