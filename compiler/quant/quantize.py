"""INT8 post-training quantization: explicit Q/DQ pairs for TensorRT 11's strongly typed networks.

TensorRT 11 builds INT8 kernels only where the ONNX graph says so: a QuantizeLinear ->
DequantizeLinear pair on each input of a MatMul/Gemm ("explicit quantization"); it fuses the
DQ -> MatMul <- DQ pattern into one INT8 GEMM. This module places those pairs, calibrates their
scales on real text, and measures what they cost in fidelity on held-out text:

Placement (`insert_qdq`), symmetric INT8 with zero point 0:
    - activations: one Q/DQ pair per tensor, per tensor scale, shared by every quantized
      MatMul it feeds (the Q/K/V projections share the layer norm output's pair);
    - weights: stored as INT8 initializers, per output channel scales, one DequantizeLinear
      with `axis` = the output-channel axis (MatMul W[K, N]: axis 1; Gemm transB=1 W[N, K]:
      axis 0);
    - nothing else: no Q/DQ on MatMul outputs, layer norm, softmax, GELU, residual adds;
    - the two attention batched matmuls (Q.K^T and probs.V, both inputs activations) by
      `QuantSettings.quantize_attention_bmm`; nodes matching `QuantSettings.exclude` (fnmatch
      patterns on node names) and nodes the budget loop measured as too sensitive stay float.

Calibration (`calibrate`): ONNX Runtime's own calibrators (`create_calibrator`: MinMax, Entropy,
Percentile), fed fixed-length windows of real text without padding (see
`calibration_windows`): every window holds exactly the same number of tokens, so the histogram
calibrators, which stack a tensor's arrays across samples, never meet ragged shapes, and no
padded position enters a statistic. Thresholds are cached as JSON.

SmoothQuant (`smooth`, Xiao et al. 2023): BERT's layer norm and GELU outputs carry a few
channels 10-30x larger than the rest (MiniLM: |x| up to 28 where most values are below 1), so a
per tensor INT8 scale leaves the ordinary channels a handful of levels. Dividing each channel by
s_j and multiplying the weight's input row j by s_j moves that range into the per-channel
weights; the FP32 function is unchanged.

Budget (`quantize_within_budget`): smooth, calibrate, place, measure cosine against FP32 on
held-out text (never the calibration text); while the cosine minimum is under `min_cosine`,
leave the most sensitive MatMul (measured: fidelity on calibration windows with only that node
float) unquantized.

Defaults, measured on MiniLM (128 calibration / 64 held-out WikiText-2 samples; SmoothQuant's
alpha chosen on a third, disjoint slice; see benchmarks/int8_ptq.py): `max` thresholds (entropy
and percentile clip the outlier channels: held-out cosine min 0.89 / 0.87 against 0.96 for
max, without SmoothQuant), attention bmm float (quantizing them costs 0.003 of cosine min
for 5 % of the MACs), SmoothQuant alpha 0.8 (cosine min 0.962 -> 0.993 with 94.7 % of MatMul
MACs in INT8 and no node left float).

The output graph is FP32 with INT8 Q/DQ; `compiler.passes.precision.convert_precision` turns the rest
into FP16 afterwards (Q/DQ accept FP16 inputs and scales from opset 19 on, so the graph must be
at opset >= 19: export with `ExportSettings(opset=19)`, or see `upgrade_opset`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from compiler.eval.fidelity import FidelityProbe
from compiler.settings import QUANT_METHODS, QuantSettings, settings_hash  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

METHODS = QUANT_METHODS
QUANT_OPS = ("MatMul", "Gemm")
MIN_OPSET = 19  # QuantizeLinear / DequantizeLinear take float16 inputs and scales from opset 19
INT8_MAX = 127
# Scales are kept at or above FP16's smallest normal so that the precision pass, which stores
# them in FP16 next to FP16 tensors, never flushes one to zero (a threshold of 127 * 2**-14 =
# 0.0078 or less is an all-but-constant tensor).
MIN_SCALE = 2.0**-14
FLOAT = 1  # onnx.TensorProto.FLOAT
CALIBRATION_VERSION = "int8-calibration-v1"


@dataclass
class ExcludedNode:
    """A MatMul/Gemm left unquantized, and why.

    Attributes:
        name / op_type: the node.
        macs: its multiply-accumulates at the report's `mac_shape`.
        reason: `attention-bmm` (setting off), `pattern` (matched `QuantSettings.exclude`),
            `sensitivity` (the budget loop), `not-eligible` (non-FP32 inputs, a constant of
            rank < 2, or two constants).
        detail: the pattern, or the measurement.
        effect: measured effect of leaving it float (budget loop only): the calibration-set
            cosine deficit it removes and the held-out fidelity after excluding it.
    """

    name: str
    op_type: str
    macs: int
    reason: str
    detail: str = ""
    effect: dict[str, float] | None = None


@dataclass
class QuantReport:
    """What `insert_qdq` (and `quantize_within_budget`) did.

    Attributes:
        method: calibration method of the activation thresholds.
        quantize_attention_bmm: the attention bmm setting.
        smoothquant_alpha: SmoothQuant strength `quantize_within_budget` applied; None when the
            graph was not smoothed (`insert_qdq` itself never smooths).
        quantized_matmuls: MatMul/Gemm nodes with INT8 inputs.
        quantized_nodes: their names.
        excluded: every MatMul/Gemm left float, with reason and (budget loop) measured effect.
        activation_qdq: Q/DQ pairs on activations (one per tensor).
        int8_weights: weight initializers stored as INT8.
        matmul_macs: {"int8": MACs, "float": MACs} at `mac_shape`.
        mac_shape: {"batch", "sequence"} the MACs are counted at.
        int8_mac_fraction: share of MatMul/Gemm MACs that run in INT8.
        calibration: calibration summary (windows, tokens, seconds, cache hit).
        fidelity: held-out fidelity vs FP32 (`quantize_within_budget`).
        budget: the budget and whether it was met.
        steps: the budget loop's steps with their held-out fidelity.
        sensitivity: per candidate node, the calibration-set cosine deficit its exclusion removes.
        smoothquant: per smoothed activation tensor, the channel scale range.
        thresholds: calibrated |x| threshold (maps to 127) per activation tensor
            (`quantize_within_budget`; QAT starts from these).
    """

    method: str
    quantize_attention_bmm: bool
    smoothquant_alpha: float | None = None
    quantized_matmuls: int = 0
    quantized_nodes: list[str] = field(default_factory=list)
    excluded: list[ExcludedNode] = field(default_factory=list)
    activation_qdq: int = 0
    int8_weights: int = 0
    matmul_macs: dict[str, int] = field(default_factory=dict)
    mac_shape: dict[str, int] = field(default_factory=dict)
    int8_mac_fraction: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)
    smoothquant: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The short form for report.json and the manifest."""
        return {"method": self.method, "quantize_attention_bmm": self.quantize_attention_bmm,
                "quantized_matmuls": self.quantized_matmuls, "excluded": [e.name for e in self.excluded],
                "int8_mac_fraction": round(self.int8_mac_fraction, 4),
                "cosine_min": self.fidelity.get("cosine_min")}


