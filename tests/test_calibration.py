"""calibration/: reading real text, tokenizing with a content-hash cache, batching."""

from __future__ import annotations

import numpy as np
import pytest

from calibration import default_text_path, load_texts, tokenized_set
from compiler.errors import DataError
from compiler.training.models import load_model
from compiler.settings import DataSettings, ModelSettings


@pytest.fixture(scope="module")
def tokenizer():
    return load_model(ModelSettings(name="minilm")).tokenizer


def test_wikitext_default_skips_short_lines():
    assert default_text_path() is not None
    texts = load_texts(DataSettings(samples=20))
    assert len(texts) == 20 and all(len(t.split()) >= 8 for t in texts)
    held_out = load_texts(DataSettings(samples=5), skip=20)
    assert not set(held_out) & set(texts)


def test_tsv_column(tmp_path):
    sst2 = default_text_path().parent.parent / "sst2" / "dev.tsv"
    texts = load_texts(DataSettings(path=str(sst2), samples=10, min_words=1))
    assert texts[0].startswith("it 's a charming and often affecting journey")
    with pytest.raises(DataError, match="--text-column"):
        load_texts(DataSettings(path=str(sst2), text_column="review", samples=10))


def test_missing_file_and_too_few_samples(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_texts(DataSettings(path=str(tmp_path / "nope.txt")))
    small = tmp_path / "small.txt"
    small.write_text("one two three four five six seven eight\nshort\n")
    with pytest.raises(DataError, match="found 1 samples"):
        load_texts(DataSettings(path=str(small), samples=2))


def test_tokenized_set_cache_and_batches(tmp_path, tokenizer):
    texts = load_texts(DataSettings(samples=10))
    first = tokenized_set(texts, tokenizer, 32, tmp_path)
    cached = list(tmp_path.glob("*.npz"))
    assert len(cached) == 1
    again = tokenized_set(texts, tokenizer, 32, tmp_path)
    assert again.key == first.key
    assert all(np.array_equal(a, b) for a, b in zip(first.input_ids, again.input_ids))
    other = tokenized_set(texts, tokenizer, 16, tmp_path)  # changed input -> new key
    assert other.key != first.key and len(list(tmp_path.glob("*.npz"))) == 2

    names = ["input_ids", "attention_mask", "token_type_ids"]
    (feeds, lengths), = list(first.batches(16, names))
    assert feeds["input_ids"].shape == (10, lengths.max()) and feeds["input_ids"].dtype == np.int64
    assert np.array_equal(feeds["attention_mask"].sum(1), lengths)
    rng = np.random.default_rng(0)
    (rand, rand_lengths), = list(first.batches(16, names, rng=rng, vocab_size=1000))
    assert np.array_equal(rand["attention_mask"], feeds["attention_mask"])
    valid = rand["input_ids"][rand["attention_mask"] == 1]
    assert valid.max() < 1000 and not np.array_equal(valid, feeds["input_ids"][feeds["attention_mask"] == 1])


def test_training_text_layout_separate_file_and_shortfall(tmp_path, caplog):
    from compiler.pipeline import training_texts
    from compiler.settings import BuildSettings, TrainSettings

    data = DataSettings(samples=16, calib_samples=32, train_samples=64)
    train = training_texts(BuildSettings(data=data))
    assert train == load_texts(data, count=64, skip=48)  # [calibration | held-out | training]
    sst2 = default_text_path().parent.parent / "sst2" / "train.tsv"
    separate = BuildSettings(data=DataSettings(train_samples=40, train_path=str(sst2), min_words=1))
    assert training_texts(separate) == load_texts(DataSettings(path=str(sst2), min_words=1), count=40)
    # fewer lines than train_samples: all of them, with a warning; fewer than a batch: an error
    small = tmp_path / "small.txt"
    small.write_text("\n".join(f"line {i} has more than eight words in it" for i in range(10)))
    short = BuildSettings(data=DataSettings(train_samples=100, train_path=str(small)), train=TrainSettings(batch_size=8))
    with caplog.at_level("WARNING", logger="compiler"):
        assert len(training_texts(short)) == 10
    assert "10 samples available" in caplog.text
    tiny = BuildSettings(data=DataSettings(train_samples=100, train_path=str(small)), train=TrainSettings(batch_size=16))
    with pytest.raises(DataError, match="need 16"):
        training_texts(tiny)


def test_mixed_training_texts_interleave_and_keep_held_out_lines_out():
    """Two texts share train_samples evenly and alternate; the verification text named as a
    training text is read after its calibration and held-out lines, never from its start."""
    from compiler.pipeline import training_texts
    from compiler.settings import BuildSettings

    wiki = default_text_path()
    sst2 = wiki.parent.parent / "sst2" / "train.tsv"
    data = DataSettings(samples=16, calib_samples=32, train_samples=41, train_path=(str(sst2), str(wiki)))
    mixed = training_texts(BuildSettings(data=data))
    own_sst2 = load_texts(DataSettings(path=str(sst2)), count=21)
    own_wiki = load_texts(DataSettings(), count=20, skip=48)  # after calibration and held-out lines
    assert len(mixed) == 41
    assert mixed[0::2] == own_sst2 and mixed[1::2] == own_wiki
    assert not set(mixed) & set(load_texts(DataSettings(), count=48))
    assert DataSettings(train_path="one.txt").train_path == ("one.txt",)
    with pytest.raises(ValueError, match="at least one sample per text"):
        DataSettings(train_samples=1, train_path=("a.txt", "b.txt"))
