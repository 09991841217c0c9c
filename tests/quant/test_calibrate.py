"""Calibration (`compiler.quant.calibrate`): windows of real text, ONNX Runtime's calibrators
against numpy on the same activations, channel maxima, and both caches (reuse proven by the
calibrator not running again)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from calibration import TokenizedSet, load_texts, tokenized_set
from compiler.errors import DataError
from compiler.quant import calibrate as C
from compiler.quant.calibrate import (WindowTooShort, cached_channel_absmax, calibrate, calibration_windows, channel_absmax,
                                      channel_absmax_in_graph, thresholds_from_channels, window_feeds, window_set)
from compiler.settings import DataSettings, ExportSettings, QuantSettings
from tests.models import f32, make_model, minilm

OPSET = 19
IDS = ["input_ids"]
rng = np.random.default_rng(1)

# --------------------------------------------------------------------------------------------
# Calibration on token ids: input_ids -> Gather(embeddings) -> MatMul -> MatMul


def ids_model(emb: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """input_ids -> Gather(E) = x -> MatMul(W1) = h -> MatMul(W2) = last_hidden_state."""
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["x"], name="embed", axis=0),
             helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "W2"], ["last_hidden_state"], name="mm2")]
    inp = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    return make_model(nodes, [inp], [f32("last_hidden_state", ["batch", "sequence", w2.shape[1]])],
                      {"E": emb, "W1": w1, "W2": w2}, opset=OPSET)


def token_set(rows, key):
    return TokenizedSet([np.asarray(r, np.int64) for r in rows], None, 0, key)


def ragged_ids(n, seed, vocab=64):
    """n samples of 6-19 random ids in [1, vocab), no shared first/last token."""
    r = np.random.default_rng(seed)
    return token_set([r.integers(1, vocab, r.integers(6, 20)) for _ in range(n)], f"ids-{seed}-{n}")


@pytest.fixture(scope="session")
def minilm19(tmp_path_factory):
    """MiniLM exported at opset 19 (Q/DQ with FP16 scales need it), 64 calibration / 32 held-out samples."""
    from compiler.training.export import onnx_from_torch

    loaded = minilm()
    data = DataSettings(samples=32, calib_samples=64)
    heldout_texts = load_texts(data, skip=data.calib_samples)
    directory = tmp_path_factory.getbasetemp() / "minilm-export-opset19"
    directory.mkdir(parents=True, exist_ok=True)
    path, report = onnx_from_torch(loaded, ExportSettings(opset=19, parity_sequences=(8, 33)),
                                   directory / "model.fp32.onnx", heldout_texts)
    calib = tokenized_set(load_texts(data, count=data.calib_samples), loaded.tokenizer, 128, None)
    heldout = tokenized_set(heldout_texts, loaded.tokenizer, 128, None)
    return Path(path), report.outputs, calib, heldout, loaded.input_names


# --------------------------------------------------------------------------------------------
# Windows


def test_calibration_windows_are_fixed_length_real_text():
    samples = [np.array([101, 5, 6, 7, 102]), np.array([101, 8, 9, 102]), np.array([101, 10, 11, 12, 13, 102])]
    tokens = token_set(samples, "k")
    w = calibration_windows(tokens, length=5)
    assert w.shape == (3, 5) and (w[:, 0] == 101).all() and (w[:, -1] == 102).all()
    stream = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert [list(r[1:-1]) for r in w] == [stream[0:3], stream[3:6], stream[6:9]]  # evenly spaced
    assert calibration_windows(tokens).shape == (3, 6)  # default: one per sample, longest length
    plain = calibration_windows(ragged_ids(4, 0), count=7, length=9)  # no shared first/last id
    assert plain.shape == (7, 9) and (plain > 0).all()
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(tokens, length=20)
    with pytest.raises(WindowTooShort, match="a window of 2 token.* holds no text .* 3 or more") as e:
        calibration_windows(tokens, length=2)  # [CLS] [SEP]: was "holds 9 tokens, fewer than one window of 2"
    assert e.value.needed == 3
    with pytest.raises(ValueError, match="no calibration samples"):
        calibration_windows(token_set([], "empty"))


def test_window_feeds_and_window_set():
    windows = np.arange(12, dtype=np.int64).reshape(3, 4)
    f = window_feeds(windows, ["token_type_ids", "input_ids", "attention_mask"])
    assert list(f) == ["token_type_ids", "input_ids", "attention_mask"]
    np.testing.assert_array_equal(f["input_ids"], windows)
    assert (f["attention_mask"] == 1).all() and not f["token_type_ids"].any() and f["attention_mask"].shape == (3, 4)
    with pytest.raises(DataError, match="position_ids"):
        window_feeds(windows, ["input_ids", "position_ids"])
    (feeds, lengths), = window_set(windows, "w").batches(8, ["input_ids", "attention_mask"])
    np.testing.assert_array_equal(feeds["input_ids"], windows)  # no padding: every window is full
    assert lengths.tolist() == [4, 4, 4] and (feeds["attention_mask"] == 1).all()


# --------------------------------------------------------------------------------------------
# Thresholds


def test_thresholds_match_numpy_on_the_same_windows(tmp_path):
    """max: max |x| of the activations; percentile: the p-th percentile of |x| to within one of
    the calibrator's histogram bins (one batch, so the histogram range is the data's own)."""
    emb = rng.standard_normal((64, 8)).astype(np.float32)
    w1 = rng.standard_normal((8, 8)).astype(np.float32)
    path = tmp_path / "m.onnx"
    onnx.save(ids_model(emb, w1, np.eye(8, dtype=np.float32)), path)
    tokens = ragged_ids(16, 3)
    x = emb[calibration_windows(tokens)]
    h = x @ w1
    got = calibrate(path, tokens, IDS, QuantSettings(), None)
    assert set(got) == {"x", "h"}  # every activation feeding a MatMul (calibration_tensors)
    assert got["x"] == pytest.approx(np.abs(x).max(), rel=1e-6) and got["h"] == pytest.approx(np.abs(h).max(), rel=1e-5)
    settings = QuantSettings(method="percentile", percentile=99.0, num_bins=512, calib_batch_size=16)
    pct = calibrate(path, tokens, IDS, settings, None, tensors=["h"])
    assert list(pct) == ["h"]
    bin_width = np.abs(h).max() / 512
    assert abs(pct["h"] - np.percentile(np.abs(h), 99.0)) <= bin_width + 1e-6
    assert pct["h"] < 0.9 * got["h"]


def test_calibration_cache_reuses_and_recalibrates(tmp_path, monkeypatch):
    emb = rng.standard_normal((64, 8)).astype(np.float32)
    path = tmp_path / "m.onnx"
    onnx.save(ids_model(emb, np.eye(8, dtype=np.float32), np.eye(8, dtype=np.float32)), path)
    calls = []
    real = C.run_calibrator
    monkeypatch.setattr(C, "run_calibrator", lambda *a: calls.append(a[3].shape) or real(*a))
    tokens, cache = ragged_ids(16, 1), tmp_path / "cache"
    windows = calibration_windows(tokens)
    first = calibrate(path, tokens, IDS, QuantSettings(), cache)
    assert set(first) == {"x", "h"} and first["x"] == pytest.approx(np.abs(emb[windows]).max(), rel=1e-6)
    (stored,) = cache.glob("int8-*.json")
    stamp = stored.stat().st_mtime_ns
    assert calibrate(path, tokens, IDS, QuantSettings(), cache) == first and len(calls) == 1  # reused
    assert stored.stat().st_mtime_ns == stamp and len(list(cache.glob("int8-*.json"))) == 1  # not rewritten
    calibrate(path, tokens, IDS, QuantSettings(method="percentile", num_bins=512), cache)  # method
    calibrate(path, ragged_ids(16, 2), IDS, QuantSettings(), cache)  # tokens
    assert len(calls) == 3 and len(list(cache.glob("int8-*.json"))) == 3
    onnx.save(ids_model(2 * emb, np.eye(8, dtype=np.float32), np.eye(8, dtype=np.float32)), path)
    doubled = calibrate(path, tokens, IDS, QuantSettings(), cache)  # graph
    assert doubled["x"] == pytest.approx(2 * first["x"]) and len(calls) == 4
    # placement/budget settings do not change thresholds: reused, the calibrator not run again
    assert calibrate(path, tokens, IDS, QuantSettings(quantize_attention_bmm=True, min_cosine=0.5), cache) == doubled
    assert len(calls) == 4
    assert calls[0] == windows.shape == (16, max(len(s) for s in tokens.input_ids))  # one per sample


# --------------------------------------------------------------------------------------------
# Channel maxima


def test_channel_absmax_matches_numpy_and_its_cache_reuses(tmp_path, monkeypatch):
    emb = rng.standard_normal((64, 8)).astype(np.float32)
    w1 = rng.standard_normal((8, 8)).astype(np.float32)
    model = ids_model(emb, w1, np.eye(8, dtype=np.float32))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    windows = calibration_windows(ragged_ids(12, 5), length=10)
    x = emb[windows]
    expect = {"x": np.abs(x).max(axis=(0, 1)), "h": np.abs(x @ w1).max(axis=(0, 1))}
    for source in (model, path):  # a ModelProto (outputs added and removed again) or a file
        got = channel_absmax(source, windows, IDS, ["x", "h"], batch_size=5)
        assert got["x"].dtype == np.float32 and got["x"].shape == (8,)
        np.testing.assert_allclose(got["x"], expect["x"], rtol=1e-6)
        np.testing.assert_allclose(got["h"], expect["h"], rtol=1e-5)
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]

    cache = tmp_path / "cache"
    first = cached_channel_absmax(path, "sha-1", windows, "tokens", IDS, ["x", "h"], cache)
    (stored,) = cache.glob("int8-channels-*.npz")
    stamp = stored.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("channel_absmax ran again")

    monkeypatch.setattr(C, "channel_absmax_in_graph", refuse)
    again = cached_channel_absmax(path, "sha-1", windows, "tokens", IDS, ["x", "h"], cache)
    assert list(again) == ["x", "h"] and stored.stat().st_mtime_ns == stamp
    for t in ("x", "h"):
        np.testing.assert_array_equal(again[t], first[t])
        np.testing.assert_allclose(again[t], expect[t], rtol=1e-5)
    with pytest.raises(AssertionError, match="ran again"):  # another graph hash: a new key
        cached_channel_absmax(path, "sha-2", windows, "tokens", IDS, ["x", "h"], cache)


def test_in_graph_channel_maxima_equal_numpys_and_give_the_max_thresholds(tmp_path):
    """The in-graph reduction returns exactly the NumPy path's channel maxima (both from ONNX
    Runtime's activations), and the `max` thresholds read from them equal ONNX Runtime's MinMax
    calibrator's exactly; after SmoothQuant, the thresholds of x / s agree with the calibrator run
    on the smoothed graph to float rounding."""
    from compiler.passes.smoothquant import smooth

    emb = rng.standard_normal((64, 8)).astype(np.float32)
    emb[:, 3] *= 40.0  # an outlier channel for SmoothQuant
    w1 = rng.standard_normal((8, 8)).astype(np.float32)
    model = ids_model(emb, w1, rng.standard_normal((8, 8)).astype(np.float32))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    tokens = ragged_ids(16, 6)
    windows = calibration_windows(tokens)
    for source in (model, path):
        got = channel_absmax_in_graph(source, windows, IDS, ["x", "h"], batch_size=3)
        ref = channel_absmax(source, windows, IDS, ["x", "h"], batch_size=3)
        for t in ("x", "h"):
            assert got[t].shape == (8,) and got[t].dtype == np.float32
            np.testing.assert_array_equal(got[t], ref[t])
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]  # the nodes were removed again

    amax = channel_absmax_in_graph(path, windows, IDS, ["x", "h"])
    assert thresholds_from_channels(model, ["x", "h"], amax) == calibrate(path, tokens, IDS, QuantSettings(), None)

    smoothed, info = smooth(model, {"x": amax["x"]}, 0.8)
    assert "x" in info
    spath = tmp_path / "smoothed.onnx"
    onnx.save(smoothed, spath)
    derived = thresholds_from_channels(smoothed, ["x_smoothed", "h", "nothing"], amax)
    assert set(derived) == {"x_smoothed", "h"}  # a tensor without maxima is left to the calibrator
    measured = calibrate(spath, tokens, IDS, QuantSettings(), None, tensors=["x_smoothed", "h"])
    assert derived == pytest.approx(measured, rel=1e-5)
    assert derived["x_smoothed"] < 0.5 * derived.get("x", amax["x"].max())  # the outlier was divided down


# --------------------------------------------------------------------------------------------
# MiniLM (real weights, WikiText-2)


def test_minilm_methods_give_different_thresholds(minilm19, tmp_path):
    """On real text the three ORT calibrators differ: histogram methods clip below the maximum."""
    path, _, calib, _, names = minilm19
    tensors = ["/model/encoder/layer.0/intermediate/intermediate_act_fn/Mul_1_output_0",
               "/model/encoder/layer.0/attention/output/LayerNorm/LayerNormalization_output_0"]
    got = {m: calibrate(path, calib, names, QuantSettings(method=m, calib_windows=16), tmp_path, tensors=tensors)
           for m in ("max", "entropy", "percentile")}
    for t in tensors:
        mx, ent, pct = got["max"][t], got["entropy"][t], got["percentile"][t]
        assert ent < 0.9 * mx and pct < 0.9 * mx and abs(ent - pct) > 0.01 * mx, (t, mx, ent, pct)
