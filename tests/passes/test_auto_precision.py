"""compiler/passes/auto_precision.py: the rules, the budgeted search, island merging, the planted hazard."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from calibration import TokenizedSet, load_texts, tokenized_set
from calibration.stats import ActivationStats, TensorStats
from compiler.passes.auto_precision import auto_precision, merge_islands, rule_initializer_underflow, rule_overflow
from compiler.training.export import onnx_from_torch
from compiler.training.models import LoadedModel
from compiler.passes.precision import convert_precision
from compiler.settings import DataSettings, ExportSettings, PrecisionSettings
from compiler.eval.verify import verify_variant
from tests.models import f32, make_model, minilm, minilm_dir, minilm_fp32_model, minilm_variant, planted_hazard_bert

IDS = ["input_ids"]


def ids_graph(nodes, initializers, output="last_hidden_state"):
    """input_ids (batch, sequence) int64 -> Cast float -> nodes -> `output` (batch, sequence)."""
    cast = helper.make_node("Cast", ["input_ids"], ["x"], to=TensorProto.FLOAT, name="cast")
    inp = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    return make_model([cast, *nodes], [inp], [f32(output, ["batch", "sequence"])], initializers)


def token_set(rows, key="t"):
    return TokenizedSet([np.asarray(r, np.int64) for r in rows], None, 0, key)


def test_overflow_rule_fires_with_margin_and_declines_mask_fill():
    model = ids_graph([helper.make_node("Mul", ["x", "w"], ["y"], name="big"),
                       helper.make_node("Add", ["y", "m"], ["last_hidden_state"], name="next")],
                      {"w": np.array(1.0, np.float32), "m": np.array(0.0, np.float32)})
    stats = ActivationStats("real", 1, 99.99, {"x": TensorStats(10.0, 5.0, 1),
                                               "y": TensorStats(40000.0, 30000.0, 1),
                                               "last_hidden_state": TensorStats(1.0, 1.0, 1)})
    pins, declined = rule_overflow(model, stats, margin=2.0)
    assert set(pins) == {"big", "next"}  # the producer and the consumer of the hot tensor
    assert pins["big"][0] == "overflow" and pins["big"][1].startswith("y: absmax 40000")
    assert rule_overflow(model, stats, margin=1.0)[0] == {}  # 40000 < 65504 without the margin

    stats.tensors["y"] = TensorStats(3.4e38, 3.4e38, 1)  # a mask fill value: clamped, not pinned
    pins, declined = rule_overflow(model, stats, margin=2.0)
    assert pins == {} and len(declined) == 2 and all("mask fill value" in d for d in declined)


def underflow_graph(values):
    """x * s with the constant `s` (values as float32, broadcast over the sequence)."""
    return ids_graph([helper.make_node("Mul", ["x", "s"], ["last_hidden_state"], name="scale")],
                     {"s": np.asarray(values, np.float32)})


def test_initializer_underflow_rule():
    tiny, normal = 1e-6, 0.5  # FP16's smallest normal is 2**-14 = 6.1e-5
    detail = "s: {} of nonzero values below 6.1e-05"
    assert rule_initializer_underflow(underflow_graph([tiny] * 15)) == {}  # 15 nonzero values: too few to judge
    assert rule_initializer_underflow(underflow_graph([tiny] * 16)) == {
        "scale": ("initializer-underflow", detail.format("100%"))}
    assert rule_initializer_underflow(underflow_graph([tiny] * 8 + [normal] * 8)) == {}  # 8/16 is no majority
    pins = rule_initializer_underflow(underflow_graph([tiny] * 9 + [normal] * 7 + [0.0] * 100))
    assert pins == {"scale": ("initializer-underflow", detail.format("56%"))}  # 9/16: zeros do not count
    assert rule_initializer_underflow(underflow_graph([2.0**-14] * 16)) == {}  # the smallest normal is normal
    assert rule_initializer_underflow(underflow_graph([tiny] * 8 + [normal] * 8), share=0.4) == {
        "scale": ("initializer-underflow", detail.format("50%"))}
    wide = ids_graph([helper.make_node("MatMul", ["x", "W"], ["last_hidden_state"], name="mm")],
                     {"W": np.where(np.arange(64 * 64).reshape(64, 64) % 4, 1e-6, 0.5).astype(np.float32)})
    wide.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 64
    pins = rule_initializer_underflow(wide)
    assert pins == {"mm": ("initializer-underflow", "W: 75% of nonzero values below 6.1e-05")}  # 3 of every 4


def test_initializer_underflow_rule_reads_external_weights_one_at_a_time(tmp_path):
    from compiler.graph.onnx_io import save_onnx

    rng = np.random.default_rng(0)
    model = ids_graph([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                       helper.make_node("Mul", ["h", "s"], ["last_hidden_state"], name="scale")],
                      {"W": np.where(rng.random((64, 64)) < 0.7, 1e-6, 0.5).astype(np.float32),
                       "s": np.full(64, 1e-7, np.float32)})
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 64
    expected = rule_initializer_underflow(model)
    assert set(expected) == {"mm", "scale"}
    path = save_onnx(model, tmp_path / "m.onnx", external=True)
    light = onnx.load(str(path), load_external_data=False)
    assert rule_initializer_underflow(light, base_dir=str(tmp_path)) == expected
    w = next(t for t in light.graph.initializer if t.name == "W")
    assert not w.raw_data and w.external_data  # the graph is still without its weights


def test_merge_islands_joins_fp16_node_between_fp32_nodes():
    model = ids_graph([helper.make_node("Softmax", ["x"], ["a"], name="s1", axis=-1),
                       helper.make_node("Mul", ["a", "k"], ["b"], name="mul"),
                       helper.make_node("Softmax", ["b"], ["last_hidden_state"], name="s2", axis=-1)],
                      {"k": np.array(3.0, np.float32)})
    pins = {"s1": ("sensitivity", ""), "s2": ("sensitivity", "")}
    merged = merge_islands(model, pins)
    assert set(merged) == {"mul", "cast"}  # cast: int -> FP32 directly, not int -> FP16 -> FP32
    before = convert_precision(model, PrecisionSettings(mode="auto"), fp32_nodes=pins)[1].casts_inserted
    after = convert_precision(model, PrecisionSettings(mode="auto"), fp32_nodes={**pins, **merged})[1]
    assert before == 3 and after.casts_inserted == 0


def test_constant_nodes_are_never_pinned_or_merged():
    # An RMSNorm exported as Pow(x, Constant 2) -> ReduceMean -> Add(Constant eps): with Pow and Add
    # pinned, the Constants between them were merged into the island, and the conversion (where
    # Constant nodes are initializers) refused the pins: "fp32_nodes names nodes that are not in
    # the graph" on any Llama-family model whose activations pass FP16's range.
    const = lambda name, v: helper.make_node(  # noqa: E731
        "Constant", [], [name], name=name, value=onnx.numpy_helper.from_array(np.array(v, np.float32)))
    two, eps = const("two", 2.0), const("eps", 1e-6)
    model = ids_graph([two, eps, helper.make_node("Pow", ["x", "two"], ["sq"], name="pow"),
                       helper.make_node("Add", ["sq", "eps"], ["last_hidden_state"], name="add")], {})
    stats = ActivationStats("real", 1, 99.99, {"x": TensorStats(1e3, 1e3, 1), "sq": TensorStats(1e6, 1e6, 1),
                                               "two": TensorStats(1e5, 1e5, 1), "eps": TensorStats(1e-6, 1e-6, 1),
                                               "last_hidden_state": TensorStats(1e6, 1e6, 1)})
    pins, _ = rule_overflow(model, stats, margin=2.0)
    assert set(pins) == {"pow", "add"}  # not the Constant "two", whatever its statistics say
    merged = merge_islands(model, pins)
    assert set(merged) == {"cast"}  # not the Constants "two" and "eps" between pinned nodes
    converted, report = convert_precision(model, PrecisionSettings(mode="auto"), fp32_nodes={**pins, **merged})
    assert report.nodes == {"fp32": 3, "fp16": 0}


def test_search_moves_the_sensitive_nodes_until_the_budget_holds():
    # (x + 1000) - 1000 in FP16 loses x's low bits (spacing 0.5 near 1000): the search must find
    # the nodes, and measure its way to the budget.
    model = ids_graph([helper.make_node("Mul", ["x", "scale"], ["s"], name="scale"),
                       helper.make_node("Add", ["s", "c"], ["a"], name="add"),
                       helper.make_node("Sub", ["a", "c"], ["last_hidden_state"], name="sub")],
                      {"scale": np.array(1e-3, np.float32), "c": np.array(1000.0, np.float32)})
    rng = np.random.default_rng(0)
    calib = token_set(rng.integers(1, 3000, (8, 16)), "calib")
    heldout = token_set(rng.integers(1, 3000, (8, 16)), "heldout")
    settings = PrecisionSettings(mode="auto", min_cosine=0.99999)
    converted, report = auto_precision(model, settings, calib, heldout, IDS, ["last_hidden_state"], 4, 3000,
                                       "sha", None)
    assert report.search["budget"]["met"], report.search["steps"]
    assert report.search["steps"][0]["ok"] is False  # all-FP16 start misses the budget
    rules = {p.name: p.rule for p in report.fp32_nodes}
    assert rules.get("add") == "sensitivity" and "scale" not in rules
    assert report.search["heldout_fidelity"]["cosine_min"] >= 0.99999


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tok = minilm().tokenizer
    loaded = LoadedModel(planted_hazard_bert(tok), tok, None, ["input_ids", "attention_mask", "token_type_ids"],
                         30522, "encoder", "planted hazard", "planted-hazard-v1")
    data = DataSettings(samples=32, calib_samples=32)
    heldout_texts = load_texts(data, skip=data.calib_samples)
    path, report = onnx_from_torch(loaded, ExportSettings(parity_atol=1e-3),
                                   tmp_path_factory.mktemp("planted") / "model.onnx", heldout_texts)
    calib = tokenized_set(load_texts(data, count=data.calib_samples), tok, 128, None)
    heldout = tokenized_set(heldout_texts, tok, 128, None)
    return onnx.load(path), report.outputs, calib, heldout, loaded


def test_planted_hazard_fp16_and_hybrid_fail_auto_holds(planted):
    fp32, outputs, calib, heldout, loaded = planted
    results = {}
    for mode in ("fp16", "hybrid"):
        variant, _ = convert_precision(fp32, PrecisionSettings(mode=mode))
        results[mode] = verify_variant(fp32, variant, outputs, heldout, 8, 30522)
        assert results[mode]["real"]["nonfinite_count"] > 0, mode
    # random ids hit the frequent tokens far less often: they underestimate the hazard
    assert results["fp16"]["random"]["nonfinite_count"] < results["fp16"]["real"]["nonfinite_count"] / 4

    variant, report = auto_precision(fp32, PrecisionSettings(mode="auto"), calib, heldout, loaded.input_names,
                                     outputs, 8, 30522, "planted", None)
    fid = verify_variant(fp32, variant, outputs, heldout, 8, 30522)
    assert fid["real"]["nonfinite_count"] == 0 and fid["random"]["nonfinite_count"] == 0
    assert fid["real"]["cosine_min"] >= 0.9998 and report.search["budget"]["met"]
    pinned = {p.name: p for p in report.fp32_nodes}
    ffn = "/model/encoder/layer.1/output/dense/MatMul"
    assert pinned[ffn].rule == "overflow" and "absmax 118" in pinned[ffn].detail
    assert report.matmul_fp16_fraction > 0.9
    hybrid_casts = convert_precision(fp32, PrecisionSettings(mode="hybrid"))[1].casts_inserted
    assert report.casts_inserted < hybrid_casts
    real, rand = report.search["activation_stats"]["real"], report.search["activation_stats"]["random"]
    assert real["largest"][0]["absmax"] > 65504
    assert rand["largest"][0]["percentile"] < real["largest"][0]["percentile"] / 100


def test_minilm_auto_needs_no_more_fp32_than_hybrid(tmp_path_factory):
    directory = minilm_dir(tmp_path_factory)
    fp32 = minilm_fp32_model(directory)
    tok = minilm().tokenizer
    data = DataSettings(samples=32, calib_samples=16)
    calib = tokenized_set(load_texts(data, count=16), tok, 128, None)
    heldout = tokenized_set(load_texts(data, skip=16), tok, 128, None)
    _, report = auto_precision(fp32, PrecisionSettings(mode="auto"), calib, heldout, minilm().input_names,
                               ["last_hidden_state", "pooler_output"], 8, 30522, "minilm", None)
    _, hybrid = minilm_variant(directory, "hybrid")
    assert report.search["budget"]["met"]
    assert report.nodes["fp32"] <= hybrid.nodes["fp32"] and report.casts_inserted <= hybrid.casts_inserted
    assert report.matmul_fp16_fraction >= 0.95
