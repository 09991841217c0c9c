"""The INT8 budget loop (`compiler.quant.budget.quantize_within_budget`): which node it leaves
float and in what order (checked against sensitivities measured here with ONNX Runtime and
numpy), SmoothQuant inside the loop, and MiniLM on real text with its caches reused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compiler.passes.qdq import insert_qdq
from compiler.passes.smoothquant import smooth
from compiler.quant import calibrate as C
from compiler.quant.budget import quantize_within_budget
from compiler.quant.calibrate import calibration_windows
from compiler.settings import QuantSettings
from tests.models import ort_run, producers
from tests.quant.test_calibrate import IDS, ids_model, minilm19, ragged_ids  # noqa: F401 (minilm19: fixture)

OUT = ["last_hidden_state"]


def dequantized_inputs(model, node_name):
    """Input positions of `node_name` that a DequantizeLinear feeds."""
    node = next(n for n in model.graph.node if n.name == node_name)
    made_by = producers(model)
    return [k for k, t in enumerate(node.input) if t in made_by and made_by[t].op_type == "DequantizeLinear"]


def _outlier_model(row7: float) -> onnx.ModelProto:
    """Channel 7 of x is 1000 on every token and (almost) unused by mm1: per tensor INT8 of x
    (scale 1000/127) rounds the other channels, ~N(0, 1), to 0 -> mm1 is very sensitive."""
    r = np.random.default_rng(3)
    emb = r.standard_normal((64, 8)).astype(np.float32)
    emb[:, 7] = 1000.0
    w1 = r.standard_normal((8, 8)).astype(np.float32)
    w1[7] = row7
    return ids_model(emb, w1, r.standard_normal((8, 8)).astype(np.float32))


def _two_sensitive_model() -> onnx.ModelProto:
    """mm1 mildly sensitive (x's channel 7 is 20, weakly used), mm2 very sensitive (h's channel
    0 is ~1000 and unused by mm2): the most sensitive node comes second in graph order."""
    r = np.random.default_rng(7)
    emb = r.standard_normal((64, 8)).astype(np.float32)
    emb[:, 7] = 20.0
    w1 = r.standard_normal((8, 8)).astype(np.float32)
    w1[7] = 0.01
    w1[7, 0] = 50.0
    w2 = r.standard_normal((8, 8)).astype(np.float32)
    w2[0] = 1e-3
    return ids_model(emb, w1, w2)


def mean_deficit(fp32, variant, windows) -> float:
    """Mean over windows of 1 - cosine(FP32 output, variant output), ONNX Runtime + numpy."""
    ref = ort_run(fp32, {"input_ids": windows}, optimize=False)[0].astype(np.float64)
    got = ort_run(variant, {"input_ids": windows}, optimize=False)[0].astype(np.float64)
    cos = [a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(ref, got)]
    return float(np.mean(1.0 - np.array(cos)))


def test_budget_loop_leaves_the_sensitive_node_float(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_outlier_model(0.0), path)
    settings = QuantSettings(smoothquant_alpha=None, min_cosine=0.999)
    model, report = quantize_within_budget(path, ragged_ids(16, 4), ragged_ids(8, 5), IDS, OUT, settings, None,
                                           batch_size=4)
    assert report.steps[0]["cosine_min"] < 0.9  # all INT8 misses the budget
    assert report.budget["met"] and report.fidelity["cosine_min"] >= 0.999
    assert [(e.name, e.reason) for e in report.excluded] == [("mm1", "sensitivity")]
    effect = report.excluded[0].effect
    assert effect["heldout_cosine_min_after"] >= 0.999 and effect["sensitivity"] > 0.1
    assert report.sensitivity["mm1"] > report.sensitivity["mm2"]
    assert report.quantized_nodes == ["mm2"] and 0 < report.int8_mac_fraction < 1
    assert dequantized_inputs(model, "mm1") == [] and dequantized_inputs(model, "mm2") == [0, 1]

    _, none = quantize_within_budget(path, ragged_ids(16, 4), ragged_ids(8, 5), IDS, OUT,
                                     QuantSettings(smoothquant_alpha=None, min_cosine=0.999, max_excluded=0),
                                     None, batch_size=4)
    assert not none.budget["met"] and none.excluded == [] and none.sensitivity == {}


def test_budget_loop_excludes_the_most_sensitive_node_first(tmp_path):
    """The loop's order is the sensitivity order, and each sensitivity equals the mean cosine
    deficit that leaving only that node float removes, measured here on the same calibration
    windows with ONNX Runtime and numpy."""
    fp32 = _two_sensitive_model()
    path = tmp_path / "m.onnx"
    onnx.save(fp32, path)
    calib = ragged_ids(16, 4)
    settings = QuantSettings(smoothquant_alpha=None, min_cosine=0.9999, sensitivity="end-to-end")
    _, report = quantize_within_budget(path, calib, ragged_ids(8, 5), IDS, OUT, settings, None, batch_size=4)
    windows = calibration_windows(calib)[: settings.sensitivity_samples]
    qdq = lambda exclude: insert_qdq(fp32, report.thresholds, settings, exclude_nodes=exclude)[0]  # noqa: E731
    base = mean_deficit(fp32, qdq({}), windows)
    expect = {n: base - mean_deficit(fp32, qdq({n: "probe"}), windows) for n in ("mm1", "mm2")}
    assert report.sensitivity == pytest.approx(expect, rel=1e-4, abs=1e-7)
    assert expect["mm2"] > expect["mm1"]  # the second node in graph order is the most sensitive
    assert [s["action"] for s in report.steps] == ["start", "float: top 1", "float: top 2"]
    assert [s.get("nodes") for s in report.steps] == [None, ["mm2"], ["mm2", "mm1"]]
    assert report.steps[1]["cosine_min"] < settings.min_cosine <= report.steps[2]["cosine_min"]
    assert report.budget["met"] and report.budget["excluded_by_budget"] == 2 and report.quantized_matmuls == 0

    _, capped = quantize_within_budget(path, calib, ragged_ids(8, 5), IDS, OUT,
                                       QuantSettings(smoothquant_alpha=None, min_cosine=0.9999, max_excluded=1,
                                                     sensitivity="end-to-end"),
                                       None, batch_size=4)
    assert [e.name for e in capped.excluded] == ["mm2"] and capped.quantized_nodes == ["mm1"]
    assert not capped.budget["met"] and capped.fidelity["cosine_min"] == report.steps[1]["cosine_min"]


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
        path, ragged_ids(16, 4), ragged_ids(8, 5), IDS, OUT,
        QuantSettings(smoothquant_alpha=alpha, max_excluded=0), None, batch_size=4)[1]
    plain, smoothed_report = run(None), run(0.8)
    assert plain.fidelity["cosine_min"] < 0.9 and plain.smoothquant == {} and plain.smoothquant_alpha is None
    assert smoothed_report.fidelity["cosine_min"] > 0.99 and smoothed_report.int8_mac_fraction == 1.0
    assert smoothed_report.smoothquant["alpha"] == 0.8 and "x" in smoothed_report.smoothquant["tensors"]
    assert smoothed_report.smoothquant_alpha == 0.8
    # the smoothed graph is what got calibrated: its tensor names carry the SmoothQuant Mul's
    assert "x_smoothed" in smoothed_report.thresholds and "x" not in smoothed_report.thresholds


def test_minilm_int8_within_budget_on_heldout_text(minilm19, tmp_path, monkeypatch):
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
    # `max` thresholds come from the channel maxima (one pass, cached): no calibrator pass, no
    # thresholds file; the same call reuses the maxima and gives the same graph
    assert report.calibration["thresholds_from"] == "channel maxima (in-graph)"
    assert list(tmp_path.glob("int8-*.json")) == []
    (channels,) = tmp_path.glob("int8-channels-*.npz")
    stamp = channels.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("a cached statistic was computed again")

    monkeypatch.setattr(C, "run_calibrator", refuse)
    monkeypatch.setattr(C, "channel_absmax_in_graph", refuse)
    again, second = quantize_within_budget(path, calib, heldout, names, outputs, QuantSettings(), tmp_path)
    assert channels.stat().st_mtime_ns == stamp
    assert second.thresholds == report.thresholds and second.fidelity == report.fidelity
    assert again.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("needed, evaluated", [(5, [1, 8, 2, 4, 6, 5]), (6, [1, 8, 2, 4, 6, 5]), (1, [1]),
                                               (3, [1, 8, 2, 4, 3]), (8, [1, 8, 2, 4, 6, 7]), (2, [1, 8, 2]),
                                               (None, [1, 8])])
def test_budget_finds_the_fewest_float_nodes_by_doubling_then_bisection(needed, evaluated):
    """Held-out fidelity that grows with the number of float nodes: the loop returns the
    smallest prefix of the sensitivity order meeting the budget (or all `max_excluded` when none
    does) and measures only the prefixes 1, then `max_excluded` (failing: the search ends), then
    2, 4, ... and the bisection's."""
    from dataclasses import dataclass

    from compiler.passes.qdq import QuantReport
    from compiler.quant.budget import _exclude_until_met

    names = [f"mm{i}" for i in range(12)]
    sensitivity = {n: 12.0 - i for i, n in enumerate(names)}  # mm0 most sensitive

    @dataclass
    class Fid:
        n: int

        def to_dict(self):
            ok = needed is not None and self.n >= needed
            return {"cosine_min": 0.99 if ok else 0.5 + 0.01 * self.n, "cosine_mean": 0.99, "nonfinite_count": 0}

    class Heldout:
        def score(self, model):
            return Fid(model)

    def variant(exclude):
        assert list(exclude) == names[: len(exclude)]  # always a prefix of the order
        return len(exclude), QuantReport("max", False, quantized_nodes=names[len(exclude):],
                                         int8_mac_fraction=1 - len(exclude) / 12)

    def rank(model, report):
        return dict(sensitivity), lambda name: f"rank {name}"

    loop = _exclude_until_met(variant, Heldout(), rank, QuantSettings(max_excluded=8))
    assert [len(s["nodes"]) for s in loop.steps[1:]] == evaluated
    final = needed if needed is not None else 8
    assert list(loop.excluded) == names[:final] and loop.model == final
    assert loop.fid["cosine_min"] == (0.99 if needed is not None else 0.5 + 0.08)


