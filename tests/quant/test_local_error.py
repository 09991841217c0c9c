"""The one-pass INT8 sensitivity (`compiler.quant.local_error`): each node's score equals the
relative error of its output when it alone is quantized (its inputs then FP32), computed here
from separate ONNX Runtime runs and numpy; and the budget loop with the default `local`
sensitivity leaves the right node float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from calibration.stats import exposed_outputs
from compiler.passes.qdq import insert_qdq
from compiler.quant.budget import quantize_within_budget
from compiler.quant.calibrate import calibrate, calibration_windows
from compiler.quant.local_error import local_error_graph, local_errors
from compiler.settings import QuantSettings
from tests.models import ort_run
from tests.quant.test_budget import OUT, _two_sensitive_model
from tests.quant.test_calibrate import IDS, ragged_ids


def _output_of(model, node: str, feeds) -> np.ndarray:
    name = next(n.output[0] for n in model.graph.node if n.name == node)
    with exposed_outputs(model, [name]):
        outs = ort_run(model, feeds, optimize=False)
    return outs[-1]  # an exposed output comes last; mm2's is the graph's only output


def test_local_error_is_each_nodes_own_error(tmp_path):
    fp32 = _two_sensitive_model()
    path = tmp_path / "m.onnx"
    onnx.save(fp32, path)
    settings = QuantSettings(smoothquant_alpha=None)
    calib = ragged_ids(16, 4)
    scales = calibrate(path, calib, IDS, settings, None)
    windows = calibration_windows(calib)
    qdq, report = insert_qdq(fp32, scales, settings)
    assert report.quantized_nodes == ["mm1", "mm2"]
    batches = [{"input_ids": windows[s:s + 4]} for s in range(0, len(windows), 4)]
    got = local_errors(fp32, qdq, report.quantized_nodes, batches)

    expect = {}
    for node, other in (("mm1", "mm2"), ("mm2", "mm1")):
        alone = insert_qdq(fp32, scales, settings, exclude_nodes={other: "test"})[0]
        err = ref = 0.0
        for feeds in batches:
            y = _output_of(fp32, node, feeds).astype(np.float64)
            yq = _output_of(alone, node, feeds).astype(np.float64)
            err += float(np.sum((yq - y) ** 2))
            ref += float(np.sum(y ** 2))
        expect[node] = (err / ref) ** 0.5
    assert got == pytest.approx(expect, rel=1e-4)
    assert got["mm2"] > 0.5 > 0.1 > got["mm1"] > 0  # mm2: h's channel 0 (~1000) rounds the rest to 0

    graph, outputs = local_error_graph(fp32, qdq, ["mm2"])
    onnx.checker.check_model(graph, full_check=True)
    assert [o.name for o in graph.graph.output] == list(outputs["mm2"])
    with pytest.raises(ValueError, match="not found"):
        local_error_graph(fp32, qdq, ["embed_missing"])


def test_budget_with_local_sensitivity_leaves_the_sensitive_node_float(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_two_sensitive_model(), path)
    settings = QuantSettings(smoothquant_alpha=None, min_cosine=0.9999)
    assert settings.sensitivity == "local"
    _, report = quantize_within_budget(path, ragged_ids(16, 4), ragged_ids(8, 5), IDS, OUT, settings, None,
                                       batch_size=4)
    assert max(report.sensitivity, key=report.sensitivity.get) == "mm2"
    assert report.steps[1]["nodes"] == ["mm2"]
    assert report.budget["sensitivity"] == "local" and report.budget["sensitivity_seconds"] >= 0
    detail = {e.name: e.detail for e in report.excluded}
    assert "local INT8 error" in detail["mm2"]
    assert report.budget["met"]
