"""The KV cache stays FP16 across steps in an FP16 variant.

The precision pass keeps every graph input and output at its declared type (FP32), so a
`text-generation-with-past` graph converted to FP16 would take its past as FP32, cast it to
FP16 inside, and cast `present.*` back to FP32 on the way out: twice the cache memory and
bandwidth of an FP16 cache, and two casts per layer per step. This pass retypes the cache at
the graph border instead:

- a `past_key_values.*` input whose consumers read it as FP16 (through the Cast(to=FP16) the
  precision pass inserted) becomes an FP16 input; those Casts go, and any consumer that reads it
  as FP32 gets one Cast(to=FP32);
- a `present.*` output computed in FP16 and Cast back to FP32 at the border
  (`compiler.passes.precision.cast_graph_outputs`) loses that Cast and becomes an FP16 output.

Values do not change in the decode loop: the past fed at step t+1 is the present of step t,
already FP16 values (the Cast to FP32 and back was exact). A cache tensor computed in FP32
(pinned, or `fp32` mode) is left FP32.
"""

from __future__ import annotations

from typing import Any

from compiler.graph.analysis import FLOAT, FLOAT16


def _cast_to(node: Any) -> int | None:
    if node.op_type != "Cast":
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def fp16_cache_io(model: Any) -> tuple[Any, dict[str, Any]]:
    """Retype the KV-cache inputs and outputs of a strongly typed graph to FP16 where the graph
    computes them in FP16 (see the module docstring). Modifies and returns `model`.

    Args:
        model: onnx.ModelProto after `compiler.passes.precision.convert_precision` (or `auto`).

    Returns:
        (model, {"fp16_inputs": [...], "fp16_outputs": [...], "kept_fp32": [...], "casts_removed": n}).
    """
    import onnx

    g = model.graph
    nodes = list(g.node)  # one wrapper per node: drop/keep below go by identity
    inputs = [v for v in g.input if v.name.startswith("past_key_values.") and v.type.tensor_type.elem_type == FLOAT]
    outputs = [v for v in g.output if v.name.startswith("present.") and v.type.tensor_type.elem_type == FLOAT]
    report: dict[str, Any] = {"fp16_inputs": [], "fp16_outputs": [], "kept_fp32": [], "casts_removed": 0}
    drop: set[int] = set()
    renames: dict[str, str] = {}
    new_nodes = []
    for v in inputs:
        readers = [n for n in nodes if v.name in n.input]
        halves = [n for n in readers if _cast_to(n) == FLOAT16]
        if not halves:
            report["kept_fp32"].append(v.name)
            continue
        for n in halves:
            drop.add(id(n))
            renames[n.output[0]] = v.name
        others = [n for n in readers if id(n) not in drop]
        if others:
            wide = f"{v.name}__fp32"
            new_nodes.append(onnx.helper.make_node("Cast", [v.name], [wide], to=FLOAT, name=f"{v.name}__input_cast_fp32"))
            for n in others:
                n.input[:] = [wide if t == v.name else t for t in n.input]
        v.type.tensor_type.elem_type = FLOAT16
        report["fp16_inputs"].append(v.name)
        report["casts_removed"] += len(halves)
    producer = {t: n for n in nodes for t in n.output}
    for v in outputs:
        n = producer.get(v.name)
        if n is None or _cast_to(n) != FLOAT or not n.input[0].endswith("__fp16"):
            report["kept_fp32"].append(v.name)
            continue
        drop.add(id(n))
        renames[n.input[0]] = v.name
        v.type.tensor_type.elem_type = FLOAT16
        report["fp16_outputs"].append(v.name)
        report["casts_removed"] += 1
    kept = [onnx.NodeProto() for n in nodes if id(n) not in drop]
    for copy, n in zip(kept, [n for n in nodes if id(n) not in drop]):
        copy.CopyFrom(n)
        copy.input[:] = [renames.get(t, t) for t in n.input]
        copy.output[:] = [renames.get(t, t) for t in n.output]
    g.ClearField("node")
    g.node.extend(new_nodes + kept)
    # value_info of renamed tensors would now disagree with the new names' types
    stale = set(renames) | set(renames.values())
    keep_vi = [vi for vi in g.value_info if vi.name not in stale]
    g.ClearField("value_info")
    g.value_info.extend(keep_vi)
    return model, report