# --------------------------------------------------------------------------------------------
# Graph analysis


@dataclass
class _MatMul:
    """One MatMul/Gemm and how it would be quantized."""

    index: int
    name: str
    op_type: str
    activations: list[int]  # input positions holding activations
    weight: int | None  # input position of the weight initializer
    axis: int  # output-channel axis of the weight
    macs: int
    bmm: bool  # both inputs are activations
    not_eligible: str = ""  # why the node cannot be quantized ("" when it can)


def _initializers(model: Any) -> dict[str, Any]:
    return {t.name: t for t in model.graph.initializer}


def _name_nodes(model: Any) -> None:
    """Give every unnamed node a unique name (reports and exclusions address nodes by name)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)


def _attr(node: Any, name: str, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _float_tensors(model: Any) -> set[str]:
    import onnx

    from compiler.graph.onnx_io import without_weights

    g = onnx.shape_inference.infer_shapes(without_weights(model)).graph
    names = {v.name for v in [*g.input, *g.output, *g.value_info] if v.type.tensor_type.elem_type == FLOAT}
    names |= {t.name for t in model.graph.initializer if t.data_type == FLOAT}
    return names


def matmul_nodes(model: Any, mac_shape: tuple[int, int] = (1, 128)) -> list[_MatMul]:
    """Every MatMul/Gemm with float inputs: which inputs are activations, which a weight.

    A weight is a float initializer of rank >= 2; its output-channel axis is the last one for
    MatMul's second input (W[..., K, N]), the second-to-last for its first input, and for
    Gemm's B 0 with transB=1 (W[N, K]) else 1. MACs are counted at `mac_shape` (batch,
    sequence) with `compiler.passes.precision.matmul_macs`.
    """
    from compiler.graph.analysis import matmul_macs

    inits = _initializers(model)
    floats = _float_tensors(model)
    found = []
    for i, n in enumerate(model.graph.node):
        if n.op_type not in QUANT_OPS:
            continue
        acts = [k for k in (0, 1) if n.input[k] not in inits]
        consts = [k for k in (0, 1) if n.input[k] in inits]
        weight, axis, why = None, 0, ""
        if not all(t in floats for t in n.input[:2]):
            why = "inputs are not FP32"
        elif len(acts) == 1 and len(inits[n.input[consts[0]]].dims) >= 2:
            weight = consts[0]
            rank = len(inits[n.input[weight]].dims)
            if n.op_type == "Gemm":
                axis = (0 if _attr(n, "transB") else 1) if weight == 1 else (1 if _attr(n, "transA") else 0)
            else:
                axis = rank - 1 if weight == 1 else rank - 2
        elif len(acts) == 1:
            why = "its constant input has rank < 2 (no output-channel axis)"
        elif not acts:
            why = "both inputs are constants (constant folding's job)"
        found.append(_MatMul(i, n.name, n.op_type, acts if not why else [], weight, axis, 0,
                             len(acts) == 2 and not why, why))
    macs = matmul_macs(model, list(model.graph.node), mac_shape)
    for m in found:
        m.macs = macs[m.index]
    return found


def calibration_tensors(model: Any) -> list[str]:
    """Activation tensors that feed a MatMul/Gemm (every one `insert_qdq` may quantize)."""
    nodes = list(model.graph.node)
    return list(dict.fromkeys(nodes[m.index].input[k] for m in matmul_nodes(model) for k in m.activations))


# --------------------------------------------------------------------------------------------
# Q/DQ placement


def _weight_int8(w: np.ndarray, axis: int, scale: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel INT8 of `w` along `axis`: (int8 array, float32 scales of shape (C,))."""
    moved = np.moveaxis(w.astype(np.float32), axis, 0)
    if scale is None:
        absmax = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
        scale = np.maximum(absmax / INT8_MAX, MIN_SCALE).astype(np.float32)
    else:
        scale = np.asarray(scale, dtype=np.float32).reshape(-1)
        if scale.shape != (moved.shape[0],) or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ValueError(f"weight scale of shape {scale.shape}: expected ({moved.shape[0]},) "
                             "positive finite values (one per output channel)")
    shape = (-1,) + (1,) * (moved.ndim - 1)
    q = np.clip(np.rint(moved / scale.reshape(shape)), -INT8_MAX - 1, INT8_MAX).astype(np.int8)
    return np.moveaxis(q, 0, axis), scale


