"""The precision pass (the `precision` stage of `compiler.results.STAGES`): ONNX -> strongly typed ONNX.

TensorRT 11 networks are strongly typed: the builder runs each layer in the type its tensors
carry, so precision is decided here, in the graph (TensorRT 11 docs, "Strongly Typed Networks").
The pass assigns every node that computes floats a precision, then makes the types agree:

1. `fp32`: the graph is returned unchanged.
2. `fp16`: every float node computes in FP16 (the naive baseline).
3. `hybrid`: the published rule (softmax and layer norm in FP32, linear layers in FP16; BERT-base
   and GPT-2 kept cosine >= 0.9998 with no NaN, where full FP16 produced NaN). The rules live
   in `compiler.passes.precision_rules`, each a pattern, a check and the reason it reports:
   - `softmax`: Softmax / LogSoftmax, and the decomposed Exp -> ReduceSum -> Div pattern.
   - `layer-norm`: LayerNormalization and other normalization ops, the decomposed layer norm
     (ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div) and RMS norm (Llama, T5).
   - `reduction`: accumulating reductions (ReduceSum, ReduceMean, ReduceL2, ...).
   - `position-angle`: Cos / Sin of position x frequency (rotary embeddings) and its cone.
   - `fp16-range` (every mode but fp32): a node whose constant input holds finite values
     beyond FP16's range that are not mask fill values (see below) stays FP32 with it.
   Everything else (MatMul, Gemm, GELU, residual Add, ...) runs in FP16.
4. `auto`: only the nodes `compiler.passes.auto_precision` measured a need for (passed as `fp32_nodes`).

Type agreement: float initializers used by FP16 nodes are stored in FP16 (a second copy only
when FP32 nodes use them too); a tensor crossing between precisions gets one Cast per target
type, shared by all its consumers, so adjacent FP32 nodes form one island with Casts only at its
borders. Graph inputs and outputs keep their types; an FP16 graph output that also feeds other
nodes is renamed inside the graph and Cast back to FP32 under its own name.

Constants beyond FP16's range whose magnitude is >= 1e30 are mask fill values (Hugging Face
fills masked attention scores with finfo(float32).min = -3.4e38): they are clamped to
`PrecisionSettings.fp16_clamp`, so that score + mask stays finite; the report lists each.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from compiler.errors import PrecisionError
from compiler.graph.analysis import (FLOAT, FLOAT16, FP16_MAX, array, check_fp32_straight_line, matmul_macs,
                                     tensor_consumers, tensor_types)
from compiler.graph.onnx_io import constants_to_initializers, graph_copy
from compiler.passes.precision_rules import HYBRID_RULES, MASK_FILL_MIN, constant_absmax, rule_fp16_range
from compiler.settings import PrecisionSettings

log = logging.getLogger(__name__)

DTYPE_NAME = {FLOAT: "fp32", FLOAT16: "fp16"}

# Inputs that accept any type: these never get a Cast in front.
ANY_TYPE_INPUTS = {"Shape": {0}, "Size": {0}, "Cast": {0}, "CastLike": {0}}
# Inputs / outputs whose type the ONNX spec fixes to float32 whatever the node computes in.
FIXED_FP32_INPUTS = {"Resize": {2}, "Upsample": {1}}
FIXED_FP32_OUTPUTS = {"LayerNormalization": {1, 2}}  # mean / inv std dev follow stash_type


@dataclass
class PinnedNode:
    """An FP32 node and the rule that pinned it."""

    name: str
    op_type: str
    rule: str
    detail: str


@dataclass
class ClampedConstant:
    """A constant whose values do not fit FP16, and what was done about it."""

    tensor: str
    values_out_of_range: int
    absmax: float
    action: str
    reason: str


@dataclass
class PrecisionReport:
    """What the precision pass decided.

    Attributes:
        mode: fp32 / fp16 / hybrid.
        nodes: {"fp32": n, "fp16": n} over nodes that compute floats (Casts it inserted excluded).
        by_op: {op_type: {"fp32": n, "fp16": n}}.
        fp32_nodes: every FP32 node with the rule that pinned it (empty for fp32 mode).
        constants: constants clamped or kept FP32 because of FP16's range.
        underflow_values: nonzero constant values that FP16 flushes to zero (|v| < 2**-24).
        casts_inserted: Cast nodes the pass added.
        matmul_macs: {"fp16": MACs, "fp32": MACs} of MatMul/Gemm at `mac_shape`.
        matmul_fp16_fraction: share of MatMul/Gemm multiply-accumulates that run in FP16.
    """

    mode: str
    nodes: dict[str, int]
    by_op: dict[str, dict[str, int]]
    fp32_nodes: list[PinnedNode] = field(default_factory=list)
    constants: list[ClampedConstant] = field(default_factory=list)
    underflow_values: int = 0
    casts_inserted: int = 0
    matmul_macs: dict[str, int] = field(default_factory=dict)
    mac_shape: dict[str, int] = field(default_factory=dict)
    matmul_fp16_fraction: float = 0.0
    search: dict[str, Any] = field(default_factory=dict)  # `auto` only: see compiler.passes.auto_precision

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The short form used in report.json and the manifest."""
        return {"mode": self.mode, "nodes": self.nodes, "cast_nodes_inserted": self.casts_inserted,
                "matmul_fp16_fraction": round(self.matmul_fp16_fraction, 4)}


