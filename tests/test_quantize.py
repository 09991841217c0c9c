"""INT8 PTQ (`compiler.quant.quantize`): placement, calibration, cache, SmoothQuant, budget loop, MiniLM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration import TokenizedSet, load_texts, tokenized_set
from compiler.quant import quantize as Q
from compiler.passes.precision import convert_precision
from compiler.quant.quantize import (QuantSettings, calibrate, calibration_windows, insert_qdq, quantize_within_budget,
                               smooth)
from compiler.settings import DataSettings, ExportSettings, PrecisionSettings
from tests.models import f32, make_model, minilm, ort_run, tensor_types

OPSET = 19
IDS = ["input_ids"]
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


def producers(model):
    return {t: n for n in model.graph.node for t in n.output}


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


def test_settings_validate():
    QuantSettings()
    for bad in (dict(method="mse"), dict(percentile=0.0), dict(percentile=100.5), dict(num_bins=128),
                dict(exclude=["*"]), dict(exclude=("",)), dict(min_cosine=1.5), dict(max_excluded=-1),
                dict(smoothquant_alpha=1.2), dict(calib_windows=0), dict(sensitivity_samples=0)):
        with pytest.raises(ValueError):
            QuantSettings(**bad)


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

    q, report = insert_qdq(block(), thresholds(), QuantSettings(), exclude_nodes={"v_proj": "measured"})
    assert dq_of(q, "v_proj", 0) is None
    assert {e.name: (e.reason, e.detail) for e in report.excluded}["v_proj"] == ("sensitivity", "measured")


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


def test_weight_scale_override_opset_and_missing_thresholds():
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
    with pytest.raises(ValueError, match="opset"):
        insert_qdq(block(opset=17), thresholds(), QuantSettings())
    upgraded = Q.upgrade_opset(block(opset=17))
    insert_qdq(upgraded, thresholds(), QuantSettings())


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
    import onnxruntime as ort

    ort.InferenceSession(h.SerializeToString(), providers=["CPUExecutionProvider"])  # loads
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
    model = _unresolved_reshape_graph()
    assert convert_precision(model, PrecisionSettings(mode="hybrid"))[1].matmul_fp16_fraction == 1.0  # FP32: fine
    q, report = insert_qdq(model, {"xt": 3.0}, QuantSettings())
    assert report.matmul_macs == {"int8": 128 * 2 * 48 * 32, "float": 0}  # our own count works
    h, _ = convert_precision(q, PrecisionSettings(mode="hybrid"))  # InvalidArgument: tensor(float) vs int8
    onnx.checker.check_model(h, full_check=True)


# --------------------------------------------------------------------------------------------
# Calibration on token ids: input_ids -> Gather(embeddings) -> MatMul -> MatMul


def ids_model(emb: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["x"], name="embed", axis=0),
             helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "W2"], ["last_hidden_state"], name="mm2")]
    inp = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    return make_model(nodes, [inp], [f32("last_hidden_state", ["batch", "sequence", w2.shape[1]])],
                      {"E": emb, "W1": w1, "W2": w2}, opset=OPSET)


def token_set(rows, key):
    return TokenizedSet([np.asarray(r, np.int64) for r in rows], None, 0, key)


def ragged_ids(n, seed, vocab=64):
    r = np.random.default_rng(seed)
    return token_set([r.integers(1, vocab, r.integers(6, 20)) for _ in range(n)], f"ids-{seed}-{n}")


def test_calibration_windows_are_fixed_length_real_text():
    samples = [np.array([101, 5, 6, 7, 102]), np.array([101, 8, 9, 102]), np.array([101, 10, 11, 12, 13, 102])]
    tokens = token_set(samples, "k")
    w = calibration_windows(tokens, length=5)
    assert w.shape == (3, 5) and (w[:, 0] == 101).all() and (w[:, -1] == 102).all()
    stream = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert [list(r[1:-1]) for r in w] == [stream[0:3], stream[3:6], stream[6:9]]  # evenly spaced
    assert calibration_windows(tokens).shape == (3, 6)  # default: one per sample, longest length
    plain = calibration_windows(ragged_ids(4, 0), count=7, length=9)  # no shared first/last id
    assert plain.shape == (7, 9) and (plain > 0).all()
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(tokens, length=20)


def test_calibration_cache_reuses_and_recalibrates(tmp_path, monkeypatch):
    emb = rng.standard_normal((64, 8)).astype(np.float32)
    path = tmp_path / "m.onnx"
    onnx.save(ids_model(emb, np.eye(8, dtype=np.float32), np.eye(8, dtype=np.float32)), path)
    calls = []
    real = Q._run_calibrator
    monkeypatch.setattr(Q, "_run_calibrator", lambda *a: calls.append(a[3].shape) or real(*a))
    tokens, cache = ragged_ids(16, 1), tmp_path / "cache"
    windows = calibration_windows(tokens)
    first = calibrate(path, tokens, IDS, QuantSettings(), cache)
    assert set(first) == {"x", "h"} and first["x"] == pytest.approx(np.abs(emb[windows]).max(), rel=1e-6)
    assert calibrate(path, tokens, IDS, QuantSettings(), cache) == first and len(calls) == 1  # reused
    assert len(list(cache.glob("int8-*.json"))) == 1
    calibrate(path, tokens, IDS, QuantSettings(method="percentile", num_bins=512), cache)  # method
    calibrate(path, ragged_ids(16, 2), IDS, QuantSettings(), cache)  # tokens
    onnx.save(ids_model(2 * emb, np.eye(8, dtype=np.float32), np.eye(8, dtype=np.float32)), path)
    assert calibrate(path, tokens, IDS, QuantSettings(), cache)["x"] == pytest.approx(2 * first["x"])  # graph
    assert calibrate(path, tokens, IDS, QuantSettings(quantize_attention_bmm=True, min_cosine=0.5), cache)
    assert len(calls) == 4  # placement/budget settings do not change thresholds: reused
    assert calls[0] == windows.shape == (16, max(len(s) for s in tokens.input_ids))  # one per sample


def _outlier_model(row7: float) -> onnx.ModelProto:
    """Channel 7 of x is 1000 on every token and (almost) unused by mm1: per tensor INT8 of x
    (scale 1000/127) rounds the other channels, ~N(0, 1), to 0 -> mm1 is very sensitive."""
    r = np.random.default_rng(3)
    emb = r.standard_normal((64, 8)).astype(np.float32)
    emb[:, 7] = 1000.0
    w1 = r.standard_normal((8, 8)).astype(np.float32)
    w1[7] = row7
    return ids_model(emb, w1, r.standard_normal((8, 8)).astype(np.float32))


def test_budget_loop_leaves_the_sensitive_node_float(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_outlier_model(0.0), path)
    settings = QuantSettings(smoothquant_alpha=None, min_cosine=0.999)
    model, report = quantize_within_budget(path, ragged_ids(16, 4), ragged_ids(8, 5), IDS, ["last_hidden_state"],
                                           settings, None, batch_size=4)
    assert report.steps[0]["cosine_min"] < 0.9  # all INT8 misses the budget
    assert report.budget["met"] and report.fidelity["cosine_min"] >= 0.999
    assert [(e.name, e.reason) for e in report.excluded] == [("mm1", "sensitivity")]
    effect = report.excluded[0].effect
    assert effect["heldout_cosine_min_after"] >= 0.999 and effect["calib_deficit_removed"] > 0.1
    assert report.sensitivity["mm1"] > report.sensitivity["mm2"]
    assert report.quantized_nodes == ["mm2"] and 0 < report.int8_mac_fraction < 1
    assert dq_of(model, "mm1", 0) is None and dq_of(model, "mm2", 1) is not None

    _, none = quantize_within_budget(path, ragged_ids(16, 4), ragged_ids(8, 5), IDS, ["last_hidden_state"],
                                     QuantSettings(smoothquant_alpha=None, min_cosine=0.999, max_excluded=0),
                                     None, batch_size=4)
    assert not none.budget["met"] and none.excluded == []


def test_smoothquant_is_exact_in_fp32_and_fixes_the_outlier(tmp_path):
    model = _outlier_model(1e-3)
    amax = {"x": np.abs(numpy_helper.to_array(model.graph.initializer[0])).max(axis=0),
            "h": np.ones(8, np.float32)}
    smoothed, info = smooth(model, amax, 0.8)
    onnx.checker.check_model(smoothed, full_check=True)
    assert info["x"]["scale_max"] > 100 and info["x"]["consumers"] == ["mm1"]
    ids = {"input_ids": np.arange(1, 25, dtype=np.int64).reshape(2, 12)}
    np.testing.assert_allclose(ort_run(smoothed, ids)[0], ort_run(model, ids)[0], rtol=1e-4, atol=1e-3)

    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    run = lambda alpha: quantize_within_budget(  # noqa: E731
        path, ragged_ids(16, 4), ragged_ids(8, 5), IDS, ["last_hidden_state"],
        QuantSettings(smoothquant_alpha=alpha, max_excluded=0), None, batch_size=4)[1]
    plain, smoothed_report = run(None), run(0.8)
    assert plain.fidelity["cosine_min"] < 0.9
    assert smoothed_report.fidelity["cosine_min"] > 0.99 and smoothed_report.int8_mac_fraction == 1.0
    assert smoothed_report.smoothquant["alpha"] == 0.8 and "x" in smoothed_report.smoothquant["tensors"]


# --------------------------------------------------------------------------------------------
# MiniLM (real weights, WikiText-2)


@pytest.fixture(scope="module")
def minilm19(tmp_path_factory):
    """MiniLM exported at opset 19 (Q/DQ with FP16 scales need it), 64 calibration / 32 held-out samples."""
    from compiler.training.export import onnx_from_torch

    loaded = minilm()
    data = DataSettings(samples=32, calib_samples=64)
    heldout_texts = load_texts(data, skip=data.calib_samples)
    directory = tmp_path_factory.getbasetemp() / "minilm-export-opset19"
    directory.mkdir(parents=True, exist_ok=True)
    path, report = onnx_from_torch(loaded, ExportSettings(opset=19, parity_sequences=(8, 33)),
                                   directory / "model.fp32.onnx", heldout_texts)
    calib = tokenized_set(load_texts(data, count=data.calib_samples), loaded.tokenizer, 128, None)
    heldout = tokenized_set(heldout_texts, loaded.tokenizer, 128, None)
    return Path(path), report.outputs, calib, heldout, loaded.input_names


def test_minilm_int8_within_budget_on_heldout_text(minilm19, tmp_path):
    path, outputs, calib, heldout, names = minilm19
    model, report = quantize_within_budget(path, calib, heldout, names, outputs, QuantSettings(), tmp_path)
    assert report.budget["met"], report.steps
    assert report.fidelity["cosine_min"] >= 0.99 and report.fidelity["nonfinite_count"] == 0
    assert report.fidelity["samples"] == len(heldout) == 32
    assert report.int8_mac_fraction >= 0.75
    assert report.quantized_matmuls == 37  # 6 layers x (Q, K, V, O, FFN1, FFN2) + pooler
    assert sorted({e.reason for e in report.excluded}) == ["attention-bmm"] and len(report.excluded) == 12
    assert report.calibration["windows"] == 64 and report.calibration["window_tokens"] == 128
    assert len(report.smoothquant["tensors"]) == 25  # 6 x (QKV input, O input, FFN1 input, FFN2 input) + pooler
    onnx.checker.check_model(model, full_check=True)
    assert len([n for n in model.graph.node if n.op_type == "QuantizeLinear"]) == report.activation_qdq == 25
    # the thresholds of this run were cached; the same call reuses them
    assert len(list(tmp_path.glob("int8-*.json"))) == 1 and len(list(tmp_path.glob("int8-channels-*.npz"))) == 1


def test_minilm_methods_give_different_thresholds(minilm19, tmp_path):
    """On real text the three ORT calibrators differ: histogram methods clip below the maximum."""
    path, _, calib, _, names = minilm19
    tensors = ["/model/encoder/layer.0/intermediate/intermediate_act_fn/Mul_1_output_0",
               "/model/encoder/layer.0/attention/output/LayerNorm/LayerNormalization_output_0"]
    got = {m: calibrate(path, calib, names, QuantSettings(method=m, calib_windows=16), tmp_path, tensors=tensors)
           for m in ("max", "entropy", "percentile")}
    for t in tensors:
        mx, ent, pct = got["max"][t], got["entropy"][t], got["percentile"][t]
        assert ent < 0.9 * mx and pct < 0.9 * mx and abs(ent - pct) > 0.01 * mx, (t, mx, ent, pct)
