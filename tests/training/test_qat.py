"""Quantization-aware training (`compiler.training.qat`): fake quantization against a hand-computed
quantize-dequantize, LSQ scale gradients, placement errors, insertion and removal of the wrappers.

Reference: symmetric INT8 with zero point 0, q = clamp(round_half_even(x / scale), -128, 127),
x' = q * scale (ONNX QuantizeLinear / DequantizeLinear); activations per tensor with
scale = threshold / 127, weights per output channel with scale = absmax / 127. Tiny layers and a
tiny random BERT (hidden 32, 2 layers), all CPU.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from onnx import helper, numpy_helper
from transformers.pytorch_utils import Conv1D

from compiler.settings import TrainSettings
from compiler.training.qat import (QMAX, FakeQuantLinear, insert_fake_quant, linear_placement, qat_model,
                                   remove_fake_quant, smoothing_factors)
from tests.models import BERT_INPUTS, tiny_bert, training_tokens


def qdq(x: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    """The reference quantize-dequantize: np.round rounds half to even, as QuantizeLinear does."""
    return np.clip(np.round(x / scale), -128, 127) * scale


def linear_with(weight: np.ndarray, bias: np.ndarray | None = None) -> torch.nn.Linear:
    out_f, in_f = weight.shape
    layer = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.zeros(out_f) if bias is None else torch.from_numpy(bias))
    return layer


def scale_param(threshold: float) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor([threshold / QMAX], dtype=torch.float32))


# --------------------------------------------------------------------------------------------
# Fake quantization against hand-computed values


def test_activation_fake_quant_per_tensor_matches_hand_values():
    """Scale 2^-4 (threshold 127 x 2^-4): halves round to even, the ends saturate at -128 / 127."""
    x = np.array([[0.15625, 0.21875, -0.15625, 100.0, -100.0, 0.09375, -0.03125, 0.1]], np.float32)
    # x / scale = 2.5, 3.5, -2.5, 1600, -1600, 1.5, -0.5, 1.6 -> q = 2, 4, -2, 127, -128, 2, -0, 2
    by_hand = np.array([[0.125, 0.25, -0.125, 7.9375, -8.0, 0.125, 0.0, 0.125]], np.float32)
    np.testing.assert_array_equal(qdq(x, 2.0**-4), by_hand)  # the reference agrees with the hand values
    fq = FakeQuantLinear(linear_with(np.eye(8, dtype=np.float32)), scale_param(127 * 2.0**-4))
    with torch.no_grad():
        y = fq(torch.from_numpy(x)).numpy()
    # identity weight: per-channel scale 1/127, q = 127, dequantized back to 1 (to FP32 rounding)
    np.testing.assert_allclose(y, by_hand, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_weight_fake_quant_per_output_channel_matches_hand_values(kind):
    """Identity input (exact at scale 2^-6) reads the fake-quantized weight back: per output
    channel scale = absmax / 127, not one scale per tensor (the rows differ 1000x in size)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 8)).astype(np.float32) * np.array([[1.0], [1e-3], [30.0]], np.float32)  # (out, in)
    bias = np.array([0.5, -1.0, 2.0], np.float32)
    scale = np.abs(w).max(axis=1, keepdims=True) / 127  # (out, 1)
    by_hand = qdq(w, scale)
    assert np.abs(by_hand).max(axis=1) == pytest.approx(np.abs(w).max(axis=1), rel=1e-6)  # absmax -> +-127
    assert not np.allclose(by_hand, qdq(w, np.abs(w).max() / 127), atol=1e-6)  # per tensor would differ
    if kind == "linear":
        layer = linear_with(w, bias)
    else:  # GPT-2's Conv1D holds (in, out): the output channel is axis 1
        layer = Conv1D(3, 8)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w.T.copy()))
            layer.bias.copy_(torch.from_numpy(bias))
    fq = FakeQuantLinear(layer, scale_param(127 * 2.0**-6))
    with torch.no_grad():
        y = fq(torch.eye(8)).numpy()  # (in, out) = Wq^T + b
    np.testing.assert_allclose(y - bias, by_hand.T, rtol=1e-5, atol=1e-7)


