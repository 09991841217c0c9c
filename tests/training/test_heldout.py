"""The held-out cosine along a fine-tuning run (`compiler.training.heldout`) and its curve in
`TrainReport.curve`. Tiny random BERT, real WikiText-2 text, CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compiler.settings import TrainSettings
from compiler.training.distill import bf16_matmul_available, distill
from compiler.training.heldout import heldout_cosine, sample_cosines
from tests.models import BERT_INPUTS, tiny_bert, training_tokens


def test_sample_cosines_by_hand():
    ref = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]], [[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]])
    got = ref.clone()
    got[0, 2] = -9.0  # a padded position: ignored at length 2
    got[1, 1] = torch.tensor([2.0, -2.0])
    c = sample_cosines(ref, got, np.array([2, 2]))
    assert c[0] == pytest.approx(1.0) and c[1] == pytest.approx(2 / 10)  # [1,1,2,2].[1,1,2,-2] / (sqrt(10) sqrt(10))
    got[1, 0, 0] = float("nan")
    assert sample_cosines(ref, got, np.array([2, 2]))[1] == -1.0
    rows = sample_cosines(torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 4.0]]), np.array([1]))  # rank 2: the row
    assert rows == [pytest.approx(1.0)]


def test_heldout_cosine_is_one_for_the_teacher_and_lower_for_another_model():
    teacher, other = tiny_bert(), tiny_bert(seed=3)
    held = training_tokens(6, skip=0)
    evaluate = heldout_cosine(teacher, held, BERT_INPUTS, max_samples=5)
    assert evaluate(teacher) == pytest.approx(1.0, abs=1e-6)
    worse = evaluate(other)
    assert -1.0 <= worse < 0.99
    other.train()
    assert evaluate(other) == pytest.approx(worse) and other.training  # mode restored
    with pytest.raises(ValueError, match="no held-out sample"):
        heldout_cosine(teacher, training_tokens(6).__class__([], None, 0, "empty"), BERT_INPUTS)


def test_distill_records_the_heldout_curve():
    """A point before the first step and one per progress line (every 5 %: each of 4 steps
    here); the cosine rises as the student learns the teacher."""
    teacher, student = tiny_bert(), tiny_bert(seed=1)
    train, held = training_tokens(8), training_tokens(4, skip=0)  # held: the calibration slice
    report = distill(student, teacher, train, BERT_INPUTS, TrainSettings(steps=4, lr=3e-3, batch_size=4),
                     evaluate=heldout_cosine(teacher, held, BERT_INPUTS))
    assert [p[0] for p in report.curve] == [0, 1, 2, 3, 4]
    seconds = [p[1] for p in report.curve]
    assert seconds == sorted(seconds) and seconds[0] < 1.0
    assert report.curve[-1][2] > report.curve[0][2]
    assert report.to_dict()["curve"] == report.curve
    assert distill(tiny_bert(seed=1), teacher, train, BERT_INPUTS, TrainSettings(steps=1, batch_size=4)).curve == []


def test_bf16_matmul_available_answers_for_each_device():
    assert isinstance(bf16_matmul_available("cpu"), bool)
    if not torch.cuda.is_available():
        assert bf16_matmul_available("auto") == bf16_matmul_available("cpu")
        assert bf16_matmul_available("cuda") is False


def test_heldout_cosine_keeps_the_teacher_outputs_within_the_memory_cap(monkeypatch):
    """Past `REFERENCE_MAX_MIB` no further batch is kept or measured (at least one is)."""
    import compiler.training.heldout as heldout

    teacher = tiny_bert()
    held = training_tokens(40, skip=0)
    calls = []
    forward = type(teacher).forward
    monkeypatch.setattr(type(teacher), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    monkeypatch.setattr(heldout, "REFERENCE_MAX_MIB", 0)  # every batch passes the cap: one batch kept
    evaluate = heldout.heldout_cosine(teacher, held, BERT_INPUTS, max_samples=40)
    assert evaluate(teacher) == pytest.approx(1.0, abs=1e-6)
    assert len(calls) == 2  # one teacher batch, then the same batch on the "student"
