"""The distillation loop (`compiler.training.distill`): schedule, batches, teacher cache, device, loss.

Tiny random BERT (hidden 32, 2 layers) and real WikiText-2 text, a few steps each, all CPU.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from calibration.text import TokenizedSet
from compiler.errors import CompilerError
from compiler.settings import SparsitySettings, TrainSettings, settings_hash
from compiler.training.distill import (TrainReport, batches_forever, distill, distill_loss,
                                       length_groups, lr_factor, split_outputs, train_device)
from compiler.training.teacher_cache import TeacherCache
from tests.models import BERT_INPUTS, tiny_bert, tiny_gpt2, training_tokens


@pytest.fixture(scope="module")
def tokens():
    return training_tokens(8)


# --------------------------------------------------------------------------------------------
# Learning-rate schedule


def test_linear_schedule_by_hand():
    # 100 steps: w = 100 // 20 = 5 warm-up steps at (i + 1) / 5, then (100 - i) / 95
    f = lr_factor("linear", 100)
    assert [f(i) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f(5) == 1.0 and f(50) == pytest.approx(50 / 95) and f(99) == pytest.approx(1 / 95)
    assert f(100) == 0.0 and f(150) == 0.0  # never negative past the end
    assert all(f(i) >= f(i + 1) for i in range(5, 100))
    # fewer than 20 steps: one warm-up step (w = max(1, steps // 20)), then (10 - i) / 9
    g = lr_factor("linear", 10)
    assert g(0) == 1.0 and g(1) == pytest.approx(1.0) and g(4) == pytest.approx(6 / 9) and g(9) == pytest.approx(1 / 9)
    assert lr_factor("linear", 1)(0) == 1.0
    assert {lr_factor("constant", 100)(i) for i in (0, 50, 99)} == {1.0}
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'cosine'"):
        lr_factor("cosine", 10)
    with pytest.raises(ValueError, match="schedule"):
        TrainSettings(schedule="cosine")
    with pytest.raises(ValueError, match="recover_schedule"):
        SparsitySettings(recover_schedule="step")


def test_schedule_reaches_the_optimizer(monkeypatch):
    """Step i of the loop runs at lr x lr_factor(i): the learning rate AdamW holds at each step."""
    seen = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: seen.append(self.param_groups[0]["lr"]) or step(self, *a, **k))
    teacher = tiny_bert(layers=1)
    teacher.embeddings.requires_grad_(False)  # the 30522 x 32 table would dominate the cost of a step
    toks = training_tokens(4, max_length=16)
    for schedule in ("constant", "linear"):
        seen.clear()
        distill(copy.deepcopy(teacher), teacher, toks, BERT_INPUTS,
                TrainSettings(steps=20, lr=1e-3, batch_size=2, schedule=schedule))
        # linear at 20 steps: w = 1 warm-up step, then (20 - i) / 19
        expected = [1e-3] * 20 if schedule == "constant" else [1e-3] + [1e-3 * (20 - i) / 19 for i in range(1, 20)]
        assert seen == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# Batches


def test_length_grouped_batches_cover_every_sample_once_with_less_padding():
    rng = np.random.default_rng(3)
    lengths = np.concatenate([rng.integers(5, 20, 300), rng.integers(100, 128, 300)])  # short and long texts
    tokens = TokenizedSet([np.arange(1, n + 1) + 1000 * i for i, n in enumerate(lengths)], None, 0, "k")

    def epoch(group: bool) -> tuple[list[int], int]:
        gen = batches_forever(tokens, 8, ["input_ids", "attention_mask"], seed=0, group_by_length=group)
        seen, padded = [], 0
        for _ in range(75):  # 600 samples / 8
            feeds, valid, idx = next(gen)
            assert [int(row[0]) // 1000 for row in feeds["input_ids"] - 1] == list(idx)
            padded += feeds["input_ids"].size
            seen += [int(row[0]) // 1000 for row in feeds["input_ids"] - 1]
            assert np.array_equal(feeds["attention_mask"].sum(1), valid)
        return seen, padded

    grouped, grouped_cost = epoch(True)
    plain, plain_cost = epoch(False)
    assert sorted(grouped) == sorted(plain) == list(range(600))  # every sample once per epoch
    assert grouped_cost < 0.7 * plain_cost and grouped_cost < 1.1 * lengths.sum()
    assert grouped != sorted(grouped)  # still shuffled


def test_batches_reshuffle_every_epoch():
    tokens = TokenizedSet([np.array([i + 1]) for i in range(12)], None, 0, "k")
    gen = batches_forever(tokens, 4, ["input_ids"], seed=1)
    epochs = [np.concatenate([next(gen)[2] for _ in range(3)]) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert list(epochs[0]) != list(epochs[1])


def test_length_groups_by_hand_and_against_every_partition():
    # longest first: 100, 98 together (cost 200 + 10) beside 5, 3 (10 + 10), not all four padded to 100
    assert [list(g) for g in length_groups(np.array([3, 100, 5, 98]), cost_tokens=10)] == [[1, 3], [2, 0]]
    assert [list(g) for g in length_groups(np.array([3, 100, 5, 98]), cost_tokens=10**6)] == [[1, 3, 2, 0]]
    assert [list(g) for g in length_groups(np.array([3, 100, 5, 98]), cost_tokens=0)] == [[1], [3], [2], [0]]
    rng = np.random.default_rng(0)
    for _ in range(50):  # the cheapest cut of the sorted lengths, checked against all 2^(n-1) cuts
        lengths = rng.integers(1, 129, rng.integers(1, 9))
        cost = int(rng.integers(0, 200))
        groups = length_groups(lengths, cost)
        assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
        got = sum(len(g) * lengths[g].max() + cost for g in groups)
        ordered = np.sort(lengths)[::-1]
        best = min(sum(len(part) * part[0] + cost for part in np.split(ordered, [i + 1 for i in range(len(ordered) - 1)
                                                                                 if mask >> i & 1]))
                   for mask in range(2 ** (len(ordered) - 1)))
        assert got == best


def _ragged(tokens, lengths):
    """`tokens` cut to `lengths` (sample i to lengths[i % len(lengths)] tokens): mixed lengths."""
    ids = [np.asarray(x)[: lengths[i % len(lengths)]] for i, x in enumerate(tokens.input_ids)]
    types = (None if tokens.token_type_ids is None
             else [np.asarray(t)[: len(x)] for t, x in zip(tokens.token_type_ids, ids)])
    return TokenizedSet(ids, types, tokens.pad_id, tokens.key + "-ragged")


@pytest.mark.parametrize("family", ["encoder", "decoder", "classifier"])
def test_split_batches_train_what_the_padded_batches_train(tokens, family, monkeypatch):
    """Sub-batches of similar length, one optimizer step: the losses and the trained weights are
    the padded batch's (float summation order aside), for an encoder, a decoder and a head
    model, with the teacher cache filling on the way."""
    import compiler.training.distill as distill_module
    from transformers import BertForSequenceClassification

    ragged = _ragged(tokens, [32, 5, 30, 7])
    if family == "encoder":
        teacher, names = tiny_bert(), BERT_INPUTS
    elif family == "decoder":
        teacher, names = tiny_gpt2(), ["input_ids", "attention_mask"]
    else:
        config = tiny_bert().config
        config.num_labels = 3
        torch.manual_seed(0)
        teacher, names = BertForSequenceClassification(config).eval(), BERT_INPUTS
    torch.manual_seed(5)
    start = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.05 * torch.randn_like(p))
    shapes = []
    monkeypatch.setattr(teacher, "forward",
                        lambda *a, _f=teacher.forward, **k: shapes.append(k["input_ids"].shape) or _f(*a, **k))
    trained = {}
    for split, cost in ((False, None), (True, None), (True, 0)):
        monkeypatch.setattr(distill_module, "SPLIT_COST_TOKENS", 128 if cost is None else cost)
        student = copy.deepcopy(start)
        shapes.clear()
        report = distill(student, teacher, ragged, names,
                         TrainSettings(steps=4, lr=1e-3, batch_size=4, split_by_length=split))
        trained[split, cost] = student.state_dict(), report.losses, list(shapes)
    # the teacher runs in the first epoch only (cache), 2 batches of 4 of the 8 samples; a head
    # model's outputs are not cached: every step. At the default cost these batches (samples of
    # 32, 5, 30, 7 tokens) stay whole.
    epochs = 2 if family == "classifier" else 1
    assert trained[True, None][2] == trained[False, None][2]
    assert [b for b, _ in trained[True, None][2]] == [4] * 2 * epochs
    # at cost 0: sub-batches of equal length, each cut to its own longest
    split = trained[True, 0][2]
    assert all(b < 4 for b, _ in split) and sum(b for b, _ in split) == 8 * epochs
    assert {t for _, t in split} == {len(x) for x in ragged.input_ids}
    np.testing.assert_allclose(trained[True, 0][1], trained[False, None][1], rtol=1e-5)
    # AdamW divides by the gradient's running RMS, which magnifies summation-order noise where a
    # gradient is ~0: weights agree within a tenth of one step (lr 1e-3); the gradients
    # themselves are compared tightly below
    for k, v in trained[False, None][0].items():
        torch.testing.assert_close(trained[True, 0][0][k], v, rtol=0, atol=1e-4)
    # one batch by hand: the sub-batches' losses (normalized by the whole batch) add up to the
    # padded batch's loss, and their gradients to its gradient
    feeds, lengths, _ = next(batches_forever(ragged, 4, names, seed=0))
    hidden = True

    def loss_and_grads(parts):
        student = copy.deepcopy(start)
        total = 0.0
        for part in parts:
            t = int(lengths[part].max())
            inputs = {k: torch.from_numpy(np.ascontiguousarray(v[part, :t])) for k, v in feeds.items()}
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            with torch.no_grad():
                states, heads = split_outputs(teacher(**inputs, output_hidden_states=hidden), True)
            loss = distill_loss(student(**inputs, output_hidden_states=hidden), states + [v for _, v in heads], mask,
                                True, float(lengths.sum()), len(lengths))
            loss.backward()
            total += float(loss.detach())
        return total, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    whole, grads = loss_and_grads([np.arange(len(lengths))])
    split_loss, split_grads = loss_and_grads(length_groups(lengths, 0))
    assert split_loss == pytest.approx(whole, rel=1e-6) and split_grads.keys() == grads.keys()
    for k, v in grads.items():
        torch.testing.assert_close(split_grads[k], v, rtol=1e-4, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Loss


def test_distill_loss_by_hand():
    """MSE at valid tokens only: sum of squared errors over valid (token, channel) / (valid tokens x H)."""
    from transformers.modeling_outputs import BaseModelOutput

    out = BaseModelOutput(last_hidden_state=torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]]),  # token 2 padded
                          hidden_states=(None, torch.ones(1, 3, 2), None))  # embeddings, one block, last
    target = torch.zeros(1, 3, 2)
    mask = torch.tensor([[[1.0], [1.0], [0.0]]])
    plain = distill_loss(out, [target], mask, layerwise=False)
    assert float(plain) == pytest.approx((1 + 4 + 9 + 16) / 4)
    block_target = torch.full((1, 3, 2), 3.0)  # (1 - 3)^2 = 4 at every valid position
    both = distill_loss(out, [target, block_target], mask, layerwise=True)
    assert float(both) == pytest.approx(30 / 4 + 4.0)
    weighted = distill_loss(out, [target, block_target], mask, layerwise=True, layerwise_weight=3.0)
    assert float(weighted) == pytest.approx(30 / 4 + 3 * 4.0)
    with pytest.raises(ValueError, match="layerwise_weight"):
        TrainSettings(layerwise_weight=-1.0)


def test_distill_loss_of_a_head_model_by_hand():
    """A head model: the last block's output (`hidden_states[-1]`) stands for last_hidden_state,
    and each head output adds its MSE: per sample for classification logits, at valid tokens for
    span logits."""
    from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput

    mask = torch.tensor([[[1.0], [1.0], [0.0]]])
    last = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    hidden = (torch.zeros(1, 3, 2), last)
    cls = SequenceClassifierOutput(logits=torch.tensor([[1.0, 3.0]]), hidden_states=hidden)
    loss = distill_loss(cls, [torch.zeros(1, 3, 2), torch.zeros(1, 2)], mask, layerwise=False)
    assert float(loss) == pytest.approx(30 / 4 + (1 + 9) / 2)
    qa = QuestionAnsweringModelOutput(start_logits=torch.tensor([[2.0, 0.0, 50.0]]),
                                      end_logits=torch.tensor([[0.0, 4.0, 50.0]]), hidden_states=hidden)
    loss = distill_loss(qa, [torch.zeros(1, 3, 2), torch.zeros(1, 3), torch.zeros(1, 3)], mask, layerwise=False)
    assert float(loss) == pytest.approx(30 / 4 + 4 / 2 + 16 / 2)  # the padded position's 50 is not counted


# --------------------------------------------------------------------------------------------
# Teacher cache


def test_teacher_cache_budget_by_hand():
    """A sample costs valid tokens x H x 4 bytes per state; storing stops at the first one that
    does not fit, skips samples already stored, and `get` answers only for fully stored batches."""
    cache = TeacherCache(budget_mib=0)
    cache.put(np.array([0]), np.array([3]), [torch.ones(1, 5, 2)])
    assert cache.store == {} and cache.get(np.array([0]), "cpu") is None

    cache = TeacherCache(budget_mib=1)
    cache.free = 2 * (3 * 4 * 4) + 10  # room for two samples of 3 valid tokens x 4 channels, FP32
    states = [torch.arange(3 * 5 * 4, dtype=torch.float32).reshape(3, 5, 4)]  # (B=3, T=5, H=4)
    cache.put(np.array([7, 8, 9]), np.array([3, 3, 3]), states)
    assert sorted(cache.store) == [7, 8] and cache.free == 10
    assert torch.equal(cache.store[8][0], states[0][1, :3])  # valid tokens only
    cache.put(np.array([7]), np.array([5]), [torch.zeros(1, 5, 4)])  # already stored: unchanged
    assert torch.equal(cache.store[7][0], states[0][0, :3]) and cache.free == 10
    assert cache.get(np.array([7, 9]), "cpu") is None  # 9 did not fit
    cache.store[9] = [torch.ones(1, 4)]  # one valid token: padded with zeros to the batch's longest
    got = cache.get(np.array([9, 7]), "cpu")
    assert len(got) == 1 and got[0].shape == (2, 3, 4)
    assert torch.equal(got[0][0], torch.tensor([[1.0] * 4, [0.0] * 4, [0.0] * 4]))
    assert torch.equal(got[0][1], states[0][0, :3])


def _teacher_rows_with_and_without_cache(tokens, monkeypatch) -> dict[int, list[int]]:
    """6 steps of batch 4 on the 8 samples (3 epochs), without a teacher cache and with one:
    {cache MiB: the batch size of each teacher call}; both runs train the same weights."""
    teacher = tiny_bert()
    rows = []
    monkeypatch.setattr(teacher, "forward",
                        lambda *a, _f=teacher.forward, **k: rows.append(len(k["input_ids"])) or _f(*a, **k))
    trained = {}
    for mib in (0, 64):
        student = copy.deepcopy(tiny_bert(1))
        rows.clear()
        report = distill(student, teacher, tokens, BERT_INPUTS,
                         TrainSettings(steps=6, lr=1e-3, batch_size=4, teacher_cache_mib=mib, split_by_length=False))
        trained[mib] = (student.state_dict(), report.losses, list(rows))
    np.testing.assert_allclose(trained[64][1], trained[0][1], rtol=1e-4)
    for k, v in trained[0][0].items():
        torch.testing.assert_close(trained[64][0][k], v, rtol=1e-4, atol=1e-5)
    return {mib: t[2] for mib, t in trained.items()}


def test_teacher_cache_reuses_outputs_without_changing_training(tokens, monkeypatch):
    """Over 3 epochs the cached run calls the teacher once per batch of the first epoch only and
    trains the same weights as an uncached run."""
    rows = _teacher_rows_with_and_without_cache(tokens, monkeypatch)
    assert len(rows[0]) == 6 and len(rows[64]) == 2  # 2 batches per epoch, 3 epochs
    with pytest.raises(ValueError, match="teacher_cache_mib"):
        TrainSettings(teacher_cache_mib=-1)


def test_teacher_cache_runs_the_teacher_on_unstored_samples_only(tokens, monkeypatch):
    """A budget that holds 5 of the 8 samples: after the first epoch the teacher sees only the 3
    unstored samples an epoch (a batch mixing stored and unstored ones runs the unstored alone),
    and the student trains to the same weights as without a cache."""
    import compiler.training.distill as distill_module

    class FiveSamples(TeacherCache):
        def put(self, idx, lengths, states):
            keep = max(0, 5 - len(self.store))
            super().put(idx[:keep], lengths[:keep], [s[:keep] for s in states])

    monkeypatch.setattr(distill_module, "TeacherCache", FiveSamples)
    rows = _teacher_rows_with_and_without_cache(tokens, monkeypatch)
    assert sum(rows[0]) == 24 and sum(rows[64]) == 8 + 3 + 3  # 3 epochs of 8 samples


def test_distill_flushes_denormals_while_it_trains(tokens):
    """Denormal floats are flushed to zero during the steps (a microcode assist each on x86
    CPUs) and not after: PyTorch's default is restored on return."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals (torch.set_flush_denormal returned False)")
    torch.set_flush_denormal(False)
    tiny = torch.tensor([1e-39])  # below float32's smallest normal, 1.18e-38
    seen = []
    distill(tiny_bert(1), tiny_bert(), tokens, BERT_INPUTS, TrainSettings(steps=2, lr=1e-3, batch_size=4),
            after_step=lambda _: seen.append(float(tiny * 1.0)))
    assert seen == [0.0, 0.0]
    assert float(tiny * 1.0) > 0


