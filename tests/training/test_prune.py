"""2:4 pruning in PyTorch (`compiler.training.prune`): layer choice, pruning, Wanda, masks, recovery.

Tiny random BERT / GPT-2 (hidden 32, 2 layers) and real WikiText-2 text, all CPU. The ONNX side
(the pattern check of the exported graphs) is tests/graph/test_sparsity.py.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from compiler.errors import SettingsError
from compiler.settings import SparsitySettings, TrainSettings
from compiler.training.distill import distill
from compiler.training.prune import (SparsityPruneReport, block_linears, hold_masks, input_axis, input_norms,
                                     is_linear, magnitude_mask_2_4, prune_2_4, recover)
from tests.models import pruned_tiny_bert, BERT_INPUTS, TINY_LAYERS, tiny_bert, tiny_gpt2, training_tokens

S24 = SparsitySettings(pattern="2:4", method="magnitude")


def groups_along(w: np.ndarray, axis: int) -> np.ndarray:
    """Zeros per group of 4 consecutive values along `axis`: (..., K/4)."""
    moved = np.moveaxis(w, axis, -1)
    return (moved.reshape(*moved.shape[:-1], -1, 4) == 0).sum(-1)


@pytest.fixture(scope="module")
def pruned_bert():
    return pruned_tiny_bert()


# --------------------------------------------------------------------------------------------
# Linear layers and their axes


def test_is_linear_and_input_axis():
    class Conv1DLookalike(torch.nn.Module):
        pass

    Conv1DLookalike.__name__ = "Conv1D"  # the name alone does not make a linear layer
    assert is_linear(torch.nn.Linear(4, 2)) and is_linear(Conv1D(2, 4))
    assert not is_linear(Conv1DLookalike()) and not is_linear(torch.nn.Embedding(4, 2)) and not is_linear(None)
    # nn.Linear weight (out 2, in 4): in is axis 1; Conv1D(nf=2, nx=4) weight (in 4, out 2): axis 0
    assert input_axis(torch.nn.Linear(4, 2)) == 1 and torch.nn.Linear(4, 2).weight.shape[1] == 4
    assert input_axis(Conv1D(2, 4)) == 0 and Conv1D(2, 4).weight.shape[0] == 4


def test_magnitude_mask_by_hand():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.2, -4.0, 3.0, 0.0, -1.0]])  # two groups along axis 1
    mask = magnitude_mask_2_4(w, 1)
    assert mask.tolist() == [[False, True, True, False, True, True, False, False]]
    assert magnitude_mask_2_4(w.T, 0).T.tolist() == mask.tolist()  # the same groups along axis 0
    ties = magnitude_mask_2_4(torch.tensor([[3.0, -3.0, 3.0, 1.0]]), 1)[0]
    assert ties.sum() == 2 and not ties[3]  # two of the three equal |w|, never the smaller one


def test_block_linears_default_patterns_and_errors():
    model = tiny_bert()
    names = list(block_linears(model))
    per_layer = ["attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense"]
    assert names == [f"encoder.layer.{i}.{n}" for i in range(TINY_LAYERS) for n in per_layer]  # no pooler
    picked = block_linears(model, ("encoder.layer.0.*dense",))
    assert list(picked) == ["encoder.layer.0.attention.output.dense", "encoder.layer.0.intermediate.dense",
                            "encoder.layer.0.output.dense"]
    assert list(block_linears(model, ("pooler.*",))) == ["pooler.dense"]  # patterns override the default
    with pytest.raises(SettingsError, match="--sparse-layers decoder.\\*: matches no linear layer"):  # was exit 3
        block_linears(model, ("decoder.*",))
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        block_linears(torch.nn.Sequential(torch.nn.Linear(8, 8)))
    with pytest.raises(ValueError, match="pattern='2:4'"):
        prune_2_4(model, SparsitySettings())


# --------------------------------------------------------------------------------------------
# Pruning


def test_prune_bert_2_of_4_along_input_dim(pruned_bert):
    dense, module, masks, report = pruned_bert
    assert report.pruned == list(block_linears(module)) == list(masks) and report.skipped == {}
    assert report.zero_fraction == pytest.approx(0.5)
    before = dict(dense.named_modules())
    for name, m in block_linears(module).items():
        w, w0, mask = m.weight.detach().numpy(), before[name].weight.detach().numpy(), masks[name].numpy()
        assert mask.dtype == bool and mask.shape == w.shape == (m.out_features, m.in_features)
        assert (groups_along(w, 1) >= 2).all()  # groups of 4 along `in` (dim 1 of (out, in))
        assert (groups_along(mask.astype(np.float32), 1) == 2).all()  # exactly 2 kept per group
        np.testing.assert_array_equal(w[mask], w0[mask])  # kept weights unchanged ...
        groups, keep = np.abs(w0).reshape(w.shape[0], -1, 4), mask.reshape(w.shape[0], -1, 4)
        kept, dropped = np.where(keep, groups, np.inf), np.where(keep, -1.0, groups)
        assert (kept.min(-1) >= dropped.max(-1)).all()  # ... and they are the 2 largest |w|
        np.testing.assert_array_equal(m.bias.detach().numpy(), before[name].bias.detach().numpy())
    for name in ("embeddings.word_embeddings", "embeddings.position_embeddings", "pooler.dense"):
        np.testing.assert_array_equal(module.get_submodule(name).weight.detach().numpy(),
                                      before[name].weight.detach().numpy())


def test_prune_gpt2_conv1d_along_dim_0():
    model = tiny_gpt2()
    wte = model.wte.weight.detach().clone()
    masks, report = prune_2_4(model, S24)
    assert report.pruned == [f"h.{i}.{n}" for i in range(TINY_LAYERS)
                             for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    for name in report.pruned:
        m = model.get_submodule(name)
        assert isinstance(m, Conv1D)
        w = m.weight.detach().numpy()  # (in, out)
        assert masks[name].shape == w.shape == (m.nx, m.nf)
        assert (groups_along(w, 0) >= 2).all()  # along `in` = dim 0
        assert not (groups_along(w, 1) >= 2).all()  # not along the output dim
    assert torch.equal(model.wte.weight, wte)


def test_layer_with_input_not_multiple_of_4_is_skipped_with_reason():
    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 8))])
            self.head = torch.nn.Linear(8, 3)

    toy = Toy()
    head = toy.head.weight.detach().clone()
    masks, report = prune_2_4(toy, S24)
    assert report.pruned == ["blocks.0.0"] and list(masks) == ["blocks.0.0"]
    assert report.skipped == {"blocks.0.1": "input dimension 6 is not a multiple of 4"}
    assert torch.equal(toy.head.weight, head) and (toy.blocks[0][1].weight != 0).all()
    # the report goes to sparsity_report.json and is read back from it (the pipeline's reuse path)
    again = SparsityPruneReport(**json.loads(json.dumps(report.to_dict())))
    assert again == report
    assert again.zero_fraction == pytest.approx(0.5)  # 8 x 8 weights, 2 of every 4 zero
    with pytest.raises(ValueError, match="no layer could be pruned"):
        prune_2_4(toy, SparsitySettings(pattern="2:4", method="magnitude", layers=("blocks.0.1",)))


# --------------------------------------------------------------------------------------------
# Wanda


def test_wanda_scores_weights_by_input_norm():
    """Wanda keeps a small weight on a loud input over a larger one on a quiet input; magnitude
    does the opposite (one input feature of a real layer made loud, its weights made small)."""
    tokens = training_tokens(8, skip=0)
    dense = tiny_bert()
    name = "encoder.layer.0.intermediate.dense"  # its input is the attention block's LayerNorm output
    ln = dense.get_submodule("encoder.layer.0.attention.output.LayerNorm")
    with torch.no_grad():  # input feature 0 of `name` 10^4 x louder, its weights 100x smaller
        ln.weight[0] *= 1e4
        ln.bias[0] *= 1e4
        dense.get_submodule(name).weight[:, 0] /= 100.0
    with pytest.raises(ValueError, match="wanda"):
        prune_2_4(copy.deepcopy(dense), SparsitySettings(pattern="2:4", method="wanda"))
    mag, _ = prune_2_4(copy.deepcopy(dense), S24)
    wanda, report = prune_2_4(copy.deepcopy(dense), SparsitySettings(pattern="2:4", method="wanda"),
                              tokens, BERT_INPUTS)
    assert report.method == "wanda" and report.zero_fraction == 0.5
    assert not mag[name][:, 0].any()  # weights / 100: magnitude drops every one of them
    # but |w| x ||x|| is ~100x the others': Wanda keeps them (all but a weight that is itself ~0)
    assert wanda[name][:, 0].float().mean() > 0.9
    for mask in wanda.values():  # still exactly 2 of every 4 along the input axis
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()


def test_input_norms_leave_out_padding():
    from calibration import load_texts, tokenized_set
    from compiler.settings import DataSettings
    from tests.models import minilm_tokenizer

    texts = load_texts(DataSettings(), count=4)
    model = tiny_bert()
    name = "encoder.layer.0.attention.self.query"
    layer = {name: model.get_submodule(name)}
    together = input_norms(model, layer, tokenized_set(texts, minilm_tokenizer(), 64, None), BERT_INPUTS, batch_size=4)
    alone = [input_norms(model, layer, tokenized_set([t], minilm_tokenizer(), 64, None), BERT_INPUTS, batch_size=1)
             for t in texts]
    summed = sum(a[name] ** 2 for a in alone).sqrt()
    # padded batch == samples one by one (no padding): padded positions are not counted
    torch.testing.assert_close(together[name], summed, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Masks held during recovery


def output_mse(student, teacher, tokens) -> float:
    """MSE of last_hidden_state at valid tokens over all of `tokens` (eval mode, one batch)."""
    feeds, _ = next(tokens.batches(len(tokens), BERT_INPUTS))
    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    with torch.no_grad():
        a, b = student(**inputs).last_hidden_state, teacher(**inputs).last_hidden_state
    return float((((a - b) ** 2) * mask).sum() / (mask.sum() * a.shape[-1]))


def test_hold_masks_zeroes_pruned_weights_and_checks_shapes(pruned_bert):
    _dense, module, masks, _report = pruned_bert
    model = copy.deepcopy(module)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # every pruned weight now 1.0
    hold_masks(masks, model)(model)
    for name, mask in masks.items():
        w = model.get_submodule(name).weight.detach()
        assert not w[~mask].any() and (w[mask] != 0).all()
    with pytest.raises(ValueError, match="shape"):
        hold_masks({"pooler.dense": torch.ones(3, 3, dtype=torch.bool)}, model)
    with pytest.raises(ValueError, match="no such submodule"):
        hold_masks({"encoder.nothing": torch.ones(3, 3, dtype=torch.bool)}, model)


def test_recover_holds_masks_and_lowers_error():
    # Weights 10x the default init so that pruning costs something measurable; no dropout so
    # that the training loss measures the pruning error alone.
    teacher = tiny_bert(initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    student, free = copy.deepcopy(teacher), copy.deepcopy(teacher)
    masks, _ = prune_2_4(student, S24)
    pruned = {n: student.get_submodule(n).weight.detach().clone() for n in masks}
    all_tokens = training_tokens(24)
    tokens, heldout = (type(all_tokens)(all_tokens.input_ids[s], all_tokens.token_type_ids[s], all_tokens.pad_id, k)
                       for s, k in ((slice(0, 16), "train"), (slice(16, 24), "heldout")))
    before = output_mse(student, teacher, heldout)
    train = TrainSettings(steps=999, lr=1e-3, batch_size=4)
    report = recover(student, teacher, masks, tokens, BERT_INPUTS, train, steps=4)
    assert report.steps == 4 and len(report.losses) == 4 and report.loss_last < report.loss_first
    assert output_mse(student, teacher, heldout) < 0.7 * before  # recovery works on unseen text
    for name, mask in masks.items():
        w = student.get_submodule(name).weight.detach()
        assert not w[~mask].any()  # the pattern held
        assert not torch.equal(w, pruned[name])  # and the kept weights were trained
    # the same loop without hold_masks loses the pattern: the masks are what keeps it
    masks, _ = prune_2_4(free, S24)
    distill(free, teacher, tokens, BERT_INPUTS, TrainSettings(steps=1, lr=1e-3, batch_size=4))
    assert any(free.get_submodule(n).weight.detach()[~m].any() for n, m in masks.items())
    frozen = copy.deepcopy(teacher).requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        recover(frozen, teacher, masks, tokens, BERT_INPUTS, train, steps=1)


@pytest.mark.parametrize("family", ["bert", "gpt2-lm"])
def test_recover_can_hold_the_embedding_table(family):
    # SparsitySettings.recover_embeddings=False: the token-embedding table (and an LM head tied to
    # it) keeps its weights; the blocks train; requires_grad is restored on return.
    from transformers import GPT2LMHeadModel

    if family == "bert":
        teacher, inputs = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), BERT_INPUTS
    else:
        torch.manual_seed(0)
        teacher, inputs = GPT2LMHeadModel(tiny_gpt2().config).eval(), ["input_ids", "attention_mask"]
    for train_embeddings in (False, True):
        student = copy.deepcopy(teacher)
        masks, _ = prune_2_4(student, S24)
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        recover(student, teacher, masks, training_tokens(16), inputs, TrainSettings(lr=1e-3, batch_size=4),
                steps=2, train_embeddings=train_embeddings)
        changed = {n for n, p in student.named_parameters() if not torch.equal(p.detach(), before[n])}
        table = next(n for n, p in student.named_parameters() if p is student.get_input_embeddings().weight)
        assert (table in changed) is train_embeddings, (table, train_embeddings)
        assert len(changed) > 4 and all(p.requires_grad for p in student.parameters())
        if family == "gpt2-lm":  # the LM head is the tied table itself
            assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
