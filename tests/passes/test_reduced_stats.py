"""compiler/passes/reduced_stats.py: the in-graph statistics agree with the NumPy path of
calibration/stats.py (absmax exactly, the percentile exactly when the subsample holds every
element), on a tiny BERT over real text and on a graph with NaN, inf and empty tensors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from calibration import TokenizedSet, load_texts, tokenized_set
from calibration.stats import collect_activation_stats
from compiler.graph.onnx_io import save_onnx
from compiler.passes.reduced_stats import (cached_reduced_stats, equal_length_batches, histogram_percentile,
                                           reduced_activation_stats, scaled_values)
from compiler.settings import DataSettings
from tests.models import f32, make_model, minilm

INPUTS = ["input_ids"]


def tiny_encoder(vocab: int = 30522, hidden: int = 32, seed: int = 0):
    """One attention + FFN block over embeddings (opset 17), a hot FFN channel past 65504:
    (batch, sequence, hidden) and (batch, sequence, sequence) activations, input_ids only."""
    rng = np.random.default_rng(seed)
    w = {"emb": rng.normal(0, 1, (vocab, hidden)), "wq": rng.normal(0, 0.2, (hidden, hidden)),
         "w1": rng.normal(0, 0.2, (hidden, 4 * hidden)), "w2": rng.normal(0, 0.2, (4 * hidden, hidden)),
         "g": np.ones(hidden), "b": np.zeros(hidden), "half": np.array(0.5), "one": np.array(1.0),
         "rs2": np.array(2 ** -0.5)}
    w["w2"][:, 3] *= 2e4  # the hot channel
    mk = helper.make_node
    nodes = [mk("Gather", ["emb", "input_ids"], ["e"]),
             mk("LayerNormalization", ["e", "g", "b"], ["h"], axis=-1),
             mk("MatMul", ["h", "wq"], ["q"]), mk("Transpose", ["h"], ["kt"], perm=[0, 2, 1]),
             mk("MatMul", ["q", "kt"], ["scores"]), mk("Softmax", ["scores"], ["p"], axis=-1),
             mk("MatMul", ["p", "h"], ["ctx"]), mk("Add", ["ctx", "h"], ["r1"]),
             mk("MatMul", ["r1", "w1"], ["f1"]), mk("Mul", ["f1", "rs2"], ["f2"]), mk("Erf", ["f2"], ["f3"]),
             mk("Add", ["f3", "one"], ["f4"]), mk("Mul", ["f1", "f4"], ["f5"]), mk("Mul", ["f5", "half"], ["gelu"]),
             mk("MatMul", ["gelu", "w2"], ["f6"]), mk("Add", ["f6", "r1"], ["r2"]),
             mk("LayerNormalization", ["r2", "g", "b"], ["last_hidden_state"], axis=-1)]
    inp = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    return make_model(nodes, [inp], [f32("last_hidden_state", ["batch", "sequence", hidden])],
                      {k: np.asarray(v, np.float32) for k, v in w.items()})


def save_external(model, path) -> None:
    """A copy of `model` saved as the pipeline saves its FP32 graph: weights in external data."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    save_onnx(copy, path, external=True)


@pytest.fixture(scope="module")
def tiny_bert():
    """The tiny encoder and 12 real-text samples (MiniLM's WordPiece ids, at most 48 tokens)."""
    data = DataSettings(samples=8, calib_samples=12)
    return tiny_encoder(), tokenized_set(load_texts(data, count=12), minilm().tokenizer, 48, None)


def test_in_graph_statistics_agree_with_the_numpy_path(tiny_bert, tmp_path):
    model, tokens = tiny_bert
    path = tmp_path / "model.onnx"  # the pipeline's form: a file with external data, weights read by ORT
    save_external(model, path)
    assert len({len(x) for x in tokens.input_ids}) < len(tokens)  # some lengths repeat: real batches
    old = collect_activation_stats(path, tokens.batches(1, INPUTS), "real")
    batches = list(equal_length_batches(tokens, 4, INPUTS))
    assert all((n == f["input_ids"].shape[1]).all() for f, n in batches)  # never padded
    new = reduced_activation_stats(path, batches, "real", subsample=1 << 20)  # every element
    assert new.samples == old.samples == len(tokens) and set(new.tensors) == set(old.tensors)
    scaled = scaled_values(model, list(old.tensors))
    assert set(scaled) == {"f2", "gelu"}  # x * 2**-0.5 and x * 0.5: not reduced, derived
    for t, o in old.tensors.items():
        n = new.tensors[t]
        assert n.absmax == o.absmax, t  # exactly, derived ones too
        assert n.elements == o.elements, t
        if t in scaled:  # the histogram shifted by log2 |c|: within one bin
            assert 2 ** (-1 / 16) <= n.percentile / o.percentile <= 2 ** (1 / 16), t
        else:
            assert n.percentile == pytest.approx(o.percentile, rel=1e-12), t  # the same histogram
    hot = max(old.tensors, key=lambda t: old.tensors[t].absmax)
    assert old.tensors[hot].absmax > 65504  # the planted overflow is seen by both

    before = model.SerializeToString()
    sampled = reduced_activation_stats(model, batches, "real")  # default subsample: absmax still exact
    assert model.SerializeToString() == before  # the ModelProto is restored
    assert all(sampled.tensors[t].absmax == o.absmax for t, o in old.tensors.items())
    # the sampled percentile of the hot tensor stays within a factor 2 of the full one
    assert 0.5 <= sampled.tensors[hot].percentile / old.tensors[hot].percentile <= 2.0


