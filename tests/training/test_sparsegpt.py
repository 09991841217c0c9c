"""SparseGPT 2:4 pruning (`compiler.training.sparsegpt`, `prune_2_4(method="sparsegpt")`).

One layer on correlated inputs (the OBS prune against magnitude and Wanda on the same 2:4
budget), its special cases (identity / diagonal Hessian), and tiny random BERT / GPT-2 on real
WikiText-2 text, all CPU, seconds.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

from compiler.settings import SparsitySettings
from compiler.training.prune import input_axis, magnitude_mask_2_4, prune_2_4
from compiler.training.sparsegpt import (forward_all, inverse_hessian_factor, layer_stages, obs_prune_2_4, output_error,
                                         sparsegpt_2_4, stage_hessian)
from tests.models import BERT_INPUTS, TINY_LAYERS, tiny_bert, tiny_gpt2, training_tokens

GPT2_INPUTS = ["input_ids", "attention_mask"]


def exactly_2_of_4(mask: torch.Tensor, axis: int) -> bool:
    moved = mask.movedim(axis, -1)
    return bool((moved.reshape(*moved.shape[:-1], -1, 4).sum(-1) == 2).all())


def correlated_inputs(tokens: int = 512, features: int = 64, seed: int = 0) -> torch.Tensor:
    """(tokens, features) inputs with unequal scales and correlated features, like activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features ** 0.5 + torch.eye(features)
    scales = torch.exp(torch.randn(features, generator=g))
    return (torch.randn(tokens, features, generator=g) @ mix) * scales


@pytest.fixture(scope="module")
def calib():
    return training_tokens(12, max_length=24)


@pytest.fixture(scope="module")
def dense_models():
    """{family: (dense tiny model, its inputs)}; tests prune copies. BERT's initializer range is
    raised (0.02 -> 0.1) so that pruning moves its output measurably."""
    return {"bert": (tiny_bert(initializer_range=0.1), BERT_INPUTS), "gpt2": (tiny_gpt2(), GPT2_INPUTS)}


# --------------------------------------------------------------------------------------------
# One layer


def test_obs_prune_is_2_4_and_reconstructs_better_than_magnitude_and_wanda():
    x = correlated_inputs()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    new, keep = obs_prune_2_4(w, x.T.double() @ x.double(), blocksize=16)
    assert keep.dtype == torch.bool and exactly_2_of_4(keep, 1)
    assert bool((new[~keep] == 0).all()) and bool((new[keep] != 0).all()) and new.dtype == w.dtype
    assert not torch.equal(new[keep], w[keep])  # the kept weights were updated
    wanda = w * magnitude_mask_2_4(w.abs() * x.norm(dim=0)[None, :], 1)
    magnitude = w * magnitude_mask_2_4(w, 1)
    err = {name: output_error(x, w, v) for name, v in
           {"sparsegpt": new, "wanda": wanda, "magnitude": magnitude}.items()}
    assert err["sparsegpt"] < 0.9 * err["wanda"] and err["wanda"] < err["magnitude"], err
    # on held-out inputs of the same distribution too (not only the calibration ones)
    y = correlated_inputs(tokens=1024)[512:]  # the same mixing and scales, other tokens
    assert output_error(y, w, new) < output_error(y, w, wanda)


def test_identity_hessian_is_magnitude_and_diagonal_hessian_is_wanda():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    new, keep = obs_prune_2_4(w, torch.eye(32))
    assert torch.equal(keep, magnitude_mask_2_4(w, 1))
    assert torch.allclose(new, w * keep)  # no correlation between inputs: nothing to compensate
    norms = torch.exp(torch.randn(32, generator=torch.Generator().manual_seed(3)))
    new, keep = obs_prune_2_4(w, torch.diag(norms ** 2), percdamp=1e-9)
    assert torch.equal(keep, magnitude_mask_2_4(w.abs() * norms[None, :], 1))  # Wanda's score
    assert torch.allclose(new, w * keep)


def test_obs_prune_rejects_bad_shapes_and_handles_dead_inputs():
    with pytest.raises(ValueError, match="multiple of 4|Hessian"):
        obs_prune_2_4(torch.ones(2, 6), torch.eye(6))
    with pytest.raises(ValueError, match="Hessian"):
        obs_prune_2_4(torch.ones(2, 8), torch.eye(4))
    with pytest.raises(ValueError, match="square"):
        inverse_hessian_factor(torch.ones(4))
    h = torch.eye(8)
    h[3, 3] = 0.0  # an input that is never non-zero: still a valid factor, still 2:4
    u = inverse_hessian_factor(h)
    assert torch.allclose(u.T @ u @ (h + torch.diag((h.diagonal() == 0).double()) + 0.01 * torch.eye(8)).double(),
                          torch.eye(8, dtype=torch.float64), atol=1e-9)
    _, keep = obs_prune_2_4(torch.randn(4, 8), h)
    assert exactly_2_of_4(keep, 1)


