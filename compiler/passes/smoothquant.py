"""The SmoothQuant pass (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", eq. 4): move activation outliers into the weights.

BERT's layer norm and GELU outputs carry a few channels 10-30x larger than the rest (MiniLM:
|x| up to 28 where most values are below 1), so a per tensor INT8 scale leaves the ordinary
channels a handful of levels. Dividing each channel j by s_j and multiplying the weight's input
row j by s_j moves that range into the per-channel weight scales; the FP32 function is unchanged
(X / s . (s * W) = X . W).

Rules, per activation tensor X (channels along its last axis, the MatMuls' reduction axis K):

1. X is smoothed for the weight MatMul/Gemm nodes it feeds whose activation's reduction axis is
   X's last (MatMul with the weight second; Gemm without transA), all of them or those named.
2. s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), with max|W_j| over every weight X feeds (they
   share one smoothed tensor); s_j = 1 where either maximum is 0; s clipped to [1e-4, 1e4].
3. One Mul(X, 1/s) node, emitted right before the first of those consumers, feeds them; their
   weights' input rows W_j become W_j * s_j (a new initializer each). Other consumers of X
   (residual adds) still read X.
4. X is skipped when a consumer's weight is batched (rank != 2) or when `act_absmax[X]` does not
   have one value per input channel.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from compiler.graph.analysis import array, attr
from compiler.passes.qdq import MatMulSite, matmul_nodes, name_nodes


def _smoothable(model: Any, act_absmax: Mapping[str, np.ndarray], nodes: Iterable[str] | None
                ) -> dict[str, list[MatMulSite]]:
    """{activation tensor: the weight MatMuls it feeds that rule 1 smooths}."""
    wanted = None if nodes is None else set(nodes)
    groups: dict[str, list[MatMulSite]] = {}
    for m in matmul_nodes(model):
        n = model.graph.node[m.index]
        if m.weight is None or len(m.activations) != 1 or (wanted is not None and m.name not in wanted):
            continue
        if (m.op_type == "Gemm" and attr(n, "transA")) or (m.op_type == "MatMul" and m.weight != 1):
            continue  # reduction axis of the activation is not its last: not smoothed
        if n.input[m.activations[0]] in act_absmax:
            groups.setdefault(n.input[m.activations[0]], []).append(m)
    return groups


def _in_rows(w: np.ndarray, m: MatMulSite, node: Any) -> np.ndarray:
    """The weight as (K, N): rows are input channels (a Gemm with transB=1 stores W[N, K])."""
    return w.T if m.op_type == "Gemm" and attr(node, "transB") else w


def _channel_scales(x_absmax: np.ndarray, w_rows: list[np.ndarray], alpha: float) -> np.ndarray | None:
    """Rule 2's s (float32, (K,)) from max|X_j| and the (K, N) weights; None when shapes differ."""
    x = np.asarray(x_absmax, np.float64)
    w = np.max([np.abs(r).max(axis=1) for r in w_rows], axis=0).astype(np.float64)
    if x.shape != w.shape:
        return None
    ok = (x > 0) & (w > 0)
    s = np.ones_like(x)
    s[ok] = x[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def _scale_weights(graph: Any, inits: dict[str, Any], graph_nodes: list[Any], members: list[MatMulSite],
                   smoothed: str, s: np.ndarray) -> None:
    """Rule 3 for one group: its MatMuls read `smoothed` and W_j * s_j (new initializers)."""
    from onnx import numpy_helper

    for m in members:
        n = graph_nodes[m.index]
        n.input[m.activations[0]] = smoothed
        wname = n.input[m.weight]
        w_arr = array(inits[wname]).astype(np.float32)
        w_new = w_arr * s[None, :] if m.op_type == "Gemm" and attr(n, "transB") else w_arr * s[:, None]
        new_name = f"{wname}_smoothed"
        while new_name in inits:  # a weight shared by two smoothed groups gets one copy each
            new_name += "_"
        t_new = numpy_helper.from_array(w_new.astype(np.float32), new_name)
        graph.initializer.append(t_new)
        inits[new_name] = t_new
        n.input[m.weight] = new_name


def _relink(graph: Any, graph_nodes: list[Any], before: dict[int, Any]) -> None:
    """Rewrite `graph`'s node list with `before[i]` emitted right before node i, and drop the
    initializers no node or output reads any more."""
    graph.ClearField("node")
    for i, n in enumerate(graph_nodes):
        if i in before:
            graph.node.append(before[i])
        graph.node.append(n)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)


def smooth(model: Any, act_absmax: Mapping[str, np.ndarray], alpha: float,
           nodes: Iterable[str] | None = None,
           scales: Mapping[str, np.ndarray] | None = None) -> tuple[Any, dict[str, Any]]:
    """SmoothQuant the graph's weight MatMuls (the module's rules 1-4); exact in FP32.

    Args:
        model: FP32 onnx.ModelProto (not modified).
        act_absmax: {tensor: (K,) max |x| per last-axis channel}, as from
            `compiler.quant.calibrate.channel_absmax`.
        alpha: migration strength in [0, 1] (0: s = 1 / max|W_j|; 1: s = max|X_j|).
        nodes: weight MatMul names to smooth (default every one whose input is in `act_absmax`).
        scales: {tensor: (K,) s} to apply as given instead of rule 2's (e.g. another graph's
            factors, read back from its `<tensor>_smooth_inv_scale`).

    Returns:
        (new ModelProto, {tensor: {"channels", "scale_min", "scale_max", "consumers"}}), one
        entry per smoothed tensor. The new graph has a `<tensor>_SmoothQuant` Mul node and
        `<tensor>_smooth_inv_scale` (1/s, float32 (K,)) per smoothed tensor, and
        `<weight>_smoothed` weights.
    """
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    name_nodes(out)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    groups = _smoothable(out, act_absmax, nodes)
    info: dict[str, Any] = {}
    graph_nodes = list(graph.node)
    before: dict[int, Any] = {}  # node index -> the Mul to emit right before it
    for t, members in groups.items():
        rows = [_in_rows(array(inits[graph_nodes[m.index].input[m.weight]]), m, graph_nodes[m.index])
                for m in members]
        if any(r.ndim != 2 for r in rows):
            continue  # batched weights: not smoothed
        s = np.asarray(scales[t], np.float32) if scales is not None else _channel_scales(act_absmax[t], rows, alpha)
        if s is None:
            continue
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{t}_smooth_inv_scale")
        smoothed = f"{t}_smoothed"
        graph.initializer.append(inv)
        before[min(m.index for m in members)] = helper.make_node("Mul", [t, inv.name], [smoothed],
                                                                 name=f"{t}_SmoothQuant")
        _scale_weights(graph, inits, graph_nodes, members, smoothed, s)
        info[t] = {"channels": int(s.size), "scale_min": float(s.min()), "scale_max": float(s.max()),
                   "consumers": [m.name for m in members]}
    _relink(graph, graph_nodes, before)
    return out, info
