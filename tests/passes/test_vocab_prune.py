"""Vocabulary pruning (`compiler.passes.vocab_prune.prune_vocabulary`): the id remap checked on ONNX
Runtime against the unpruned graph (kept ids: identical outputs; dropped ids: the outputs of
[UNK]), on hand-built graphs and on a tiny BERT export; parameter counts by hand; the tied-head
refusal and the shrunk head."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from calibration import load_texts, tokenized_set
from calibration.vocabulary import choose_vocabulary, count_tokens, special_token_ids
from compiler.errors import CompilerError
from compiler.passes.vocab_prune import prune_vocabulary
from compiler.settings import DataSettings, ExportSettings
from compiler.training.export import onnx_from_torch
from tests.models import f32, make_model, minilm_tokenizer, ort_run, tiny_bert, tiny_loaded

V, H, N = 10, 4, 3
r = np.random.default_rng(7)
TABLE = r.standard_normal((V, H)).astype(np.float32)
W = r.standard_normal((H, N)).astype(np.float32)
KEPT = np.array([7, 0, 3, 1, 5, 3])  # unsorted, repeated: the pass sorts and de-duplicates
UNK = 1


def ids_input() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])


def encoder(cast: bool | str = False) -> onnx.ModelProto:
    """input_ids -> [Cast int32 -> Identity ->] Gather(table) -> MatMul(W) -> y; `shape` reads
    input_ids too (it must keep reading the original ids). cast="reshape": input_ids ->
    Reshape(-1, 4) -> Gather, as GPT-2's `input_ids.view(-1, seq)` exports."""
    nodes = [helper.make_node("Shape", ["input_ids"], ["shape"], name="shape")]
    ids = "input_ids"
    extra = {}
    if cast == "reshape":
        nodes += [helper.make_node("Reshape", ["input_ids", "rows"], ["ids_rows"], name="view")]
        ids, extra = "ids_rows", {"rows": np.array([-1, 4], np.int64)}
    elif cast:
        nodes += [helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32, name="cast"),
                  helper.make_node("Identity", ["ids32"], ["ids_same"], name="same")]
        ids = "ids_same"
    nodes += [helper.make_node("Gather", ["table", ids], ["h"], name="embed"),
              helper.make_node("MatMul", ["h", "W"], ["y"], name="proj")]
    return make_model(nodes, [ids_input()],
                      [f32("y", ["batch", "seq", N]), helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                      {"table": TABLE, "W": W, **extra})


def check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)


@pytest.mark.parametrize("cast", [False, True, "reshape"])  # reshape: GPT-2 (was "found no word-embedding Gather")
def test_kept_ids_give_identical_outputs_and_dropped_ids_behave_as_unk(cast):
    model = encoder(cast)
    pruned, report = prune_vocabulary(model, KEPT, UNK)
    check(pruned)
    kept_ids = np.array([[0, 7, 3, 5], [1, 1, 0, 7]])
    ref, got = ort_run(model, {"input_ids": kept_ids}), ort_run(pruned, {"input_ids": kept_ids})
    assert float(np.abs(got[0] - ref[0]).max()) == 0.0
    np.testing.assert_array_equal(got[1], ref[1])  # Shape still reads the original ids

    mixed = np.array([[2, 7, 9, 4], [8, 6, 0, 3]])  # 2, 4, 6, 8, 9 are dropped
    as_unk = np.where(np.isin(mixed, KEPT), mixed, UNK)
    got = ort_run(pruned, {"input_ids": mixed})[0]
    assert float(np.abs(got - ort_run(model, {"input_ids": as_unk})[0]).max()) == 0.0
    assert float(np.abs(got - ort_run(model, {"input_ids": mixed})[0]).max()) > 0.1  # dropped ids did change

    g = pruned.graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    np.testing.assert_array_equal(inits["table"], TABLE[[0, 1, 3, 5, 7]])  # ascending ids
    assert inits["table_remap"].dtype == np.int32
    np.testing.assert_array_equal(inits["table_remap"], [0, 1, 1, 2, 1, 3, 1, 4, 1, 1])
    assert [v.name for v in g.input] == ["input_ids"] and g.input[0].type.tensor_type.elem_type == TensorProto.INT64
    assert [n.op_type for n in g.node] == [n.op_type for n in model.graph.node][:-2] + ["Gather", "Gather", "MatMul"]


