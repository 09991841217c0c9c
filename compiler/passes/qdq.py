"""The Q/DQ pass: explicit INT8 QuantizeLinear/DequantizeLinear pairs for TensorRT 11.

TensorRT 11 builds INT8 kernels only where the ONNX graph says so: a QuantizeLinear ->
DequantizeLinear pair on each input of a MatMul/Gemm ("explicit quantization", TensorRT docs
"Working with Quantized Types"); it fuses DQ -> MatMul <- DQ into one INT8 GEMM. `QdqPlacer`
(one call: `insert_qdq`) places those pairs, symmetric INT8 with zero point 0, by these rules
in order (`QdqPlacer.plan`), each MatMul/Gemm left float reporting the rule's name:

1. `not-eligible`: inputs not FP32, a constant input of rank < 2, or two constants.
2. `sensitivity`: named in `exclude_nodes` (the budget loop's measured exclusions).
3. `pattern`: the name matches a `QuantSettings.exclude` fnmatch pattern (one matching nothing is refused).
4. `attention-bmm`: both inputs are activations (Q.K^T, probs.V), unless
   `QuantSettings.quantize_attention_bmm`.
5. Every other node is quantized:
   - activations: one Q/DQ pair per tensor, per tensor scale threshold / 127, shared by every
     quantized MatMul it feeds (the Q/K/V projections share the layer norm output's pair);
   - weights: stored as INT8 initializers, per output channel scales absmax / 127, one
     DequantizeLinear with `axis` = the output-channel axis (MatMul W[K, N]: axis 1; Gemm
     transB=1 W[N, K]: axis 0);
   - nothing else: no Q/DQ on MatMul outputs, layer norm, softmax, GELU, residual adds.

The output graph is FP32 with INT8 Q/DQ; `compiler.passes.precision.convert_precision` turns the
rest into FP16 afterwards (Q/DQ accept FP16 inputs and scales from opset 19 on, so the graph must
be at opset >= 19: export with `ExportSettings(opset=19)`, or see `upgrade_opset`). Thresholds
come from `compiler.quant.calibrate`; the budget loop is `compiler.quant.budget`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from compiler.errors import PrecisionError
from compiler.graph.analysis import FLOAT, GEMM_OPS, MacList, attr, matmul_macs
from compiler.settings import QuantSettings

MIN_OPSET = 19  # QuantizeLinear / DequantizeLinear take float16 inputs and scales from opset 19
INT8_MAX = 127
# Scales are kept at or above FP16's smallest normal so that the precision pass, which stores
# them in FP16 next to FP16 tensors, never flushes one to zero (a threshold of 127 * 2**-14 =
# 0.0078 or less is an all-but-constant tensor).
MIN_SCALE = 2.0**-14


@dataclass
class ExcludedNode:
    """A MatMul/Gemm left unquantized, and why.

    Attributes:
        name / op_type: the node. macs: its multiply-accumulates at the report's `mac_shape`.
        reason: the rule that left it float (the module's rules 1-4, by name).
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
    """What `insert_qdq` (and `compiler.quant.budget.quantize_within_budget`) did.

    Attributes:
        method / quantize_attention_bmm: the calibration method and the attention bmm setting.
        smoothquant_alpha: SmoothQuant strength `quantize_within_budget` applied; None when the
            graph was not smoothed (`insert_qdq` itself never smooths).
        quantized_matmuls / quantized_nodes: MatMul/Gemm nodes with INT8 inputs; their names.
        excluded: every MatMul/Gemm left float, with reason and (budget loop) measured effect.
        activation_qdq / int8_weights: Q/DQ pairs on activations (one per tensor); weight
            initializers stored as INT8.
        matmul_macs: {"int8": MACs, "float": MACs} at `mac_shape` ({"batch", "sequence"});
            int8_mac_fraction: share of MatMul/Gemm MACs that run in INT8.
        Filled by `quantize_within_budget`: calibration (windows, tokens, seconds,
            thresholds_from); fidelity (held-out, vs FP32); budget (and whether it was met);
            steps (the loop's, with their held-out fidelity); sensitivity (per node, on calibration windows: its local INT8
            error, or with `QuantSettings.sensitivity="end-to-end"` the cosine deficit its
            exclusion removes); smoothquant (per smoothed tensor, the channel scale range);
            thresholds (calibrated |x| mapping to 127 per activation; QAT starts from these).
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
        """Every field, as plain JSON-ready data."""
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
class MatMulSite:
    """One MatMul/Gemm and how it would be quantized: its position in `model.graph.node`,
    the input positions of its activations ([] when not eligible) and of its weight (or None),
    the weight's output-channel axis, its MACs, whether both inputs are activations (`bmm`),
    and why it cannot be quantized (`not_eligible`, "" when it can)."""

    index: int
    name: str
    op_type: str
    activations: list[int]
    weight: int | None
    axis: int
    macs: int
    bmm: bool
    not_eligible: str = ""


def name_nodes(model: Any) -> None:
    """Give every unnamed node of `model` a unique name `<op_type>_<index>`, in place.

    Reports and exclusions address nodes by name, so every pass that reports nodes calls this
    on its own copy first.
    """
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)


def _float_tensors(model: Any) -> set[str]:
    import onnx

    from compiler.graph.onnx_io import without_weights

    g = onnx.shape_inference.infer_shapes(without_weights(model)).graph
    names = {v.name for v in [*g.input, *g.output, *g.value_info] if v.type.tensor_type.elem_type == FLOAT}
    names |= {t.name for t in model.graph.initializer if t.data_type == FLOAT}
    return names


def _weight_axis(node: Any, weight: int, rank: int) -> int:
    """Output-channel axis of input `weight` (0 or 1) of a MatMul/Gemm, the weight of `rank`."""
    if node.op_type == "Gemm":
        return (0 if attr(node, "transB") else 1) if weight == 1 else (1 if attr(node, "transA") else 0)
    return rank - 1 if weight == 1 else rank - 2


def matmul_nodes(model: Any, mac_shape: tuple[int, int] = (1, 128)) -> MacList:
    """Every MatMul/Gemm with float inputs: which inputs are activations, which a weight.

    A weight is a float initializer of rank >= 2; its output-channel axis is the last one for
    MatMul's second input (W[..., K, N]), the second-to-last for its first input, and for
    Gemm's B 0 with transB=1 (W[N, K]) else 1.

    Args:
        model: onnx.ModelProto (not modified).
        mac_shape: (batch, sequence) at which MACs are counted (`graph.analysis.matmul_macs`).

    Returns:
        One `MatMulSite` per MatMul/Gemm, in graph order; `.shape`: where MACs were counted.

    Raises:
        compiler.errors.PrecisionError: a MatMul whose shape cannot be resolved at `mac_shape`.
    """
    inits = {t.name: t for t in model.graph.initializer}
    floats = _float_tensors(model)
    found = []
    for i, n in enumerate(model.graph.node):
        if n.op_type not in GEMM_OPS:
            continue
        acts = [k for k in (0, 1) if n.input[k] not in inits]
        consts = [k for k in (0, 1) if n.input[k] in inits]
        weight, axis, why = None, 0, ""
        if not all(t in floats for t in n.input[:2]):
            why = "inputs are not FP32"
        elif len(acts) == 1 and len(inits[n.input[consts[0]]].dims) >= 2:
            weight = consts[0]
            axis = _weight_axis(n, weight, len(inits[n.input[weight]].dims))
        elif len(acts) == 1:
            why = "its constant input has rank < 2 (no output-channel axis)"
        elif not acts:
            why = "both inputs are constants (constant folding's job)"
        found.append(MatMulSite(i, n.name, n.op_type, acts if not why else [], weight, axis, 0,
                                len(acts) == 2 and not why, why))
    macs = matmul_macs(model, list(model.graph.node), mac_shape)
    for m in found:
        m.macs = macs[m.index]
    return MacList(found, macs.shape)


def calibration_tensors(model: Any) -> list[str]:
    """Activation tensors that feed a MatMul/Gemm (every one `insert_qdq` may quantize), in
    graph order, each once."""
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


class _Rewrite:
    """The Q/DQ nodes and initializers one `QdqPlacer.call` adds, collected before the graph is
    emitted: fresh names, one dequantized tensor per activation / (weight, axis), and which node
    input reads which dequantized tensor."""

    def __init__(self, nodes: list[Any], inits: Mapping[str, Any]) -> None:
        self.taken = {t for n in nodes for t in [*n.input, *n.output]} | set(inits) | {n.name for n in nodes}
        self.act_dq: dict[str, str] = {}  # activation -> its dequantized name
        self.weight_dq: dict[tuple[str, int], str] = {}  # (weight, axis) -> its dequantized name
        self.pending: dict[str, list[Any]] = {}  # origin -> nodes to emit before its first consumer
        self.new_inits: list[Any] = []
        self.rewired: dict[int, dict[int, str]] = {}  # node index -> {input position: new input}

    def fresh(self, base: str) -> str:
        name = base
        while name in self.taken:
            name += "_"
        self.taken.add(name)
        return name

    def activation(self, t: str, threshold: float) -> str:
        """QuantizeLinear -> DequantizeLinear of activation `t` (per tensor scale); the DQ output."""
        from onnx import helper, numpy_helper

        threshold = float(threshold)
        if not np.isfinite(threshold) or threshold < 0:
            raise ValueError(f"activation threshold of {t!r} is {threshold}: expected finite >= 0")
        scale = np.float32(max(threshold / INT8_MAX, MIN_SCALE))
        s_name, z_name = self.fresh(f"{t}_scale"), self.fresh(f"{t}_zero_point")
        q_out, dq_out = self.fresh(f"{t}_quantized"), self.fresh(f"{t}_dequantized")
        self.new_inits += [numpy_helper.from_array(np.array(scale, np.float32), s_name),
                           numpy_helper.from_array(np.array(0, np.int8), z_name)]
        self.pending.setdefault(t, []).extend([
            helper.make_node("QuantizeLinear", [t, s_name, z_name], [q_out], name=self.fresh(f"{t}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out],
                             name=self.fresh(f"{t}_DequantizeLinear"))])
        self.act_dq[t] = dq_out
        return dq_out

    def weight(self, w: str, axis: int, q: np.ndarray, s: np.ndarray) -> str:
        """INT8 initializer + DequantizeLinear(axis) of weight `w`; the DQ output."""
        from onnx import helper, numpy_helper

        q_name, s_name, z_name = self.fresh(f"{w}_quantized"), self.fresh(f"{w}_scale"), self.fresh(f"{w}_zero_point")
        dq_out = self.fresh(f"{w}_dequantized")
        self.new_inits += [numpy_helper.from_array(q, q_name), numpy_helper.from_array(s, s_name),
                           numpy_helper.from_array(np.zeros(s.shape, np.int8), z_name)]
        self.pending.setdefault(f"__weight__{dq_out}", []).append(
            helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_out],
                             name=self.fresh(f"{w}_DequantizeLinear"), axis=axis))
        self.weight_dq[(w, axis)] = dq_out
        return dq_out

    def emit(self, src: Any, nodes: list[Any]) -> Any:
        """The new model: `src`'s nodes with rewired inputs, each Q/DQ right before its first
        quantized consumer (keeps topological order); FP32 weights no node reads are dropped."""
        import onnx

        out = onnx.ModelProto(ir_version=src.ir_version, opset_import=src.opset_import, producer_name=src.producer_name,
                              producer_version=src.producer_version, domain=src.domain, model_version=src.model_version,
                              doc_string=src.doc_string, metadata_props=src.metadata_props, functions=src.functions)
        g = src.graph
        out.graph.CopyFrom(onnx.GraphProto(name=g.name, input=g.input, output=g.output, value_info=g.value_info,
                                           doc_string=g.doc_string))
        dq_source = {dq: t for t, dq in self.act_dq.items()}
        dq_source.update({dq: f"__weight__{dq}" for dq in self.weight_dq.values()})
        emitted = set()
        new_nodes = []
        for i, n in enumerate(nodes):
            if i in self.rewired:
                n = onnx.NodeProto()
                n.CopyFrom(nodes[i])
                for k, name in self.rewired[i].items():
                    origin = dq_source[name]
                    if origin not in emitted:
                        new_nodes.extend(self.pending[origin])
                        emitted.add(origin)
                    n.input[k] = name
            new_nodes.append(n)
        out.graph.node.extend(new_nodes)
        used = {t for n in new_nodes for t in n.input} | {o.name for o in g.output}
        for t in g.initializer:  # FP32 weights that no float consumer reads any more are dropped
            if t.name in used:
                out.graph.initializer.add().CopyFrom(t)
        out.graph.initializer.extend(self.new_inits)
        return out


@dataclass
class QdqResult:
    """What one `QdqPlacer.call` returns: the new onnx.ModelProto (FP32 + INT8 Q/DQ; the
    placer's graph is not modified), its `QuantReport` (counts, exclusions and MACs; the budget
    fields stay empty), and whether at least one MatMul/Gemm was quantized (`modified`)."""

    model: Any
    report: QuantReport
    modified: bool


class QdqPlacer:
    """The Q/DQ pass over one FP32 graph; builds as many Q/DQ variants of it as asked.

    Declared input (checked here): an onnx.ModelProto whose default opset is >= `MIN_OPSET` and
    whose weights are initializers. The placer keeps its own copy (with every node named) and
    quantizes each weight once per (weight, axis, scale): the budget loop's many variants share
    that work.

    Args:
        model: FP32 onnx.ModelProto (not modified).
        mac_shape: (batch, sequence) for `int8_mac_fraction`'s MAC counts. Defaults to (1, 128).

    Attributes:
        model: the named copy. matmuls: its `MatMulSite`s. by_name: {node name: MatMulSite}.

    Raises:
        ValueError: the default opset is below `MIN_OPSET`.
    """

    def __init__(self, model: Any, mac_shape: tuple[int, int] = (1, 128)) -> None:
        import onnx

        if not any(o.domain in ("", "ai.onnx") and o.version >= MIN_OPSET for o in model.opset_import):
            raise ValueError(f"the graph's default opset is below {MIN_OPSET}: QuantizeLinear/DequantizeLinear "
                             "take FP16 inputs and scales (which the precision pass produces) from opset 19 on. "
                             "Export with ExportSettings(opset=19), or convert with "
                             "compiler.passes.qdq.upgrade_opset(model).")
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        name_nodes(self.model)
        self.matmuls = matmul_nodes(self.model, mac_shape)
        self.mac_shape = self.matmuls.shape
        self.by_name = {m.name: m for m in self.matmuls}
        self.inits = {t.name: t for t in self.model.graph.initializer}
        self._weights: dict[tuple[str, int, bytes | None], tuple[Any, Any]] = {}

    def plan(self, settings: QuantSettings, exclude_nodes: Mapping[str, str] | None = None
             ) -> tuple[list[MatMulSite], list[ExcludedNode]]:
        """(MatMuls to quantize, MatMuls left float with the reason), by rules 1-5 (PrecisionError: see 3)."""
        unmatched = [p for p in settings.exclude if not any(fnmatch.fnmatchcase(m.name, p) for m in self.matmuls)]
        if unmatched:
            raise PrecisionError(f"--exclude {' '.join(unmatched)}: matches no MatMul/Gemm node of the graph; they "
                                 f"are named like {', '.join(m.name for m in self.matmuls[:4])} (fnmatch patterns)")
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
            self._weights[key] = _weight_int8(numpy_helper.to_array(self.inits[name]), axis, scale)
        return self._weights[key]

    def call(self, act_scales: Mapping[str, float], settings: QuantSettings,
             weight_scales: Mapping[str, np.ndarray] | None = None,
             exclude_nodes: Mapping[str, str] | None = None) -> QdqResult:
        """One Q/DQ variant of the graph; see `insert_qdq` for the arguments and errors."""
        quantized, excluded = self.plan(settings, exclude_nodes)
        nodes = list(self.model.graph.node)
        weight_scales = dict(weight_scales or {})
        unknown = sorted(set(weight_scales) - set(self.inits))
        if unknown:
            raise ValueError(f"weight_scales names tensors that are not initializers: {unknown[:5]}")
        rw = _Rewrite(nodes, self.inits)
        missing = []
        for m in quantized:
            n = nodes[m.index]
            for k in m.activations:
                t = n.input[k]
                if t not in rw.act_dq and t not in act_scales:
                    missing.append(t)
                    continue
                rw.rewired.setdefault(m.index, {})[k] = rw.act_dq.get(t) or rw.activation(t, act_scales[t])
            if m.weight is not None:
                w = n.input[m.weight]
                dq = rw.weight_dq.get((w, m.axis)) or rw.weight(w, m.axis, *self._weight(w, m.axis, weight_scales.get(w)))
                rw.rewired.setdefault(m.index, {})[m.weight] = dq
        if missing:
            raise ValueError(f"no calibrated threshold for {len(missing)} activation tensor(s) feeding quantized "
                             f"MatMuls, e.g. {sorted(set(missing))[:3]}; calibrate this graph "
                             "(compiler.quant.calibrate.calibrate)")
        return QdqResult(rw.emit(self.model, nodes), self._report(settings, quantized, excluded, rw), bool(quantized))

    def _report(self, settings: QuantSettings, quantized: list[MatMulSite], excluded: list[ExcludedNode],
                rw: _Rewrite) -> QuantReport:
        total, int8 = sum(m.macs for m in self.matmuls), sum(m.macs for m in quantized)
        return QuantReport(settings.method, settings.quantize_attention_bmm, quantized_matmuls=len(quantized),
                           quantized_nodes=[m.name for m in quantized], excluded=excluded,
                           activation_qdq=len(rw.act_dq), int8_weights=len(rw.weight_dq),
                           matmul_macs={"int8": int8, "float": total - int8},
                           mac_shape={"batch": self.mac_shape[0], "sequence": self.mac_shape[1]},
                           int8_mac_fraction=int8 / total if total else 0.0)


def insert_qdq(model: Any, act_scales: Mapping[str, float], settings: QuantSettings,
               weight_scales: Mapping[str, np.ndarray] | None = None, *,
               exclude_nodes: Mapping[str, str] | None = None,
               mac_shape: tuple[int, int] = (1, 128)) -> tuple[Any, QuantReport]:
    """Place INT8 Q/DQ pairs on the inputs of the graph's MatMul/Gemm nodes (`QdqPlacer`, once).

    Args:
        model: FP32 onnx.ModelProto at opset >= 19 (not modified). Weights must be initializers
            (the export folds constants).
        act_scales: {activation tensor: threshold} (absmax or clipped range, as from
            `compiler.quant.calibrate.calibrate`); the scale is threshold / 127 (at least
            2**-14). Needed for every activation input of a quantized node.
        settings: placement settings (`quantize_attention_bmm`, `exclude`, and `method` for the
            report).
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
    result = QdqPlacer(model, mac_shape).call(act_scales, settings, weight_scales, exclude_nodes)
    return result.model, result.report


def upgrade_opset(model: Any, opset: int = MIN_OPSET) -> Any:
    """The onnx.ModelProto `model` (not modified) at default-domain `opset` (for graphs exported
    below 19): `model` itself when already at `opset` or above, else a new model from
    `onnx.version_converter.convert_version`."""
    import onnx

    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current >= opset:
        return model
    return onnx.version_converter.convert_version(model, opset)
