"""compiler/stages/verify.py: the profile-max windows, read from the text after the calibration
samples, and refused before any stage's work when the text is too short for them."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest

from compiler.errors import DataError
from compiler.settings import BuildSettings, DataSettings, EngineSettings, ModelSettings, ProfileSettings
from compiler.stages.verify import profile_edge
from tests.models import minilm_tokenizer

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