class _Placer:
    """Builds Q/DQ variants of one FP32 graph; weight quantization is done once per weight."""

    def __init__(self, model: Any, mac_shape: tuple[int, int] = (1, 128)) -> None:
        import onnx

        if not any(o.domain in ("", "ai.onnx") and o.version >= MIN_OPSET for o in model.opset_import):
            raise ValueError(f"the graph's default opset is below {MIN_OPSET}: QuantizeLinear/DequantizeLinear "
                             "take FP16 inputs and scales (which the precision pass produces) from opset 19 on. "
                             "Export with ExportSettings(opset=19), or convert with "
                             "compiler.quant.quantize.upgrade_opset(model).")
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        _name_nodes(self.model)
        self.mac_shape = mac_shape
        self.matmuls = matmul_nodes(self.model, mac_shape)
        self.by_name = {m.name: m for m in self.matmuls}
        self.inits = _initializers(self.model)
        self._weights: dict[tuple[str, int, bytes | None], tuple[Any, Any]] = {}

    def plan(self, settings: QuantSettings, exclude_nodes: Mapping[str, str] | None = None
             ) -> tuple[list[_MatMul], list[ExcludedNode]]:
        """(MatMuls to quantize, MatMuls left float with the reason)."""
        quantized, excluded = [], []
        exclude_nodes = dict(exclude_nodes or {})
        for m in self.matmuls:
            pattern = next((p for p in settings.exclude if fnmatch.fnmatchcase(m.name, p)), None)
            if m.not_eligible:
                excluded.append(ExcludedNode(m.name, m.op_type, m.macs, "not-eligible", m.not_eligible))
            elif m.name in exclude_nodes:
                excluded.append(ExcludedNode(m.name, m.op_type, m.macs, "sensitivity", exclude_nodes[m.name]))
            elif pattern is not None:
                excluded.append(ExcludedNode(m.name, m.op_type, m.macs, "pattern", f"matches {pattern!r}"))
            elif m.bmm and not settings.quantize_attention_bmm:
                excluded.append(ExcludedNode(m.name, m.op_type, m.macs, "attention-bmm",
                                             "both inputs are activations; quantize_attention_bmm=False"))
            else:
                quantized.append(m)
        return quantized, excluded

    def _weight(self, name: str, axis: int, scale: np.ndarray | None) -> tuple[Any, Any]:
        from onnx import numpy_helper

        key = (name, axis, None if scale is None else np.asarray(scale, np.float32).tobytes())
        if key not in self._weights:
            q, s = _weight_int8(numpy_helper.to_array(self.inits[name]), axis, scale)
            self._weights[key] = (q, s)
        return self._weights[key]

    def build(self, act_scales: Mapping[str, float], settings: QuantSettings,
              weight_scales: Mapping[str, np.ndarray] | None = None,
              exclude_nodes: Mapping[str, str] | None = None) -> tuple[Any, QuantReport]:
        import onnx
        from onnx import helper, numpy_helper

        quantized, excluded = self.plan(settings, exclude_nodes)
        nodes = list(self.model.graph.node)
        weight_scales = dict(weight_scales or {})
        unknown = sorted(set(weight_scales) - set(self.inits))
        if unknown:
            raise ValueError(f"weight_scales names tensors that are not initializers: {unknown[:5]}")
        taken = {t for n in nodes for t in [*n.input, *n.output]} | set(self.inits) | {n.name for n in nodes}

        def fresh(base: str) -> str:
            name = base
            while name in taken:
                name += "_"
            taken.add(name)
            return name

        # tensor -> its dequantized name, and the Q/DQ nodes (and initializers) that make it
        act_dq: dict[str, str] = {}
        weight_dq: dict[tuple[str, int], str] = {}
        pending: dict[str, list[Any]] = {}  # tensor -> nodes to emit before its first consumer
        new_inits: list[Any] = []
        rewired: dict[int, dict[int, str]] = {}
        missing = []
        for m in quantized:
            n = nodes[m.index]
            for k in m.activations:
                t = n.input[k]
                if t not in act_dq:
                    if t not in act_scales:
                        missing.append(t)
                        continue
                    threshold = float(act_scales[t])
                    if not np.isfinite(threshold) or threshold < 0:
                        raise ValueError(f"activation threshold of {t!r} is {threshold}: expected finite >= 0")
                    scale = np.float32(max(threshold / INT8_MAX, MIN_SCALE))
                    s_name, z_name = fresh(f"{t}_scale"), fresh(f"{t}_zero_point")
                    q_out, dq_out = fresh(f"{t}_quantized"), fresh(f"{t}_dequantized")
                    new_inits += [numpy_helper.from_array(np.array(scale, np.float32), s_name),
                                  numpy_helper.from_array(np.array(0, np.int8), z_name)]
                    pending.setdefault(t, []).extend([
                        helper.make_node("QuantizeLinear", [t, s_name, z_name], [q_out], name=fresh(f"{t}_QuantizeLinear")),
                        helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out],
                                         name=fresh(f"{t}_DequantizeLinear"))])
                    act_dq[t] = dq_out
                rewired.setdefault(m.index, {})[k] = act_dq[t]
            if m.weight is not None:
                w = n.input[m.weight]
                key = (w, m.axis)
                if key not in weight_dq:
                    q, s = self._weight(w, m.axis, weight_scales.get(w))
                    q_name, s_name, z_name = fresh(f"{w}_quantized"), fresh(f"{w}_scale"), fresh(f"{w}_zero_point")
                    dq_out = fresh(f"{w}_dequantized")
                    new_inits += [numpy_helper.from_array(q, q_name), numpy_helper.from_array(s, s_name),
                                  numpy_helper.from_array(np.zeros(s.shape, np.int8), z_name)]
                    pending.setdefault(f"__weight__{dq_out}", []).append(
                        helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_out],
                                         name=fresh(f"{w}_DequantizeLinear"), axis=m.axis))
                    weight_dq[key] = dq_out
                rewired.setdefault(m.index, {})[m.weight] = weight_dq[key]
        if missing:
            raise ValueError(f"no calibrated threshold for {len(missing)} activation tensor(s) feeding quantized "
                             f"MatMuls, e.g. {sorted(set(missing))[:3]}; calibrate this graph (calibrate())")

        src = self.model
        out = onnx.ModelProto(ir_version=src.ir_version, opset_import=src.opset_import, producer_name=src.producer_name,
                              producer_version=src.producer_version, domain=src.domain, model_version=src.model_version,
                              doc_string=src.doc_string, metadata_props=src.metadata_props, functions=src.functions)
        g = src.graph
        out.graph.CopyFrom(onnx.GraphProto(name=g.name, input=g.input, output=g.output, value_info=g.value_info,
                                           doc_string=g.doc_string))
        # Q/DQ of an activation right before its first quantized consumer (keeps topological order)
        dq_source = {dq: t for t, dq in act_dq.items()}
        dq_source.update({dq: f"__weight__{dq}" for dq in weight_dq.values()})
        emitted = set()
        new_nodes = []
        for i, n in enumerate(nodes):
            if i in rewired:
                n = onnx.NodeProto()
                n.CopyFrom(nodes[i])
                for k, name in rewired[i].items():
                    origin = dq_source[name]
                    if origin not in emitted:
                        new_nodes.extend(pending[origin])
                        emitted.add(origin)
                    n.input[k] = name
            new_nodes.append(n)
        out.graph.node.extend(new_nodes)
        used = {t for n in new_nodes for t in n.input} | {o.name for o in g.output}
        for t in g.initializer:  # FP32 weights that no float consumer reads any more are dropped
            if t.name in used:
                out.graph.initializer.add().CopyFrom(t)
        out.graph.initializer.extend(new_inits)

        total = sum(m.macs for m in self.matmuls)
        int8 = sum(m.macs for m in quantized)
        report = QuantReport(settings.method, settings.quantize_attention_bmm)
        report.quantized_matmuls = len(quantized)
        report.quantized_nodes = [m.name for m in quantized]
        report.excluded = excluded
        report.activation_qdq = len(act_dq)
        report.int8_weights = len(weight_dq)
        report.matmul_macs = {"int8": int8, "float": total - int8}
        report.mac_shape = {"batch": self.mac_shape[0], "sequence": self.mac_shape[1]}
        report.int8_mac_fraction = int8 / total if total else 0.0
        return out, report