def test_nan_inf_and_zeros_read_as_in_the_numpy_path():
    # x = float(ids) - 2: log(x) is NaN below 2, -inf at 2; 1 / (x * 0) is inf; x * 0 is all zero
    nodes = [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["f", "two"], ["x"]),
             helper.make_node("Log", ["x"], ["log"]),
             helper.make_node("Mul", ["x", "zero"], ["z"]),
             helper.make_node("Div", ["one", "z"], ["inv"]),
             helper.make_node("Add", ["x", "z"], ["last_hidden_state"])]
    inp = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    model = make_model(nodes, [inp], [f32("last_hidden_state", ["batch", "sequence"])],
                       {"two": np.array(2.0, np.float32), "zero": np.array(0.0, np.float32),
                        "one": np.array(1.0, np.float32)})
    tokens = TokenizedSet([np.array([1, 5, 9]), np.array([7, 3, 2]), np.array([4, 8])], None, 0, "t")
    old = collect_activation_stats(model, tokens.batches(1, ["input_ids"]), "real")
    new = reduced_activation_stats(model, equal_length_batches(tokens, 8, ["input_ids"]), "real")
    assert new.tensors["log"].absmax == old.tensors["log"].absmax == np.inf  # a NaN and a -inf
    assert new.tensors["inv"].absmax == np.inf and new.tensors["z"].absmax == 0.0
    assert new.tensors["x"].absmax == old.tensors["x"].absmax == 7.0
    for t, o in old.tensors.items():
        assert (new.tensors[t].percentile, new.tensors[t].elements) == (o.percentile, o.elements), t


def test_scaled_tensors_keep_absmax_bit_for_bit_through_negative_constants_divisions_and_chains():
    """Mul by a negative constant, Div, a chain of both, a Constant node, an overflow to inf in
    the scaling itself: the derived absmax equals the measured one exactly; c / x, x * 0 and
    x * y are reduced as before."""
    nodes = [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f", "third"], ["x"]),  # a non-scaled start: x = ids * (1/3) is scaled too
             helper.make_node("Sin", ["x"], ["s"]),
             helper.make_node("Mul", ["s", "neg"], ["a"]),
             helper.make_node("Div", ["a", "seven"], ["b"]),
             helper.make_node("Constant", [], ["k"], value=helper.make_tensor("k", TensorProto.FLOAT, [1], [1e-3])),
             helper.make_node("Mul", ["k", "b"], ["c"]),
             helper.make_node("Mul", ["x", "huge"], ["big"]),  # overflows float32 to inf
             helper.make_node("Div", ["seven", "s"], ["inv"]),  # c / x: not a scaling
             helper.make_node("Mul", ["s", "zero"], ["z"]),
             helper.make_node("Mul", ["s", "x"], ["last_hidden_state"])]
    inp = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    model = make_model(nodes, [inp], [f32("last_hidden_state", ["batch", "sequence"])],
                       {"third": np.array(1 / 3, np.float32), "neg": np.array(-2.7, np.float32),
                        "seven": np.array(7.3, np.float32), "huge": np.array(3e38, np.float32),
                        "zero": np.array(0.0, np.float32)})
    names = ["f", "x", "s", "a", "b", "c", "big", "inv", "z", "last_hidden_state"]
    scaled = scaled_values(model, names)
    assert scaled == {"x": ("f", [("Mul", pytest.approx(1 / 3))]), "a": ("s", [("Mul", pytest.approx(2.7))]),
                      "b": ("s", [("Mul", pytest.approx(2.7)), ("Div", pytest.approx(7.3))]),
                      "c": ("s", [("Mul", pytest.approx(2.7)), ("Div", pytest.approx(7.3)), ("Mul", pytest.approx(1e-3))]),
                      "big": ("f", [("Mul", pytest.approx(1 / 3)), ("Mul", pytest.approx(3e38))])}
    tokens = TokenizedSet([np.array([1, 5, 9, 11]), np.array([7, 3, 2, 30]), np.array([4, 8])], None, 0, "t")
    old = collect_activation_stats(model, tokens.batches(1, ["input_ids"]), "real")
    new = reduced_activation_stats(model, equal_length_batches(tokens, 8, ["input_ids"]), "real", tensors=names)
    for t in names:
        assert new.tensors[t].absmax == old.tensors[t].absmax, t
        assert new.tensors[t].elements == old.tensors[t].elements, t
    assert new.tensors["big"].absmax == np.inf


