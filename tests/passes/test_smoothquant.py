"""The SmoothQuant pass (`compiler.passes.smoothquant.smooth`): exact in FP32 (checked on ONNX
Runtime and in numpy), scales from Xiao et al.'s formula worked out by hand, and the rules."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler.passes.smoothquant import smooth
from tests.models import f32, make_model, ort_run

OPSET = 19
K = 8
r = np.random.default_rng(11)
WA = r.standard_normal((K, 6)).astype(np.float32)  # MatMul(x, Wa): W[K, N]
WB = (3 * r.standard_normal((K, 5))).astype(np.float32)  # MatMul(x, Wb): shares x with Wa
WG = r.standard_normal((4, K)).astype(np.float32)  # Gemm(z, Wg, transB=1): W[N, K]
WL = r.standard_normal((5, 3)).astype(np.float32)  # MatMul(Wl, t): weight first, not smoothed


def graph() -> onnx.ModelProto:
    """x (batch, seq, K) feeds two weight MatMuls and a residual Add; z (rows, K) a Gemm with
    transB=1; t (3, cols) a weight-first MatMul."""
    nodes = [helper.make_node("Add", ["x", "x"], ["twice"], name="residual"),
             helper.make_node("MatMul", ["x", "Wa"], ["a"], name="mm_a"),
             helper.make_node("MatMul", ["x", "Wb"], ["b"], name="mm_b"),
             helper.make_node("Gemm", ["z", "Wg"], ["g"], name="gemm", transB=1),
             helper.make_node("MatMul", ["Wl", "t"], ["l"], name="left")]
    return make_model(nodes, [f32("x", ["batch", "seq", K]), f32("z", ["rows", K]), f32("t", [3, "cols"])],
                      [f32("twice", ["batch", "seq", K]), f32("a", ["batch", "seq", 6]), f32("b", ["batch", "seq", 5]),
                       f32("g", ["rows", 4]), f32("l", [5, "cols"])],
                      {"Wa": WA, "Wb": WB, "Wg": WG, "Wl": WL}, opset=OPSET)


def feeds() -> dict[str, np.ndarray]:
    x = r.standard_normal((2, 7, K)).astype(np.float32)
    x[..., 2] *= 40.0  # an outlier channel, as after BERT's layer norms
    z = r.standard_normal((9, K)).astype(np.float32)
    z[:, 5] *= 25.0
    return {"x": x, "z": z, "t": r.standard_normal((3, 4)).astype(np.float32)}


def absmax_of(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {t: np.abs(f[t].reshape(-1, K)).max(axis=0) for t in ("x", "z")}


def test_smoothquant_leaves_the_fp32_function_unchanged():
    """X / s . (s * W) == X . W: every output of the smoothed graph equals the FP32 graph's on
    ONNX Runtime, and the graph's own 1/s and s * W reproduce X . W in numpy."""
    model, f = graph(), feeds()
    smoothed, info = smooth(model, absmax_of(f), 0.5)
    onnx.checker.check_model(smoothed, full_check=True)
    assert sorted(info) == ["x", "z"]
    for ref, got in zip(ort_run(model, f, optimize=False), ort_run(smoothed, f, optimize=False)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    consts = {t.name: numpy_helper.to_array(t) for t in smoothed.graph.initializer}
    inv = consts["x_smooth_inv_scale"]
    for w, name in ((WA, "Wa_smoothed"), (WB, "Wb_smoothed")):
        np.testing.assert_allclose((f["x"] * inv) @ consts[name], f["x"] @ w, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose((f["z"] * consts["z_smooth_inv_scale"]) @ consts["Wg_smoothed"].T, f["z"] @ WG.T,
                               rtol=1e-5, atol=1e-4)
    # the outlier moved into the weights: at alpha 0.5 max|X_j / s_j| = sqrt(max|X_j| max|W_j|)
    w_x = np.maximum(np.abs(WA).max(axis=1), np.abs(WB).max(axis=1))
    smoothed_max = np.abs(f["x"] * inv).reshape(-1, K).max(axis=0)
    np.testing.assert_allclose(smoothed_max, np.sqrt(absmax_of(f)["x"] * w_x), rtol=1e-5)
    assert smoothed_max.max() / smoothed_max.min() < absmax_of(f)["x"].max() / absmax_of(f)["x"].min() / 4


def test_scales_follow_the_formula_and_weights_are_rescaled():
    """s_j = max|X_j|^alpha / max_j(|Wa_j|, |Wb_j|)^(1 - alpha), one s for both consumers of x;
    channels with max|X_j| = 0 keep s = 1; s is clipped to [1e-4, 1e4]."""
    f = feeds()
    amax = absmax_of(f)
    amax["x"][0] = 0.0
    amax["z"][1] = 1e12
    alpha = 0.8
    smoothed, info = smooth(graph(), amax, alpha)
    consts = {t.name: numpy_helper.to_array(t) for t in smoothed.graph.initializer}
    w_x = np.maximum(np.abs(WA).max(axis=1), np.abs(WB).max(axis=1))
    s_x = amax["x"].astype(np.float64) ** alpha / w_x.astype(np.float64) ** (1 - alpha)
    s_x[0] = 1.0
    np.testing.assert_allclose(1 / consts["x_smooth_inv_scale"], s_x, rtol=1e-5)
    s_z = amax["z"].astype(np.float64) ** alpha / np.abs(WG).max(axis=0).astype(np.float64) ** (1 - alpha)
    s_z[1] = 1e4
    np.testing.assert_allclose(1 / consts["z_smooth_inv_scale"], s_z, rtol=1e-5)
    np.testing.assert_allclose(consts["Wa_smoothed"], WA * s_x[:, None], rtol=1e-5)
    np.testing.assert_allclose(consts["Wg_smoothed"], WG * s_z[None, :], rtol=1e-5)
    assert info["x"] == {"channels": K, "scale_min": float(np.float32(s_x.min())),
                         "scale_max": float(np.float32(s_x.max())), "consumers": ["mm_a", "mm_b"]}
    assert info["z"]["consumers"] == ["gemm"] and info["z"]["scale_max"] == np.float32(1e4)
    assert not {"Wa", "Wb", "Wg"} & set(consts) and "Wl" in consts  # replaced weights dropped


def test_rules_what_is_not_smoothed():
    model, f = graph(), feeds()
    amax = absmax_of(f)
    smoothed, info = smooth(model, amax, 0.5, nodes=["mm_a"])
    by_name = {n.name: n for n in smoothed.graph.node}
    assert list(info) == ["x"] and info["x"]["consumers"] == ["mm_a"]  # only the named node
    assert by_name["mm_a"].input == ["x_smoothed", "Wa_smoothed"] and by_name["mm_b"].input == ["x", "Wb"]
    assert by_name["residual"].input == ["x", "x"]  # other consumers still read X
    assert by_name["left"].input == ["Wl", "t"]  # weight-first MatMul: reduction axis not X's last
    # the Mul is emitted right before its first consumer (topological order)
    order = [n.name for n in smoothed.graph.node]
    assert order.index("x_SmoothQuant") == order.index("mm_a") - 1
    for ref, got in zip(ort_run(model, f, optimize=False), ort_run(smoothed, f, optimize=False)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    # a statistic of the wrong width, or none, leaves the tensor alone
    same, info = smooth(model, {"x": np.ones(K + 1, np.float32)}, 0.5)
    assert info == {} and [n.input[:] for n in same.graph.node] == [n.input[:] for n in model.graph.node]
    assert model.graph.node[1].input == ["x", "Wa"]  # the input graph is not modified
