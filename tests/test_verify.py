"""compiler/verify.py: the faithful FP16 reference (fp16_emulation), compare() and verify_variant().

ONNX Runtime's CPU provider has no FP16 kernels for most ops: it computes them in FP32 and
drops the Cast pairs, so an FP16 overflow mid-graph never shows there. The emulation graph must
show it; the planted-overflow BERT checks that on real WikiText-2 text, and MiniLM checks the
published hybrid figure (cosine >= 0.9998, no NaN).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from calibration import load_texts, tokenized_set
from compiler.training.export import onnx_from_torch
from compiler.training.models import LoadedModel
from compiler.passes.precision import convert_precision
from compiler.settings import DataSettings, ExportSettings, PrecisionSettings
from compiler.eval.verify import REFERENCE_NAME, compare, fp16_emulation, has_fp16, session, verify_variant
from tests.models import (FP16_MAX, f32, layer0_residual, make_model, minilm, minilm_dir, minilm_export,
                          minilm_fp32_model, minilm_variant, ort_run, planted_overflow_bert, tensor_types)

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FIDELITY_KEYS = {"cosine_min", "cosine_mean", "max_abs_err", "nonfinite_count", "samples", "seconds"}


def fp16_chain(*steps: tuple[str, float]):
    """X (FP32) -> Cast FP16 -> op(FP16 constant) for each (op, value) -> Cast FP32 -> Y."""
    nodes, inits, cur = [helper.make_node("Cast", ["X"], ["x16"], to=FLOAT16)], {}, "x16"
    for k, (op, value) in enumerate(steps):
        inits[f"c{k}"] = np.array([value], np.float16)
        nodes.append(helper.make_node(op, [cur, f"c{k}"], [f"t{k}"]))
        cur = f"t{k}"
    nodes.append(helper.make_node("Cast", [cur], ["Y"], to=FLOAT))
    return make_model(nodes, [f32("X", [1])], [f32("Y", [1])], inits)


# --------------------------------------------------------------------------------------------
# fp16_emulation


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
    for optimize in (True, False):
        (direct,) = ort_run(model, feeds, optimize=optimize)
        if np.isfinite(direct[0]):
            # ORT computed both Muls in FP32 and never held 1e5 in FP16: the reason the
            # emulation exists (ORT 1.31 CPU gives ~100.04 here)
            assert direct[0] == pytest.approx(100.0, rel=1e-3)


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


def test_emulation_refuses_fp16_graph_inputs():
    model = make_model([helper.make_node("Identity", ["X"], ["Y"])],
                       [helper.make_tensor_value_info("X", FLOAT16, [1])],
                       [helper.make_tensor_value_info("Y", FLOAT16, [1])])
    with pytest.raises(ValueError, match="FP32 graph inputs"):
        fp16_emulation(model)


# --------------------------------------------------------------------------------------------
# compare()


def ids_model(log: bool = False, scale: float = 1.0):
    """input_ids (batch, sequence) int64 -> float [-> Log] [* scale] -> (batch, sequence, 1)."""
    nodes = [helper.make_node("Cast", ["input_ids"], ["f"], to=FLOAT)]
    cur = "f"
    if log:
        nodes.append(helper.make_node("Log", [cur], ["l"]))
        cur = "l"
    nodes += [helper.make_node("Mul", [cur, "scale"], ["s"]),
              helper.make_node("Unsqueeze", ["s", "axes"], ["Y"])]
    return make_model(nodes, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
                      [f32("Y", ["batch", "sequence", 1])],
                      {"scale": np.array(scale, np.float32), "axes": np.array([2], np.int64)})


IDS_BATCHES = [({"input_ids": np.array([[1, 2, 3], [2, 0, 0]], np.int64)}, np.array([3, 2])),
               ({"input_ids": np.array([[3, 1]], np.int64)}, np.array([2]))]


def test_compare_nonfinite_sample_gives_cosine_none_and_counts_values():
    reference, variant = session(ids_model(), False), session(ids_model(log=True), False)
    # log(0) = -inf at sample 1, position 1 (valid); its position 2 (id 0, -inf too) is padding
    result = compare(reference, variant, ["Y"], iter(IDS_BATCHES))
    assert result.nonfinite_count == 1
    assert result.cosine_min is None and result.cosine_mean is None and result.max_abs_err is None
    assert result.samples == 3
    assert set(result.to_dict()) == FIDELITY_KEYS


def test_compare_finite_variant():
    reference = session(ids_model(), False)
    same = compare(reference, session(ids_model(), False), ["Y"], iter(IDS_BATCHES))
    assert same.cosine_min == pytest.approx(1.0, abs=1e-12)
    assert same.cosine_mean == pytest.approx(1.0, abs=1e-12)
    assert (same.max_abs_err, same.nonfinite_count, same.samples) == (0.0, 0, 3)
    # 2x the reference: cosine is scale-free, the error is not (max |2y - y| = 3 at id 3)
    doubled = compare(reference, session(ids_model(scale=2.0), False), ["Y"], iter(IDS_BATCHES))
    assert doubled.cosine_min == pytest.approx(1.0, abs=1e-12)
    assert doubled.max_abs_err == 3.0 and doubled.nonfinite_count == 0


# --------------------------------------------------------------------------------------------
# verify_variant on real text


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return minilm().tokenizer


@pytest.fixture(scope="module")
def planted(tmp_path_factory, minilm_tokenizer):
    """The planted-overflow BERT, its FP32 export, its fp16 conversion and 16 real samples."""
    module = planted_overflow_bert()
    loaded = LoadedModel(module, minilm_tokenizer, None, ["input_ids", "attention_mask", "token_type_ids"],
                         30522, "encoder", "planted overflow (tests/models.py)",
                         key="tests.models.planted_overflow_bert-v1")
    texts = load_texts(DataSettings(samples=16))
    # The FP32 graph carries a ~7e4 activation: allow a little more than the default 1e-4
    # between PyTorch and ONNX Runtime after the LayerNorm divides it back down.
    path, report = onnx_from_torch(loaded, ExportSettings(parity_sequences=(8, 33), parity_atol=1e-3),
                                   tmp_path_factory.mktemp("planted") / "model.fp32.onnx", texts)
    fp32 = onnx.load(str(path))
    fp16, precision = convert_precision(fp32, PrecisionSettings(mode="fp16"))
    tokens = tokenized_set(texts, minilm_tokenizer, 64, cache_dir=None)
    return module, fp32, fp16, precision, report.outputs, tokens


def test_planted_fp16_overflow_shows_on_real_text(planted):
    module, fp32, fp16, precision, outputs, tokens = planted
    # no constant is out of FP16's range (only the attention mask's fill value, clamped): the
    # overflow is an activation's, mid-graph
    assert precision.fp32_nodes == []
    assert [(c.values_out_of_range, c.action) for c in precision.constants] == [(1, "clamped to +-32768")]
    # FP32: layer 0's residual stream really passes FP16's maximum, and the outputs stay finite
    reference = session(fp32, faithful_fp16=False)
    names = [i.name for i in reference.get_inputs()]
    residual_max = 0.0
    for feeds, lengths in tokens.batches(8, names):
        residual = layer0_residual(module, feeds)
        valid = np.concatenate([residual[i, :n] for i, n in enumerate(lengths)])
        residual_max = max(residual_max, float(np.abs(valid).max()))
        for out in reference.run(outputs, feeds):
            assert np.isfinite(out).all()
    assert residual_max > FP16_MAX
    # the faithful FP16 reference shows it on real text
    fidelity = verify_variant(fp32, fp16, outputs, tokens, batch_size=8, vocab_size=30522)
    assert fidelity["reference"] == REFERENCE_NAME
    real = fidelity["real"]
    assert set(real) == FIDELITY_KEYS and real["samples"] == 16
    assert real["nonfinite_count"] > 0
    assert real["cosine_min"] is None and real["max_abs_err"] is None


def test_minilm_hybrid_fidelity_on_real_text(tmp_path_factory, minilm_tokenizer):
    directory = minilm_dir(tmp_path_factory)
    outputs = minilm_export(directory)[1]
    hybrid, _ = minilm_variant(directory, "hybrid")
    tokens = tokenized_set(load_texts(DataSettings(samples=64)), minilm_tokenizer, 128, cache_dir=None)
    assert len(tokens) == 64 and max(len(x) for x in tokens.input_ids) == 128
    fidelity = verify_variant(minilm_fp32_model(directory), hybrid, outputs, tokens, batch_size=8,
                              vocab_size=minilm().vocab_size)
    assert fidelity["reference"] == REFERENCE_NAME
    for which in ("real", "random"):
        result = fidelity[which]
        assert set(result) == FIDELITY_KEYS, which
        assert result["samples"] == 64 and result["nonfinite_count"] == 0, which
        assert result["cosine_min"] >= 0.9998, which
        assert result["cosine_min"] <= result["cosine_mean"] <= 1.0 + 1e-12, which
        assert 0 < result["max_abs_err"] < 0.1, which  # it did compute in FP16


def test_minilm_fp32_variant_matches_itself(tmp_path_factory, minilm_tokenizer):
    directory = minilm_dir(tmp_path_factory)
    outputs = minilm_export(directory)[1]
    fp32_variant, report = minilm_variant(directory, "fp32")
    assert not has_fp16(fp32_variant) and report.fp32_nodes == []
    tokens = tokenized_set(load_texts(DataSettings(samples=16)), minilm_tokenizer, 128, cache_dir=None)
    fidelity = verify_variant(minilm_fp32_model(directory), fp32_variant, outputs, tokens, batch_size=8,
                              vocab_size=minilm().vocab_size)
    assert fidelity["reference"] == "onnxruntime CPU (FP32 graph)"
    for which in ("real", "random"):
        result = fidelity[which]
        assert set(result) == FIDELITY_KEYS, which
        assert result["cosine_min"] == pytest.approx(1.0, abs=1e-12), which
        assert result["cosine_mean"] == pytest.approx(1.0, abs=1e-12), which
        assert result["max_abs_err"] == 0.0 and result["nonfinite_count"] == 0, which
        assert result["samples"] == 16, which
