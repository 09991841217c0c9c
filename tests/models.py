"""Small helpers for the precision and verification tests: tiny ONNX graphs, ONNX Runtime runs,
a planted-overflow BERT, and a once-per-session MiniLM export.

Everything here is deterministic and CPU-only. The MiniLM helpers are cached per process (keyed
by the directory they write into), so that tests/test_precision.py and tests/test_verify.py
share one export and one conversion per mode in a pytest session.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # opset 17 needs IR >= 8; ONNX Runtime reads it whatever its own maximum
FP16_MAX = 65504.0

# --------------------------------------------------------------------------------------------
# Tiny ONNX graphs


def f32(name: str, shape: Iterable[Any]) -> Any:
    """A FLOAT graph input/output declaration."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def make_model(nodes: list[Any], inputs: list[Any], outputs: list[Any],
               initializers: dict[str, np.ndarray] | None = None, opset: int = OPSET) -> Any:
    """A checked ONNX model (default domain at `opset`) from nodes, I/O declarations and arrays."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor_types(model: Any) -> dict[str, int]:
    """elem_type of every tensor of `model` (graph I/O, inferred value_info, initializers)."""
    g = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def producers(model: Any) -> dict[str, Any]:
    """tensor name -> the node that produces it."""
    return {t: n for n in model.graph.node for t in n.output}


def consumers(model: Any) -> dict[str, list[Any]]:
    """tensor name -> the nodes that read it."""
    out: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for t in n.input:
            out.setdefault(t, []).append(n)
    return out


def nodes_of(model: Any, op_type: str) -> list[Any]:
    return [n for n in model.graph.node if n.op_type == op_type]


def ort_session(model: Any, optimize: bool = True) -> Any:
    """An ONNX Runtime CPU session (graph optimizations off when `optimize` is False)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_run(model: Any, feeds: dict[str, np.ndarray], optimize: bool = True) -> list[np.ndarray]:
    """All graph outputs of `model` on `feeds`, in graph-output order."""
    return ort_session(model, optimize).run(None, feeds)


# --------------------------------------------------------------------------------------------
# Planted mid-graph overflow


def planted_overflow_bert(channel: int = 1, weight_scale: float = 1e5, bias: float = 65000.0,
                          seed: int = 0) -> Any:
    """A tiny random BERT whose layer-0 residual stream overflows FP16 on real text.

    BertConfig(hidden 64, 2 layers, 2 heads, intermediate 128, vocab 30522 so that MiniLM's
    WordPiece ids fit), eager attention, `torch.manual_seed(seed)`. Row `channel` of layer 0's
    `output.dense` (intermediate -> hidden) is multiplied by `weight_scale` and its bias set to
    `bias`: the dense output's channel then sits around `bias` +- several thousand, so that the
    residual sum entering layer 0's output LayerNorm passes 65504 (FP16's maximum) on part of
    the tokens of real text, while every weight stays inside FP16's range (max |w| ~ 7.7e3,
    bias < 65504: no constant is out of range, the overflow is an activation's). The LayerNorm
    renormalizes, so the FP32 model's outputs stay finite.

    Returns:
        A transformers BertModel in eval mode (FP32, CPU).
    """
    import torch
    from transformers import BertConfig, BertModel

    assert abs(bias) < FP16_MAX, "the bias itself must fit FP16 (else the fp16-range rule pins it)"
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, vocab_size=30522)
    config._attn_implementation = "eager"
    model = BertModel(config).eval()
    dense = model.encoder.layer[0].output.dense
    with torch.no_grad():
        dense.weight[channel] *= weight_scale
        dense.bias[channel] = bias
    return model


def layer0_residual(model: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Layer 0's residual sum (the input of its output LayerNorm), via a forward pre-hook."""
    import torch

    captured: dict[str, Any] = {}
    hook = model.encoder.layer[0].output.LayerNorm.register_forward_pre_hook(
        lambda _module, args: captured.__setitem__("x", args[0].detach().numpy().copy()))
    try:
        with torch.no_grad():
            model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    finally:
        hook.remove()
    return captured["x"]


# --------------------------------------------------------------------------------------------
# MiniLM (real weights), exported and converted once per process


@functools.lru_cache(maxsize=None)
def minilm() -> Any:
    """compiler.models.LoadedModel of MiniLM (pretrained, offline)."""
    from compiler.models import load_model
    from compiler.settings import ModelSettings

    return load_model(ModelSettings(name="minilm"))


@functools.lru_cache(maxsize=None)
def minilm_export(directory: Path) -> tuple[Path, list[str]]:
    """(FP32 ONNX path, output names) of MiniLM exported into `directory`."""
    from calibration import load_texts
    from compiler.export import onnx_from_torch
    from compiler.settings import DataSettings, ExportSettings

    directory.mkdir(parents=True, exist_ok=True)
    texts = load_texts(DataSettings(samples=4))
    path, report = onnx_from_torch(minilm(), ExportSettings(parity_sequences=(8, 33)),
                                   directory / "model.fp32.onnx", texts)
    return path, list(report.outputs)


@functools.lru_cache(maxsize=None)
def minilm_fp32_model(directory: Path) -> Any:
    return onnx.load(str(minilm_export(directory)[0]))


@functools.lru_cache(maxsize=None)
def minilm_variant(directory: Path, mode: str) -> tuple[Any, Any]:
    """(converted model, PrecisionReport) of the MiniLM export in `mode`. Do not mutate."""
    from compiler.precision import convert_precision
    from compiler.settings import PrecisionSettings

    return convert_precision(minilm_fp32_model(directory), PrecisionSettings(mode=mode))


def minilm_dir(tmp_path_factory: Any) -> Path:
    """The session's MiniLM export folder (the same path for every test module)."""
    return tmp_path_factory.getbasetemp() / "minilm-export"
