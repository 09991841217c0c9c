"""calibration/stats.py: streamed activation statistics of an FP32 graph, and their cache."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import calibration.stats as stats_module
from calibration.stats import (ActivationStats, cached_activation_stats, collect_activation_stats, exposed_outputs,
                               float_activations)
from calibration.text import TokenizedSet
from tests.models import f32, make_model

IDS = ["input_ids"]


def ids_graph(nodes, initializers, outputs=("last_hidden_state",)):
    """input_ids (batch, sequence) int64 -> Cast float `x` -> nodes -> outputs (batch, sequence)."""
    cast = helper.make_node("Cast", ["input_ids"], ["x"], to=TensorProto.FLOAT, name="cast")
    inp = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    return make_model([cast, *nodes], [inp], [f32(o, ["batch", "sequence"]) for o in outputs], initializers)


def double_and_huge():
    """last_hidden_state = 2x; huge = x * 1e38, which overflows FP32 to inf for ids >= 4."""
    return ids_graph([helper.make_node("Mul", ["x", "two"], ["last_hidden_state"], name="double"),
                      helper.make_node("Mul", ["x", "big"], ["huge"], name="huge")],
                     {"two": np.array(2.0, np.float32), "big": np.array(1e38, np.float32)},
                     ("last_hidden_state", "huge"))


def test_statistics_stream_and_skip_padding_and_integers():
    # y = x * 2: absmax is 2 * the largest valid id; padded positions (a huge pad id) must not count.
    model = ids_graph([helper.make_node("Mul", ["x", "two"], ["last_hidden_state"], name="mul")],
                      {"two": np.array(2.0, np.float32)})
    assert float_activations(model) == ["x", "last_hidden_state"]  # int input_ids excluded
    tokens = TokenizedSet([np.array([1, 2, 3]), np.array([7])], None, pad_id=1000, key="k")
    stats = collect_activation_stats(model, tokens.batches(2, IDS), "real")
    assert stats.samples == 2
    assert stats.tensors["last_hidden_state"].absmax == 14.0  # not 2000: padding excluded
    assert stats.tensors["x"].elements == 4

    rng = np.random.default_rng(0)
    values = rng.lognormal(0, 2, size=(4, 5000)).astype(np.int64) + 1
    big = TokenizedSet(list(values), None, 0, "big")
    s = collect_activation_stats(model, big.batches(1, IDS), "real", percentile=99.0)
    exact = np.percentile(2.0 * values, 99.0)
    assert s.tensors["last_hidden_state"].absmax == 2.0 * values.max()
    assert abs(s.tensors["last_hidden_state"].percentile / exact - 1) < 0.1  # one histogram bin is 4.4 %


def test_exposed_outputs_are_removed_on_exit():
    model = double_and_huge()
    with exposed_outputs(model, ["x", "huge"]) as m:
        assert [o.name for o in m.graph.output] == ["last_hidden_state", "huge", "x"]  # huge not twice
    assert [o.name for o in model.graph.output] == ["last_hidden_state", "huge"]


def test_cached_statistics_written_once_read_back_and_keyed(tmp_path, monkeypatch):
    model = double_and_huge()
    tokens = TokenizedSet([np.array([1, 2, 3]), np.array([7])], None, 0, "text-a")
    runs = []
    collect = stats_module.collect_activation_stats

    def counting(*args, **kwargs):
        runs.append(args[2])
        return collect(*args, **kwargs)

    monkeypatch.setattr(stats_module, "collect_activation_stats", counting)
    first = cached_activation_stats(model, "graph-a", tokens, IDS, tmp_path, "real")
    assert runs == ["real"] and len(list(tmp_path.glob("stats-*.json"))) == 1
    assert first.tensors["last_hidden_state"].absmax == 14.0  # 2 x 7, by hand
    assert first.tensors["huge"].absmax == np.inf  # 7e38 > FP32's 3.4e38: kept through JSON below

    def no_onnx_runtime(*args, **kwargs):
        raise AssertionError("a cache hit ran ONNX Runtime")

    with monkeypatch.context() as m:
        m.setattr(stats_module, "ort_session", no_onnx_runtime)
        m.setattr(stats_module, "collect_activation_stats", no_onnx_runtime)
        again = cached_activation_stats(model, "graph-a", tokens, IDS, tmp_path, "real")
    assert isinstance(again, ActivationStats) and again == first and again is not first
    assert runs == ["real"]

    cached_activation_stats(model, "graph-b", tokens, IDS, tmp_path, "real")  # changed graph hash
    other_text = TokenizedSet(tokens.input_ids, None, 0, "text-b")
    cached_activation_stats(model, "graph-a", other_text, IDS, tmp_path, "real")  # changed text
    rand = cached_activation_stats(model, "graph-a", tokens, IDS, tmp_path, "random", vocab_size=3)
    assert runs == ["real", "real", "real", "random"]
    assert len(list(tmp_path.glob("stats-*.json"))) == 4
    assert rand.tensors["last_hidden_state"].absmax <= 4.0  # random ids in [0, 3), doubled


def test_no_cache_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative default would land here
    tokens = TokenizedSet([np.array([1, 2])], None, 0, "k")
    stats = cached_activation_stats(double_and_huge(), "g", tokens, IDS, None, "real")
    assert stats.tensors["last_hidden_state"].absmax == 4.0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("percentile", [50.0, 100.0])
def test_percentile_edges(percentile):
    model = ids_graph([helper.make_node("Identity", ["x"], ["last_hidden_state"], name="id")], {})
    tokens = TokenizedSet([np.array([0, 0, 0, 8])], None, 0, "k")  # |x|: three zeros and an 8
    s = collect_activation_stats(model, tokens.batches(1, IDS), "real", percentile=percentile)
    t = s.tensors["last_hidden_state"]
    assert t.absmax == 8.0 and t.elements == 4
    assert t.percentile == (0.0 if percentile == 50.0 else 8.0)  # the median is a zero; p100 is capped at absmax