def test_report_counts_parameters_by_hand_and_input_is_untouched():
    model = encoder()
    before = model.SerializeToString()
    _, report = prune_vocabulary(model, KEPT, UNK)
    assert model.SerializeToString() == before
    assert (report.vocab_size, report.kept, report.hidden, report.unk_id) == (10, 5, 4, 1)
    assert (report.embedding, report.gather, report.tied) == ("table", "embed", False)
    assert report.embedding_params_before == 40  # 10 x 4
    assert report.embedding_params_after == 5 * 4 + 10  # kept rows + int32 remap
    assert report.model_params_before == 40 + 12  # + W (4 x 3)
    assert report.model_params_after == 30 + 12
    assert report.to_dict()["kept"] == 5 and report.to_dict()["head_nodes"] == []


@pytest.mark.parametrize("kept, unk, message", [
    (np.array([0, 3]), 1, "unk_id 1 is not among the kept ids"),
    (np.array([1, 10]), 1, r"within \[0, 10\)"),
    (np.array([], dtype=np.int64), 1, "non-empty"),
])
def test_bad_kept_ids_raise(kept, unk, message):
    with pytest.raises(ValueError, match=message):
        prune_vocabulary(encoder(), kept, unk)


def test_no_embedding_gather_names_what_it_looked_for():
    nodes = [helper.make_node("Cast", ["input_ids"], ["x"], to=TensorProto.FLOAT, name="tofloat"),
             helper.make_node("Mul", ["x", "x"], ["y"], name="sq")]
    model = make_model(nodes, [ids_input()], [f32("y", ["batch", "seq"])])
    with pytest.raises(CompilerError, match=r"found no word-embedding Gather.*'input_ids'.*inputs: \['input_ids'\]"):
        prune_vocabulary(model, KEPT, UNK)
    with pytest.raises(CompilerError, match=r"no graph input 'ids'; inputs: \['input_ids'\]"):
        prune_vocabulary(encoder(), KEPT, UNK, input_name="ids")


def test_quantized_table_is_refused():
    nodes = [helper.make_node("DequantizeLinear", ["table_q", "scale"], ["table"], name="dq"),
             helper.make_node("Gather", ["table", "input_ids"], ["y"], name="embed")]
    model = make_model(nodes, [ids_input()], [f32("y", ["batch", "seq", H])],
                       {"table_q": (TABLE * 10).astype(np.int8), "scale": np.float32(0.1)})
    with pytest.raises(CompilerError, match="Q/DQ'd.*'dq'.*before INT8"):
        prune_vocabulary(model, KEPT, UNK)


def tied(folded: bool) -> onnx.ModelProto:
    """GPT-2 style: Gather(table, ids) -> Relu -> MatMul(h, table^T) -> logits (batch, seq, V), the
    transpose as a Transpose node or as a constant-folded copy `table_t`."""
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["h"], name="wte"),
             helper.make_node("Relu", ["h"], ["a"], name="act")]
    inits = {"table": TABLE}
    if folded:
        inits["table_t"] = TABLE.T.copy()
    else:
        nodes.append(helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0], name="tied_t"))
    nodes.append(helper.make_node("MatMul", ["a", "table_t"], ["logits"], name="lm_head"))
    return make_model(nodes, [ids_input()], [f32("logits", ["batch", "seq", V])], inits)


@pytest.mark.parametrize("folded", [False, True])
def test_tied_head_is_refused_unless_allowed(folded):
    model = tied(folded)
    with pytest.raises(CompilerError, match=r"also feeds .*MatMul 'lm_head'.*logits.*--vocab-tied"):
        prune_vocabulary(model, KEPT, UNK)

    pruned, report = prune_vocabulary(model, KEPT, UNK, allow_tied=True)
    check(pruned)
    assert report.tied and report.head_nodes == ["lm_head"]
    kept = np.unique(KEPT)
    assert pruned.graph.output[0].type.tensor_type.shape.dim[-1].dim_value == kept.size
    ids = np.array([[0, 7, 3], [5, 1, 1]])
    got, ref = ort_run(pruned, {"input_ids": ids})[0], ort_run(model, {"input_ids": ids})[0]
    assert got.shape == (2, 3, kept.size)
    assert float(np.abs(got - ref[..., kept]).max()) <= 1e-6
    # parameters: the table (and its folded copy) lose 5 rows of 4; the remap adds 10
    assert report.model_params_before - report.model_params_after == (2 if folded else 1) * 20 - 10