@dataclass
class Assignment:
    """The precision each node computes in, before the graph is rewritten.

    Attributes:
        pins: {node index: (rule, detail)} of the nodes kept in FP32 and the rule that did it.
        precision: {node index: FLOAT or FLOAT16} of every node that produces floats.
        follows: per node, True when it only reads floats (Shape, Cast to int, comparisons): it
            takes the type its first float input ends up with.
        out_of_range: {constant: a node it keeps in FP32} for the fp16-range rule.
    """

    pins: dict[int, tuple[str, str]]
    precision: dict[int, int]
    follows: list[bool]
    out_of_range: dict[str, str]


def convert_precision(model: Any, settings: PrecisionSettings, mac_shape: tuple[int, int] = (1, 128),
                      fp32_nodes: Mapping[str, tuple[str, str]] | None = None) -> tuple[Any, PrecisionReport]:
    """Rewrite an FP32 ONNX model into a strongly typed FP32/FP16 graph.

    The steps: a working copy (`working_copy`), a precision per node by the mode's rules
    (`choose_precisions`), the nodes retyped with Casts at island borders (`CastInserter`),
    float initializers retyped (`retype_initializers`), graph outputs cast back to their
    declared type (`cast_graph_outputs`), and the report.

    Args:
        model: onnx.ModelProto with FP32 float tensors (not modified).
        settings: `mode` (fp32 / fp16 / hybrid / auto) and the clamp value for mask constants.
            `hybrid` applies `HYBRID_RULES`; `fp16` and `auto` pin only what `fp32_nodes` and
            the fp16-range rule name.
        mac_shape: (batch, sequence) at which MatMul/Gemm MACs are counted for
            `matmul_fp16_fraction`.
        fp32_nodes: {node name: (rule, detail)} kept in FP32 besides the mode's rules (the
            `auto` search passes its decisions here).

    Returns:
        (new ModelProto, PrecisionReport). Graph inputs/outputs keep their dtypes.

    Raises:
        PrecisionError: the graph has control flow (If/Loop/Scan), ops outside the standard
            domain, 16-bit float tensors (`check_fp32_straight_line`), tensors whose type shape
            inference cannot tell, or `fp32_nodes` names a node that is not in the graph.
    """
    work, all_inits = working_copy(model, settings.mode)
    graph = work.graph
    nodes = list(graph.node)
    types = tensor_types(model)
    inits = {t.name: t for t in all_inits}
    macs_by_node = matmul_macs(model, nodes, mac_shape)  # while node tensors keep their FP32 names
    choice = choose_precisions(nodes, types, inits, settings.mode, fp32_nodes)
    if settings.mode == "fp32":  # the graph unchanged (a copy)
        return work, _report(settings.mode, nodes, choice, macs_by_node, macs_by_node.shape)

    cast = CastInserter(graph.input, types, inits, settings.fp16_clamp)
    for i, n in enumerate(nodes):
        cast.add_node(n, choice.precision.get(i), choice.follows[i])
    constants, underflow = retype_initializers(graph, all_inits, cast.init_names, settings.fp16_clamp)
    kept = _kept_fp32_constants(choice.out_of_range, inits)
    output_casts = cast_graph_outputs(graph, types, cast.dtype_of, cast.nodes)

    graph.ClearField("node")
    graph.node.extend(cast.nodes)
    graph.ClearField("value_info")  # stale types (TensorRT and ONNX Runtime infer their own)
    report = _report(settings.mode, nodes, choice, macs_by_node, macs_by_node.shape,
                     constants=[*cast.clamped, *constants, *kept], underflow=underflow,
                     casts=cast.casts_inserted + output_casts)
    log.info("precision %s: %s, %d Casts inserted, matmul_fp16_fraction %.3f", settings.mode,
             report.nodes, report.casts_inserted, report.matmul_fp16_fraction)
    return work, report