def test_equal_length_batches_draw_the_random_ids_of_the_one_sample_path():
    tokens = TokenizedSet([np.arange(1, n + 1) for n in (5, 3, 5, 4, 5)], None, 0, "t")
    batches = list(equal_length_batches(tokens, 2, ["input_ids"]))
    assert [f["input_ids"].shape for f, _ in batches] == [(2, 5), (1, 5), (1, 4), (1, 3)]
    assert sum(len(n) for _, n in batches) == 5
    assert len(list(equal_length_batches(tokens, 2, ["input_ids"], limit=2))) == 2  # samples 0 and 1 only

    drawn = list(equal_length_batches(tokens, 8, ["input_ids"], rng=np.random.default_rng(3), vocab_size=50))
    one = [f["input_ids"][0] for f, _ in tokens.batches(1, ["input_ids"], rng=np.random.default_rng(3),
                                                       vocab_size=50)]
    rows = {tuple(r) for f, _ in drawn for r in f["input_ids"]}
    assert rows == {tuple(r) for r in one}  # the same ids, grouped by length


def test_padded_batches_are_refused_and_results_are_cached(tmp_path):
    nodes = [helper.make_node("Cast", ["input_ids"], ["last_hidden_state"], to=TensorProto.FLOAT)]
    inp = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    model = make_model(nodes, [inp], [f32("last_hidden_state", ["batch", "sequence"])])
    tokens = TokenizedSet([np.array([1, 5, 9]), np.array([7, 3])], None, 0, "t")
    with pytest.raises(ValueError, match="unpadded"):
        reduced_activation_stats(model, tokens.batches(2, ["input_ids"]), "real")
    first = cached_reduced_stats(model, "sha", tokens, ["input_ids"], tmp_path, "real")
    assert len(list(tmp_path.glob("stats-*.json"))) == 1
    again = cached_reduced_stats(model, "sha", tokens, ["input_ids"], tmp_path, "real")
    assert again == first and first.tensors["last_hidden_state"].absmax == 9.0
    rand = cached_reduced_stats(model, "sha", tokens, ["input_ids"], tmp_path, "random", limit=1, vocab_size=4)
    assert rand.samples == 1 and rand.tensors["last_hidden_state"].absmax < 4


def test_the_random_pass_leaves_the_fp32_outputs_verify_reads_back(tiny_bert, tmp_path):
    """The random-id statistics run is verify's random-id set: its FP32 outputs land in the
    reference cache under the key a FidelityProbe of that set computes, and they are the FP32
    graph's outputs (the statistics graph runs without the fusions its reductions block)."""
    import onnxruntime as ort

    from calibration.text import random_id_batches
    from compiler.eval.fidelity import FidelityProbe
    from compiler.eval.reference_outputs import reference_cached
    from compiler.graph.onnx_io import onnx_sha256

    model, tokens = tiny_bert
    path = tmp_path / "model.onnx"
    save_external(model, path)
    cache = tmp_path / "cache"
    cached_reduced_stats(path, onnx_sha256(path), tokens, INPUTS, cache, "random", batch_size=4,
                         limit=len(tokens), vocab_size=30522, seed=7)
    batches = list(random_id_batches(tokens, 4, INPUTS, 30522, 7))
    probe = FidelityProbe(path, ["last_hidden_state"], {"random": batches}, str(cache))
    assert probe.reused == ["random"]  # not run again
    assert reference_cached(path, batches, ["last_hidden_state"], str(cache))
    padded = list(tokens.batches(4, INPUTS, np.random.default_rng(7), 30522, by_length=True))  # same ids, padded
    assert not reference_cached(path, padded, ["last_hidden_state"], str(cache))
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for (feeds, _), (got,) in zip(batches, probe.reference["random"]):
        np.testing.assert_allclose(got, plain.run(["last_hidden_state"], feeds)[0], rtol=1e-5, atol=1e-5)
    # a set of other samples (fewer of them, another seed) does not find them
    fewer = FidelityProbe(path, ["last_hidden_state"], {"random": random_id_batches(tokens, 4, INPUTS, 30522, 7,
                                                                                   limit=3)}, str(cache))
    other = FidelityProbe(path, ["last_hidden_state"], {"random": random_id_batches(tokens, 4, INPUTS, 30522, 8)},
                          str(cache))
    assert fewer.reused == [] and other.reused == []


