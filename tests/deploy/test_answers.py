"""compiler/deploy/answers.py, and a classifier bundle end to end: its class names reach Triton's
`labels.txt` (`label_filename` in both configs) and `run` answers with them. Before, `run` on a
classifier printed the logits as an "embedding" ("mean of logits over unmasked tokens") and the
bundle kept no class names."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compiler.cli import main
from compiler.deploy.answers import answer_line, softmax, task_answers
from compiler.deploy.triton import read_config
from tests.models import minilm_tokenizer

LABELS = ("NEGATIVE", "POSITIVE")


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


def _classifier_bundle(head: type, names: tuple[str, ...], tmp_path: Path, **config: Any) -> Path:
    """A bundle (ONNX Runtime only, here) of a tiny BERT with `head` and class `names`."""
    import torch
    from transformers import BertConfig

    torch.manual_seed(0)
    checkpoint = tmp_path / "classifier"
    head(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=30522,
                    id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}, **config)
         ).save_pretrained(checkpoint)
    minilm_tokenizer().save_pretrained(checkpoint)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["-q", "bundle", "--model", str(checkpoint), "--samples", "2", "--calib-samples", "2",
                     "--max-length", "16", "--max-shape", "2x16", "--output-dir", str(tmp_path / "out"),
                     "--out", str(tmp_path / "bundle")]) == 0
    return tmp_path / "bundle"


def test_each_task_answers_from_its_outputs(tokenizer):
    feeds = {k: v.astype(np.int64) for k, v in tokenizer(["a [MASK] film", "paris is nice"], padding=True,
                                                        return_tensors="np").items()}
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    b, s = ids.shape
    cls = task_answers("text-classification", {"logits": np.array([[0.0, 2.0], [3.0, 0.0]], np.float32)}, feeds,
                       tokenizer, LABELS)
    assert [a["label"] for a in cls] == ["POSITIVE", "NEGATIVE"] and cls[0]["score"] == pytest.approx(0.880797, 1e-5)
    tok = np.zeros((b, s, 2), np.float32)
    tok[..., 1] = 1.0
    rows = task_answers("token-classification", {"logits": tok}, feeds, tokenizer, LABELS)
    assert [t["token"] for t in rows[1]] == ["paris", "is", "nice"]  # no [CLS], [SEP] or padding
    assert {t["label"] for r in rows for t in r} == {"POSITIVE"}
    vocab = np.zeros((b, s, len(tokenizer)), np.float32)
    vocab[0, 2, tokenizer.convert_tokens_to_ids("good")] = 9.0  # position 2: [CLS] a [MASK]
    filled = task_answers("fill-mask", {"logits": vocab}, feeds, tokenizer, top_k=3)
    assert filled[0][0][0]["token"] == "good" and len(filled[0][0]) == 3 and filled[1] == []
    start, end = np.zeros((b, s), np.float32), np.zeros((b, s), np.float32)
    start[1, 1], end[1, 3] = 5.0, 5.0  # "paris is nice"
    end[1, 0] = 9.0  # [CLS] is never an answer
    assert task_answers("question-answering", {"start_logits": start, "end_logits": end}, feeds,
                        tokenizer)[1]["answer"] == "paris is nice"
    logits = np.zeros((b, s, len(tokenizer)), np.float32)
    last = mask.sum(axis=1) - 1
    logits[0, last[0], tokenizer.convert_tokens_to_ids("end")] = 1.0
    assert task_answers("text-generation", {"logits": logits}, feeds, tokenizer)[0]["next_token"] == "end"
    assert task_answers("feature-extraction", {"last_hidden_state": tok}, feeds, tokenizer) is None
    assert answer_line("text-classification", cls[0]) == "POSITIVE (0.8808)"
    np.testing.assert_allclose(softmax(np.array([[1000.0, 1000.0]])), [[0.5, 0.5]])  # no overflow


def test_a_classifier_bundle_carries_its_class_names_to_triton_and_run(tmp_path):
    from transformers import BertForSequenceClassification

    bundle = _classifier_bundle(BertForSequenceClassification, LABELS, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["task"] == "text-classification"
    assert manifest["labels"] == {"output": "logits", "names": list(LABELS), "file": "labels.txt",
                                  "problem_type": "single_label_classification"}
    for folder in (manifest["name"], f"{manifest['name']}_onnxruntime"):
        assert (bundle / folder / "labels.txt").read_text().splitlines() == list(LABELS)
        assert f"{folder}/labels.txt" in manifest["files"]  # hashed: a changed label file is refused
        (logits,) = [o for o in read_config(bundle / folder / "config.pbtxt").output if o.name == "logits"]
        assert logits.label_filename == "labels.txt"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", str(bundle), "--text", "a good film", "--text", "bad", "--out", str(tmp_path / "r")]) == 0
    answers = json.loads((tmp_path / "r" / "run.json").read_text())["answers"]
    assert len(answers) == 2 and {a["label"] for a in answers} <= set(LABELS)
    assert "answers (text-classification):" in printed.getvalue() and "embedding" not in printed.getvalue()
    assert Path(tmp_path / "r" / "logits.npy").is_file() and not Path(tmp_path / "r" / "embedding.npy").exists()
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        assert main(["inspect", str(bundle)]) == 0
    assert "task text-classification" in shown.getvalue()
    assert "labels (logits, labels.txt): 2 classes, NEGATIVE, POSITIVE" in shown.getvalue()


def test_multi_label_and_regression_classifiers_answer_as_trained(tokenizer):
    """A softmax top-1 misreads both (transformers' `problem_type`)."""
    feeds = {k: v.astype(np.int64) for k, v in tokenizer(["a", "b"], return_tensors="np").items()}
    logits = np.array([[2.0, 1.0, -3.0], [-2.0, -1.0, -3.0]], np.float32)
    multi = task_answers("text-classification", {"logits": logits}, feeds, tokenizer, ("a", "b", "c"),
                         problem_type="multi_label_classification")
    assert multi[0]["labels"] == ["a", "b"] and multi[1]["labels"] == []  # every class with sigmoid >= 0.5
    assert multi[0]["scores"]["c"] == pytest.approx(0.047426, abs=1e-6)
    assert answer_line("text-classification", multi[1]) == "(no class at 0.5 or more)"
    scored = task_answers("text-classification", {"logits": np.array([[3.25], [-0.5]], np.float32)}, feeds,
                          tokenizer, ("LABEL_0",), problem_type="regression")
    assert scored == [{"score": 3.25}, {"score": -0.5}] and answer_line("text-classification", scored[0]) == "3.2500"


def test_a_question_answering_span_lies_in_the_context_of_a_pair(tokenizer):
    enc = tokenizer(["who wrote it"], ["mary shelley wrote it"], return_tensors="np")
    feeds = {k: v.astype(np.int64) for k, v in enc.items()}
    tokens = tokenizer.convert_ids_to_tokens(feeds["input_ids"][0].tolist())
    start, end = np.zeros((1, len(tokens)), np.float32), np.zeros((1, len(tokens)), np.float32)
    start[0, tokens.index("who")], end[0, tokens.index("who")] = 9.0, 9.0  # the question's own words
    first = tokens.index("mary")
    start[0, first], end[0, first + 1] = 5.0, 5.0
    out = {"start_logits": start, "end_logits": end}
    assert task_answers("question-answering", out, feeds, tokenizer, paired=True)[0]["answer"] == "mary shelley"
    assert task_answers("question-answering", out, feeds, tokenizer)[0]["answer"] == "who"  # one text: anywhere


def test_token_classification_labels_are_written_without_triton_label_filename(tmp_path):
    from transformers import BertForTokenClassification

    names = ("O", "B-PER", "I-PER")
    bundle = _classifier_bundle(BertForTokenClassification, names, tmp_path)
    folder = bundle / json.loads((bundle / "manifest.json").read_text())["name"]
    assert (folder / "labels.txt").read_text().splitlines() == list(names)
    (logits,) = [o for o in read_config(folder / "config.pbtxt").output if o.name == "logits"]
    assert logits.label_filename == ""  # Triton's classification ranks one vector per item: not per token


def test_a_multi_label_bundle_records_its_problem_type_and_run_uses_it(tmp_path):
    from transformers import BertForSequenceClassification

    bundle = _classifier_bundle(BertForSequenceClassification, ("toxic", "insult", "threat"), tmp_path,
                                problem_type="multi_label_classification")
    assert json.loads((bundle / "manifest.json").read_text())["labels"]["problem_type"] == "multi_label_classification"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(bundle), "--text", "a text", "--out", str(tmp_path / "r")]) == 0
    (answer,) = json.loads((tmp_path / "r" / "run.json").read_text())["answers"]
    assert set(answer["scores"]) == {"toxic", "insult", "threat"} and "label" not in answer