@pytest.mark.parametrize("cosines, nonfinite, shipped", [
    ({0: 0.96609, 1: 0.96576, 8: 0.96603}, {}, 0),  # BERT-large, VNNI: floats did not help, the start ships
    ({0: 0.96625, 1: 0.96652, 8: 0.97356}, {}, 8),  # BERT-large, AVX2: the 8 floats helped
    ({0: 0.90, 1: 0.95, 8: 0.93}, {}, 1),
    ({0: 0.97, 1: 0.96, 8: 0.95}, {0: 3, 1: 1}, 8),  # non-finite outputs first
    ({0: 0.95, 1: 0.95, 8: 0.95}, {}, 0),  # a tie: the most INT8
])
def test_an_out_of_reach_budget_ships_the_best_graph_measured(cosines, nonfinite, shipped):
    """When even `max_excluded` float nodes miss the budget, the loop ships the best of the graphs
    it measured (the all-INT8 start, top 1, top `max_excluded`): fewest non-finite, then highest
    cosine min, then most INT8, never a prefix worse than the start."""
    from compiler.passes.qdq import QuantReport
    from compiler.quant.budget import _exclude_until_met

    names = [f"mm{i}" for i in range(12)]

    class Heldout:
        def score(self, model):
            class Fid:
                def to_dict(self):
                    return {"cosine_min": cosines[model], "cosine_mean": 0.99,
                            "nonfinite_count": nonfinite.get(model, 0)}
            return Fid()

    def variant(exclude):
        return len(exclude), QuantReport("max", False, quantized_nodes=names[len(exclude):],
                                         int8_mac_fraction=1 - len(exclude) / 12)

    def rank(model, report):
        return {n: 12.0 - i for i, n in enumerate(names)}, lambda name: f"rank {name}"

    loop = _exclude_until_met(variant, Heldout(), rank, QuantSettings(max_excluded=8))
    assert [len(s["nodes"]) for s in loop.steps[1:]] == [1, 8]  # the same two evaluations
    assert loop.model == shipped and list(loop.excluded) == names[:shipped]
    assert loop.fid["cosine_min"] == cosines[shipped] and loop.report.int8_mac_fraction == 1 - shipped / 12
