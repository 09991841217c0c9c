"""ONNX node -> PyTorch module (`compiler.graph.modules.module_for_node`): by hand, and on real
exports, where every weight GEMM must name the module whose weight it holds (PyTorch reference)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from calibration import load_texts
from compiler.graph.modules import module_for_node
from compiler.settings import DataSettings, ExportSettings
from compiler.training.export import onnx_from_torch
from compiler.training.prune import is_linear
from tests.models import tiny_bert, tiny_gpt2, tiny_loaded


@pytest.mark.parametrize("node, module", [
    ("/model/encoder/layer.0/attention/self/query/MatMul", "encoder.layer.0.attention.self.query"),
    ("/model/h.1/mlp/c_fc/Gemm", "h.1.mlp.c_fc"),
    ("/encoder/layer.3/output/dense/MatMul", "encoder.layer.3.output.dense"),  # no wrapper scope
    ("/model/MatMul", ""),  # a node of the top module
    ("MatMul_12", ""),  # an unscoped name
])
def test_module_for_node_by_hand(node, module):
    assert module_for_node(node) == module


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_every_weight_gemm_of_an_export_names_its_linear(tmp_path, kind):
    """The MatMul/Gemm reading an initializer maps to the nn.Linear / Conv1D holding that weight:
    the initializer is the (in, out) weight (Linear.weight^T, Conv1D.weight), or (out, in) for a
    Gemm with transB=1."""
    module = tiny_bert() if kind == "bert" else tiny_gpt2()
    texts = load_texts(DataSettings(samples=2), count=2)
    path, _ = onnx_from_torch(tiny_loaded(module, f"graph-modules-{kind}-v1"),
                              ExportSettings(parity_batches=(1,), parity_sequences=(8,)), tmp_path / "m.onnx", texts)
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    modules = dict(module.named_modules())
    linears = {n for n, m in modules.items() if is_linear(m)}
    seen = set()
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in inits:
            continue
        name = module_for_node(node.name)
        assert name in linears, node.name
        weight = modules[name].weight.detach().numpy()
        in_out = weight.T if isinstance(modules[name], torch.nn.Linear) else weight  # Conv1D holds (in, out)
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)  # Gemm(x, W^T): W is (out, in)
        np.testing.assert_array_equal(inits[node.input[1]], in_out.T if trans_b else in_out)
        seen.add(name)
    assert seen == linears  # every linear layer of the model, pooler included, was found
