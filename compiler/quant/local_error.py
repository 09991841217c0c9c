"""INT8 sensitivity of every quantized MatMul from one pass: its local quantization error.

The budget loop (`compiler.quant.budget`) needs an order in which to leave MatMuls float. The
end-to-end measure (one full evaluation per quantized node with only that node float) costs a
pass over the probe windows per node: on BERT-large (144 quantized MatMuls, hybrid FP16
emulation) 145 passes of ~29 s, over an hour. Here one pass scores every node.

A copy of the FP32 graph computes, beside each quantized MatMul/Gemm y = f(A, W), its INT8 twin
y_q = f(DQ(Q(A)), DQ(W_int8)) on the same FP32 inputs, with the variant's own Q/DQ nodes and
scales, and reduces inside the graph:

    err(node) = sqrt( sum ||y_q - y||^2 / sum ||y||^2 )   over every window (no unit)

Only two scalars per node leave ONNX Runtime. Because both twins read the FP32 activations, a
node's score is the error it adds itself, not the error it inherits from earlier layers (the
layer-wise comparison of float and quantized activations that ModelOpt's and ONNX Runtime's
quantization debuggers make: `onnxruntime.quantization.qdq_loss_debug`). A NaN or inf in the
twin scores inf. Ranking by it is a proxy: it does not weigh how much of a node's error reaches
the output; the budget loop measures the held-out fidelity after each node it leaves float.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
SUFFIX = "__int8_local"


def local_error_graph(fp32: Any, qdq: Any, nodes: Iterable[str]) -> tuple[Any, dict[str, tuple[str, str]]]:
    """The FP32 graph plus each node's INT8 twin and its two error sums as graph outputs.

    Args:
        fp32: the FP32 onnx.ModelProto the variant was placed on (same node and tensor names).
        qdq: the Q/DQ variant (`compiler.passes.qdq.QdqPlacer.call`): its Q/DQ nodes, their
            scales and INT8 weights are copied; the FP32 weights are `fp32`'s.
        nodes: names of the quantized MatMul/Gemm nodes to score.

    Returns:
        (new onnx.ModelProto, {node: (sum-of-squared-error output, sum-of-squares output)}),
        both outputs float32 scalars.

    Raises:
        ValueError: a node name that is not in `qdq`, or a node whose output `fp32` lacks.
    """
    import onnx
    from onnx import TensorProto, helper

    from compiler.graph.onnx_io import graph_copy

    wanted = list(dict.fromkeys(nodes))
    q_nodes = {n.name: n for n in qdq.graph.node}
    missing = [n for n in wanted if n not in q_nodes]
    fp32_outputs = {t for n in fp32.graph.node for t in n.output}
    missing += [n for n in wanted if n in q_nodes and q_nodes[n].output[0] not in fp32_outputs]
    if missing:
        raise ValueError(f"{len(missing)} node(s) not found as quantized MatMuls of this graph, e.g. {missing[:3]}")
    out = graph_copy(fp32)
    out.graph.initializer.extend(fp32.graph.initializer)
    added = [n for n in qdq.graph.node if n.op_type in QDQ_OPS]
    outputs: dict[str, tuple[str, str]] = {}
    for name in wanted:
        src = q_nodes[name]
        twin = onnx.NodeProto()
        twin.CopyFrom(src)
        y = src.output[0]
        twin.name, twin.output[0] = f"{name}{SUFFIX}", f"{y}{SUFFIX}"
        del twin.output[1:]
        err, sq_err, sq_ref = f"{y}{SUFFIX}_diff", f"{y}{SUFFIX}_sq_err", f"{y}{SUFFIX}_sq_ref"
        added += [twin,
                  helper.make_node("Sub", [twin.output[0], y], [err], name=f"{name}{SUFFIX}_Sub"),
                  helper.make_node("ReduceSumSquare", [err], [sq_err], name=f"{name}{SUFFIX}_err", keepdims=0),
                  helper.make_node("ReduceSumSquare", [y], [sq_ref], name=f"{name}{SUFFIX}_ref", keepdims=0)]
        outputs[name] = (sq_err, sq_ref)
    out.graph.node.extend(added)
    have = {t.name for t in fp32.graph.initializer}
    read = {t for n in added for t in n.input}
    out.graph.initializer.extend(t for t in qdq.graph.initializer if t.name in read and t.name not in have)
    del out.graph.output[:]
    out.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, [])
                            for pair in outputs.values() for t in pair)
    return out, outputs


def local_errors(fp32: Any, qdq: Any, nodes: Iterable[str],
                 batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Relative local INT8 error of each node over `batches`, one ONNX Runtime pass.

    Args:
        fp32, qdq, nodes: as `local_error_graph`.
        batches: feeds dicts ({input name: (batch, sequence) int64}); windows of real
            calibration text, never the held-out text.

    Returns:
        {node: sqrt(sum ||y_q - y||^2 / sum ||y||^2)} (no unit); inf when the twin's output is
        non-finite; 0.0 when y is zero everywhere and the twin equals it.

    Raises:
        ValueError: see `local_error_graph`; onnxruntime errors for feeds the graph rejects.
    """
    import onnxruntime as ort

    from compiler.graph.onnx_io import ort_session

    graph, outputs = local_error_graph(fp32, qdq, nodes)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED  # each twin right after its node
    sess = ort_session(graph, opts, consume=True)
    del graph
    names = [t for pair in outputs.values() for t in pair]
    sums = np.zeros(len(names), np.float64)
    for feeds in batches:
        sums += np.asarray(sess.run(names, dict(feeds)), np.float64)
    scores = {}
    for i, node in enumerate(outputs):
        err, ref = sums[2 * i], sums[2 * i + 1]
        if not np.isfinite(err):
            scores[node] = float("inf")
        else:
            scores[node] = float(np.sqrt(err / ref)) if ref > 0 else (0.0 if err == 0 else float("inf"))
    return scores