def test_fake_quant_computes_in_fp32_under_bf16_autocast():
    fq = FakeQuantLinear(torch.nn.Linear(8, 4), torch.nn.Parameter(torch.tensor([0.05])))
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fq(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, fq(x))


# --------------------------------------------------------------------------------------------
# Scale learning (LSQ)


def test_lsq_gradient_reaches_the_activation_scale():
    """d loss / d scale by LSQ (Esser et al. 2020, eq. 3): round(x/s) - x/s inside the range,
    -128 / 127 where x saturates, times the upstream gradient, times 1 / sqrt(numel x 127)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 3)
    s = 0.02
    act = scale_param(s * QMAX)
    fq = FakeQuantLinear(layer, act)
    x = torch.randn(2, 5, 8) * 2.0  # |x| up to ~6: many values saturate at 127 x 0.02 = 2.54
    g = torch.randn(2, 5, 3)
    (fq(x) * g).sum().backward()
    assert act.grad is not None and act.grad.shape == (1,)
    xs = x.numpy().astype(np.float64) / float(act.detach())
    q = np.round(xs)
    d_scale = np.where(q > 127, 127.0, np.where(q < -128, -128.0, q - xs))  # d xq / d s
    w = layer.weight.detach().numpy()
    wq = qdq(w, np.abs(w).max(axis=1, keepdims=True) / 127)
    upstream = g.numpy() @ wq  # d loss / d xq, (2, 5, 8)
    expected = (upstream * d_scale).sum() / np.sqrt(x.numel() * QMAX)
    assert float(act.grad) == pytest.approx(expected, rel=1e-4)
    assert (np.abs(q) > 127).any() and (np.abs(q) <= 127).any()  # both branches were exercised


def test_optimizer_steps_on_a_tiny_linear_reduce_the_distillation_loss():
    """Fake-quantized student, FP32 teacher: AdamW on the weights and the scale lowers the MSE, and
    the scale moves away from a threshold that clips most of the input."""
    torch.manual_seed(0)
    teacher = torch.nn.Linear(16, 8)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.weight.add_(0.05 * torch.randn_like(student.weight))
    act = scale_param(0.3)  # the inputs are N(0, 1): a threshold of 0.3 clips most of them
    fq = FakeQuantLinear(student, act)
    opt = torch.optim.AdamW([{"params": student.parameters(), "lr": 1e-2}, {"params": [act], "lr": 1e-2}],
                            weight_decay=0.0)
    x = torch.randn(64, 16)
    with torch.no_grad():
        target = teacher(x)
    losses = []
    for _ in range(30):
        loss = ((fq(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]
    assert float(act.detach()) * QMAX > 2 * 0.3  # the learned threshold grew out of the clipping


# --------------------------------------------------------------------------------------------
# Placement


def onnx_nodes(*specs: tuple[str, str, str]):
    """A graph holding only nodes (op type, name, input tensor): what `linear_placement` reads."""
    nodes = [helper.make_node(op, [tensor, "W"], [f"{name}_out"], name=name) for op, name, tensor in specs]
    return helper.make_model(helper.make_graph(nodes, "names", [], []))


LAYER0 = "/model/encoder/layer.0"
QKV_INPUT = "/model/embeddings/LayerNorm/output_0"
QKV = [("MatMul", f"{LAYER0}/attention/self/{p}/MatMul", QKV_INPUT) for p in ("query", "key", "value")]
FFN = ("MatMul", f"{LAYER0}/intermediate/dense/MatMul", "/model/encoder/layer.0/attention/output/LayerNorm/output_0")


def test_linear_placement_maps_nodes_to_linear_modules():
    model = tiny_bert()
    graph = onnx_nodes(*QKV, FFN, ("MatMul", f"{LAYER0}/attention/self/MatMul", "q"))  # the bmm: not quantized
    placement = linear_placement(graph, [n for _, n, _ in (*QKV, FFN)], model)
    assert placement == {"encoder.layer.0.attention.self.query": (QKV[0][1], QKV_INPUT),
                         "encoder.layer.0.attention.self.key": (QKV[1][1], QKV_INPUT),
                         "encoder.layer.0.attention.self.value": (QKV[2][1], QKV_INPUT),
                         "encoder.layer.0.intermediate.dense": (FFN[1], FFN[2])}


def test_a_quantized_layer_outside_the_model_is_left_to_ptq():
    """A sentence-transformers Dense head sits in the export wrapper, outside the model QAT
    fine-tunes: it is not fake-quantized (it keeps PTQ's scale); was a refusal naming int8."""
    dense = "/dense.0/dense.0.0/Gemm"
    placement = linear_placement(onnx_nodes(*QKV, ("Gemm", dense, "/Div_output_0")), [QKV[0][1], dense], tiny_bert())
    assert placement == {"encoder.layer.0.attention.self.query": (QKV[0][1], QKV_INPUT)}


def test_linear_placement_errors_name_the_node():
    model = tiny_bert()
    bmm = f"{LAYER0}/attention/self/MatMul"  # attention's batched matmul: module BertSelfAttention
    with pytest.raises(ValueError, match=r"1 quantized MatMul/Gemm nodes map to no Linear module \(first: "
                                         + bmm.replace(".", r"\.") + r"\).*quantize_attention_bmm"):
        linear_placement(onnx_nodes(*QKV, ("MatMul", bmm, "q")), [QKV[0][1], bmm], model)
    with pytest.raises(ValueError, match="2 quantized"):  # no such module at all, and a Gemm
        linear_placement(onnx_nodes(("MatMul", "/model/nowhere/MatMul", "a"), ("Gemm", "/model/pooler/Gemm", "b")),
                         ["/model/nowhere/MatMul", "/model/pooler/Gemm"], model)

    class Conv1D(torch.nn.Module):  # a lookalike of transformers' Conv1D: the name is not enough
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, 4))

    toy = torch.nn.Module()
    toy.fake = Conv1D()
    with pytest.raises(ValueError, match="no Linear module"):
        linear_placement(onnx_nodes(("Gemm", "/model/fake/Gemm", "x")), ["/model/fake/Gemm"], toy)