def insert_qdq(model: Any, act_scales: Mapping[str, float], settings: QuantSettings,
               weight_scales: Mapping[str, np.ndarray] | None = None, *,
               exclude_nodes: Mapping[str, str] | None = None,
               mac_shape: tuple[int, int] = (1, 128)) -> tuple[Any, QuantReport]:
    """Place INT8 Q/DQ pairs on the inputs of the graph's MatMul/Gemm nodes.

    Args:
        model: FP32 onnx.ModelProto at opset >= 19 (not modified). Weights must be initializers
            (the export folds constants).
        act_scales: {activation tensor: threshold} (absmax or clipped range, as from
            `calibrate`); the scale is threshold / 127 (at least 2**-14). Needed for every
            activation input of a quantized node.
        settings: placement settings (`quantize_attention_bmm`, `exclude`, and `method` /
            `smoothquant_alpha` for the report).
        weight_scales: {weight initializer: (C,) float32 scales} overriding the per output
            channel absmax / 127 scales (QAT's learned scales); W / scale is rounded half to
            even and saturated to [-128, 127], as QuantizeLinear would.
        exclude_nodes: {node name: reason} also left float (the budget loop's exclusions; exact
            names, unlike the `exclude` patterns).
        mac_shape: (batch, sequence) at which MACs are counted for `int8_mac_fraction`.

    Returns:
        (new ModelProto, QuantReport). The new graph: FP32 except INT8 weights (stored as INT8
        initializers + DequantizeLinear(axis=output channel), FP32 scales of shape (C,), INT8
        zero points 0) and one QuantizeLinear -> DequantizeLinear pair per quantized activation
        tensor (FP32 scalar scale, INT8 zero point 0). Inputs, outputs and every other node are
        unchanged; FP32 weights only quantized consumers read are dropped.

    Raises:
        ValueError: opset below 19, a missing or invalid activation threshold, `weight_scales`
            naming a non-initializer or of the wrong shape, or non-positive scales.
    """
    return _Placer(model, mac_shape).build(act_scales, settings, weight_scales, exclude_nodes)


def upgrade_opset(model: Any, opset: int = MIN_OPSET) -> Any:
    """`onnx.version_converter` to `opset` (for graphs exported below 19); returns a new model."""
    import onnx

    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current >= opset:
        return model
    return onnx.version_converter.convert_version(model, opset)


# --------------------------------------------------------------------------------------------
# Calibration


def _special_tokens(samples: list[np.ndarray]) -> tuple[int | None, int | None]:
    """(first, last) token ids shared by every sample ([CLS] / [SEP]), or None where they differ."""
    if not samples or min(len(s) for s in samples) < 2:
        return None, None
    firsts, lasts = {int(s[0]) for s in samples}, {int(s[-1]) for s in samples}
    return (firsts.pop() if len(firsts) == 1 else None), (lasts.pop() if len(lasts) == 1 else None)


