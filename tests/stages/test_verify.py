"""compiler/stages/verify.py: the profile-max windows, read from the text after the calibration
samples, and refused before any stage's work when the text is too short for them; a variant
that gives NaN/Inf on real text where the FP32 graph does not is refused after the report."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest

from compiler.errors import EXIT_BAD_INPUT, DataError, VerificationError
from compiler.settings import (BuildSettings, DataSettings, EngineSettings, ExportSettings, ModelSettings,
                               PrecisionSettings, ProfileSettings)
from compiler.stages.verify import nonfinite_verdict, profile_edge, refuse_nonfinite
from tests.models import minilm_tokenizer, planted_hazard_bert

WORDS = "one two three four five six seven eight nine ten".split()  # one WordPiece token each


def _settings(tmp_path, lines: int, words: int, max_shape=(4, 128)) -> BuildSettings:
    text = tmp_path / "text.txt"
    text.write_text("".join(" ".join(WORDS[i % 10] for i in range(words)) + "\n" for _ in range(lines)))
    return BuildSettings(data=DataSettings(path=str(text), samples=4, calib_samples=4, max_length=128),
                         engine=EngineSettings(profiles=(ProfileSettings(max_shape=max_shape),)),
                         output_dir=str(tmp_path))


def _export() -> SimpleNamespace:
    return SimpleNamespace(loaded=SimpleNamespace(tokenizer=minilm_tokenizer(),
                                                  input_names=["input_ids", "attention_mask", "token_type_ids"]))


def test_windows_count_the_text_without_each_lines_special_tokens(tmp_path):
    # 16 lines of 30 words: 16 x 32 = 512 tokens with [CLS] and [SEP], but a stream of 480,
    # short of one 512-token window; the text holds more lines, so they are read
    settings = _settings(tmp_path, lines=64, words=30, max_shape=(2, 512))
    batches = profile_edge(settings, _export())
    ids = batches[0][0]["input_ids"]
    assert ids.shape == (2, 512) and list(batches[0][1]) == [512, 512]
    assert (ids[:, 0] == 101).all() and (ids[:, -1] == 102).all()  # each window reads as one sample


def test_a_text_too_short_for_one_window_is_a_data_error_naming_the_fix(tmp_path):
    settings = _settings(tmp_path, lines=12, words=10, max_shape=(2, 512))
    with pytest.raises(DataError, match=r"profile's max shape 2x512.*--max-shape"):
        profile_edge(settings, _export())


def test_the_pipeline_refuses_a_short_text_before_the_precision_stage(tmp_path, caplog):
    from compiler.pipeline import run_pipeline

    settings = replace(_settings(tmp_path, lines=12, words=10, max_shape=(2, 512)),
                       model=ModelSettings(name="minilm"))
    with caplog.at_level(logging.INFO), pytest.raises(DataError, match="max shape"):
        run_pipeline(settings, until="verify")
    assert "stage precision" not in caplog.text


def _sets(**counts):
    """A fidelity section: {set: (variant's NaN/Inf values, the FP32 graph's)}."""
    return {k: {"nonfinite_count": v, "reference_nonfinite_count": r} for k, (v, r) in counts.items()}


def test_nonfinite_on_real_text_is_refused_with_the_modes_fix(tmp_path):
    verdict = nonfinite_verdict(_sets(real=(3, 0), profile_max=(0, 0), random=(5, 0)), "hybrid", allow=False)
    assert verdict["status"] == "refused" and verdict["sets"] == ["real"] and verdict["nonfinite"]["random"] == 5
    with pytest.raises(VerificationError) as e:
        refuse_nonfinite(verdict, "hybrid", tmp_path / "report.json")
    message = str(e.value)
    assert e.value.exit_code == EXIT_BAD_INPUT
    assert "3 on real" in message and "PRECISION=auto" in message and "--allow-nonfinite" in message
    assert str(tmp_path / "report.json") in message
    # the profile's max shape is real text too; an INT8 variant is told about its float part
    verdict = nonfinite_verdict(_sets(real=(0, 0), profile_max=(7, 0)), "int8", allow=False)
    assert verdict["sets"] == ["profile_max"] and "--float-mode fp32" in verdict["fix"]


def test_random_ids_alone_or_the_fp32_graphs_own_nonfinite_values_only_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="compiler.stages.verify"):
        assert nonfinite_verdict(_sets(real=(0, 0), random=(4, 0)), "fp16", allow=False)["status"] == "ok"
        assert "random ids" in caplog.text
        caplog.clear()
        ok = nonfinite_verdict(_sets(real=(6, 6), profile_max=(0, 0)), "fp32", allow=False)
        assert ok["status"] == "ok" and "the FP32 graph itself gives 6" in caplog.text
    refuse_nonfinite(ok, "fp32", "report.json")  # nothing raised


def test_allow_nonfinite_keeps_the_variant_with_a_warning(caplog):
    verdict = nonfinite_verdict(_sets(real=(2, 0)), "fp16", allow=True)
    assert verdict["status"] == "allowed"
    with caplog.at_level(logging.WARNING, logger="compiler.stages.verify"):
        refuse_nonfinite(verdict, "fp16", "report.json")
    assert "kept (--allow-nonfinite)" in caplog.text


@pytest.fixture(scope="module")
def planted_checkpoint(tmp_path_factory):
    """The planted FP16 hazard (`tests.models.planted_hazard_bert`: layer 1 passes 65504 on
    frequent tokens, FP32 stays finite) saved as a local checkpoint with MiniLM's tokenizer."""
    path = tmp_path_factory.mktemp("planted-ckpt")
    tok = minilm_tokenizer()
    planted_hazard_bert(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_the_pipeline_writes_the_report_then_refuses_an_overflowing_fp16_variant(planted_checkpoint, tmp_path):
    from compiler.pipeline import run_pipeline

    settings = BuildSettings(model=ModelSettings(name=str(planted_checkpoint), task="feature-extraction"),
                             export=ExportSettings(parity_atol=1e-2),  # ~1.2e5 activations: FP32 rounding moves ~1e-3
                             precision=PrecisionSettings(mode="fp16"),
                             data=DataSettings(samples=8, calib_samples=16, profile_max_rows=2),
                             engine=EngineSettings(profiles=(ProfileSettings(max_shape=(4, 128)),)),
                             output_dir=str(tmp_path))
    with pytest.raises(VerificationError, match="PRECISION=auto"):
        run_pipeline(settings, until="build")
    report = json.loads((settings.variant_dir() / "report.json").read_text())
    check = report["fidelity"]["nonfinite_check"]
    assert check["status"] == "refused" and check["nonfinite"]["real"] > 0
    assert check["reference_nonfinite"]["real"] == 0 and "build" not in report
    # kept on request: the same artifacts (the flag is not in any cache key), then the build stage
    allowed = replace(settings, precision=replace(settings.precision, allow_nonfinite=True))
    run = run_pipeline(allowed, until="verify")
    assert run.verify.fidelity["nonfinite_check"]["status"] == "allowed"
    assert run.report["export"]["reused"]
    # auto keeps the overflowing feed-forward output in FP32: it ships
    auto = replace(settings, precision=PrecisionSettings(mode="auto"))
    assert run_pipeline(auto, until="verify").verify.fidelity["nonfinite_check"]["status"] == "ok"



def _cosines(real, profile_max, random=0.5):
    return {"real": {"cosine_mean": real, "cosine_min": -1.0}, "profile_max": {"cosine_mean": profile_max},
            "random": {"cosine_mean": random}}  # the minimum decides nothing: one sample's scalar may flip


def test_an_fp16_or_hybrid_variant_below_the_cosine_budget_is_refused_without_a_nan(tmp_path):
    """A variant that loses the output without a NaN (a Llama's RMS norm squares past 65504 in
    FP16: the norm is 0) shipped with exit 0; checked where the figures are the precision's alone."""
    from compiler.settings import SparsitySettings, VocabSettings
    from compiler.stages.verify import cosine_verdict, refuse_low_cosine

    hybrid = BuildSettings(precision=PrecisionSettings(mode="hybrid"))
    verdict = cosine_verdict(_cosines(0.0, 0.99999), hybrid)
    assert verdict["status"] == "refused" and verdict["sets"] == ["real"]  # random ids decide nothing
    with pytest.raises(VerificationError, match=r"hybrid variant's mean cosine similarity .* is 0 on held-out text, "
                                                r"below 0.99, .*--precision auto.*lower --min-cosine") as e:
        refuse_low_cosine(verdict, "hybrid", tmp_path / "report.json")
    assert e.value.exit_code == EXIT_BAD_INPUT
    assert cosine_verdict(_cosines(0.99999, None), hybrid)["status"] == "ok"  # None: the NaN check's
    assert cosine_verdict(_cosines(0.995, 0.995), hybrid)["status"] == "ok"  # rounding, not a lost output
    lower = replace(hybrid, precision=PrecisionSettings(mode="fp16", min_cosine=-1.0))
    assert cosine_verdict(_cosines(0.0, 0.0), lower)["status"] == "ok"
    refuse_low_cosine(cosine_verdict(_cosines(0.0, 0.0), lower), "fp16", "r")
    # losses that are not the precision's: 2:4 and vocabulary pruning are measured against the dense graph
    for other in (replace(hybrid, sparsity=SparsitySettings(pattern="2:4")),
                  replace(hybrid, vocab=VocabSettings(texts=("t.txt",))),
                  replace(hybrid, precision=PrecisionSettings(mode="auto"))):
        assert cosine_verdict(_cosines(0.5, 0.5), other) == {"status": "not checked"}