def test_table_feeding_a_non_head_node_is_refused_even_when_tied_is_allowed():
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["h"], name="wte"),
             helper.make_node("Mul", ["table", "table"], ["squares"], name="odd")]
    model = make_model(nodes, [ids_input()], [f32("h", ["batch", "seq", H]), f32("squares", [V, H])], {"table": TABLE})
    with pytest.raises(CompilerError, match="Mul 'odd', which is no MatMul/Gemm output head"):
        prune_vocabulary(model, KEPT, UNK, allow_tied=True)


# --------------------------------------------------------------------------------------------
# A tiny BERT exported from PyTorch, pruned to the tokens of a few real texts


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    texts = load_texts(DataSettings(samples=10))
    path, _ = onnx_from_torch(tiny_loaded(tiny_bert(), "vocab-prune-v1"), ExportSettings(),
                              tmp_path_factory.mktemp("vocab") / "model.onnx", texts)
    return onnx.load(str(path)), texts


def test_tiny_bert_pruned_to_domain_text(bert):
    model, texts = bert
    tokenizer = minilm_tokenizer()
    domain, held_out = texts[:6], texts[6:]
    kept = choose_vocabulary(count_tokens(domain, tokenizer, 64), 1, special_token_ids(tokenizer))
    pruned, report = prune_vocabulary(model, kept, tokenizer.unk_token_id)
    check(pruned)
    assert report.gather and report.embedding_params_before == 30522 * 32 and report.kept == kept.size < 30522 // 10
    names = [v.name for v in model.graph.input]

    def outputs(m, tokens, replace=False):
        feeds, _ = next(tokens.batches(len(tokens), names))
        if replace:
            feeds["input_ids"] = np.where(np.isin(feeds["input_ids"], kept), feeds["input_ids"], tokenizer.unk_token_id)
        return ort_run(m, feeds, optimize=False)

    seen = tokenized_set(domain, tokenizer, 64, None)
    for got, ref in zip(outputs(pruned, seen), outputs(model, seen)):
        assert float(np.abs(got - ref).max()) == 0.0
    other = tokenized_set(held_out, tokenizer, 64, None)
    assert not np.isin(np.concatenate(other.input_ids), kept).all()  # the held-out text has dropped ids
    for got, ref in zip(outputs(pruned, other), outputs(model, other, replace=True)):
        assert float(np.abs(got - ref).max()) == 0.0


@pytest.mark.parametrize("gemm", [True, False])
def test_tied_head_bias_shrinks_with_the_table(gemm):
    """Gemm(h, table, bias, transB=1), or Transpose -> MatMul -> Add(bias): the [V] bias keeps the
    kept tokens' entries."""
    bias = r.standard_normal(V).astype(np.float32)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch"])
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["h"], name="wte")]
    if gemm:
        nodes.append(helper.make_node("Gemm", ["h", "table", "bias"], ["logits"], transB=1, name="lm_head"))
    else:
        nodes += [helper.make_node("Transpose", ["table"], ["table_t"], name="tied_t"),
                  helper.make_node("MatMul", ["h", "table_t"], ["raw"], name="lm_head"),
                  helper.make_node("Add", ["raw", "bias"], ["logits"], name="lm_bias")]
    model = make_model(nodes, [ids], [f32("logits", ["batch", V])], {"table": TABLE, "bias": bias})
    pruned, report = prune_vocabulary(model, KEPT, UNK, allow_tied=True)
    check(pruned)
    assert report.head_nodes == ["lm_head"]
    kept, feed = np.unique(KEPT), {"input_ids": np.array([3, 0, 7])}
    got, ref = ort_run(pruned, feed)[0], ort_run(model, feed)[0]
    assert got.shape == (3, kept.size) and float(np.abs(got - ref[:, kept]).max()) <= 1e-6