# --------------------------------------------------------------------------------------------
# The loop


def test_distill_lowers_the_loss_and_reports_it(tokens, caplog):
    teacher = tiny_bert()
    student = tiny_bert(seed=1)
    with caplog.at_level("INFO", logger="compiler.training.distill"):
        report = distill(student, teacher, tokens, BERT_INPUTS, TrainSettings(steps=8, lr=3e-3, batch_size=4))
    assert isinstance(report, TrainReport) and report.steps == 8 and len(report.losses) == 8
    assert report.loss_first == report.losses[0] and report.loss_last == report.losses[-1]
    assert np.mean(report.losses[-2:]) < 0.8 * np.mean(report.losses[:2])
    # progress reaches the log (tqdm is silent off a terminal): one line per 5% of the run
    assert "distillation step 8/8" in caplog.text and "s left" in caplog.text
    assert all(not p.requires_grad or p.device.type == "cpu" for p in student.parameters())
    assert not student.training and not teacher.training
    d = report.to_dict()
    assert d["steps"] == 8 and d["losses"] == [round(v, 6) for v in report.losses]  # fewer than 20: all


def test_bf16_autocast_trains_fp32_weights(tokens):
    """`bf16` runs the student under bfloat16 autocast (the loss moves a little, so it is on) and
    keeps the weights FP32."""
    teacher = tiny_bert()
    first = {}
    for bf16 in (False, True):
        student = tiny_bert(seed=1)
        report = distill(student, teacher, tokens, BERT_INPUTS, TrainSettings(steps=2, lr=1e-3, batch_size=4, bf16=bf16))
        first[bf16] = report.loss_first
        assert all(p.dtype == torch.float32 for p in student.parameters()) and np.isfinite(report.losses).all()
    assert first[True] != first[False] and abs(first[True] - first[False]) < 0.05 * first[False]