def calibration_windows(tokens: Any, count: int | None = None, length: int | None = None) -> np.ndarray:
    """Fixed-length windows of real text, no padding: (count, length) int64 token ids.

    The samples' tokens are concatenated into one stream (each sample's shared first and last
    token, [CLS] and [SEP] for BERT, taken off); `count` windows of `length` tokens, evenly
    spaced over the stream (overlapping where the stream is short), each get the first and last
    token back. Every window therefore looks like one sample of exactly `length` tokens.

    Args:
        tokens: a `calibration.TokenizedSet` (the calibration samples).
        count: windows wanted; default one per sample.
        length: tokens per window; default the longest sample (the tokenizer's max_length).

    Raises:
        ValueError: the text holds fewer tokens than one window, or the set is empty.
    """
    samples = [np.asarray(s, np.int64) for s in tokens.input_ids]
    if not samples:
        raise ValueError("no calibration samples")
    count = len(samples) if count is None else count
    length = max(len(s) for s in samples) if length is None else length
    first, last = _special_tokens(samples)
    cut = slice(1 if first is not None else 0, -1 if last is not None else None)
    stream = np.concatenate([s[cut] for s in samples])
    body = length - (first is not None) - (last is not None)
    if body < 1 or len(stream) < body:
        raise ValueError(f"calibration text holds {len(stream)} tokens, fewer than one window of {length}: "
                         "use more calibration samples")
    starts = np.linspace(0, len(stream) - body, count).round().astype(np.int64)
    windows = np.stack([stream[s:s + body] for s in starts])
    parts = ([np.full((count, 1), first)] if first is not None else []) + [windows] + (
        [np.full((count, 1), last)] if last is not None else [])
    return np.concatenate(parts, axis=1).astype(np.int64)


def window_feeds(windows: np.ndarray, input_names: list[str]) -> dict[str, np.ndarray]:
    """ONNX Runtime feeds for unpadded windows: ids, an all-ones mask, zero segment ids."""
    from compiler.errors import DataError

    feeds = {"input_ids": windows, "attention_mask": np.ones_like(windows),
             "token_type_ids": np.zeros_like(windows)}
    unknown = [n for n in input_names if n not in feeds]
    if unknown:
        raise DataError(f"graph inputs {unknown} cannot be filled from text; known: {sorted(feeds)}")
    return {n: feeds[n] for n in input_names}


def window_set(windows: np.ndarray, key: str) -> Any:
    """The windows as a `calibration.TokenizedSet` (for `TokenizedSet.batches`)."""
    from calibration import TokenizedSet

    return TokenizedSet(list(windows), [np.zeros_like(w) for w in windows], 0, key)


class _Reader:
    """A CalibrationDataReader over a list of feeds (one ONNX Runtime run each)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


_MARKER_OP = "IsNaN"  # float in, bool out: marks a tensor for ORT's op-type based selection


def calibrate(model_path: str | os.PathLike, tokens: Any, input_names: list[str], settings: QuantSettings,
              cache_dir: str | os.PathLike | None, tensors: list[str] | None = None) -> dict[str, float]:
    """Activation thresholds of the tensors feeding MatMul/Gemm, from ONNX Runtime's calibrators.

    The calibrator (`onnxruntime.quantization.calibrate.create_calibrator`, CalibrationMethod
    MinMax / Entropy / Percentile) runs the FP32 graph over `calibration_windows(tokens,
    settings.calib_windows)`, `settings.calib_batch_size` windows a run, with symmetric ranges:
    `max` gives max |x|; `entropy` the KL-optimal threshold over `num_bins` bins
    (`num_quantized_bins` quantized bins); `percentile` the `percentile`-th percentile of |x|
    over `num_bins` bins. Only the wanted tensors are calibrated: a copy of the graph gives each
    an `IsNaN` marker node, and the calibrator is told to calibrate the inputs of `IsNaN` nodes.
    A tqdm progress bar counts the batches.

    Args:
        model_path: FP32 ONNX file (external data allowed; temporary files go beside it).
        tokens: `calibration.TokenizedSet` of calibration text (never the held-out text).
        input_names: graph inputs (`input_ids`, `attention_mask`, `token_type_ids`).
        settings: method, bins, percentile, windows, batch size.
        cache_dir: thresholds are cached as `<cache_dir>/int8-<key>.json`, key = sha256
            (`compiler.settings.settings_hash`) over the graph file(s), `tokens.key`, the
            tensors, `QuantSettings.calibration_key()` and the ONNX Runtime version; a change in
            any of them recalibrates. Placement settings (attention bmm, exclusions, budget) are
            not part of the key. None disables the cache.
        tensors: tensors to calibrate; default `calibration_tensors(model)`.

    Returns:
        {tensor name: threshold >= 0}, the |x| that maps to 127.

    Raises:
        ValueError: too little text for one window; DataError: inputs text cannot fill.
    """
    import onnx
    import onnxruntime

    from compiler.artifacts import write_json
    from compiler.graph.onnx_io import onnx_sha256

    model_path = Path(model_path)
    light = onnx.load(str(model_path), load_external_data=False)
    if tensors is None:
        tensors = calibration_tensors(_with_weight_shapes(light, model_path))
    tensors = sorted(set(tensors))
    key = settings_hash(CALIBRATION_VERSION, onnx_sha256(model_path), tokens.key, tensors,
                        settings.calibration_key(), onnxruntime.__version__)
    path = Path(cache_dir) / f"int8-{key[:32]}.json" if cache_dir else None
    if path is not None and path.is_file():
        log.info("INT8 thresholds reused from %s", path)
        return {k: float(v) for k, v in json.loads(path.read_text())["thresholds"].items()}
    start = time.perf_counter()
    windows = calibration_windows(tokens, settings.calib_windows)
    thresholds = _run_calibrator(model_path, light, tensors, windows, input_names, settings)
    if path is not None:
        write_json(path, {"key": key, "method": settings.method, "windows": list(windows.shape),
                          "seconds": round(time.perf_counter() - start, 1), "thresholds": thresholds})
    return thresholds


def _with_weight_shapes(light: Any, model_path: Path) -> Any:
    """The graph with its weights loaded (matmul analysis needs initializer dims and MACs)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(light)
    onnx.load_external_data_for_model(m, str(model_path.parent))
    return m


