"""compiler/eval/verify.py: verify_variant on real text.

The planted-overflow BERT checks that an FP16 overflow mid-graph shows on real WikiText-2 text;
MiniLM checks the published hybrid figure (cosine >= 0.9998, no NaN).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from calibration import load_texts, tokenized_set
from compiler.eval.fp16_reference import REFERENCE_NAME, has_fp16, session
from compiler.eval.verify import verify_variant
from compiler.passes.precision import convert_precision
from compiler.settings import DataSettings, ExportSettings, PrecisionSettings
from compiler.training.export import onnx_from_torch
from compiler.training.models import LoadedModel
from tests.models import (FP16_MAX, layer0_residual, minilm, minilm_dir, minilm_export, minilm_fp32_model,
                          minilm_variant, planted_overflow_bert)

FIDELITY_KEYS = {"cosine_min", "cosine_mean", "max_abs_err", "nonfinite_count", "reference_nonfinite_count", "samples", "seconds", "reused", "outputs"}


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
    assert real["nonfinite_count"] > 0 and real["reference_nonfinite_count"] == 0
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
        # every output is measured; the headline figures are the first output's
        assert list(result["outputs"]) == outputs, which
        assert result["outputs"][outputs[0]]["cosine_min"] == result["cosine_min"], which
        assert sum(o["nonfinite_count"] for o in result["outputs"].values()) == result["nonfinite_count"], which


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