# --------------------------------------------------------------------------------------------
# Device


def test_out_of_gpu_memory_is_a_clear_error_and_the_models_come_back(tokens, monkeypatch):
    """`auto` trains on any GPU PyTorch sees: running out of its memory names the fixes
    (CompilerError, exit 1) instead of an internal error, and the models are on the CPU after.
    The step raises PyTorch's own OutOfMemoryError (what a CUDA allocation raises)."""
    from compiler.training import distill as distill_module

    def out_of_memory(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(distill_module, "_sub_batch_backward", out_of_memory)
    teacher = tiny_bert(layers=1)
    student = copy.deepcopy(teacher)
    with pytest.raises(CompilerError, match="ran out of GPU memory") as err:
        distill(student, teacher, tokens, BERT_INPUTS, TrainSettings(steps=2, lr=1e-3, batch_size=4, device="cpu"))
    assert "--train-device cpu" in str(err.value) and "Tried to allocate 2.00 GiB" in str(err.value)
    assert all(p.device.type == "cpu" for p in student.parameters())


def test_train_device_errors_and_cache_keys(tokens):
    """A CUDA device PyTorch cannot see fails before any step, with the fix, the models untouched
    and on the CPU; `auto` falls back to the CPU; the device never changes a cache key."""
    with pytest.raises(ValueError, match="cuda:N"):
        TrainSettings(device="gpu")
    assert train_device("cpu").type == "cpu"
    assert train_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    past_last = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    with pytest.raises(CompilerError, match="--train-device cpu") as err:
        train_device(past_last)
    assert repr(past_last) in str(err.value) and "CUDA GPU(s)" in str(err.value)
    teacher = tiny_bert(layers=1)
    student = copy.deepcopy(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(CompilerError, match="--train-device cpu"):
        distill(student, teacher, tokens, BERT_INPUTS, TrainSettings(steps=2, lr=1e-3, batch_size=4, device=past_last))
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].device.type == "cpu" for k in before)
    assert settings_hash(TrainSettings()) == settings_hash(TrainSettings(device=past_last))
    assert settings_hash(TrainSettings()) != settings_hash(TrainSettings(lr=2e-5))
    # the teacher cache's budget is cost, not result; bf16 counts only when set, so the keys of
    # caches made before the knob existed stay valid
    assert settings_hash(TrainSettings()) == settings_hash(TrainSettings(teacher_cache_mib=0))
    assert settings_hash(TrainSettings()) != settings_hash(TrainSettings(bf16=True))
    old, new = (dataclasses.make_dataclass("S", fields) for fields in (
        [("lr", float, 1e-3)],
        [("lr", float, 1e-3), ("knob", bool, dataclasses.field(default=False, metadata={"hash": "if-set"}))]))
    assert settings_hash(old()) == settings_hash(new()) != settings_hash(new(knob=True))