def _run_calibrator(model_path: Path, light: Any, tensors: list[str], windows: np.ndarray,
                    input_names: list[str], settings: QuantSettings) -> dict[str, float]:
    import onnx
    from onnx import TensorProto, helper
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
    from tqdm import tqdm

    view = onnx.ModelProto()
    view.CopyFrom(light)
    view.graph.node.extend(helper.make_node(_MARKER_OP, [t], [f"{t}__calib_marker"], name=f"{t}__calib_marker")
                           for t in tensors)
    view.graph.output.extend(helper.make_tensor_value_info(f"{t}__calib_marker", TensorProto.BOOL, None)
                             for t in tensors)
    method, extra = {
        "max": (CalibrationMethod.MinMax, {"symmetric": True}),
        "entropy": (CalibrationMethod.Entropy, {"symmetric": True, "num_bins": settings.num_bins,
                                                "num_quantized_bins": settings.num_quantized_bins}),
        "percentile": (CalibrationMethod.Percentile, {"symmetric": True, "num_bins": settings.num_bins,
                                                      "percentile": settings.percentile}),
    }[settings.method]
    # The view lies beside the model so that its external-data references still resolve.
    fd, view_path = tempfile.mkstemp(prefix=f".{model_path.stem}.calib.", suffix=".onnx", dir=model_path.parent)
    os.close(fd)
    big = sum(t.data_location == TensorProto.EXTERNAL for t in light.graph.initializer) > 0
    with tempfile.TemporaryDirectory(prefix="int8-calib.") as tmp:
        try:
            onnx.save_model(view, view_path)
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram collector prints
                calibrator = create_calibrator(Path(view_path), [_MARKER_OP], str(Path(tmp) / "augmented.onnx"),
                                               method, use_external_data_format=big,
                                               providers=["CPUExecutionProvider"], extra_options=extra)
        finally:
            os.unlink(view_path)
        batch = settings.calib_batch_size
        for s in tqdm(range(0, len(windows), batch), desc=f"INT8 calibration ({settings.method})",
                      unit="batch", disable=None, leave=False):
            with contextlib.redirect_stdout(io.StringIO()):
                calibrator.collect_data(_Reader([window_feeds(windows[s:s + batch], input_names)]))
        with contextlib.redirect_stdout(io.StringIO()):
            data = calibrator.compute_data()
        del calibrator
    out = {}
    for t in tensors:
        lo, hi = data[t].range_value  # symmetric: (-threshold, threshold)
        out[t] = float(max(np.max(np.abs(lo)), np.max(np.abs(hi))))
    return out


# --------------------------------------------------------------------------------------------
# SmoothQuant


def channel_absmax(model: Any, windows: np.ndarray, input_names: list[str], tensors: list[str],
                   batch_size: int = 8) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor over the windows (FP32, ONNX Runtime CPU).

    Args:
        model: FP32 onnx.ModelProto (outputs are added and removed again) or an ONNX path.
        windows: (count, length) token ids from `calibration_windows`.
        input_names: graph inputs.
        tensors: activation tensors whose last axis holds the channels.

    Returns:
        {tensor: (channels,) float32 absmax}.
    """
    from calibration.stats import exposed_outputs
    from compiler.graph.onnx_io import ort_session, session_with_outputs

    if isinstance(model, (str, os.PathLike)):
        sess = session_with_outputs(model, tensors)
    else:
        with exposed_outputs(model, tensors):
            sess = ort_session(model)
    out: dict[str, np.ndarray] = {}
    for s in range(0, len(windows), batch_size):
        for t, x in zip(tensors, sess.run(tensors, window_feeds(windows[s:s + batch_size], input_names))):
            m = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
            out[t] = m if t not in out else np.maximum(out[t], m)
    return {t: v.astype(np.float32) for t, v in out.items()}


def smooth(model: Any, act_absmax: Mapping[str, np.ndarray], alpha: float,
           nodes: Iterable[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, exactly.

    For each activation X feeding weight MatMuls/Gemms (all of them, or those named in
    `nodes`), with channel j along X's last axis (the MatMuls' reduction axis K):
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), max|W_j| over every weight X feeds (they
    share one smoothed tensor). A Mul(X, 1/s) node feeds those MatMuls and their weights'
    rows W_j are multiplied by s_j; other consumers of X (residual adds) still read X. In exact
    arithmetic the graph computes the same function.

    Args:
        model: FP32 onnx.ModelProto (not modified).
        act_absmax: {tensor: (K,) max |x| per channel}, as from `channel_absmax`.
        alpha: migration strength in [0, 1].
        nodes: weight MatMul names to smooth (default every one whose input is in `act_absmax`).

    Returns:
        (new ModelProto, {tensor: {"channels", "scale_min", "scale_max", "consumers"}}).
    """
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    _name_nodes(out)
    graph = out.graph
    inits = _initializers(out)
    wanted = None if nodes is None else set(nodes)
    groups: dict[str, list[_MatMul]] = {}
    for m in matmul_nodes(out):
        n = graph.node[m.index]
        if m.weight is None or len(m.activations) != 1 or (wanted is not None and m.name not in wanted):
            continue
        if (m.op_type == "Gemm" and _attr(n, "transA")) or (m.op_type == "MatMul" and m.weight != 1):
            continue  # reduction axis of the activation is not its last: not smoothed
        if n.input[m.activations[0]] in act_absmax:
            groups.setdefault(n.input[m.activations[0]], []).append(m)
    info: dict[str, Any] = {}
    graph_nodes = list(graph.node)
    before: dict[int, Any] = {}  # node index -> the Mul to emit right before it
    for t, members in groups.items():
        def in_rows(m: _MatMul) -> np.ndarray:  # the weight as (K, N): rows are input channels
            w = numpy_helper.to_array(inits[graph_nodes[m.index].input[m.weight]])
            return w.T if m.op_type == "Gemm" and _attr(graph_nodes[m.index], "transB") else w

        if any(in_rows(m).ndim != 2 for m in members):
            continue  # batched weights: not smoothed
        x = np.asarray(act_absmax[t], np.float64)
        w = np.max([np.abs(in_rows(m)).max(axis=1) for m in members], axis=0).astype(np.float64)
        if x.shape != w.shape:
            continue
        ok = (x > 0) & (w > 0)
        s = np.ones_like(x)
        s[ok] = x[ok] ** alpha / w[ok] ** (1.0 - alpha)
        s = np.clip(s, 1e-4, 1e4).astype(np.float32)
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{t}_smooth_inv_scale")
        smoothed = f"{t}_smoothed"
        graph.initializer.append(inv)
        before[min(m.index for m in members)] = helper.make_node("Mul", [t, inv.name], [smoothed],
                                                                 name=f"{t}_SmoothQuant")
        for m in members:
            n = graph_nodes[m.index]
            n.input[m.activations[0]] = smoothed
            wname = n.input[m.weight]
            w_arr = numpy_helper.to_array(inits[wname]).astype(np.float32)
            w_new = w_arr * s[None, :] if m.op_type == "Gemm" and _attr(n, "transB") else w_arr * s[:, None]
            new_name = f"{wname}_smoothed"
            while new_name in inits:  # a weight shared by two smoothed groups gets one copy each
                new_name += "_"
            t_new = numpy_helper.from_array(w_new.astype(np.float32), new_name)
            graph.initializer.append(t_new)
            inits[new_name] = t_new
            n.input[m.weight] = new_name
        info[t] = {"channels": int(s.size), "scale_min": float(s.min()), "scale_max": float(s.max()),
                   "consumers": [m.name for m in members]}
    graph.ClearField("node")
    for i, n in enumerate(graph_nodes):
        if i in before:
            graph.node.append(before[i])
        graph.node.append(n)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)
    return out, info


