"""compiler/eval/fidelity.py: the one fidelity probe, checked on tiny graphs against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper

from compiler.eval.fidelity import FidelityProbe, sample_fidelity, valid_positions
from tests.models import f32, make_model

FLOAT = TensorProto.FLOAT


def ids_model(log: bool = False, scale: float = 1.0, fp16: bool = False):
    """input_ids (batch, sequence) int64 -> float [-> Log] [* scale] -> Y (batch, sequence, 1) and
    its sum over the sequence, P (batch, 1): two outputs, like last_hidden_state and a pooled one."""
    nodes = [helper.make_node("Cast", ["input_ids"], ["f"], to=FLOAT)]
    cur = "f"
    if log:
        nodes.append(helper.make_node("Log", [cur], ["l"]))
        cur = "l"
    if fp16:  # round through FP16 mid-graph: the probe must run it on the FP16 emulation
        nodes += [helper.make_node("Cast", [cur], ["h"], to=TensorProto.FLOAT16),
                  helper.make_node("Cast", ["h"], ["h32"], to=FLOAT)]
        cur = "h32"
    nodes += [helper.make_node("Mul", [cur, "scale"], ["s"]),
              helper.make_node("Unsqueeze", ["s", "axes"], ["Y"]),
              helper.make_node("ReduceSum", ["s", "axes1"], ["P"], keepdims=1)]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    return make_model(nodes, [ids], [f32("Y", ["batch", "sequence", 1]), f32("P", ["batch", 1])],
                      {"scale": np.array(scale, np.float32), "axes": np.array([2], np.int64),
                       "axes1": np.array([1], np.int64)})


# two batches, three samples; sample 1 has one padding position (id 0)
IDS_BATCHES = [({"input_ids": np.array([[1, 2, 3], [2, 1, 0]], np.int64)}, np.array([3, 2])),
               ({"input_ids": np.array([[3, 1]], np.int64)}, np.array([2]))]


def probe(outputs=("Y",)):
    return FidelityProbe(ids_model(), list(outputs), {"set": IDS_BATCHES})


def test_sample_fidelity_by_hand():
    ref = np.array([[[1.0], [0.0]], [[3.0], [4.0]]])  # (batch 2, sequence 2, 1)
    got = np.array([[[0.0], [1.0]], [[3.0], [4.5]]])
    # sample 0, both positions valid: orthogonal vectors
    assert sample_fidelity(ref, got, 0, 2) == (0.0, 0, 1.0)
    # sample 1, only position 0 valid: the same vector, padding ignored
    assert sample_fidelity(ref, got, 1, 1) == (1.0, 0, 0.0)
    cosine, bad, err = sample_fidelity(ref, got, 1, 2)
    assert cosine == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5))) and (bad, err) == (0, 0.5)
    # a non-finite value: cosine -1, error nan, counted
    inf = got.copy()
    inf[1, 0, 0] = np.inf
    c, bad, err = sample_fidelity(ref, inf, 1, 2)
    assert (c, bad) == (-1.0, 1) and math.isnan(err)
    # pooled (batch, features) outputs have no sequence axis: the whole row counts
    np.testing.assert_array_equal(valid_positions(np.arange(6).reshape(2, 3), 1, 1), [3, 4, 5])


def test_identical_variant_scores_one_and_zero_error():
    f = probe().score(ids_model())
    assert (f.cosine_min, f.cosine_mean, f.deficit_mean) == pytest.approx((1.0, 1.0, 0.0), abs=1e-12)
    assert (f.max_abs_err, f.nonfinite_count, f.samples) == (0.0, 0, 3)
    assert f.within(0.9999, 0)


def test_scaled_variant_keeps_cosine_and_shows_error():
    # 2x the reference: cosine is scale-free, the error is not (max |2y - y| = 3 at id 3)
    f = probe().score(ids_model(scale=2.0))
    assert f.cosine_min == pytest.approx(1.0, abs=1e-12) and f.max_abs_err == 3.0


def test_nonfinite_sample_budget_view_and_report_view():
    # log(0) = -inf only at sample 1's padding position (ignored); log(1) = 0 at sample 1,
    # position 1 and sample 2, position 1: finite. Cosine of [0, log 2, log 3] vs [1, 2, 3] by hand:
    f = probe().score(ids_model(log=True))
    v, r = np.log([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])
    assert f.cosine_min == pytest.approx(min(v @ r / np.linalg.norm(v) / np.linalg.norm(r),
                                             np.log(2) * 2 / np.log(2) / math.hypot(2, 1),
                                             np.log(3) * 3 / np.log(3) / math.hypot(3, 1)))
    assert f.nonfinite_count == 0
    # a zero id inside the valid positions: -inf counts, cosine -1 (budget view), None (report view)
    batches = [({"input_ids": np.array([[0, 2]], np.int64)}, np.array([2]))]
    g = FidelityProbe(ids_model(), ["Y"], {"set": batches}).score(ids_model(log=True))
    assert (g.cosine_min, g.nonfinite_count) == (-1.0, 1)
    assert not g.within(-1.0, 0) and g.within(-1.0, 1)
    report = g.report()
    assert report["cosine_min"] is None and report["max_abs_err"] is None and report["nonfinite_count"] == 1
    assert report["reference_nonfinite_count"] == 0
    # the reference's own NaN/Inf at valid positions are counted apart: the log graph as the
    # reference, the variant the same graph: both have sample 0's -inf, padding's stays out
    same = FidelityProbe(ids_model(log=True), ["Y"], {"set": batches + IDS_BATCHES}).score(ids_model(log=True))
    assert same.outputs[0].reference_nonfinite_count == 1 and same.nonfinite_count == 1
    assert same.report()["reference_nonfinite_count"] == 1


def test_every_output_is_measured_and_nonfinite_counted_over_all():
    p = probe(outputs=("Y", "P"))
    f = p.score(ids_model(scale=2.0))
    assert [o.name for o in f.outputs] == ["Y", "P"]
    # P sums every position, padding too: sample 0 ref 1+2+3 = 6, got 12
    assert f.outputs[1].max_abs_err == 6.0 and f.max_abs_err == 3.0  # headline = first output
    assert set(f.report()["outputs"]) == {"Y", "P"}


def test_reference_computed_once_and_sets_kept_apart():
    p = FidelityProbe(ids_model(), ["Y"], {"a": IDS_BATCHES[:1], "b": IDS_BATCHES[1:]})
    assert p.samples == {"a": 2, "b": 1}
    result = p.measure(ids_model(scale=2.0))
    assert result["a"].max_abs_err == 3.0 and result["b"].max_abs_err == 3.0
    assert result["a"].samples == 2 and result["b"].samples == 1
    p.measure(ids_model())
    assert p.evaluations == 2
    with pytest.raises(ValueError, match="one input set"):
        p.score(ids_model())
    with pytest.raises(ValueError, match="non-empty"):
        FidelityProbe(ids_model(), ["Y"], {"empty": []})


def test_fp16_variant_runs_on_the_emulation():
    # ids up to 2049: 2049 is not an FP16 value (rounds to 2048): only the emulation shows it
    batches = [({"input_ids": np.array([[2049, 1]], np.int64)}, np.array([2]))]
    p = FidelityProbe(ids_model(), ["Y"], {"set": batches})
    assert p.score(ids_model(fp16=True)).max_abs_err == 1.0


def test_reference_outputs_are_cached_by_graph_feeds_and_output(tmp_path, monkeypatch):
    """With a graph file and a cache folder, a second probe over the same batches reads the FP32
    outputs back (no reference session is opened) and measures the same as an uncached probe;
    other feeds or another graph file are computed anew. A ModelProto reference is never cached."""
    import onnx

    from compiler.eval import fidelity as F
    from compiler.eval import reference_outputs as R

    path, cache = tmp_path / "ref.onnx", tmp_path / "cache"
    onnx.save(ids_model(), path)
    # a one-output probe (a budget's) stores both outputs of the graph: a later two-output probe
    # (verify's) finds them
    first = FidelityProbe(path, ["Y"], {"a": IDS_BATCHES, "b": IDS_BATCHES[1:]}, str(cache))
    assert first.reused == [] and len(list(cache.glob("fp32-outputs-*.npz"))) == 4  # 2 sets x 2 outputs
    want = FidelityProbe(path, ["Y", "P"], {"a": IDS_BATCHES, "b": IDS_BATCHES[1:]}).measure(ids_model(scale=2.0))

    opened = []
    real_session = F.session
    for module in (F, R):  # the variant's sessions, the reference's
        monkeypatch.setattr(module, "session", lambda *a, **k: opened.append(a) or real_session(*a, **k))
    again = FidelityProbe(path, ["Y", "P"], {"a": IDS_BATCHES, "b": IDS_BATCHES[1:]}, str(cache))
    assert again.reused == ["a", "b"] and opened == []
    got = again.measure(ids_model(scale=2.0))
    assert {k: v.report() | {"seconds": 0} for k, v in got.items()} == \
        {k: v.report() | {"seconds": 0} for k, v in want.items()}

    other = [({"input_ids": np.array([[3, 3]], np.int64)}, np.array([2]))]
    assert FidelityProbe(path, ["Y", "P"], {"a": other}, str(cache)).reused == []
    assert FidelityProbe(path, ["Y"], {"b": IDS_BATCHES[1:]}, str(cache)).reused == ["b"]  # one output of two
    onnx.save(ids_model(scale=3.0), path)  # the graph changed: its outputs are not reused
    changed = FidelityProbe(path, ["Y"], {"b": IDS_BATCHES[1:]}, str(cache))
    assert changed.reused == [] and changed.reference["b"][0][0][0, 0, 0] == 9.0
    assert FidelityProbe(ids_model(), ["Y"], {"b": IDS_BATCHES[1:]}, str(cache)).reused == []


def test_variant_figures_are_cached_by_reference_samples_outputs_and_graph(tmp_path, monkeypatch):
    """A variant measured once (a budget's last evaluation) is read back by a later probe over the
    same reference, batches and outputs (verify) without opening a session, with the same
    figures; another variant graph, another output list or other batches are measured anew."""
    import onnx

    from compiler.eval import fidelity as F
    from compiler.eval import reference_outputs as R

    path, cache = tmp_path / "ref.onnx", tmp_path / "cache"
    onnx.save(ids_model(), path)
    first = FidelityProbe(path, ["Y", "P"], {"heldout": IDS_BATCHES}, str(cache))
    want = first.score(ids_model(scale=2.0))
    assert want.reused is False and len(list(cache.glob("fidelity-*.json"))) == 1

    opened = []
    real_session = F.session
    for module in (F, R):  # the variant's sessions, the reference's
        monkeypatch.setattr(module, "session", lambda *a, **k: opened.append(a) or real_session(*a, **k))
    verify = FidelityProbe(path, ["Y", "P"], {"real": IDS_BATCHES, "random": IDS_BATCHES[1:]}, str(cache))
    got = verify.measure(ids_model(scale=2.0))  # "real" = the budget's batches under another name
    # sessions: the FP32 reference and the variant on "random" only
    assert got["real"].reused is True and got["random"].reused is False and len(opened) == 2
    assert got["real"].to_json() == want.to_json() and got["real"].report()["reused"] is True
    opened.clear()
    assert verify.measure(ids_model(scale=2.0))["random"].reused is True and opened == []  # both cached now
    # another graph (one weight changed), another output list: measured anew, with their own figures
    other = verify.measure(ids_model(scale=3.0))
    assert not any(f.reused for f in other.values()) and other["real"].max_abs_err != want.max_abs_err
    assert FidelityProbe(path, ["Y"], {"real": IDS_BATCHES}, str(cache)).score(ids_model(scale=2.0)).reused is False
    # no cache folder, or a ModelProto reference (no content key): never reused
    assert FidelityProbe(path, ["Y", "P"], {"real": IDS_BATCHES}).score(ids_model(scale=2.0)).reused is False
    assert FidelityProbe(ids_model(), ["Y", "P"], {"real": IDS_BATCHES}, str(cache)).score(
        ids_model(scale=2.0)).reused is False
    # a damaged entry is measured again, not trusted
    for f in cache.glob("fidelity-*.json"):
        f.write_text("{not json")
    fresh = FidelityProbe(path, ["Y", "P"], {"real": IDS_BATCHES}, str(cache))
    assert fresh.score(ids_model(scale=2.0)).reused is False


def test_a_set_too_large_to_keep_is_streamed_with_the_same_figures(monkeypatch):
    """Outputs over `REFERENCE_MEMORY_MAX_MIB` (LM logits over a 250k vocabulary) are not kept:
    the reference runs again beside the variant a few rows at a time, with the figures of a
    probe that kept them. Sizes shrunk here so that three tiny samples count as too large."""
    from compiler.eval import fidelity as F
    from compiler.eval import reference_outputs as R

    kept = FidelityProbe(ids_model(), ["Y", "P"], {"set": IDS_BATCHES})
    want = kept.score(ids_model(scale=2.0))
    monkeypatch.setattr(R, "REFERENCE_MEMORY_MAX_MIB", 0)
    monkeypatch.setattr(R, "STREAMED_CHUNK_MIB", 0)  # one row a run
    runs = []
    real_session = R.session

    def counting(*a, **k):
        sess = real_session(*a, **k)
        return type("S", (), {"run": lambda self, n, f: runs.append(len(next(iter(f.values())))) or sess.run(n, f),
                              "get_outputs": lambda self: sess.get_outputs()})()

    for module in (F, R):
        monkeypatch.setattr(module, "session", counting)
    streamed = FidelityProbe(ids_model(), ["Y", "P"], {"set": IDS_BATCHES})
    assert streamed.streamed == ["set"] and streamed.reference["set"] is None
    got = streamed.score(ids_model(scale=2.0))
    assert got.to_json() | {"seconds": 0} == want.to_json() | {"seconds": 0}
    assert max(runs) == 1  # no run of more than one row


def test_a_sample_larger_than_a_chunk_scores_as_in_one_piece(monkeypatch):
    from compiler.eval import fidelity as F

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 7, 5)).astype(np.float32)
    got = ref + rng.standard_normal(ref.shape).astype(np.float32) * 0.01
    whole = sample_fidelity(ref, got, 1, 6)
    monkeypatch.setattr(F, "FIDELITY_CHUNK", 4)  # 30 values in 8 chunks
    chunked = sample_fidelity(ref, got, 1, 6)
    assert chunked[1:] == whole[1:] and chunked[0] == pytest.approx(whole[0], abs=1e-12)
    bad = got.copy()
    bad[1, 5, 4] = np.nan  # in the last chunk
    assert sample_fidelity(ref, bad, 1, 6)[:2] == (-1.0, 1)