def working_copy(original: Any, mode: str) -> tuple[Any, list[Any]]:
    """The model the pass rewrites, and every initializer a node may read.

    Args:
        original: the FP32 onnx.ModelProto (not modified).
        mode: `fp32` copies the whole model, which is then returned unchanged. Otherwise the
            copy has no weights: Constant nodes become initializers, the graph's initializer
            list is emptied, and `retype_initializers` refills it one tensor at a time.

    Returns:
        (copy whose nodes all have unique names, [original's initializers, then the former
        Constant nodes']).

    Raises:
        PrecisionError: a subgraph, another domain's ops or 16-bit floats (`check_fp32_straight_line`).
    """
    import onnx

    if mode == "fp32":
        model = onnx.ModelProto()
        model.CopyFrom(original)
    else:
        model = graph_copy(original)
        constants_to_initializers(model)
    graph = model.graph
    for i, n in enumerate(graph.node):  # rules and reports address nodes by unique names
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    check_fp32_straight_line(original)
    if mode == "fp32":
        return model, list(graph.initializer)
    constants_as_inits = []
    for t in graph.initializer:  # small: Constant nodes turned initializers
        c = onnx.TensorProto()
        c.CopyFrom(t)
        constants_as_inits.append(c)
    graph.ClearField("initializer")
    return model, [*original.graph.initializer, *constants_as_inits]


def choose_precisions(nodes: list[Any], types: dict[str, int], inits: dict[str, Any], mode: str,
                      fp32_nodes: Mapping[str, tuple[str, str]] | None) -> Assignment:
    """Pin nodes to FP32 by the mode's rules; every other node that produces floats runs FP16.

    Args:
        nodes: the working copy's nodes (unique names). types: {tensor: ONNX elem_type}.
        inits: {name: TensorProto} of every initializer. mode: fp32 / fp16 / hybrid / auto.
        fp32_nodes: {node name: (rule, detail)} pinned besides the mode's rules.

    Returns:
        The Assignment; in `fp32` mode every float node is FLOAT.

    Raises:
        PrecisionError: `fp32_nodes` names a node that is not in `nodes`.
    """
    computes = [n.op_type != "Constant" and any(_is_float(types, t) for t in n.output) for n in nodes]
    follows = [not c and any(_is_float(types, t) for t in n.input) for c, n in zip(computes, nodes)]
    pins: dict[int, tuple[str, str]] = {}
    if mode == "hybrid":
        consumers = tensor_consumers(nodes)
        for rule in HYBRID_RULES:
            pins.update(rule(nodes, consumers))
    if fp32_nodes:
        index = {n.name: i for i, n in enumerate(nodes)}
        unknown = sorted(set(fp32_nodes) - set(index))
        if unknown:
            raise PrecisionError(f"fp32_nodes names nodes that are not in the graph: {unknown[:5]}")
        pins.update({index[name]: why for name, why in fp32_nodes.items()})
    out_of_range: dict[str, str] = {}  # constant -> a node it keeps in FP32
    if mode != "fp32":
        range_pins, out_of_range = rule_fp16_range(nodes, inits)
        pins.update(range_pins)
    precision = {i: FLOAT if mode == "fp32" or i in pins else FLOAT16
                 for i in range(len(nodes)) if computes[i]}
    return Assignment(pins, precision, follows, out_of_range)


