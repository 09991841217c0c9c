"""compiler/eval/task_agreement.py: each task's metric on tiny lookup graphs, against values worked
out by hand; padding positions never count, and an FP16 variant is judged on its FP16 values."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from compiler.eval.task_agreement import task_agreement
from tests.models import f32, make_model

IDS = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])

# two batches, three samples; positions past a sample's length hold id 3, whose row the variants
# change, so a metric that read padding would differ
BATCHES = [({"input_ids": np.array([[1, 3, 2], [2, 3, 3]], np.int64)}, np.array([3, 1])),
           ({"input_ids": np.array([[0, 2]], np.int64)}, np.array([2]))]


def lookup(table: np.ndarray, output: str, reduce: bool = False, fp16: bool = False):
    """input_ids (B, T) -> `output` = table[input_ids]: (B, T, C), or (B, T) for a 1-D table,
    summed over T when `reduce` ((B, C)). `fp16`: the table is an FP16 initializer, cast to FP32
    before the lookup (a variant that holds FP16 tensors)."""
    nodes, name = [], "table"
    if fp16:
        nodes.append(helper.make_node("Cast", ["table"], ["table32"], to=TensorProto.FLOAT))
        name = "table32"
    nodes.append(helper.make_node("Gather", [name, "input_ids"], ["g" if reduce else output], axis=0))
    inits = {"table": table.astype(np.float16 if fp16 else np.float32)}
    if reduce:
        nodes.append(helper.make_node("ReduceSum", ["g", "axes"], [output], keepdims=0))
        inits["axes"] = np.array([1], np.int64)
    shape = ["batch", table.shape[1]] if reduce else ["batch", "sequence", *table.shape[1:]]
    return make_model(nodes, [IDS], [f32(output, shape)], inits)


# class scores per token id (V=4, C=3); argmax per id: 0 -> 0, 1 -> 1, 2 -> 2, 3 -> 0
TABLE = np.array([[3, 0, 0], [0, 3, 0], [0, 0, 3], [2, 1, 0]], np.float32)


def test_per_position_agreement_counts_valid_positions_only():
    variant = TABLE.copy()
    variant[3] = [0, 1, 2]  # id 3's argmax 0 -> 2: one valid position (sample 0, position 1) and two paddings
    for task, key in [("token-classification", "token_label_agreement"), ("fill-mask", "top1_token_agreement"),
                      ("text-generation", "top1_token_agreement")]:
        out = task_agreement(task, lookup(TABLE, "logits"), lookup(variant, "logits"), ["logits"], BATCHES)
        # valid positions: ids 1, 3, 2 | 2 | 0, 2: six, one changed
        assert out == {"task": task, "samples": 3, key: pytest.approx(5 / 6)}


def test_label_agreement_per_sample():
    variant = TABLE.copy()
    variant[1] = [0, 3, 5]  # sample 0 sums ids 1, 3, 2: [2, 4, 3] -> [2, 4, 8], label 1 -> 2
    out = task_agreement("text-classification", lookup(TABLE, "logits", reduce=True),
                         lookup(variant, "logits", reduce=True), ["logits"], BATCHES)
    # sample 1 ([0, 3, 5] not in it): [4, 2, 3] both times; sample 2 (ids 0, 2): [3, 0, 3] both times
    assert out == {"task": "text-classification", "samples": 3, "label_agreement": pytest.approx(2 / 3)}


def span_graph(start: np.ndarray, end: np.ndarray):
    """input_ids (B, T) -> start_logits, end_logits (B, T): a score per token id each."""
    nodes = [helper.make_node("Gather", ["s", "input_ids"], ["start_logits"], axis=0),
             helper.make_node("Gather", ["e", "input_ids"], ["end_logits"], axis=0)]
    return make_model(nodes, [IDS], [f32("start_logits", ["batch", "sequence"]), f32("end_logits", ["batch", "sequence"])],
                      {"s": start, "e": end})


def test_span_agreement_ignores_padding():
    start = np.array([0.0, 5.0, 1.0, 0.0], np.float32)  # start: the token with id 1
    end = np.array([0.0, 1.0, 5.0, 0.0], np.float32)  # end: the token with id 2
    moved = end.copy()
    moved[3] = 9.0  # id 3 wins the end: sample 0 (valid position 1) changes; sample 1 only in padding
    out = task_agreement("question-answering", span_graph(start, end), span_graph(start, moved),
                         ["start_logits", "end_logits"], BATCHES)
    assert out["start_agreement"] == 1.0
    assert out["end_agreement"] == pytest.approx(2 / 3) and out["span_agreement"] == pytest.approx(2 / 3)


def test_pooled_cosine_of_sentence_embeddings():
    variant = TABLE.copy()
    variant[0] = [0, 0, 3]  # only sample 2 (ids 0, 2) reads row 0
    out = task_agreement("sentence-embedding", lookup(TABLE, "sentence_embedding", reduce=True),
                         lookup(variant, "sentence_embedding", reduce=True), ["sentence_embedding"], BATCHES)
    # sample 2: [3, 0, 3] against [0, 0, 6]: cosine 18 / (sqrt(18) * 6) = 1 / sqrt(2); the others 1
    assert out["pooled_cosine_min"] == pytest.approx(1 / np.sqrt(2))
    assert out["pooled_cosine_mean"] == pytest.approx((2 + 1 / np.sqrt(2)) / 3)


def test_fp16_variant_is_judged_on_its_fp16_values():
    # 1.0004 is 1.0 in FP16 (spacing 2^-10 near 1): id 1's two scores tie and argmax takes the first
    table = np.array([[1, 0], [1.0, 1.0004], [0, 1], [1, 0]], np.float32)
    out = task_agreement("token-classification", lookup(table, "logits"), lookup(table, "logits", fp16=True),
                         ["logits"], BATCHES)
    assert out["token_label_agreement"] == pytest.approx(5 / 6)  # the one valid id 1 (sample 0, position 0)


def test_feature_extraction_has_no_task_metric():
    graph = lookup(TABLE, "last_hidden_state")
    assert task_agreement("feature-extraction", graph, graph, ["last_hidden_state"], BATCHES) == {
        "task": "feature-extraction", "samples": 3}


def test_large_outputs_run_a_row_at_a_time_with_the_same_metrics(monkeypatch):
    """Outputs over `STREAMED_CHUNK_MIB` a run (LM logits over a large vocabulary) go through the
    sessions a few rows at a time; the metrics are those of whole batches."""
    from compiler.eval import reference_outputs as R

    variant = TABLE.copy()
    variant[3] = [0, 1, 2]
    whole = task_agreement("fill-mask", lookup(TABLE, "logits"), lookup(variant, "logits"), ["logits"], BATCHES)
    monkeypatch.setattr(R, "STREAMED_CHUNK_MIB", 0)  # one row a run
    assert task_agreement("fill-mask", lookup(TABLE, "logits"), lookup(variant, "logits"), ["logits"],
                          BATCHES) == whole
    start, end = np.array([0.0, 5.0, 1.0, 0.0], np.float32), np.array([0.0, 1.0, 5.0, 0.0], np.float32)
    moved = end.copy()
    moved[3] = 9.0
    qa = task_agreement("question-answering", span_graph(start, end), span_graph(start, moved),
                        ["start_logits", "end_logits"], BATCHES)
    assert qa["samples"] == 3 and qa["span_agreement"] == pytest.approx(2 / 3)  # as test_span_agreement_ignores_padding
