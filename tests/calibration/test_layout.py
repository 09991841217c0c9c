"""calibration/layout.py: the text layout [calibration | held-out | training], never overlapping."""

from __future__ import annotations

import pytest

from calibration import default_text_path, load_texts
from calibration.layout import calibration_texts, heldout_texts, training_texts
from compiler.errors import DataError
from compiler.settings import DataSettings


def test_training_text_layout_separate_file_and_shortfall(tmp_path, caplog):
    data = DataSettings(samples=16, calib_samples=32, train_samples=64)
    assert calibration_texts(data) == load_texts(data, count=32)
    assert heldout_texts(data) == load_texts(data, count=16, skip=32)
    assert training_texts(data, 8) == load_texts(data, count=64, skip=48)  # [calibration | held-out | training]
    sst2 = default_text_path().parent.parent / "sst2" / "train.tsv"
    separate = DataSettings(train_samples=40, train_path=str(sst2), min_words=1)
    assert training_texts(separate, 8) == load_texts(DataSettings(path=str(sst2), min_words=1), count=40)
    # fewer lines than train_samples: all of them, with a warning; fewer than a batch: an error
    small = tmp_path / "small.txt"
    small.write_text("\n".join(f"line {i} has more than eight words in it" for i in range(10)))
    short = DataSettings(train_samples=100, train_path=str(small))
    with caplog.at_level("WARNING", logger="calibration"):
        assert len(training_texts(short, 8)) == 10
    assert "10 samples available" in caplog.text
    with pytest.raises(DataError, match="need 16"):
        training_texts(short, 16)


def test_mixed_training_texts_interleave_and_keep_held_out_lines_out():
    """Two texts share train_samples evenly and alternate; the verification text named as a
    training text is read after its calibration and held-out lines, never from its start."""
    wiki = default_text_path()
    sst2 = wiki.parent.parent / "sst2" / "train.tsv"
    data = DataSettings(samples=16, calib_samples=32, train_samples=41, train_path=(str(sst2), str(wiki)))
    mixed = training_texts(data, 8)
    own_sst2 = load_texts(DataSettings(path=str(sst2)), count=21)
    own_wiki = load_texts(DataSettings(), count=20, skip=48)  # after calibration and held-out lines
    assert len(mixed) == 41
    assert mixed[0::2] == own_sst2 and mixed[1::2] == own_wiki
    assert not set(mixed) & set(load_texts(DataSettings(), count=48))
    assert DataSettings(train_path="one.txt").train_path == ("one.txt",)
    with pytest.raises(ValueError, match="at least one sample per text"):
        DataSettings(train_samples=1, train_path=("a.txt", "b.txt"))


def test_vocabulary_texts_read_every_line_of_every_domain_text(tmp_path):
    from calibration.layout import vocabulary_texts
    from compiler.settings import VocabSettings

    a, b = tmp_path / "a.txt", tmp_path / "b.tsv"
    a.write_text("short line\nanother one\n\n")  # short lines count too; empty ones are no sample
    b.write_text("sentence\tlabel\ngood film .\t1\n")
    assert vocabulary_texts(VocabSettings(texts=(str(a), str(b))), DataSettings()) == \
        ["short line", "another one", "good film ."]
    with pytest.raises(DataError):
        vocabulary_texts(VocabSettings(texts=(str(tmp_path / "missing.txt"),)), DataSettings())


def test_recovery_data_is_the_mix_only_by_default_and_where_the_data_is(tmp_path, monkeypatch):
    """2:4 recovery trains on SST-2 train + WikiText-2 test (after its held-out lines) + WikiText-2
    valid when no text is given, the verification text is the default and all three exist;
    otherwise the data settings stay as they are (the QAT layout)."""
    import calibration.layout as layout
    from calibration.layout import RECOVERY_MIX, recovery_data

    root = tmp_path / "shared" / "data"
    monkeypatch.setattr(layout, "shared_data_path",
                        lambda rel: root / rel if (root / rel).exists() else None)
    default = DataSettings()
    assert recovery_data(default, 6144) is default  # no shared data: unchanged
    for rel in RECOVERY_MIX:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x\n")
    mixed = recovery_data(default, 6144)
    assert mixed.train_path == tuple(str(root / rel) for rel in RECOVERY_MIX) and mixed.train_samples == 6144
    assert (mixed.samples, mixed.calib_samples, mixed.path) == (default.samples, default.calib_samples, None)
    with pytest.raises(DataError, match="--recover-samples 1: .* mixes 3 files.*--recover-samples 3"):
        recovery_data(default, 1)  # was exit 3 (the settings' ValueError, raised inside the stage)
    given = DataSettings(train_path=("mine.txt",))
    assert recovery_data(given, 6144) is given  # a --train-text wins
    other = DataSettings(path="deploy.txt")
    assert recovery_data(other, 6144) is other  # another verification text: its own rest, as for QAT
    (root / RECOVERY_MIX[0]).unlink()
    assert recovery_data(default, 6144) is default  # one of the three missing: unchanged