def test_outputs_past_the_limit_are_not_kept(tiny_bert, monkeypatch):
    from compiler.passes import reduced_stats

    model, tokens = tiny_bert
    kept: list = []
    reduced_activation_stats(model, equal_length_batches(tokens, 4, INPUTS), "real", outputs=kept)
    assert len(kept) == len(list(equal_length_batches(tokens, 4, INPUTS))) and kept[0][0].dtype == np.float32
    monkeypatch.setattr(reduced_stats, "OUTPUTS_MAX_MIB", 0)
    dropped: list = []
    reduced_activation_stats(model, equal_length_batches(tokens, 4, INPUTS), "real", outputs=dropped)
    assert dropped == []


def test_the_accumulator_bins_as_calibration_stats_does():
    """One bincount over (tensor, bin), zeros and NaN apart: the bins of the per-tensor formula."""
    from compiler.passes.reduced_stats import BINS_PER_OCTAVE, LOG2_MAX, LOG2_MIN, NBINS, _Accumulator

    rng = np.random.default_rng(1)
    count = np.array([5, 0, 300, 41])
    sub = (rng.normal(0, 1, count.sum()) * np.exp(rng.normal(0, 12, count.sum()))).astype(np.float32)
    sub[[0, 7, 9, 11, 12]] = [0.0, np.nan, np.inf, 1e-38, -3e38]
    acc = _Accumulator(len(count))
    ones = np.ones(len(count), np.float32)
    acc.add(ones, -ones, ones, count, sub, count)
    start = 0
    for i, k in enumerate(count):  # calibration.stats' formula, tensor by tensor
        a = np.abs(sub[start:start + k])
        start += k
        nz = a[a > 0]
        with np.errstate(divide="ignore"):
            bins = np.floor((np.log2(np.minimum(nz, 2.0 ** LOG2_MAX)) - LOG2_MIN) * BINS_PER_OCTAVE)
        expected = np.bincount(np.clip(bins, 0, NBINS - 1).astype(np.int64), minlength=NBINS)
        np.testing.assert_array_equal(acc.hist[i], expected)
        assert acc.zeros[i] == k - nz.size  # zeros and NaN


def test_histogram_percentile_reads_ranks_over_zeros_and_bins():
    hist = np.zeros(768, np.int64)
    hist[24 * 16] = 10  # ten values in [1, 2**(1/16))
    assert histogram_percentile(hist, 90, 1.01, 50.0) == 0.0  # the median is a zero
    assert histogram_percentile(hist, 90, 1.01, 99.0) == pytest.approx(1.01)  # capped at absmax
    assert histogram_percentile(hist, 0, 9.0, 99.0) == pytest.approx(2 ** (1 / 16))


def test_one_session_serves_the_real_and_the_random_set(tiny_bert, tmp_path, monkeypatch):
    """`StatsSessions` builds the statistics session once for both sets (the `auto` child), and
    the figures and the random set's stored FP32 outputs are those of a session per set."""
    from calibration.text import random_id_batches
    from compiler.eval.reference_outputs import reference_cached
    from compiler.graph.onnx_io import onnx_sha256
    from compiler.passes import reduced_stats
    from compiler.passes.reduced_stats import StatsSessions

    model, tokens = tiny_bert
    path = tmp_path / "model.onnx"
    save_external(model, path)
    sha, kw = onnx_sha256(path), {"batch_size": 4, "vocab_size": 30522, "seed": 3}
    alone = {src: cached_reduced_stats(path, sha, tokens, INPUTS, tmp_path / "a", src, **kw) for src in ("real", "random")}
    built = []
    real_session = reduced_stats.reduction_session

    def counting(*args, **kwargs):
        built.append(args[0])
        return real_session(*args, **kwargs)

    monkeypatch.setattr(reduced_stats, "reduction_session", counting)
    with StatsSessions() as sessions:
        shared = {src: cached_reduced_stats(path, sha, tokens, INPUTS, tmp_path / "b", src, **kw, sessions=sessions)
                  for src in ("real", "random")}
    assert len(built) == 1
    assert shared == alone
    batches = list(random_id_batches(tokens, 4, INPUTS, 30522, 3))
    assert reference_cached(path, batches, ["last_hidden_state"], str(tmp_path / "b"))