class CastInserter:
    """Retypes nodes one at a time, in graph order, inserting Casts where precisions meet.

    A tensor read in a type other than its producer's gets one Cast per target type, shared by
    all its readers, so adjacent FP32 nodes form one island with Casts only at its borders.
    Initializers are never cast: a reader gets the FP32 original or an FP16 copy
    (`init_names`), which `retype_initializers` writes.

    Args:
        graph_inputs: the graph's input ValueInfos (they keep their types).
        types: {tensor: ONNX elem_type} of the FP32 graph. inits: {name: TensorProto}.
        clamp: |value| that mask fill values in ConstantOfShape nodes are clamped to in FP16.

    Attributes:
        nodes: the rewritten node list, Casts included. casts_inserted: Casts added.
        dtype_of: {float tensor: FLOAT or FLOAT16} as rewritten so far.
        init_names: {(initializer, FLOAT or FLOAT16): the name its readers use}.
        clamped: ClampedConstants of the ConstantOfShape nodes retyped to FP16.
    """

    def __init__(self, graph_inputs: Iterable[Any], types: dict[str, int], inits: dict[str, Any],
                 clamp: float) -> None:
        self.types, self.inits, self.clamp = types, inits, clamp
        self.nodes: list[Any] = []
        self.casts_inserted = 0
        self.init_names: dict[tuple[str, int], str] = {}
        self.clamped: list[ClampedConstant] = []
        self._cast_outputs: dict[tuple[str, int], str] = {}
        self.dtype_of = {inp.name: FLOAT for inp in graph_inputs if _is_float(types, inp.name)}
        self.dtype_of.update({name: FLOAT for name, t in inits.items() if t.data_type == FLOAT})

    def value_as(self, name: str, target: int) -> str:
        """The name under which tensor `name` reads as `target` (a Cast output when needed)."""
        import onnx

        key = (name, target)
        if name in self.inits:
            if key not in self.init_names:
                self.init_names[key] = name if target == FLOAT else f"{name}__fp16"
            return self.init_names[key]
        if self.dtype_of.get(name, target) == target:
            return name
        if key not in self._cast_outputs:
            out = f"{name}__to_{DTYPE_NAME[target]}"
            self.nodes.append(onnx.helper.make_node("Cast", [name], [out], to=target,
                                                    name=f"{name}__cast_{DTYPE_NAME[target]}"))
            self._cast_outputs[key] = out
            self.dtype_of[out] = target
            self.casts_inserted += 1
        return self._cast_outputs[key]

    def add_node(self, n: Any, precision: int | None, follows: bool) -> None:
        """Append node `n` computing in `precision` (None: it computes no floats), its float
        inputs read in that type; a `follows` node takes its first float input's type."""
        if follows:
            first = next(t for t in n.input if _is_float(self.types, t))
            p = FLOAT if first in self.inits else self.dtype_of.get(first, FLOAT)
        elif precision is not None:
            p = precision
        else:
            self.nodes.append(n)
            return
        any_type = ANY_TYPE_INPUTS.get(n.op_type, set())
        fixed = FIXED_FP32_INPUTS.get(n.op_type, set())
        for k, t in enumerate(n.input):
            if not _is_float(self.types, t) or k in any_type:
                if k in any_type and t in self.inits and _is_float(self.types, t):
                    n.input[k] = self.value_as(t, FLOAT)
                continue
            n.input[k] = self.value_as(t, FLOAT if k in fixed else p)
        out_fixed = FIXED_FP32_OUTPUTS.get(n.op_type, set())
        for k, t in enumerate(n.output):
            if _is_float(self.types, t):
                self.dtype_of[t] = FLOAT if k in out_fixed else p
        clamped = _retype_attributes(n, p, self.clamp)
        if clamped:
            self.clamped.append(_mask_fill_clamped(f"{n.name}.value", 1, clamped, self.clamp))
        self.nodes.append(n)


