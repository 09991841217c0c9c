"""Stage 2: the precision pass, an ONNX-to-ONNX rewrite into a strongly typed graph.

TensorRT 11 networks are strongly typed: the builder runs each layer in the type its tensors
carry, so precision is decided here, in the graph (TensorRT 11 docs, "Strongly Typed Networks").
The pass assigns every node that computes floats a precision, then makes the types agree:

1. `fp32`: the graph is returned unchanged.
2. `fp16`: every float node computes in FP16 (the naive baseline).
3. `hybrid`: the published rule (softmax and layer norm in FP32, linear layers in FP16; BERT-base
   and GPT-2 kept cosine >= 0.9998 with no NaN, where full FP16 produced NaN). The rules, each
   a pattern, a check and the reason it reports:
   - `softmax`: Softmax / LogSoftmax, and the decomposed Exp -> ReduceSum -> Div pattern.
   - `layer-norm`: LayerNormalization and other normalization ops, and the decomposed
     ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div (-> Mul -> Add) pattern.
   - `reduction`: accumulating reductions (ReduceSum, ReduceMean, ReduceL2, ...).
   - `fp16-range`: a node whose constant input holds finite values beyond FP16's range that
     are not mask fill values (see below) stays FP32 with that constant.
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
from compiler.graph.analysis import (FLOAT, FLOAT16, FP16_MAX, FP16_SMALLEST_NORMAL, GEMM_OPS, array, attr,
                                     matmul_macs, tensor_consumers, tensor_shapes)
from compiler.graph.onnx_io import graph_copy, without_weights
from compiler.settings import PrecisionSettings

log = logging.getLogger(__name__)

MASK_FILL_MIN = 1e30  # |v| >= this in an FP32 constant means "minus infinity" (a mask fill value)

DTYPE_NAME = {FLOAT: "fp32", FLOAT16: "fp16"}

SOFTMAX_OPS = {"Softmax", "LogSoftmax"}
NORM_OPS = {"LayerNormalization", "GroupNormalization", "InstanceNormalization",
            "BatchNormalization", "RMSNormalization", "LpNormalization", "MeanVarianceNormalization"}
REDUCTION_OPS = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
                 "ReduceLogSumExp", "ReduceProd", "CumSum"}
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


# --------------------------------------------------------------------------------------------
# Rules: each returns {node_index: (rule, detail)} for the nodes it pins to FP32.


def rule_softmax(nodes: list[Any], consumers: dict[str, list[int]]) -> dict[int, tuple[str, str]]:
    # Softmax(x) -> FP32; Exp(x) -> ReduceSum -> Div(exp, sum)  (decomposed softmax) -> FP32
    pins = {i: ("softmax", f"{n.op_type} exponentiates and normalizes over a row")
            for i, n in enumerate(nodes) if n.op_type in SOFTMAX_OPS}
    for i, n in enumerate(nodes):
        if n.op_type != "Exp":
            continue
        users = consumers.get(n.output[0], [])
        sums = [j for j in users if nodes[j].op_type == "ReduceSum"]
        divs = [j for j in users if nodes[j].op_type == "Div"]
        if sums and divs:
            for j in [i, *sums, *divs]:
                pins[j] = ("softmax", "decomposed softmax: Exp -> ReduceSum -> Div")
    return pins


def rule_layer_norm(nodes: list[Any], consumers: dict[str, list[int]]) -> dict[int, tuple[str, str]]:
    # LayerNormalization & co -> FP32; decomposed: mean=ReduceMean(x); d=Sub(x, mean);
    # var=ReduceMean(Pow(d, 2)); Div(d, Sqrt(Add(var, eps))) [-> Mul(gamma) -> Add(beta)] -> FP32
    pins = {i: ("layer-norm", f"{n.op_type}: mean and variance over the hidden size")
            for i, n in enumerate(nodes) if n.op_type in NORM_OPS}

    def only(tensor: str, op_types: set[str]) -> list[int]:
        return [j for j in consumers.get(tensor, []) if nodes[j].op_type in op_types]

    for i, n in enumerate(nodes):
        if n.op_type != "ReduceMean":
            continue
        for sub in only(n.output[0], {"Sub"}):
            if nodes[sub].input[0] != n.input[0]:
                continue
            d = nodes[sub].output[0]
            for sq in only(d, {"Pow", "Mul"}):
                for var in only(nodes[sq].output[0], {"ReduceMean"}):
                    chain = [i, sub, sq, var]
                    cur = nodes[var].output[0]
                    for op in ("Add", "Sqrt"):
                        nxt = only(cur, {op})
                        if not nxt:
                            break
                        chain.append(nxt[0])
                        cur = nodes[nxt[0]].output[0]
                    divs = [j for j in only(cur, {"Div"}) if nodes[j].input[0] == d]
                    if len(chain) < 6 or not divs:
                        continue
                    chain.append(divs[0])
                    cur = nodes[divs[0]].output[0]
                    for op in ("Mul", "Add"):  # the affine gamma / beta, when they follow
                        nxt = only(cur, {op})
                        if len(nxt) != 1 or len(consumers.get(cur, [])) != 1:
                            break
                        chain.append(nxt[0])
                        cur = nodes[nxt[0]].output[0]
                    for j in chain:
                        pins[j] = ("layer-norm", "decomposed layer norm: ReduceMean/Sub/Pow/Sqrt/Div")
    return pins


def rule_reduction(nodes: list[Any], consumers: dict[str, list[int]]) -> dict[int, tuple[str, str]]:
    # ReduceSum / ReduceMean / ... -> FP32: a sum over many elements loses FP16's 11-bit mantissa
    return {i: ("reduction", f"{n.op_type} accumulates over a whole axis")
            for i, n in enumerate(nodes) if n.op_type in REDUCTION_OPS}


HYBRID_RULES = (rule_softmax, rule_layer_norm, rule_reduction)


# --------------------------------------------------------------------------------------------


def convert_precision(model: Any, settings: PrecisionSettings, mac_shape: tuple[int, int] = (1, 128),
                      fp32_nodes: Mapping[str, tuple[str, str]] | None = None) -> tuple[Any, PrecisionReport]:
    """Rewrite an FP32 ONNX model into a strongly typed FP32/FP16 graph.

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
        PrecisionError: the graph has control flow (If/Loop/Scan) or tensors whose type shape
            inference cannot tell.
    """
    import onnx

    original = model
    if settings.mode == "fp32":  # fp32 returns the graph unchanged (a copy)
        model = onnx.ModelProto()
        model.CopyFrom(original)
    else:  # the graph without weights; initializers are added back one by one at the end
        model = graph_copy(original)
        _constants_to_initializers(model)
    graph = model.graph
    for i, n in enumerate(graph.node):  # rules and reports address nodes by unique names
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    nodes = list(graph.node)
    for n in nodes:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise PrecisionError(f"node {n.name!r} ({n.op_type}) has a subgraph; the precision pass "
                                 "handles straight-line graphs only (export without control flow)")
    types = _tensor_types(original)
    if settings.mode == "fp32":
        all_inits = list(graph.initializer)
    else:
        constants_as_inits = []
        for t in graph.initializer:  # small: Constant nodes turned initializers
            c = onnx.TensorProto()
            c.CopyFrom(t)
            constants_as_inits.append(c)
        graph.ClearField("initializer")
        all_inits = [*original.graph.initializer, *constants_as_inits]
    inits = {t.name: t for t in all_inits}
    consumers = tensor_consumers(nodes)
    if settings.mode != "fp32":  # shapes from the FP32 graph, while node tensors keep their names
        macs_by_node = matmul_macs(original, nodes, mac_shape)

    def is_float(name: str) -> bool:
        return bool(name) and types.get(name) == FLOAT

    # Nodes that produce floats get a precision. Nodes that only read floats (Shape, Cast to
    # int, comparisons) follow the type their first float input ends up with.
    computes = [n.op_type != "Constant" and any(is_float(t) for t in n.output) for n in nodes]
    follows = [not c and any(is_float(t) for t in n.input) for c, n in zip(computes, nodes)]

    pins: dict[int, tuple[str, str]] = {}
    if settings.mode == "hybrid":
        for rule in HYBRID_RULES:
            pins.update(rule(nodes, consumers))
    if fp32_nodes:
        index = {n.name: i for i, n in enumerate(nodes)}
        unknown = sorted(set(fp32_nodes) - set(index))
        if unknown:
            raise PrecisionError(f"fp32_nodes names nodes that are not in the graph: {unknown[:5]}")
        pins.update({index[name]: why for name, why in fp32_nodes.items()})
    constants: list[ClampedConstant] = []
    out_of_range: dict[str, str] = {}  # constant -> a node it keeps in FP32
    if settings.mode != "fp32":
        for i, n in enumerate(nodes):  # rule fp16-range: big finite constants stay FP32
            for t in n.input:
                if t in inits and inits[t].data_type == FLOAT:
                    absmax = _absmax(inits[t], below=MASK_FILL_MIN)
                    if absmax > FP16_MAX:
                        pins[i] = ("fp16-range", f"constant {t} holds |v| = {absmax:.4g} > {FP16_MAX:g}")
                        out_of_range[t] = nodes[i].name

    precision = {}  # node index -> FLOAT / FLOAT16 for nodes that compute floats
    for i, n in enumerate(nodes):
        if computes[i]:
            precision[i] = FLOAT if settings.mode == "fp32" or i in pins else FLOAT16

    report = PrecisionReport(settings.mode, {}, {})
    if settings.mode == "fp32":
        report.nodes = {"fp32": len(precision), "fp16": 0}
        report.by_op = _by_op(nodes, precision)
        _count_macs(matmul_macs(original, nodes, mac_shape), precision, mac_shape, report)
        return model, report

    new_nodes: list[Any] = []
    cast_cache: dict[tuple[str, int], str] = {}
    init_cache: dict[tuple[str, int], str] = {}
    dtype_of: dict[str, int] = {}  # final dtype of float tensors
    for inp in graph.input:
        if is_float(inp.name):
            dtype_of[inp.name] = FLOAT
    for name, t in inits.items():
        if t.data_type == FLOAT:
            dtype_of[name] = FLOAT
    casts = 0

    def value_as(name: str, target: int) -> str:
        nonlocal casts
        if name in inits:
            key = (name, target)
            if key not in init_cache:
                init_cache[key] = name if target == FLOAT else f"{name}__fp16"
            return init_cache[key]
        if dtype_of.get(name, target) == target:
            return name
        key = (name, target)
        if key not in cast_cache:
            out = f"{name}__to_{DTYPE_NAME[target]}"
            new_nodes.append(onnx.helper.make_node("Cast", [name], [out], to=target,
                                                   name=f"{name}__cast_{DTYPE_NAME[target]}"))
            cast_cache[key] = out
            dtype_of[out] = target
            casts += 1
        return cast_cache[key]

    for i, n in enumerate(nodes):
        if follows[i]:
            first = next(t for t in n.input if is_float(t))
            p = FLOAT if first in inits else dtype_of.get(first, FLOAT)
        elif i in precision:
            p = precision[i]
        else:
            new_nodes.append(n)
            continue
        any_type = ANY_TYPE_INPUTS.get(n.op_type, set())
        fixed = FIXED_FP32_INPUTS.get(n.op_type, set())
        for k, t in enumerate(n.input):
            if not is_float(t) or k in any_type:
                if k in any_type and t in inits and is_float(t):
                    n.input[k] = value_as(t, FLOAT)
                continue
            n.input[k] = value_as(t, FLOAT if k in fixed else p)
        out_fixed = FIXED_FP32_OUTPUTS.get(n.op_type, set())
        for k, t in enumerate(n.output):
            if is_float(t):
                dtype_of[t] = FLOAT if k in out_fixed else p
        clamped = _retype_attributes(n, p, settings.fp16_clamp)
        if clamped:
            constants.append(ClampedConstant(
                f"{n.name}.value", 1, clamped, f"clamped to +-{settings.fp16_clamp:g}",
                f"mask fill value (|v| >= {MASK_FILL_MIN:g}) beyond FP16's range; "
                f"+-{settings.fp16_clamp:g} keeps score + mask finite"))
        new_nodes.append(n)

    # Initializers: FP16 copies for FP16 users, FP32 originals dropped when unused.
    used_fp32 = {name for (name, target) in init_cache if target == FLOAT}
    used = {name for name, _ in init_cache}
    underflow = 0
    for t in all_inits:  # copied one tensor at a time: peak memory is the input + the output
        if t.data_type != FLOAT or t.name in used_fp32 or t.name not in used:
            graph.initializer.add().CopyFrom(t)
        if t.data_type == FLOAT and (t.name, FLOAT16) in init_cache:
            half, clamped, lost = _to_fp16(t, init_cache[(t.name, FLOAT16)], settings.fp16_clamp)
            underflow += lost
            if clamped:
                constants.append(ClampedConstant(
                    t.name, clamped[0], clamped[1], f"clamped to +-{settings.fp16_clamp:g}",
                    f"mask fill value (|v| >= {MASK_FILL_MIN:g}) beyond FP16's range; "
                    f"+-{settings.fp16_clamp:g} keeps score + mask finite"))
            graph.initializer.add().CopyFrom(half)
    for t, node_name in out_of_range.items():
        v = np.abs(array(inits[t]))
        constants.append(ClampedConstant(t, int(np.sum((v > FP16_MAX) & (v < MASK_FILL_MIN))), _absmax(inits[t]),
                                         "kept FP32", f"finite values beyond FP16's range; {node_name} stays FP32"))

    # Graph outputs keep their types: an FP16 output is renamed inside the graph and Cast back.
    for out in graph.output:
        if types.get(out.name) == FLOAT and dtype_of.get(out.name) == FLOAT16:
            inner = f"{out.name}__fp16"
            for node in new_nodes:
                for lst in (node.input, node.output):
                    for k, t in enumerate(lst):
                        if t == out.name:
                            lst[k] = inner
            new_nodes.append(onnx.helper.make_node("Cast", [inner], [out.name], to=FLOAT,
                                                   name=f"{out.name}__output_cast_fp32"))
            casts += 1

    graph.ClearField("node")
    graph.node.extend(new_nodes)
    graph.ClearField("value_info")  # stale types (TensorRT and ONNX Runtime infer their own)

    report.nodes = {"fp32": sum(v == FLOAT for v in precision.values()),
                    "fp16": sum(v == FLOAT16 for v in precision.values())}
    report.by_op = _by_op(nodes, precision)
    report.fp32_nodes = [PinnedNode(nodes[i].name, nodes[i].op_type, *pins[i])
                         for i in sorted(pins) if precision.get(i) == FLOAT]
    report.constants = constants
    report.underflow_values = underflow
    report.casts_inserted = casts
    _count_macs(macs_by_node, precision, mac_shape, report)
    log.info("precision %s: %s, %d Casts inserted, matmul_fp16_fraction %.3f", settings.mode,
             report.nodes, casts, report.matmul_fp16_fraction)
    return model, report


def _constants_to_initializers(model: Any) -> None:
    """Constant nodes -> initializers, so that one code path converts every constant."""
    import onnx
    from onnx import helper, numpy_helper

    keep = []
    for n in model.graph.node:
        if n.op_type != "Constant" or n.domain not in ("", "ai.onnx"):
            keep.append(n)
            continue
        a = n.attribute[0]
        if a.name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(a.t)
        elif a.name in ("value_float", "value_floats"):
            t = numpy_helper.from_array(np.array(helper.get_attribute_value(a), np.float32))
        elif a.name in ("value_int", "value_ints"):
            t = numpy_helper.from_array(np.array(helper.get_attribute_value(a), np.int64))
        else:  # sparse_value, strings: leave as a node
            keep.append(n)
            continue
        t.name = n.output[0]
        model.graph.initializer.append(t)
    model.graph.ClearField("node")
    model.graph.node.extend(keep)


def _tensor_types(model: Any) -> dict[str, int]:
    """elem_type of every tensor, from shape inference (raises PrecisionError on gaps)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(model), strict_mode=False)
    except Exception as e:
        raise PrecisionError(f"ONNX shape inference failed ({e}); the precision pass needs "
                             "every tensor's type") from e
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    missing = [t for n in g.node for t in n.output if t and t not in types]
    if missing:
        raise PrecisionError(f"shape inference gives no type for {missing[:5]} (of {len(missing)}); "
                             "export with a standard opset so every tensor is typed")
    return types


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


def _absmax(t: Any, below: float = np.inf) -> float:
    """Largest finite |v| of a float initializer, ignoring values >= `below`."""
    v = np.abs(array(t).astype(np.float64))
    v = v[np.isfinite(v) & (v < below)]
    return float(v.max()) if v.size else 0.0


def _to_fp16(t: Any, name: str, clamp: float) -> tuple[Any, tuple[int, float] | None, int]:
    """FP16 copy of an FP32 initializer: mask fill values clamped; returns (tensor, clamped, flushed)."""
    from onnx import numpy_helper

    v = array(t)
    fill = np.abs(v) >= MASK_FILL_MIN
    clamped = (int(fill.sum()), float(np.abs(v[fill]).max())) if fill.any() else None
    v = np.where(fill, np.sign(v) * clamp, v)
    flushed = int(np.sum((v != 0) & (np.abs(v) < 2.0**-24)))
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


