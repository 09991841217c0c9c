"""Graph analysis shared by every stage: tensor types, shapes, MAC counts, node consumers.

Reads ONNX graphs, never rewrites them. Passes (`compiler.passes`), calibration, evaluation and
the TensorRT builder read graphs through this module and `compiler.graph.onnx_io`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import numpy as np

from compiler.errors import PrecisionError as GraphError
from compiler.graph.onnx_io import foreign_ops, ort_session, without_weights

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16
FP16_MAX = 65504.0
FP16_SMALLEST_NORMAL = 2.0**-14
# The ops that multiply two matrices: what INT8 quantizes, 2:4 sparsity prunes and MACs count.
GEMM_OPS = ("MatMul", "Gemm")


def tensor_consumers(nodes: list[Any]) -> dict[str, list[int]]:
    """{tensor name: indices of the nodes in `nodes` that read it}."""
    out: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        for t in n.input:
            if t:
                out[t].append(i)
    return out


def tensor_types(model: Any) -> dict[str, int]:
    """ONNX elem_type of every tensor of `model` (graph I/O, node outputs, initializers).

    From ONNX shape inference on a copy without the large weights (works past 2 GiB).

    Raises:
        GraphError: shape inference fails, or leaves a node output without a type.
    """
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(model), strict_mode=False)
    except Exception as e:
        raise GraphError(f"ONNX shape inference failed ({e}); the precision pass needs "
                         "every tensor's type") from e
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    missing = [t for n in g.node for t in n.output if t and t not in types]
    if missing:
        raise GraphError(f"shape inference gives no type for {missing[:5]} (of {len(missing)}); "
                         "export with a standard opset so every tensor is typed")
    return types


LOW_FLOATS = {10: "float16", 16: "bfloat16"}  # onnx.TensorProto.FLOAT16, BFLOAT16


def check_fp32_straight_line(model: Any) -> None:
    """Refuse a graph the precision pass cannot rewrite: it takes the FP32, standard-opset,
    straight-line graph an exporter writes (TensorRT 11 parses only the standard domain).

    Raises:
        PrecisionError: a node holding a subgraph (If, Loop, Scan); nodes of another domain
            (ONNX Runtime's `com.microsoft` fusions from its transformer optimizer: Attention,
            SkipLayerNormalization, ...), named with their counts; FP16/BF16 initializers or graph
            inputs/outputs (an already converted graph: the rules would leave it as it is).
    """
    import onnx

    for n in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise GraphError(f"node {n.name!r} ({n.op_type}) has a subgraph; the precision pass "
                             "handles straight-line graphs only (export without control flow)")
    foreign = foreign_ops(model)
    if foreign:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(foreign.items()))
        raise GraphError(f"the graph has nodes outside the standard ONNX domain ({ops}); TensorRT's ONNX parser "
                         "takes standard ops only. Give the exporter's graph (`python -m compiler export`), not "
                         "one fused by onnxruntime.transformers.optimizer")
    low = [f"{t.name} ({LOW_FLOATS[t.data_type]})" for t in model.graph.initializer if t.data_type in LOW_FLOATS]
    low += [f"{v.name} ({LOW_FLOATS[v.type.tensor_type.elem_type]})" for v in (*model.graph.input, *model.graph.output)
            if v.type.tensor_type.elem_type in LOW_FLOATS]
    if low:
        raise GraphError(f"the graph is not FP32: {len(low)} tensor(s) already in a 16-bit float type, e.g. "
                         f"{', '.join(low[:3])}; the precision pass rewrites the FP32 export (it would leave these "
                         "as they are, softmax and layer norm included). Give the FP32 graph")


def array(t: Any) -> np.ndarray:
    """An initializer (TensorProto) as a numpy array."""
    from onnx import numpy_helper

    return numpy_helper.to_array(t)


class MacCounts(dict):
    """{node index: multiply-accumulates} of the MatMul/Gemm nodes, counted at `shape`
    ((batch, sequence), `matmul_macs`)."""

    def __init__(self, counts: dict[int, int], shape: tuple[int, int]) -> None:
        super().__init__(counts)
        self.shape = (int(shape[0]), int(shape[1]))


class MacList(list):
    """Per-node records (e.g. `compiler.passes.qdq.MatMulSite`) whose MACs were counted at
    `shape` ((batch, sequence), `MacCounts.shape`)."""

    def __init__(self, items: Iterable[Any], shape: tuple[int, int]) -> None:
        super().__init__(items)
        self.shape = (int(shape[0]), int(shape[1]))


def matmul_macs(model: Any, nodes: list[Any], mac_shape: tuple[int, int]) -> MacCounts:
    """{node index: multiply-accumulates} of every MatMul/Gemm in `nodes` at (batch, sequence).

    A graph that cannot run at `mac_shape`'s sequence (a model with fewer positions, e.g. 64
    rows of position embeddings against the default 128) is counted at the longest sequence
    halved from it that it runs at; `.shape` of the result says which, for the reports.
    `nodes` must still carry `model`'s tensor names (call before rewriting them).

    Raises:
        PrecisionError: a MatMul whose shapes cannot be resolved; the graph fails at every
            sequence down to 1 (ONNX Runtime's error is re-raised).
    """
    batch, seq = int(mac_shape[0]), int(mac_shape[1])
    while True:
        try:
            return MacCounts(_macs_at(model, nodes, (batch, seq)), (batch, seq))
        except Exception as e:  # noqa: BLE001 - only ONNX Runtime's own errors retry, below
            if seq <= 1 or type(e).__module__ != "onnxruntime.capi.onnxruntime_pybind11_state":
                raise
            seq //= 2


def _macs_at(model: Any, nodes: list[Any], mac_shape: tuple[int, int]) -> dict[int, int]:
    names = {n.output[0]: i for i, n in enumerate(nodes) if n.op_type in GEMM_OPS}
    shapes = tensor_shapes(model, [t for i in names.values() for t in nodes[i].input[:1]] + list(names),
                           mac_shape)
    macs = {}
    for out, i in names.items():
        a, y = shapes.get(nodes[i].input[0]), shapes.get(out)
        if a is None or y is None:
            raise GraphError(f"no shape for MatMul {nodes[i].name!r} at {mac_shape}")
        k = a[-2] if nodes[i].op_type == "Gemm" and attr(nodes[i], "transA") else a[-1]
        macs[i] = int(np.prod(y, dtype=np.int64)) * int(k)
    return macs


def attr(node: Any, name: str, default: int = 0) -> int:
    """Integer attribute `name` of an ONNX node, `default` when absent."""
    return next((a.i for a in node.attribute if a.name == name), default)


def tensor_shapes(model: Any, names: Iterable[str], shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of `names` with every (batch, sequence) input fixed to `shape`.

    Uses ONNX shape inference with data propagation; tensors it cannot resolve (shapes computed
    at run time) are read from one ONNX Runtime run on the FP32-cast graph.
    """
    import onnx

    names = list(dict.fromkeys(names))
    fixed = without_weights(model)
    originals = {i.name for i in model.graph.input}
    for inp in [i for i in fixed.graph.input if i.name in originals]:
        for axis, d in enumerate(inp.type.tensor_type.shape.dim[:2]):
            if d.dim_param or not d.dim_value:
                d.Clear()
                d.dim_value = shape[axis]
    fixed.graph.ClearField("value_info")
    inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    found: dict[str, tuple[int, ...]] = {}
    for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = v.type.tensor_type.shape.dim
        known = [d.HasField("dim_value") for d in dims]
        if v.name in names and dims and all(known[1:]) and (known[0] or len(dims) >= 3):
            # ONNX inference often loses the batch dim behind Gather/Expand ("unk__0"); with
            # every other dim of a (batch, sequence, ...) tensor resolved, the leading one is the
            # batch. A rank-2 tensor with an unknown leading dim may be flattened (GPT-2's Gemm
            # on (batch x sequence, hidden)): it is measured by running instead.
            found[v.name] = (dims[0].dim_value if known[0] else shape[0], *(d.dim_value for d in dims[1:]))
    missing = [n for n in names if n not in found]
    if missing:
        found.update(_shapes_by_running(fixed, missing, originals, shape))
    return found


def _shapes_by_running(light: Any, names: list[str], originals: set[str],
                       shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Shapes of `names` from one ONNX Runtime run of `light` (weights as graph inputs, fed with
    np.zeros: untouched zero pages cost no memory, so this is cheap for any model size)."""
    import onnx

    present = {o.name for o in light.graph.output}
    for n in names:
        if n not in present:
            light.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    sess = ort_session(light)
    declared = {v.name: v.type.tensor_type.elem_type for v in light.graph.input}
    feeds = {}
    for i in sess.get_inputs():
        np_type = onnx.helper.tensor_dtype_to_np_dtype(declared[i.name])
        # symbolic dims 0 and 1 take (batch, sequence); a KV cache's past (axis 2 of
        # past_key_values.*) is empty, the context phase; static dims are kept
        past = i.name.startswith("past_key_values.")
        dims = [d if isinstance(d, int) else shape[k] if k < 2 else 0 if past and k == 2 else 1
                for k, d in enumerate(i.shape)]
        feeds[i.name] = (np.ones if i.name in originals else np.zeros)(dims, dtype=np_type)
    outs = sess.run(names, feeds)
    return {n: tuple(o.shape) for n, o in zip(names, outs)}
