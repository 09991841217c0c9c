"""The 2:4 pattern check of ONNX graphs (`compiler.graph.sparsity`): exports of pruned tiny models,
FP16 and Q/DQ rewrites, hand-made graphs, and `require_2_4`'s errors.

Tiny random BERT / GPT-2 (hidden 32, 2 layers) pruned in PyTorch and exported once per module;
MAC counts worked out by hand. All CPU.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration import load_texts
from compiler.errors import CompilerError
from compiler.graph.sparsity import check_2_4, groups_check, require_2_4
from compiler.passes.precision import convert_precision
from compiler.passes.qdq import calibration_tensors, insert_qdq
from compiler.settings import DataSettings, ExportSettings, PrecisionSettings, QuantSettings, SparsitySettings
from compiler.training.export import onnx_from_torch
from compiler.training.prune import block_linears, prune_2_4
from tests.models import pruned_tiny_bert, TINY_HIDDEN, TINY_LAYERS, f32, make_model, tiny_gpt2, tiny_loaded

S24 = SparsitySettings(pattern="2:4", method="magnitude")
SEQ = 128  # check_2_4's default mac_shape (1, 128)


def export(module, name: str, directory, opset: int = 17):
    texts = load_texts(DataSettings(samples=4), count=4)
    path, _ = onnx_from_torch(tiny_loaded(module, name), ExportSettings(opset=opset, parity_sequences=(8, 33)),
                              directory / "model.onnx", texts)
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def pruned_bert():
    return pruned_tiny_bert()


@pytest.fixture(scope="module")
def exports(tmp_path_factory, pruned_bert):
    """(dense FP32 ONNX, pruned FP32 ONNX), both opset 19 (Q/DQ needs it), parity-checked."""
    dense, module, _masks, _report = pruned_bert
    return tuple(export(m, f"graph-sparsity-bert-{name}-v1", tmp_path_factory.mktemp(name), opset=19)
                 for name, m in (("dense", dense), ("pruned", module)))


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory):
    """(pruned tiny GPT-2, prune report, check_2_4 of its export)."""
    model = tiny_gpt2()
    _masks, report = prune_2_4(model, S24)
    return model, report, check_2_4(export(model, "graph-sparsity-gpt2-pruned-v1", tmp_path_factory.mktemp("gpt2")))


# --------------------------------------------------------------------------------------------
# groups_check by hand


def test_groups_check_by_hand():
    w = np.array([[0, 1, 0, 2, 0, 0, 3, 4],
                  [5, 0, 0, 6, 7, 8, 9, 0]], np.float32)  # along axis 1: groups (2, 2) zeros, (2, 1) zeros
    assert groups_check(w, 1) == ("1 of 4 groups have fewer than 2 zeros; first at index (1, 4) "
                                  "(the group of 4 along axis 1 starting there)")
    w[1, 7] = w[1, 4] = 0
    assert groups_check(w, 1) == ""
    assert groups_check(w.T.copy(), 0) == ""  # the same groups along axis 0 of the transpose
    assert groups_check(np.zeros((6, 2)), 0) == "K=6 not a multiple of 4"
    assert groups_check(np.array([[1, 2, 3, 4]], np.int8), 1).startswith("1 of 1 groups")  # INT8 too


# --------------------------------------------------------------------------------------------
# Exports of pruned models


def test_pruned_export_eligible_with_block_linear_mac_share(exports, pruned_bert):
    dense_onnx, pruned_onnx = exports
    _dense, module, _masks, report = pruned_bert
    check = check_2_4(pruned_onnx)
    by_module = {g.module: g for g in check.gemms}
    assert {g.module for g in check.gemms if g.eligible} == set(report.pruned)
    assert not by_module["pooler.dense"].eligible and check.ineligible == 1
    assert check.activation_matmuls == 2 * TINY_LAYERS and check.has_eligible
    # MatMul weights are exported transposed, (in, out): K is axis 0
    assert all(by_module[n].axis == 0 and by_module[n].shape == [m.in_features, m.out_features]
               for n, m in block_linears(module).items())
    # independent MAC count at (batch 1, sequence 128): linear S*in*out, pooler H*H, attention 2*S*S*H per layer
    linear = SEQ * sum(m.in_features * m.out_features for m in block_linears(module).values())
    total = linear + TINY_HIDDEN * TINY_HIDDEN + TINY_LAYERS * 2 * SEQ * SEQ * TINY_HIDDEN
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


def test_gpt2_conv1d_export_eligible_with_mac_share(gpt2_export):
    model, report, check = gpt2_export
    # exported as Gemm(x, W[in, out]) (transB=0): K is axis 0 of the initializer
    assert [(g.module, g.eligible, g.axis) for g in check.gemms] == [(n, True, 0) for n in report.pruned]
    assert check.activation_matmuls == 2 * TINY_LAYERS
    linear = SEQ * sum(model.get_submodule(n).nx * model.get_submodule(n).nf for n in report.pruned)
    assert check.eligible_macs == linear
    assert check.total_macs == linear + TINY_LAYERS * 2 * SEQ * SEQ * TINY_HIDDEN


def test_fp16_conversion_keeps_pattern(exports, pruned_bert):
    fp16, _ = convert_precision(exports[1], PrecisionSettings(mode="fp16"))
    inits = {t.name: t.data_type for t in fp16.graph.initializer}
    check = check_2_4(fp16)
    eligible = [g for g in check.gemms if g.eligible]
    assert {g.module for g in eligible} == set(pruned_bert[3].pruned)
    assert all(inits[g.weight] == TensorProto.FLOAT16 for g in eligible)


def test_qdq_keeps_pattern_on_int8_weights(exports, pruned_bert):
    model = exports[1]
    qdq, _ = insert_qdq(model, {t: 1.0 for t in calibration_tensors(model)}, QuantSettings())
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
    assert msg.count("\n  ") == 1  # only the altered GEMM is named
    # the fix names functions that exist and the CLI flag
    from compiler.training import distill, prune

    for module, name in ((prune, "prune_2_4"), (prune, "recover"), (prune, "hold_masks"), (distill, "distill")):
        assert f"{module.__name__}.{name}" in msg and callable(getattr(module, name))
    assert "--sparsity 2:4" in msg


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