# --------------------------------------------------------------------------------------------
# Insertion and removal


def test_insert_and_remove_fake_quant_restore_linears_with_learned_weights():
    model = tiny_bert()
    graph = onnx_nodes(*QKV, FFN)
    placement = linear_placement(graph, [n for _, n, _ in (*QKV, FFN)], model)
    originals = {path: model.get_submodule(path) for path in placement}
    n_params = len(list(model.parameters()))
    params = insert_fake_quant(model, placement, {QKV_INPUT: 2.54, FFN[2]: 1e-9})
    assert set(params) == {QKV_INPUT, FFN[2]}
    assert float(params[QKV_INPUT].detach()) == pytest.approx(2.54 / 127)
    assert float(params[FFN[2]].detach()) == pytest.approx(1e-6 / 127)  # at least 1e-6
    wrapped = {path: model.get_submodule(path) for path in placement}
    assert all(isinstance(m, FakeQuantLinear) and m.linear is originals[p] for p, m in wrapped.items())
    # Q, K and V read one tensor: one shared scale (the Q/DQ graph has one pair per tensor)
    assert len({id(wrapped[p].act_scale) for p in list(placement)[:3]}) == 1
    assert len(list(model.parameters())) == n_params + 2
    with torch.no_grad():  # "training": the wrapped Linear's weight changes
        wrapped["encoder.layer.0.intermediate.dense"].linear.weight.add_(1.0)
    remove_fake_quant(model)
    assert all(model.get_submodule(p) is originals[p] for p in placement)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert len(list(model.parameters())) == n_params
    fresh = tiny_bert()
    torch.testing.assert_close(model.encoder.layer[0].intermediate.dense.weight,
                               fresh.encoder.layer[0].intermediate.dense.weight + 1.0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_smoothing_is_an_exact_transform_before_and_after_fake_quant(kind):
    """With SmoothQuant factors the weights carry s and the input 1/s: after removal the model
    computes what it computed before (the pre-hook multiplies the input by 1/s)."""
    torch.manual_seed(0)
    net = torch.nn.Module()
    net.proj = torch.nn.Linear(8, 4) if kind == "linear" else Conv1D(4, 8)
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = net.proj(x)
    w0 = net.proj.weight.detach().clone()
    inv = np.linspace(0.25, 4.0, 8).astype(np.float32)  # 1/s per input channel
    insert_fake_quant(net, {"proj": ("/model/proj/MatMul", "t")}, {"t": 100.0}, {"t": inv})
    assert isinstance(net.proj, FakeQuantLinear)
    remove_fake_quant(net)
    assert type(net.proj) in (torch.nn.Linear, Conv1D)
    s = torch.from_numpy(1.0 / inv)  # along the input channels: Linear (out, in) axis 1, Conv1D (in, out) axis 0
    torch.testing.assert_close(net.proj.weight.detach() / (s[None, :] if kind == "linear" else s[:, None]), w0)
    assert not torch.allclose(net.proj.weight, w0)  # the weights were smoothed in place
    with torch.no_grad():
        torch.testing.assert_close(net.proj(x), before, rtol=1e-5, atol=1e-6)


def test_smoothing_factors_read_from_the_graph():
    inv = np.array([0.5, 2.0], np.float32)
    graph = helper.make_graph([], "g", [], [], initializer=[numpy_helper.from_array(inv, "x_smooth_inv_scale"),
                                                             numpy_helper.from_array(inv, "other")])
    got = smoothing_factors(helper.make_model(graph))
    assert list(got) == ["x"] and np.array_equal(got["x"], inv)


# --------------------------------------------------------------------------------------------
# The QAT run on a tiny BERT


def test_qat_model_learns_scales_and_leaves_plain_linears(monkeypatch):
    import compiler.training.distill as distill_module

    def no_split(*_a, **_k):  # LSQ's gradient scale depends on the batch tensor's size
        raise AssertionError("QAT must train whole padded batches")

    monkeypatch.setattr(distill_module, "length_groups", no_split)
    teacher = tiny_bert()
    student = copy.deepcopy(teacher)
    graph = onnx_nodes(*QKV, FFN)
    nodes = [n for _, n, _ in (*QKV, FFN)]
    thresholds = {QKV_INPUT: 3.0, FFN[2]: 3.0}
    learned, report = qat_model(student, teacher, BERT_INPUTS, graph, nodes, thresholds, training_tokens(8),
                                TrainSettings(steps=3, lr=1e-3, scale_lr=1e-2, batch_size=4))
    assert set(learned) == set(nodes) and report.steps == 3
    assert learned[QKV[0][1]] == learned[QKV[1][1]] == learned[QKV[2][1]]  # one shared scale
    assert all(abs(v - 3.0) > 1e-4 for v in learned.values())  # the scales trained
    assert not any(isinstance(m, FakeQuantLinear) for m in student.modules())
    assert isinstance(student.encoder.layer[0].intermediate.dense, torch.nn.Linear)
    changed = [n for n, p in student.named_parameters()
               if not torch.equal(p, teacher.get_parameter(n))]
    assert "encoder.layer.0.intermediate.dense.weight" in changed  # the weights trained too
    assert [n for n, _ in student.named_parameters()] == [n for n, _ in teacher.named_parameters()]
