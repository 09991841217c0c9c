"""compiler/eval/task_accuracy.py: mean-pooled sentence embeddings of an ONNX graph, SST-2
loading and the linear probe.

A tiny random BERT (hidden 32, 2 layers, MiniLM's WordPiece) is exported once; its ONNX
embeddings must equal PyTorch's mean-pooled last_hidden_state of each text run alone,
whatever batch and padding the text lands in. The probe is checked on synthetic
embeddings (separable: accuracy 1.0; labels unrelated to the features: chance).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from compiler.errors import DataError, InvalidOnnxError
from compiler.training.models import LoadedModel
from compiler.eval.task_accuracy import (
    embedding_session,
    load_sst2,
    nonfinite_rows,
    probe_accuracy,
    sentence_embeddings,
    train_probe,
)
from tests.models import minilm

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
TEXTS = [  # deliberately not sorted by length
    "it 's a charming and often affecting journey .",
    "bleak",
    "the film is a triumph of style over substance , a long , loud and ultimately "
    "tiresome exercise in special effects that never once makes you care about anyone "
    "on screen .",
    "unflinchingly bleak and desperate",
    "a gorgeous , witty , seductive movie .",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(LoadedModel, FP32 ONNX path) of a tiny random BERT with MiniLM's tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from compiler.training.export import onnx_from_torch
    from compiler.settings import ExportSettings

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, vocab_size=30522,
                        max_position_embeddings=128)
    config._attn_implementation = "eager"
    loaded = LoadedModel(BertModel(config).eval(), minilm().tokenizer, None, NAMES,
                         30522, "encoder", "tiny random BERT (test_task_accuracy.py)",
                         key="tests.task_accuracy.tiny-v1")
    settings = ExportSettings(parity_batches=(2,), parity_sequences=(8,))
    dest = tmp_path_factory.mktemp("tiny") / "model.fp32.onnx"
    path, _ = onnx_from_torch(loaded, settings, dest, TEXTS)
    return loaded, path


def torch_embedding(loaded: LoadedModel, text: str) -> np.ndarray:
    """PyTorch's last_hidden_state of `text` alone (no padding), mean over tokens."""
    import torch

    enc = loaded.tokenizer([text], truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = loaded.module(**{n: enc[n] for n in NAMES}).last_hidden_state
    return hidden[0].mean(dim=0).numpy()


# --------------------------------------------------------------------------------------
# sentence_embeddings


def test_embeddings_match_pytorch_in_input_order(tiny):
    loaded, path = tiny
    got = sentence_embeddings(path, TEXTS, loaded.tokenizer, NAMES, batch_size=2)
    assert got.shape == (len(TEXTS), 32) and got.dtype == np.float32
    want = np.stack([torch_embedding(loaded, t) for t in TEXTS])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # distinct texts give distinct rows: a permutation would not pass the check above
    assert np.abs(got[0] - got[1]).max() > 1e-2


def test_embeddings_padding_invariant(tiny):
    loaded, path = tiny
    sess, faithful = embedding_session(path)
    assert not faithful
    tok = loaded.tokenizer
    alone = sentence_embeddings(sess, [TEXTS[1]], tok, NAMES)
    # the short text padded to the long one's ~40 tokens
    with_long = sentence_embeddings(sess, [TEXTS[1], TEXTS[2]], tok, NAMES)
    np.testing.assert_allclose(with_long[0], alone[0], atol=1e-4, rtol=0)
    one_batch = sentence_embeddings(sess, TEXTS, tok, NAMES, batch_size=len(TEXTS))
    per_text = sentence_embeddings(sess, TEXTS, tok, NAMES, batch_size=1)
    np.testing.assert_allclose(one_batch, per_text, atol=1e-4, rtol=0)


def test_fp16_graph_runs_on_faithful_reference(tiny):
    from compiler.passes.precision import convert_precision
    from compiler.settings import PrecisionSettings

    loaded, path = tiny
    tok = loaded.tokenizer
    fp32 = sentence_embeddings(path, TEXTS, tok, NAMES)
    mode = PrecisionSettings(mode="hybrid")
    hybrid, _ = convert_precision(onnx.load(str(path)), mode)
    _, faithful = embedding_session(hybrid)
    assert faithful
    got = sentence_embeddings(hybrid, TEXTS, tok, NAMES)
    assert got.dtype == np.float32 and nonfinite_rows(got) == 0
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(fp32, axis=1)
    assert ((got * fp32).sum(1) / norms).min() > 0.999
    assert np.abs(got - fp32).max() > 0  # really rounded to FP16 somewhere
    # ONNX Runtime's own handling of the FP16 graph: runs, close to FP32
    forced = sentence_embeddings(hybrid, TEXTS, tok, NAMES, faithful_fp16=False)
    assert np.abs(forced - fp32).max() < 0.05


def test_embeddings_errors(tiny, tmp_path):
    loaded, path = tiny
    tok = loaded.tokenizer
    assert sentence_embeddings(path, [], tok, NAMES).shape == (0, 0)
    with pytest.raises(DataError, match="pixel_values"):
        sentence_embeddings(path, TEXTS, tok, ["pixel_values"])
    with pytest.raises(ValueError, match="batch_size"):
        sentence_embeddings(path, TEXTS, tok, NAMES, batch_size=0)
    with pytest.raises(InvalidOnnxError):
        sentence_embeddings(tmp_path / "missing.onnx", TEXTS, tok, NAMES)


# --------------------------------------------------------------------------------------
# load_sst2


def test_load_sst2_both_splits():
    dev_texts, dev_labels = load_sst2("dev")
    assert len(dev_texts) == len(dev_labels) == 872
    assert dev_labels.dtype == np.int64 and set(dev_labels.tolist()) == {0, 1}
    assert int(dev_labels.sum()) == 444  # positives, as ../shared/data/README.md says
    assert dev_texts[0] == "it 's a charming and often affecting journey ."
    assert dev_labels[0] == 1
    train_texts, train_labels = load_sst2("train", count=300)
    assert len(train_texts) == 300 and set(train_labels.tolist()) == {0, 1}
    assert all(t and t == t.strip() for t in train_texts)


def test_load_sst2_errors(tmp_path):
    with pytest.raises(DataError, match="split"):
        load_sst2("test")
    with pytest.raises(DataError, match="no such SST-2 file"):
        load_sst2("dev", path=tmp_path)
    with pytest.raises(DataError, match="need 900"):
        load_sst2("dev", count=900)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngood \t1\nmeh \t2\n")
    assert load_sst2("dev", count=1, path=tmp_path)[0] == ["good"]
    with pytest.raises(DataError, match="label '2'"):
        load_sst2("dev", path=tmp_path / "dev.tsv")
    (tmp_path / "train.tsv").write_text("text\tlabel\ngood\t1\n")
    with pytest.raises(DataError, match="sentence"):
        load_sst2("train", path=tmp_path)


# --------------------------------------------------------------------------------------
# probe


def synthetic(n: int, seed: int,
              separation: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 16) float32 Gaussian embeddings; class 1 moved by `separation` on axis 3."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 16)) * 0.5
    x[:, 3] += separation * y
    return x.astype(np.float32), y.astype(np.int64)


def test_probe_separable_and_chance():
    pytest.importorskip("sklearn")
    x, y = synthetic(400, seed=0)
    x_dev, y_dev = synthetic(400, seed=1)
    probe = train_probe(x, y)
    assert probe_accuracy(probe, x_dev, y_dev) == 1.0
    assert probe_accuracy(probe, x, y) == 1.0
    shuffled = np.random.default_rng(2).permutation(y)  # unrelated to the features
    chance = probe_accuracy(train_probe(x, shuffled), x_dev, y_dev)
    assert 0.4 <= chance <= 0.6
    again = train_probe(x, y, seed=0)  # deterministic
    np.testing.assert_array_equal(again.predict(x_dev), probe.predict(x_dev))


def test_probe_ignores_near_constant_features():
    """A feature that barely varies in training (std 1e-9, like 3 dims of MiniLM's
    pooled output) must not turn a 1e-3 rounding change at scoring time into a flipped
    prediction."""
    pytest.importorskip("sklearn")
    x, y = synthetic(400, seed=4, separation=2.0)
    x_dev, y_dev = synthetic(400, seed=5, separation=2.0)
    rng = np.random.default_rng(6)
    x[:, 7] = 1e-9 * rng.normal(size=len(x))
    x_dev[:, 7] = 1e-3 * rng.choice([-1.0, 1.0], size=len(x_dev))  # FP16-sized noise
    clean = x_dev.copy()
    clean[:, 7] = 0.0
    probe = train_probe(x, y)
    assert int(probe[0].get_support().sum()) == 15  # the near-constant feature dropped
    assert probe_accuracy(probe, x_dev, y_dev) == probe_accuracy(probe, clean, y_dev)
    assert probe_accuracy(probe, clean, y_dev) > 0.9
    # standardizing that feature turns 1e-3 into ~1e6 standard deviations
    naive = train_probe(x, y, min_relative_std=0.0)
    noisy_acc = probe_accuracy(naive, x_dev, y_dev)
    assert noisy_acc < probe_accuracy(naive, clean, y_dev) - 0.1


def test_probe_nonfinite_rows_and_errors():
    pytest.importorskip("sklearn")
    x, y = synthetic(200, seed=3)
    probe = train_probe(x, y)
    bad = x.copy()
    bad[:50, 0] = np.nan
    bad[50:60, 1] = np.inf
    assert nonfinite_rows(bad) == 60
    # non-finite rows count as wrong
    assert probe_accuracy(probe, bad, y) == pytest.approx(140 / 200)
    with pytest.raises(ValueError, match="NaN/Inf"):
        train_probe(bad, y)
    with pytest.raises(ValueError, match="single class"):
        train_probe(x, np.zeros_like(y))
    with pytest.raises(ValueError, match="need"):
        probe_accuracy(probe, x, y[:-1])
    with pytest.raises(ValueError, match="constant"):
        train_probe(np.ones_like(x), y)


def test_sst2_reader_takes_cp1252_with_a_warning_and_refuses_binary(tmp_path, caplog):
    from compiler.errors import DataError
    from compiler.eval.task_accuracy import load_sst2

    latin = tmp_path / "dev.tsv"
    latin.write_bytes("sentence\tlabel\nun café très bon .\t1\nmauvais .\t0\n".encode("cp1252"))
    with caplog.at_level("WARNING"):
        texts, labels = load_sst2("dev", path=latin)
    assert texts == ["un café très bon .", "mauvais ."] and labels.tolist() == [1, 0]
    assert "not UTF-8" in caplog.text
    binary = tmp_path / "bin.tsv"
    binary.write_bytes(b"\x7fELF\x00\x00" * 50)
    with pytest.raises(DataError, match="not a text file"):
        load_sst2("dev", path=binary)