def retype_initializers(graph: Any, all_inits: list[Any], init_names: dict[tuple[str, int], str],
                        clamp: float) -> tuple[list[ClampedConstant], int]:
    """Refill `graph.initializer`: FP16 copies for FP16 readers, FP32 originals only when read
    in FP32 (or never read as float), other types unchanged.

    Copied one tensor at a time: peak memory is the input model plus the output.

    Args:
        graph: the working copy's GraphProto (initializer list empty).
        all_inits: every initializer, in order (`working_copy`).
        init_names: `CastInserter.init_names`. clamp: |value| mask fill values are clamped to.

    Returns:
        (ClampedConstants of the mask fill values clamped, nonzero values FP16 flushed to zero).
    """
    used_fp32 = {name for (name, target) in init_names if target == FLOAT}
    used = {name for name, _ in init_names}
    constants: list[ClampedConstant] = []
    underflow = 0
    for t in all_inits:
        if t.data_type != FLOAT or t.name in used_fp32 or t.name not in used:
            graph.initializer.add().CopyFrom(t)
        if t.data_type == FLOAT and (t.name, FLOAT16) in init_names:
            half, clamped, lost = _to_fp16(t, init_names[(t.name, FLOAT16)], clamp)
            underflow += lost
            if clamped:
                constants.append(_mask_fill_clamped(t.name, clamped[0], clamped[1], clamp))
            graph.initializer.add().CopyFrom(half)
    return constants, underflow


def cast_graph_outputs(graph: Any, types: dict[str, int], dtype_of: dict[str, int], nodes: list[Any]) -> int:
    """Graph outputs keep their types: an FP32 output computed in FP16 is renamed inside the
    graph (`<name>__fp16`, in every node of `nodes`) and Cast back to FP32 under its own name.

    Returns:
        The number of Casts appended to `nodes`.
    """
    import onnx

    casts = 0
    for out in graph.output:
        if types.get(out.name) == FLOAT and dtype_of.get(out.name) == FLOAT16:
            inner = f"{out.name}__fp16"
            for node in nodes:
                for lst in (node.input, node.output):
                    for k, t in enumerate(lst):
                        if t == out.name:
                            lst[k] = inner
            nodes.append(onnx.helper.make_node("Cast", [inner], [out.name], to=FLOAT,
                                               name=f"{out.name}__output_cast_fp32"))
            casts += 1
    return casts


def _report(mode: str, nodes: list[Any], choice: Assignment, macs_by_node: dict[int, int],
            mac_shape: tuple[int, int], constants: list[ClampedConstant] | None = None,
            underflow: int = 0, casts: int = 0) -> PrecisionReport:
    """The PrecisionReport of `choice` (FP32 pins listed except in `fp32` mode)."""
    precision = choice.precision
    report = PrecisionReport(mode, {"fp32": sum(v == FLOAT for v in precision.values()),
                                    "fp16": sum(v == FLOAT16 for v in precision.values())},
                             _by_op(nodes, precision))
    if mode != "fp32":
        report.fp32_nodes = [PinnedNode(nodes[i].name, nodes[i].op_type, *choice.pins[i])
                             for i in sorted(choice.pins) if precision.get(i) == FLOAT]
    report.constants = constants or []
    report.underflow_values = underflow
    report.casts_inserted = casts
    _count_macs(macs_by_node, precision, mac_shape, report)
    return report


def _is_float(types: dict[str, int], name: str) -> bool:
    return bool(name) and types.get(name) == FLOAT


