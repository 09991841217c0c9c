"""The Q/DQ pass (`compiler.passes.qdq`): placement rules, weight/activation scales worked out by
hand, numerics against ONNX Runtime FP32, opset upgrade, and the precision pass on Q/DQ graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.errors import PrecisionError
from compiler.passes.precision import convert_precision
from compiler.passes.qdq import (MIN_OPSET, QdqPlacer, calibration_tensors, insert_qdq, matmul_nodes,
                                 upgrade_opset)
from compiler.settings import PrecisionSettings, QuantSettings
from tests.models import f32, make_model, ort_run, producers, tensor_types

OPSET = 19
rng = np.random.default_rng(0)

# --------------------------------------------------------------------------------------------
# A tiny attention block: shared input, Q/K/V projections, two batched matmuls, a residual Add,
# and a Gemm (transB=1) head. x: (batch, sequence, 16).

D, H = 16, 24
W = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in
     {"Wq": (D, D), "Wk": (D, D), "Wv": (D, D), "Wo": (H, D)}.items()}


def block(opset: int = OPSET) -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "Wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="attn_qk"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="attn_v"),
        helper.make_node("Add", ["ctx", "x"], ["res"], name="residual"),
        helper.make_node("Reshape", ["res", "flat"], ["res2"], name="flatten"),
        helper.make_node("Gemm", ["res2", "Wo", "bo"], ["y"], name="head", transB=1),
    ]
    inits = {**W, "bo": np.zeros(H, np.float32), "flat": np.array([-1, D], np.int64)}
    return make_model(nodes, [f32("x", ["batch", "sequence", D])], [f32("y", ["rows", H]), f32("ctx", ["batch", "sequence", D])],
                      inits, opset=opset)


def thresholds() -> dict[str, float]:
    return {"x": 4.0, "q": 20.0, "kt": 20.0, "probs": 1.0, "v": 20.0, "res2": 8.0}


def inits_of(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def attr(node, name):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def dq_of(model, node_name, k):
    """The DequantizeLinear feeding input k of node `node_name`, or None."""
    node = next(n for n in model.graph.node if n.name == node_name)
    p = producers(model).get(node.input[k])
    return p if p is not None and p.op_type == "DequantizeLinear" else None


def absmax(model, feeds):
    """{tensor: max |x|} of every tensor in `thresholds()` for one FP32 run."""
    from calibration.stats import exposed_outputs

    names = list(thresholds())
    with exposed_outputs(model, names):
        outs = ort_run(model, feeds)[-len(names):]
    return {t: float(np.abs(o).max()) for t, o in zip(names, outs)}


def cosine(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# --------------------------------------------------------------------------------------------
# Analysis


def test_matmul_nodes_and_calibration_tensors_of_the_block():
    sites = {m.name: m for m in matmul_nodes(block())}
    # (activation inputs, weight input, output-channel axis, MACs at 1 x 128, bmm), by hand
    expect = {"q_proj": ([0], 1, 1, 128 * D * D, False), "k_proj": ([0], 1, 1, 128 * D * D, False),
              "v_proj": ([0], 1, 1, 128 * D * D, False), "attn_qk": ([0, 1], None, 0, 128 * 128 * D, True),
              "attn_v": ([0, 1], None, 0, 128 * 128 * D, True), "head": ([0], 1, 0, 128 * H * D, False)}
    assert {n: (m.activations, m.weight, m.axis, m.macs, m.bmm) for n, m in sites.items()} == expect
    assert all(m.not_eligible == "" for m in sites.values())
    assert calibration_tensors(block()) == ["x", "q", "kt", "probs", "v", "res2"]  # graph order, once each


# --------------------------------------------------------------------------------------------
# Placement


def test_placement_weights_per_channel_activations_per_tensor_shared():
    model = block()
    q, report = insert_qdq(model, thresholds(), QuantSettings())
    onnx.checker.check_model(q, full_check=True)
    consts = inits_of(q)
    # one Q/DQ pair on x, shared by the three projections; the residual still reads raw x
    qs = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert [n.input[0] for n in qs] == ["x", "res2"]
    dq_x = {dq_of(q, name, 0).name for name in ("q_proj", "k_proj", "v_proj")}
    assert len(dq_x) == 1
    assert next(n for n in q.graph.node if n.name == "residual").input[1] == "x"
    assert consts[qs[0].input[1]] == np.float32(4.0 / 127) and consts[qs[0].input[2]].dtype == np.int8
    assert consts[qs[0].input[2]] == 0
    # weights: INT8 initializers, per output channel, axis 1 for MatMul W[K, N], 0 for Gemm transB=1 W[N, K]
    for name, k, w, axis in (("q_proj", 1, "Wq", 1), ("v_proj", 1, "Wv", 1), ("head", 1, "Wo", 0)):
        dq = dq_of(q, name, k)
        assert dq is not None and attr(dq, "axis") == axis
        wq, scale, zp = (consts[t] for t in dq.input)
        assert wq.dtype == np.int8 and wq.shape == W[w].shape and scale.dtype == np.float32
        assert scale.shape == (W[w].shape[axis],) and zp.dtype == np.int8 and not zp.any()
        expect = np.abs(W[w]).max(axis=1 - axis) / 127
        np.testing.assert_allclose(scale, expect, rtol=1e-6)
        assert (np.abs(wq).max(axis=1 - axis) == 127).all()  # each channel's absmax maps to 127
        deq = wq.astype(np.float32) * (scale[None, :] if axis == 1 else scale[:, None])
        assert np.abs(deq - W[w]).max() <= scale.max() / 2 + 1e-6
    assert not any(t.name in W for t in q.graph.initializer)  # FP32 weights gone
    # attention bmm off by default; no Q/DQ on any MatMul output or graph output
    assert dq_of(q, "attn_qk", 0) is None and dq_of(q, "attn_qk", 1) is None and dq_of(q, "attn_v", 0) is None
    assert {n.input[0] for n in qs}.isdisjoint({"q", "k", "v", "scores", "ctx", "y"})
    assert [producers(q)[o.name].op_type for o in q.graph.output] == ["Gemm", "MatMul"]
    # report: counts, exclusions, MACs at batch 1 x sequence 128
    assert report.quantized_matmuls == 4 and report.activation_qdq == 2 and report.int8_weights == 4
    proj, bmm, head = 128 * D * D, 128 * 128 * D, 128 * H * D
    assert report.matmul_macs == {"int8": 3 * proj + head, "float": 2 * bmm}
    assert report.int8_mac_fraction == pytest.approx((3 * proj + head) / (3 * proj + head + 2 * bmm))
    assert {(e.name, e.reason) for e in report.excluded} == {("attn_qk", "attention-bmm"), ("attn_v", "attention-bmm")}
    # numerics: with thresholds = the data's own absmax, ONNX Runtime's result is close to FP32
    x = rng.standard_normal((2, 5, D)).astype(np.float32)
    q, _ = insert_qdq(model, absmax(model, {"x": x}), QuantSettings())
    ref, got = ort_run(model, {"x": x})[0], ort_run(q, {"x": x}, optimize=False)[0]
    assert cosine(ref, got) > 0.999


def test_qdq_graph_equals_numpy_fake_quantization():
    """ONNX Runtime on the Q/DQ graph computes exactly round-to-nearest-even fake quantization
    (worked out in numpy) of x and of each weight channel."""
    model = block()
    x = (3 * rng.standard_normal((1, 4, D))).astype(np.float32)
    q, _ = insert_qdq(model, thresholds(), QuantSettings())

    def fake(a, scale):  # QuantizeLinear -> DequantizeLinear, symmetric INT8
        return (np.clip(np.rint(a / scale), -128, 127) * scale).astype(np.float32)

    sx = np.float32(4.0 / 127)
    sq = np.abs(W["Wq"]).max(axis=0) / np.float32(127)
    expect = fake(x, sx) @ fake(W["Wq"], sq[None, :])
    from calibration.stats import exposed_outputs

    with exposed_outputs(q, ["q"]):
        got = ort_run(q, {"x": x}, optimize=False)[-1]
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


def test_attention_bmm_on_and_exclusion_patterns():
    q, report = insert_qdq(block(), thresholds(), QuantSettings(quantize_attention_bmm=True))
    for name in ("attn_qk", "attn_v"):
        for k in (0, 1):
            dq = dq_of(q, name, k)
            assert dq is not None and attr(dq, "axis") is None  # activations: per tensor
            assert producers(q)[dq.input[0]].op_type == "QuantizeLinear"
    assert report.quantized_matmuls == 6 and report.int8_mac_fraction == 1.0 and report.excluded == []
    assert report.activation_qdq == 6  # x, q, kt, probs, v, res2

    q, report = insert_qdq(block(), thresholds(), QuantSettings(exclude=("k_*", "he?d")))
    assert dq_of(q, "k_proj", 0) is None and dq_of(q, "k_proj", 1) is None and dq_of(q, "head", 1) is None
    assert dq_of(q, "q_proj", 0) is not None  # x keeps its pair for the other projections
    assert "Wk" in inits_of(q) and "Wo" in inits_of(q)  # the float nodes keep FP32 weights
    reasons = {e.name: (e.reason, e.detail) for e in report.excluded}
    assert reasons["k_proj"] == ("pattern", "matches 'k_*'") and reasons["head"][0] == "pattern"
    assert report.quantized_matmuls == 2

    with pytest.raises(PrecisionError, match="--exclude kproj: matches no MatMul/Gemm node.*named like q_proj"):
        insert_qdq(block(), thresholds(), QuantSettings(exclude=("k_*", "kproj")))  # a typo: was quietly INT8

    q, report = insert_qdq(block(), thresholds(), QuantSettings(), exclude_nodes={"v_proj": "measured"})
    assert dq_of(q, "v_proj", 0) is None
    assert {e.name: (e.reason, e.detail) for e in report.excluded}["v_proj"] == ("sensitivity", "measured")


def test_placer_variants_share_one_graph_and_report_modified():
    """One QdqPlacer builds several variants; the source graph and the placer's copy stay as
    they were, and `modified` says whether anything was quantized."""
    model = block()
    before = model.SerializeToString()
    placer = QdqPlacer(model)
    copy_before = placer.model.SerializeToString()
    every = placer.call(thresholds(), QuantSettings())
    nothing = placer.call(thresholds(), QuantSettings(exclude=("*_proj", "head")))
    again = placer.call(thresholds(), QuantSettings())
    assert every.modified and every.report.quantized_matmuls == 4
    assert not nothing.modified and nothing.report.quantized_matmuls == 0
    assert not [n for n in nothing.model.graph.node if "Quantize" in n.op_type]
    assert again.model.SerializeToString() == every.model.SerializeToString()  # deterministic
    assert model.SerializeToString() == before and placer.model.SerializeToString() == copy_before
    x = rng.standard_normal((2, 3, D)).astype(np.float32)
    for ref, got in zip(ort_run(model, {"x": x}), ort_run(nothing.model, {"x": x})):
        np.testing.assert_array_equal(ref, got)  # no Q/DQ: the FP32 function itself


def test_matmul_with_a_vector_constant_is_not_eligible():
    nodes = [helper.make_node("MatMul", ["x", "vec"], ["y"], name="dot"),
             helper.make_node("MatMul", ["x", "Wq"], ["z"], name="proj")]
    model = make_model(nodes, [f32("x", ["batch", "sequence", D])],
                       [f32("y", ["batch", "sequence"]), f32("z", ["batch", "sequence", D])],
                       {"vec": np.ones(D, np.float32), "Wq": W["Wq"]}, opset=OPSET)
    q, report = insert_qdq(model, {"x": 3.0}, QuantSettings())
    assert [(e.name, e.reason) for e in report.excluded] == [("dot", "not-eligible")]
    assert dq_of(q, "dot", 0) is None and dq_of(q, "proj", 0) is not None
    assert report.matmul_macs == {"int8": 128 * D * D, "float": 128 * D}


def test_weight_axis_gemm_without_transb_and_weight_first_matmul():
    w_kn = rng.standard_normal((D, H)).astype(np.float32)  # Gemm transB=0: B[K, N] -> axis 1
    w_mk = rng.standard_normal((H, 8)).astype(np.float32)  # MatMul(W, x): W[M, K] -> axis 0 (rank - 2)
    nodes = [helper.make_node("Gemm", ["x2", "Wg"], ["g"], name="gemm"),
             helper.make_node("MatMul", ["Wm", "xt"], ["m"], name="left")]
    model = make_model(nodes, [f32("x2", ["rows", D]), f32("xt", [8, "cols"])],
                       [f32("g", ["rows", H]), f32("m", [H, "cols"])], {"Wg": w_kn, "Wm": w_mk}, opset=OPSET)
    q, report = insert_qdq(model, {"x2": 3.0, "xt": 3.0}, QuantSettings())
    consts = inits_of(q)
    for name, k, w, axis in (("gemm", 1, w_kn, 1), ("left", 0, w_mk, 0)):
        dq = dq_of(q, name, k)
        assert attr(dq, "axis") == axis and consts[dq.input[1]].shape == (w.shape[axis],)
        np.testing.assert_allclose(consts[dq.input[1]], np.abs(w).max(axis=1 - axis) / 127, rtol=1e-6)
    assert report.quantized_matmuls == 2
    x2, xt = rng.standard_normal((4, D)).astype(np.float32), rng.standard_normal((8, 5)).astype(np.float32)
    for ref, got in zip(ort_run(model, {"x2": x2, "xt": xt}), ort_run(q, {"x2": x2, "xt": xt}, optimize=False)):
        assert cosine(ref, got) > 0.995


def test_weight_scale_override_and_invalid_inputs():
    scale = np.full(D, 0.01, np.float32)
    q, _ = insert_qdq(block(), thresholds(), QuantSettings(), weight_scales={"Wq": scale})
    wq, s, _ = (inits_of(q)[t] for t in dq_of(q, "q_proj", 1).input)
    np.testing.assert_array_equal(s, scale)
    np.testing.assert_array_equal(wq, np.clip(np.rint(W["Wq"] / 0.01), -128, 127))
    with pytest.raises(ValueError, match="expected"):
        insert_qdq(block(), thresholds(), QuantSettings(), weight_scales={"Wq": scale[:3]})
    with pytest.raises(ValueError, match="not initializers"):
        insert_qdq(block(), thresholds(), QuantSettings(), weight_scales={"x": scale})
    with pytest.raises(ValueError, match="no calibrated threshold"):
        insert_qdq(block(), {"x": 1.0}, QuantSettings())
    with pytest.raises(ValueError, match="expected finite"):
        insert_qdq(block(), {**thresholds(), "x": float("nan")}, QuantSettings())
    with pytest.raises(ValueError, match="opset"):
        insert_qdq(block(opset=17), thresholds(), QuantSettings())


def test_upgrade_opset_keeps_the_function_and_allows_placement():
    old = block(opset=17)
    upgraded = upgrade_opset(old)
    assert [(o.domain, o.version) for o in upgraded.opset_import] == [("", MIN_OPSET)]
    assert [(o.domain, o.version) for o in old.opset_import] == [("", 17)]  # input untouched
    at19 = block()
    assert upgrade_opset(at19) is at19 and upgrade_opset(upgraded) is upgraded  # already there: as is
    x = rng.standard_normal((2, 5, D)).astype(np.float32)
    for ref, got in zip(ort_run(old, {"x": x}), ort_run(upgraded, {"x": x})):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)  # same FP32 function
    # the upgraded graph takes the same Q/DQ as one exported at 19, and the same numerics
    q_up, rep_up = insert_qdq(upgraded, absmax(old, {"x": x}), QuantSettings())
    q_19, rep_19 = insert_qdq(block(), absmax(old, {"x": x}), QuantSettings())
    assert rep_up.to_dict() == rep_19.to_dict()
    np.testing.assert_allclose(ort_run(q_up, {"x": x}, optimize=False)[0], ort_run(q_19, {"x": x}, optimize=False)[0],
                               rtol=1e-6, atol=1e-6)
    assert cosine(ort_run(old, {"x": x})[0], ort_run(q_up, {"x": x}, optimize=False)[0]) > 0.99


# --------------------------------------------------------------------------------------------
# The precision pass on Q/DQ graphs


def test_hybrid_precision_keeps_qdq_strongly_typed():
    """After insert_qdq, the precision pass types Q/DQ consistently: FP16 around FP16 nodes."""
    from compiler.eval.fp16_reference import fp16_emulation

    q, _ = insert_qdq(block(), thresholds(), QuantSettings(quantize_attention_bmm=True))
    h, report = convert_precision(q, PrecisionSettings(mode="hybrid"))
    onnx.checker.check_model(h, full_check=True)
    types = tensor_types(h)
    for n in h.graph.node:
        if n.op_type == "QuantizeLinear":
            assert types[n.input[0]] == types[n.input[1]] and types[n.output[0]] == TensorProto.INT8
        if n.op_type == "DequantizeLinear":
            assert types[n.input[0]] == TensorProto.INT8 and types[n.input[1]] == types[n.output[0]]
    for name in ("q_proj", "attn_qk", "head"):  # FP16 MatMuls read FP16 dequantized inputs
        node = next(n for n in h.graph.node if n.name == name)
        assert types[node.input[0]] == types[node.input[1]] == TensorProto.FLOAT16
    # softmax stays FP32 under hybrid: its Q reads the FP32 tensor directly (no Cast), and the
    # DQ after it gives the FP16 MatMul an FP16 input
    probs_q = next(n for n in h.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "probs")
    assert types[probs_q.input[0]] == types[probs_q.input[1]] == TensorProto.FLOAT
    x = rng.standard_normal((2, 5, D)).astype(np.float32)
    ref = ort_run(q, {"x": x}, optimize=False)[0]
    got = ort_run(fp16_emulation(h), {"x": x}, optimize=False)[0]
    assert cosine(ref, got) > 0.999


def _unresolved_reshape_graph() -> onnx.ModelProto:
    """x -> Reshape (a head count ONNX shape inference cannot resolve) -> MatMul(W int8-sized)."""
    inits = {"W": rng.standard_normal((32, 48)).astype(np.float32), "i0": np.array(0, np.int64),
             "i1": np.array(1, np.int64), "i2": np.array(2, np.int64), "ax": np.array([0], np.int64),
             "tail": np.array([32], np.int64), "c": np.array(32.0, np.float32)}
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
             helper.make_node("Gather", ["s", "i1"], ["t"], axis=0),
             helper.make_node("Gather", ["s", "i2"], ["h"], axis=0),
             helper.make_node("Cast", ["h"], ["hf"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["hf", "c"], ["hd"]),
             helper.make_node("Cast", ["hd"], ["hi"], to=TensorProto.INT64),
             helper.make_node("Unsqueeze", ["b", "ax"], ["bu"]),
             helper.make_node("Unsqueeze", ["t", "ax"], ["tu"]),
             helper.make_node("Unsqueeze", ["hi", "ax"], ["hu"]),
             helper.make_node("Concat", ["bu", "tu", "hu", "tail"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["xr"]),
             helper.make_node("Transpose", ["xr"], ["xt"], perm=[0, 2, 1, 3]),
             helper.make_node("MatMul", ["xt", "W"], ["y"], name="mm")]
    return make_model(nodes, [f32("x", ["batch", "sequence", 64])], [f32("y", ["batch", 2, "sequence", 48])],
                      inits, opset=OPSET)


def test_hybrid_precision_of_qdq_graph_whose_shapes_need_a_run():
    """MACs of a MatMul behind a run-time reshape are counted by hand; the hybrid Q/DQ graph
    loads in ONNX Runtime (it used to fail: tensor(float) vs int8) and stays close to FP32."""
    from compiler.eval.fp16_reference import fp16_emulation

    model = _unresolved_reshape_graph()
    assert convert_precision(model, PrecisionSettings(mode="hybrid"))[1].matmul_fp16_fraction == 1.0  # FP32: fine
    x = rng.standard_normal((2, 7, 64)).astype(np.float32)
    ref = ort_run(model, {"x": x})[0]
    q, report = insert_qdq(model, {"xt": float(np.abs(x).max())}, QuantSettings())
    assert report.matmul_macs == {"int8": 128 * 2 * 48 * 32, "float": 0}  # (1, 2, 128, 32) x (32, 48)
    h, _ = convert_precision(q, PrecisionSettings(mode="hybrid"))
    onnx.checker.check_model(h, full_check=True)
    got = ort_run(fp16_emulation(h), {"x": x}, optimize=False)[0]
    assert got.shape == ref.shape == (2, 2, 7, 48)
    assert cosine(ref, got) > 0.999