# --------------------------------------------------------------------------------------------
# Fidelity and the budget


def cached_channel_absmax(model: Any, graph_sha256: str, windows: np.ndarray, tokens_key: str,
                          input_names: list[str], tensors: list[str], cache_dir: str | os.PathLike | None,
                          batch_size: int = 8) -> dict[str, np.ndarray]:
    """`channel_absmax`, reused from `<cache_dir>/int8-channels-<key>.npz` when unchanged."""
    from compiler.artifacts import atomic_write

    key = settings_hash("int8-channel-absmax-v1", graph_sha256, tokens_key, list(windows.shape), sorted(tensors))
    path = Path(cache_dir) / f"int8-channels-{key[:32]}.npz" if cache_dir else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            stored = {str(k): z[k] for k in z.files}
        names = json.loads(str(stored.pop("__names__")))
        return {t: stored[f"t{i}"] for i, t in enumerate(names)}
    amax = channel_absmax(model, windows, input_names, tensors, batch_size)
    if path is not None:
        arrays = {f"t{i}": amax[t] for i, t in enumerate(tensors)}
        arrays["__names__"] = np.array(json.dumps(tensors))
        atomic_write(path, lambda p: np.savez(open(p, "wb"), **arrays))
    return amax


def quantize_within_budget(fp32_path: str | os.PathLike, calib_tokens: Any, heldout_tokens: Any,
                           input_names: list[str], output_names: list[str], settings: QuantSettings,
                           cache_dir: str | os.PathLike | None, batch_size: int = 8,
                           precision: Any = None) -> tuple[Any, QuantReport]:
    """Calibrate, place Q/DQ, and leave the most sensitive MatMuls float until the budget holds.

    1. SmoothQuant (when `settings.smoothquant_alpha` is set): per-channel max |x| of every
       weight MatMul's input over the calibration windows, then `smooth`; the smoothed FP32
       graph computes the same function and is what gets calibrated and quantized.
    2. Thresholds: `calibrate` over `calib_tokens` (cached).
    3. Placement: `insert_qdq` with `settings`.
    4. Budget: per-sample cosine of the first output vs the original FP32 graph on
       `heldout_tokens` (which must not overlap the calibration text); met when cosine_min >=
       `settings.min_cosine` and no output is non-finite.
    5. While not met and fewer than `max_excluded` nodes are excluded: sensitivity is measured
       once, on `sensitivity_samples` calibration windows (never held-out text): for each
       quantized node, the mean cosine deficit (1 - cosine) removed by leaving only that node
       float. The most sensitive node not yet excluded is left float, and the held-out budget
       measured again.

    Args:
        fp32_path: the FP32 ONNX file (opset >= 19).
        calib_tokens, heldout_tokens: `calibration.TokenizedSet`s of real text, disjoint.
        input_names, output_names: graph I/O; fidelity is measured on the first output.
        settings: `QuantSettings`.
        cache_dir: cache folder for thresholds and channel statistics (None: no cache).
        batch_size: held-out samples per run (padded to the batch's longest).
        precision: a `PrecisionSettings` (e.g. mode `hybrid`) or None. When given, every
            measurement is made on `convert_precision(qdq_graph, precision)` through the
            faithful FP16 reference, so that the budget holds for the graph that ships; the
            returned graph is still the FP32 + Q/DQ one (convert it afterwards).

    Returns:
        (FP32 + Q/DQ onnx.ModelProto, QuantReport with `fidelity`, `budget`, `steps`,
        `sensitivity`, `smoothquant` and each excluded node's measured effect).

    Raises:
        ValueError: see `insert_qdq` and `calibrate`; compiler.errors.DataError: graph inputs
            that text cannot fill.
    """
    import onnx

    from compiler.graph.onnx_io import onnx_sha256, save_onnx

    start = time.perf_counter()
    fp32_path = Path(fp32_path)
    fp32 = onnx.load(str(fp32_path))
    calib_windows = calibration_windows(calib_tokens, settings.calib_windows)
    smooth_info: dict[str, Any] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="int8-smoothed.") as tmp:
        model_path = fp32_path
        if settings.smoothquant_alpha is not None:
            placer = _Placer(fp32)
            nodes = list(placer.model.graph.node)
            acts = list(dict.fromkeys(nodes[m.index].input[m.activations[0]] for m in placer.matmuls
                                      if m.weight is not None and len(m.activations) == 1))
            amax = cached_channel_absmax(fp32_path, onnx_sha256(fp32_path), calib_windows, calib_tokens.key,
                                         input_names, acts, cache_dir, settings.calib_batch_size)
            smoothed, per_tensor = smooth(placer.model, amax, settings.smoothquant_alpha)
            del placer
            model_path = Path(tmp) / "model.smoothed.onnx"
            copy = onnx.ModelProto()
            copy.CopyFrom(smoothed)
            save_onnx(copy, model_path, external=True)
            del copy
            smooth_info = {"alpha": settings.smoothquant_alpha, "tensors": per_tensor}
            fp32 = smoothed
        placer = _Placer(fp32)
        del fp32
        nodes = list(placer.model.graph.node)
        wanted = list(dict.fromkeys(nodes[m.index].input[k] for m in placer.matmuls for k in m.activations))
        scales = calibrate(model_path, calib_tokens, input_names, settings, cache_dir, tensors=wanted)
    calib_seconds = round(time.perf_counter() - t0, 1)

    def variant(exclude: Mapping[str, str]) -> tuple[Any, QuantReport]:
        model, rep = placer.build(scales, settings, exclude_nodes=exclude)
        if precision is not None:
            from compiler.passes.precision import convert_precision

            model, _ = convert_precision(model, precision)
        return model, rep

    def ok(f: Mapping[str, Any]) -> bool:
        return f["cosine_min"] >= settings.min_cosine and f["nonfinite_count"] == 0

    heldout = FidelityProbe.on_tokens(fp32_path, heldout_tokens, input_names, output_names[0], batch_size)
    excluded: dict[str, str] = {}
    model, report = variant(excluded)
    fid = heldout.score(model).to_dict()
    steps = [{"action": "start", "int8_mac_fraction": report.int8_mac_fraction, **fid}]
    sensitivity: dict[str, float] = {}
    effects: dict[str, dict[str, float]] = {}
    if not ok(fid) and settings.max_excluded > 0:
        from tqdm import tqdm

        probe_set = window_set(calib_windows[: settings.sensitivity_samples], f"{calib_tokens.key}-windows")
        probe = FidelityProbe.on_tokens(fp32_path, probe_set, input_names, output_names[0], batch_size)
        base = probe.score(model).to_dict()
        for name in tqdm(report.quantized_nodes, desc="INT8 sensitivity", unit="node", disable=None, leave=False):
            sensitivity[name] = base["deficit_mean"] - probe.score(variant({name: "probe"})[0]).deficit_mean
        for name in sorted(sensitivity, key=sensitivity.get, reverse=True):
            if ok(fid) or len(excluded) >= settings.max_excluded:
                break
            excluded[name] = (f"float removes {sensitivity[name]:.3g} of the mean cosine deficit "
                              f"{base['deficit_mean']:.3g} on {probe.samples['heldout']} calibration windows")
            model, report = variant(excluded)
            fid = heldout.score(model).to_dict()
            effects[name] = {"calib_deficit_removed": sensitivity[name],
                             "heldout_cosine_min_after": fid["cosine_min"],
                             "heldout_cosine_mean_after": fid["cosine_mean"],
                             "int8_mac_fraction_after": report.int8_mac_fraction}
            steps.append({"action": f"float: {name}", "int8_mac_fraction": report.int8_mac_fraction, **fid})
    if precision is not None:  # the returned graph is the FP32 + Q/DQ one
        model, report = placer.build(scales, settings, exclude_nodes=excluded)
    for e in report.excluded:
        e.effect = effects.get(e.name)
    report.calibration = {"windows": int(calib_windows.shape[0]), "window_tokens": int(calib_windows.shape[1]),
                          "samples": len(calib_tokens), "tensors": len(scales), "seconds": calib_seconds}
    report.fidelity = {**fid, "heldout_samples": len(heldout_tokens),
                       "graph": "hybrid + INT8 (FP16 emulation)" if precision is not None else "FP32 + INT8 Q/DQ",
                       "reference": "FP32 graph, ONNX Runtime CPU"}
    report.budget = {"min_cosine": settings.min_cosine, "met": ok(fid), "excluded_by_budget": len(excluded),
                     "max_excluded": settings.max_excluded, "heldout_evaluations": heldout.evaluations,
                     "seconds": round(time.perf_counter() - start, 1)}
    report.steps = steps
    report.sensitivity = dict(sorted(sensitivity.items(), key=lambda kv: -kv[1]))
    report.smoothquant = smooth_info
    report.thresholds = {t: float(v) for t, v in scales.items()}
    report.smoothquant_alpha = settings.smoothquant_alpha if smooth_info else None
    if not ok(fid):
        log.warning("INT8 budget min_cosine %.4g not met (held-out cosine_min %.4g) after %d exclusions",
                    settings.min_cosine, fid["cosine_min"], len(excluded))
    log.info("INT8 %s: %d MatMuls quantized, %.1f %% of MatMul MACs, held-out cosine_min %.5f", settings.method,
             report.quantized_matmuls, 100 * report.int8_mac_fraction, fid["cosine_min"])
    return model, report