def _mask_fill_clamped(tensor: str, count: int, absmax: float, clamp: float) -> ClampedConstant:
    return ClampedConstant(tensor, count, absmax, f"clamped to +-{clamp:g}",
                           f"mask fill value (|v| >= {MASK_FILL_MIN:g}) beyond FP16's range; "
                           f"+-{clamp:g} keeps score + mask finite")


def _kept_fp32_constants(out_of_range: dict[str, str], inits: dict[str, Any]) -> list[ClampedConstant]:
    """The fp16-range rule's constants: kept FP32 with the node that reads them."""
    kept = []
    for t, node_name in out_of_range.items():
        v = np.abs(array(inits[t]))
        kept.append(ClampedConstant(t, int(np.sum((v > FP16_MAX) & (v < MASK_FILL_MIN))), constant_absmax(inits[t]),
                                    "kept FP32", f"finite values beyond FP16's range; {node_name} stays FP32"))
    return kept


def _retype_attributes(node: Any, p: int, clamp: float) -> float:
    """Cast(to=FLOAT) and ConstantOfShape(value: float) produce the node's precision.

    Returns the |value| of a ConstantOfShape mask fill value clamped to `clamp`, else 0.
    """
    from onnx import numpy_helper

    clamped = 0.0
    for a in node.attribute:
        if node.op_type in ("Cast", "EyeLike", "RandomNormal", "RandomUniform",
                            "RandomNormalLike", "RandomUniformLike") and a.name in ("to", "dtype"):
            if a.i == FLOAT:
                a.i = p
        elif node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == FLOAT:
            v = numpy_helper.to_array(a.t)
            if p == FLOAT16:
                fill = np.abs(v) >= MASK_FILL_MIN
                if fill.any():
                    clamped = float(np.abs(v[fill]).max())
                v = np.where(fill, np.sign(v) * clamp, v).astype(np.float16)
            a.t.CopyFrom(numpy_helper.from_array(v, a.t.name))
    return clamped


def _to_fp16(t: Any, name: str, clamp: float) -> tuple[Any, tuple[int, float] | None, int]:
    """FP16 copy of an FP32 initializer: mask fill values clamped; returns (tensor, clamped, flushed)."""
    from onnx import numpy_helper

    v = array(t)
    a = np.abs(v)  # one |v| for both tests (BERT-large's 1.3 GB of weights: ~1 s less)
    clamped = None
    fill = a >= MASK_FILL_MIN if v.size and not a.max() < MASK_FILL_MIN else None  # (not <: NaN too)
    if fill is not None and fill.any():
        clamped = (int(fill.sum()), float(a[fill].max()))
        v = np.where(fill, np.sign(v) * clamp, v)
        a = np.abs(v)
    flushed = int(np.count_nonzero(a < 2.0**-24)) - int(np.count_nonzero(a == 0))
    half = numpy_helper.from_array(v.astype(np.float16), name)
    return half, clamped, flushed


def _by_op(nodes: list[Any], precision: dict[int, int]) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for i, p in precision.items():
        counts[nodes[i].op_type][DTYPE_NAME[p]] += 1
    return {op: {"fp32": c["fp32"], "fp16": c["fp16"]} for op, c in sorted(counts.items())}


def _count_macs(macs_by_node: dict[int, int], precision: dict[int, int], mac_shape: tuple[int, int],
                report: PrecisionReport) -> None:
    """MatMul/Gemm multiply-accumulates at `mac_shape`, split by the precision they run in."""
    macs = Counter()
    for i, n in macs_by_node.items():
        macs[DTYPE_NAME[precision.get(i, FLOAT)]] += n
    report.matmul_macs = {"fp16": macs["fp16"], "fp32": macs["fp32"]}
    report.mac_shape = {"batch": mac_shape[0], "sequence": mac_shape[1]}
    total = macs["fp16"] + macs["fp32"]
    report.matmul_fp16_fraction = macs["fp16"] / total if total else 0.0


