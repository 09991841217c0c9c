"""The op-type rules of the `hybrid` precision mode: which nodes stay FP32, and why.

Each rule reads the node list of an ONNX graph and returns {node index: (rule, detail)} for the
nodes it pins to FP32; `compiler.passes.precision` applies `HYBRID_RULES` in `hybrid` mode and
`compiler.passes.auto_precision` tries every node they name back in FP16.

The published rule: softmax and layer norm in FP32, linear layers in FP16 (Micikevicius et
al., "Mixed Precision Training", ICLR 2018, sec. 3.3: large reductions, as in normalization and
softmax layers, are carried out in FP32). On BERT-base and GPT-2 it kept cosine >= 0.9998 with
no NaN where full FP16 produced NaN. Reductions join them: a sum over many elements loses
FP16's 11-bit mantissa. So do position angles (`rule_position_angles`): position x frequency
outgrows FP16's spacing long before the profile's longest sequence.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from compiler.graph.analysis import FLOAT, FP16_MAX, array

MASK_FILL_MIN = 1e30  # |v| >= this in an FP32 constant means "minus infinity" (a mask fill value)

Pins = dict[int, tuple[str, str]]

SOFTMAX_OPS = {"Softmax", "LogSoftmax"}
NORM_OPS = {"LayerNormalization", "GroupNormalization", "InstanceNormalization",
            "BatchNormalization", "RMSNormalization", "LpNormalization", "MeanVarianceNormalization"}
REDUCTION_OPS = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
                 "ReduceLogSumExp", "ReduceProd", "CumSum"}


def rule_softmax(nodes: list[Any], consumers: dict[str, list[int]]) -> Pins:
    """Softmax / LogSoftmax, and the decomposed Exp -> ReduceSum -> Div(exp, sum) pattern.

    Args:
        nodes: the graph's onnx.NodeProto list, in graph order.
        consumers: {tensor: indices into `nodes` of its readers} (`graph.analysis.tensor_consumers`).

    Returns:
        {node index: ("softmax", detail)}: the op itself, or every node of the decomposed pattern.
    """
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


def rule_layer_norm(nodes: list[Any], consumers: dict[str, list[int]]) -> Pins:
    """LayerNormalization and the other normalization ops, and the decomposed layer and RMS norms.

    The decomposed form (PyTorch exports before opset 17): mean = ReduceMean(x); d = Sub(x, mean);
    var = ReduceMean(Pow(d, 2)); Div(d, Sqrt(Add(var, eps))), followed by the affine Mul(gamma)
    and Add(beta) when each is the only reader of the previous tensor.

    Args:
        nodes, consumers: as for `rule_softmax`.

    Returns:
        {node index: ("layer-norm", detail)}: the op, or every node of a decomposed chain.
    """
    pins = {i: ("layer-norm", f"{n.op_type}: mean and variance over the hidden size")
            for i, n in enumerate(nodes) if n.op_type in NORM_OPS}
    producer = {t: i for i, n in enumerate(nodes) for t in n.output}
    for i, n in enumerate(nodes):
        if n.op_type == "ReduceMean":
            for j in _decomposed_layer_norm(nodes, consumers, i):
                pins[j] = ("layer-norm", "decomposed layer norm: ReduceMean/Sub/Pow/Sqrt/Div")
            for j in _decomposed_rms_norm(nodes, consumers, producer, i):
                pins.setdefault(j, ("layer-norm", "decomposed RMS norm: Pow/ReduceMean/Add/Sqrt/Div/Mul"))
    return pins


def _decomposed_rms_norm(nodes: list[Any], consumers: dict[str, list[int]], producer: dict[str, int],
                         var: int) -> list[int]:
    """The RMS norm chain around the ReduceMean `var` (Zhang & Sennrich 2019; Llama, Gemma, Qwen,
    Mistral, T5 as PyTorch exports them): x^2 = Pow(x, 2) or Mul(x, x); var = ReduceMean(x^2);
    r = Sqrt(Add(var, eps)); then Div(x, r), or Mul(x, 1 / r) with 1 / r as Div(1, r) or
    Reciprocal(r); then the scale Mul(gamma) (after a float Cast) when each is the only reader.
    FP16 squares overflow from |x| > 256, which a Llama's residual stream passes: Pow joins the
    island with the mean. [] when `var` is not such a chain."""

    def only(tensor: str, op_types: set[str]) -> list[int]:
        return [j for j in consumers.get(tensor, []) if nodes[j].op_type in op_types]

    sq = producer.get(nodes[var].input[0])
    if sq is None or nodes[sq].op_type not in ("Pow", "Mul"):
        return []
    x = nodes[sq].input[0]
    if nodes[sq].op_type == "Mul" and list(nodes[sq].input) != [x, x]:
        return []
    chain, cur = [sq, var], nodes[var].output[0]
    for op in ("Add", "Sqrt"):
        nxt = only(cur, {op})
        if len(nxt) != 1:
            return []
        chain.append(nxt[0])
        cur = nodes[nxt[0]].output[0]
    divides = [j for j in only(cur, {"Div"}) if list(nodes[j].input) == [x, cur]]
    if divides:  # x / sqrt(var + eps)
        chain.append(divides[0])
    else:  # x * (1 / sqrt(var + eps))
        inverse = [j for j in consumers.get(cur, []) if nodes[j].op_type == "Reciprocal"
                   or (nodes[j].op_type == "Div" and nodes[j].input[1] == cur and nodes[j].input[0] != x)]
        if len(inverse) != 1:
            return []
        r = nodes[inverse[0]].output[0]
        scaled = [j for j in only(r, {"Mul"}) if set(nodes[j].input) == {x, r}]
        if not scaled:
            return []
        chain += [inverse[0], scaled[0]]
    def sole_reader(tensor: str, op: str) -> int | None:
        readers = consumers.get(tensor, [])
        return readers[0] if len(readers) == 1 and nodes[readers[0]].op_type == op else None

    cast = sole_reader(nodes[chain[-1]].output[0], "Cast")  # `.to(input_dtype)`: FP32 to FP32 in the export
    if cast is not None and any(a.name == "to" and a.i == FLOAT for a in nodes[cast].attribute):
        chain.append(cast)
    gamma = sole_reader(nodes[chain[-1]].output[0], "Mul")  # the scale
    return chain + ([gamma] if gamma is not None else [])


def _decomposed_layer_norm(nodes: list[Any], consumers: dict[str, list[int]], mean: int) -> list[int]:
    """Indices of every decomposed layer-norm chain that starts at the ReduceMean `mean`."""

    def only(tensor: str, op_types: set[str]) -> list[int]:
        return [j for j in consumers.get(tensor, []) if nodes[j].op_type in op_types]

    found: list[int] = []
    for sub in only(nodes[mean].output[0], {"Sub"}):
        if nodes[sub].input[0] != nodes[mean].input[0]:
            continue
        d = nodes[sub].output[0]
        for sq in only(d, {"Pow", "Mul"}):
            for var in only(nodes[sq].output[0], {"ReduceMean"}):
                chain = [mean, sub, sq, var]
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
                found.extend(chain)
    return found


def rule_reduction(nodes: list[Any], consumers: dict[str, list[int]]) -> Pins:
    """Accumulating reductions (ReduceSum, ReduceMean, ReduceL2, CumSum, ...).

    Args:
        nodes, consumers: as for `rule_softmax` (`consumers` is unused: the rule is by op type).

    Returns:
        {node index: ("reduction", detail)}.
    """
    return {i: ("reduction", f"{n.op_type} accumulates over a whole axis")
            for i, n in enumerate(nodes) if n.op_type in REDUCTION_OPS}


# Ops an angle's computation passes through, and which of their inputs carry its data (None: all).
_ANGLE_OPS: dict[str, tuple[int, ...] | None] = {
    "Mul": None, "Div": None, "Add": None, "Sub": None, "MatMul": None, "Concat": None, "Neg": None,
    "Transpose": (0,), "Unsqueeze": (0,), "Squeeze": (0,), "Reshape": (0,), "Expand": (0,), "Slice": (0,),
    "Flatten": (0,), "Tile": (0,)}
_ANGLE_CONE_MAX = 32  # a position angle is a handful of nodes; a larger cone is not one


def rule_position_angles(nodes: list[Any], consumers: dict[str, list[int]]) -> Pins:
    """Cos / Sin of an angle computed from integer positions (rotary and sinusoidal position
    embeddings: Llama, Qwen, Mistral, GPT-NeoX, ...), and the nodes computing that angle.

    The angle is position x frequency, up to the profile's longest sequence in radians. FP16
    keeps 11 significant bits: at positions 256-511 its spacing is 0.25 rad, from 2048 it is 2
    (the position itself no longer exact), so the fastest rotating pairs get cosines of the wrong
    angle. Hugging Face computes the rotary embedding in float32 for that reason (autocast off).
    The cone runs back from Cos/Sin through elementwise, MatMul and shape ops to Casts (the int
    positions) and constants; where it meets anything else (an activation) or passes
    `_ANGLE_CONE_MAX` nodes, the Cos/Sin is not a position angle and nothing is pinned. Cos/Sin
    outputs are in [-1, 1]: the multiply with q and k stays FP16.

    Args:
        nodes, consumers: as for `rule_softmax` (`consumers` unused).

    Returns:
        {node index: ("position-angle", detail)}.
    """
    producer = {t: i for i, n in enumerate(nodes) for t in n.output}
    pins: Pins = {}
    for i, n in enumerate(nodes):
        if n.op_type not in ("Cos", "Sin") or i in pins:
            continue
        cone, stack = {i}, [n.input[0]]
        while stack:
            j = producer.get(stack.pop())
            if j is None or j in cone or nodes[j].op_type == "Constant":
                continue  # an initializer, a graph input or a constant: a source
            op = nodes[j].op_type
            cone.add(j)
            if op == "Cast":
                continue  # the positions (or the frequencies) entering as float
            if op not in _ANGLE_OPS or len(cone) > _ANGLE_CONE_MAX:
                break  # an activation: not a position angle
            data = _ANGLE_OPS[op]
            stack += [t for k, t in enumerate(nodes[j].input) if t and (data is None or k in data)]
        else:
            for j in cone:
                pins[j] = ("position-angle", "position x frequency: FP16 rounds the angle (0.25 rad at position "
                                             "256, 2 rad from 2048)")
    return pins


def rule_fp16_range(nodes: list[Any], inits: dict[str, Any]) -> tuple[Pins, dict[str, str]]:
    """Nodes reading a float constant with finite values beyond FP16's range (|v| > 65504).

    Mask fill values (|v| >= `MASK_FILL_MIN`) do not count: the precision pass clamps them.
    The rule runs in every mode but `fp32`.

    Args:
        nodes: as for `rule_softmax`. inits: {name: onnx.TensorProto} of every initializer.

    Returns:
        ({node index: ("fp16-range", detail)}, {constant: the last node it keeps in FP32}).
    """
    pins: Pins = {}
    out_of_range: dict[str, str] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t in inits and inits[t].data_type == FLOAT:
                absmax = constant_absmax(inits[t], below=MASK_FILL_MIN)
                if absmax > FP16_MAX:
                    pins[i] = ("fp16-range", f"constant {t} holds |v| = {absmax:.4g} > {FP16_MAX:g}")
                    out_of_range[t] = nodes[i].name
    return pins, out_of_range


def constant_absmax(t: Any, below: float = np.inf) -> float:
    """Largest finite |v| of a float initializer (onnx.TensorProto), ignoring values >= `below`;
    0.0 when none is left."""
    a = array(t)
    if a.size:  # two reductions, no copies: the answer whenever nothing is to be left out
        m = float(max(a.max(), -a.min()))
        if np.isfinite(m) and m < below:
            return m
    v = np.abs(a.astype(np.float64))
    v = v[np.isfinite(v) & (v < below)]
    return float(v.max()) if v.size else 0.0


HYBRID_RULES: tuple[Callable[[list[Any], dict[str, list[int]]], Pins], ...] = (
    rule_softmax, rule_layer_norm, rule_reduction, rule_position_angles)
