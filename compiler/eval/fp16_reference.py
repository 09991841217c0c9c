"""The faithful FP16 reference: runs a strongly typed FP32/FP16 graph as FP16 hardware would.

ONNX Runtime's CPU provider is not an FP16 reference: on x86 it has no FP16 kernels for MatMul,
Add, GELU or LayerNorm, inserts Casts around them and then removes Cast pairs, so a chain of
FP16 ops runs in FP32 and a tensor that overflows FP16 mid-graph never shows (measured: a model
whose layer 3 of 6 overflows FP16 on real text gave 0 % non-finite outputs there, 95 % with true
FP16 tensors).

The FP16 reference used instead (`fp16_emulation`): every node computes in FP32, and every
tensor that the variant types FP16 is rounded through Cast(FP16) -> Cast(FP32) right where it
is produced; FP16 initializers are widened exactly. The graph runs with all graph
optimizations off, so no Cast pair is removed. Each FP16 tensor therefore holds exactly the
FP16 value (an overflow past 65504 becomes inf and propagates), and each op computes as a
TensorRT FP16 kernel with FP32 accumulation does, rounding once at its output.

Used through `compiler.eval.fidelity.FidelityProbe` by the verify stage, the `auto` precision
search and the INT8 budget.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compiler.graph.onnx_io import graph_copy, in_memory_initializer, ort_session, without_weights
from compiler.graph.analysis import FLOAT, FLOAT16

REFERENCE_NAME = "onnx-fp16-emulation (FP32 compute, every FP16 tensor rounded through Cast, ORT graph optimizations off)"


def fp16_emulation(model: Any, weights: dict[str, np.ndarray] | None = None) -> Any:
    """The faithful FP16 reference graph of a strongly typed FP32/FP16 model.

    Args:
        model: onnx.ModelProto whose float tensors are FP32 or FP16.
        weights: when a dict, each FP16 initializer of 64 KiB or more is widened into it
            ({name: float32 array}) and the graph only names it
            (`compiler.graph.onnx_io.in_memory_initializer`); give the dict to
            `session(..., weights=)`. None: every initializer is in the returned graph.

    Returns:
        An all-FP32 onnx.ModelProto with a Cast(FP16) -> Cast(FP32) pair after every
        FP16-typed tensor; FP16 graph outputs become FP32 (values already rounded), and an FP16
        graph input (a KV cache kept FP16, `compiler.passes.kv_cache`) becomes an FP32 input
        rounded to FP16 on entry, so every variant takes the FP32 reference's feeds.
    """
    import onnx
    from onnx import helper, numpy_helper

    g = onnx.shape_inference.infer_shapes(without_weights(model)).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in model.graph.initializer})

    out = graph_copy(model)
    graph = out.graph
    entry = []
    for i in graph.input:
        if i.type.tensor_type.elem_type == FLOAT16:
            i.type.tensor_type.elem_type = FLOAT
            for n in graph.node:
                n.input[:] = [f"{i.name}__entry" if t == i.name else t for t in n.input]
            entry += [helper.make_node("Cast", [i.name], [f"{i.name}__entry16"], to=FLOAT16, name=f"{i.name}__entry_round"),
                      helper.make_node("Cast", [f"{i.name}__entry16"], [f"{i.name}__entry"], to=FLOAT,
                                       name=f"{i.name}__entry_widen")]
    for t in model.graph.initializer:  # one tensor at a time: FP16 widened exactly to FP32
        if t.data_type == FLOAT16 and weights is not None and 2 * int(np.prod(t.dims)) >= 1 << 16:
            weights[t.name] = numpy_helper.to_array(t).astype(np.float32)
            graph.initializer.append(in_memory_initializer(t.name, weights[t.name]))
        elif t.data_type == FLOAT16:
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
        else:
            graph.initializer.add().CopyFrom(t)
    nodes = []
    for n in graph.node:
        for a in n.attribute:
            if a.name in ("to", "dtype") and a.i == FLOAT16 and n.op_type != "Cast":
                a.i = FLOAT
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        rounded = [k for k, t in enumerate(n.output) if t and types.get(t) == FLOAT16]
        if n.op_type == "Cast" and any(a.name == "to" and a.i == FLOAT16 for a in n.attribute):
            # Cast(to=FP16) already rounds; widen its result back to FP32.
            t = n.output[0]
            n.output[0] = f"{t}__fp16"
            nodes += [n, helper.make_node("Cast", [n.output[0]], [t], to=FLOAT, name=f"{t}__widen")]
            continue
        pairs = []
        for k in rounded:
            t = n.output[k]
            n.output[k] = f"{t}__exact"
            pairs += [helper.make_node("Cast", [f"{t}__exact"], [f"{t}__fp16"], to=FLOAT16, name=f"{t}__round"),
                      helper.make_node("Cast", [f"{t}__fp16"], [t], to=FLOAT, name=f"{t}__widen")]
        nodes += [n, *pairs]
    graph.ClearField("node")
    graph.node.extend(entry + nodes)
    graph.ClearField("value_info")
    for o in graph.output:
        if o.type.tensor_type.elem_type == FLOAT16:
            o.type.tensor_type.elem_type = FLOAT
    return out


def session(model: Any, faithful_fp16: bool, consume: bool = False,
            weights: dict[str, np.ndarray] | None = None) -> Any:
    """An ONNX Runtime CPU session of a ModelProto or path; graph optimizations off for the FP16
    emulation graph. `consume=True` lets a large ModelProto give up its weights to the session;
    `weights`: the arrays `fp16_emulation` handed out (see `compiler.graph.onnx_io.ort_session`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if faithful_fp16:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort_session(model, opts, consume=consume, weights=weights)


def has_fp16(model: Any) -> bool:
    """True when any initializer, Cast or declared tensor of `model` is FP16."""
    g = model.graph
    return (any(t.data_type == FLOAT16 for t in g.initializer)
            or any(n.op_type == "Cast" and any(a.name == "to" and a.i == FLOAT16 for a in n.attribute)
                   for n in g.node))