# --------------------------------------------------------------------------------------------
# Whole models


def test_stages_follow_execution_and_share_qkv(calib, dense_models):
    model = dense_models["bert"][0]
    from compiler.training.prune import block_linears

    stages = layer_stages(model, block_linears(model), calib, BERT_INPUTS)
    per_layer = [["attention.self.query", "attention.self.key", "attention.self.value"],
                 ["attention.output.dense"], ["intermediate.dense"], ["output.dense"]]
    assert [names for names, _ in stages] == [[f"encoder.layer.{i}.{n}" for n in group]
                                              for i in range(TINY_LAYERS) for group in per_layer]
    assert all(stop for _, stop in stages)


def test_hessian_counts_valid_tokens_only(calib, dense_models):
    model = dense_models["bert"][0]
    layer = model.encoder.layer[1].intermediate.dense
    h, count = stage_hessian(layer, functools.partial(forward_all, model, calib, BERT_INPUTS, 4), stop=True)
    assert count == sum(len(ids) for ids in calib.input_ids)  # padding left out
    assert h.shape == (32, 32) and h.dtype == torch.float64 and torch.allclose(h, h.T)
    h1, _ = stage_hessian(layer, functools.partial(forward_all, model, calib, BERT_INPUTS, 12), stop=False)
    assert torch.allclose(h, h1, rtol=1e-4, atol=1e-5 * float(h.abs().max()))  # batching, early stop: no change


def hidden_cosine(dense, pruned, tokens, names) -> float:
    out = []
    with torch.no_grad():
        for feeds, _ in tokens.batches(4, names):
            inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
            mask = inputs["attention_mask"].bool()
            a, b = dense(**inputs).last_hidden_state[mask], pruned(**inputs).last_hidden_state[mask]
            out.append(torch.nn.functional.cosine_similarity(a, b, dim=-1))
    return float(torch.cat(out).mean())


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_prune_2_4_sparsegpt_on_tiny_models(family, calib, dense_models):
    dense, names = dense_models[family]
    results = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        model = copy.deepcopy(dense)
        masks, report = prune_2_4(model, SparsitySettings(pattern="2:4", method=method), calib, names)
        results[method] = (model, masks, report)
    model, masks, report = results["sparsegpt"]
    assert report.method == "sparsegpt" and report.zero_fraction == pytest.approx(0.5, abs=1e-3)
    assert list(masks) == list(results["wanda"][1])  # module order, the same layers
    for name, mask in masks.items():
        m = model.get_submodule(name)
        assert exactly_2_of_4(mask, input_axis(m)) and bool((m.weight.detach()[~mask] == 0).all())
    held_out = training_tokens(16, max_length=24, skip=400)  # not the calibration samples
    cos = {k: hidden_cosine(dense, v[0], held_out, names) for k, v in results.items()}
    assert cos["sparsegpt"] > cos["wanda"] and cos["sparsegpt"] > cos["magnitude"], cos


def test_sparsegpt_needs_tokens_and_calls_every_layer(calib, dense_models):
    model = copy.deepcopy(dense_models["bert"][0])
    with pytest.raises(ValueError, match="sparsegpt"):
        prune_2_4(model, SparsitySettings(pattern="2:4", method="sparsegpt"))
    with pytest.raises(ValueError, match="never calls"):  # BertModel never calls an unregistered layer
        sparsegpt_2_4(model, {"stray": torch.nn.Linear(32, 32)}, {"stray": 1}, calib, BERT_INPUTS)
    assert np.isfinite(sum(p.sum().item() for p in model.parameters()))


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_block_passes_equal_whole_model_passes(family, calib, dense_models, monkeypatch):
    """Running one block on its recorded inputs gives what running the whole model gives."""
    from compiler.training import sparsegpt
    from compiler.training.prune import block_linears

    dense, names = dense_models[family]
    layers = block_linears(dense)
    assert sparsegpt.chained_blocks(dense, layers, calib, names) is not None
    results = []
    for chained in (True, False):
        model = copy.deepcopy(dense)
        if not chained:
            monkeypatch.setattr(sparsegpt, "chained_blocks", lambda *a: None)
        chosen = block_linears(model)
        masks = sparsegpt_2_4(model, chosen, {n: input_axis(m) for n, m in chosen.items()}, calib, names)
        results.append((masks, {n: m.weight.detach().clone() for n, m in chosen.items()}))
    (m1, w1), (m2, w2) = results
    assert list(m1) == list(m2) and all(torch.equal(m1[n], m2[n]) for n in m1)
    assert all(torch.allclose(w1[n], w2[n], atol=1e-6) for n in w1)
