"""Stage 5 (fidelity): compare a precision variant against the FP32 graph on real and random text.

The FP32 graph runs on ONNX Runtime's CPU provider, the fast path. An FP16 variant does not:
on x86 ONNX Runtime has no FP16 kernels for MatMul, Add, GELU or LayerNorm, inserts Casts
around them and then removes Cast pairs, so a chain of FP16 ops runs in FP32 and a tensor that
overflows FP16 mid-graph never shows (measured: a model whose layer 3 of 6 overflows FP16 on
real text gave 0 % non-finite outputs there, 95 % with true FP16 tensors).

The FP16 reference used instead (`fp16_emulation`): every node computes in FP32, and every
tensor that the variant types FP16 is rounded through Cast(FP16) -> Cast(FP32) right where it
is produced; FP16 initializers are widened exactly. The graph runs with all graph
optimizations off, so no Cast pair is removed. Each FP16 tensor therefore holds exactly the
FP16 value (an overflow past 65504 becomes inf and propagates), and each op computes as a
TensorRT FP16 kernel with FP32 accumulation does, rounding once at its output.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from compiler.precision import FLOAT, FLOAT16

log = logging.getLogger(__name__)

REFERENCE_NAME = "onnx-fp16-emulation (FP32 compute, every FP16 tensor rounded through Cast, ORT graph optimizations off)"


def fp16_emulation(model: Any) -> Any:
    """The faithful FP16 reference graph of a strongly typed FP32/FP16 model.

    Args:
        model: onnx.ModelProto whose float tensors are FP32 or FP16.

    Returns:
        An all-FP32 onnx.ModelProto with a Cast(FP16) -> Cast(FP32) pair after every
        FP16-typed tensor, same inputs; FP16 graph outputs become FP32 (values already rounded).

    Raises:
        ValueError: a graph input is FP16 (feed types would change).
    """
    import onnx
    from onnx import helper, numpy_helper

    src = onnx.shape_inference.infer_shapes(model)
    g = src.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    if any(types.get(i.name) == FLOAT16 for i in g.input):
        raise ValueError("fp16_emulation needs FP32 graph inputs (the precision pass keeps them)")

    out = onnx.ModelProto()
    out.CopyFrom(src)
    graph = out.graph
    inits = []
    for t in graph.initializer:
        if t.data_type == FLOAT16:
            t = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)
        inits.append(t)
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
    graph.node.extend(nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(inits)
    graph.ClearField("value_info")
    for o in graph.output:
        if o.type.tensor_type.elem_type == FLOAT16:
            o.type.tensor_type.elem_type = FLOAT
    return out


def session(model: Any, faithful_fp16: bool) -> Any:
    """An ONNX Runtime CPU session; graph optimizations off for the FP16 emulation graph."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if faithful_fp16:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def has_fp16(model: Any) -> bool:
    """True when any initializer, Cast or declared tensor of `model` is FP16."""
    g = model.graph
    return (any(t.data_type == FLOAT16 for t in g.initializer)
            or any(n.op_type == "Cast" and any(a.name == "to" and a.i == FLOAT16 for a in n.attribute)
                   for n in g.node))


@dataclass
class Fidelity:
    """Variant vs FP32 over one input set.

    Attributes:
        cosine_min / cosine_mean: cosine similarity per sample over its flattened first output
            at valid (unpadded) positions; a sample with a non-finite value counts as NaN,
            reported as None.
        max_abs_err: largest |variant - fp32| over those values (None when non-finite).
        nonfinite_count: NaN/Inf values in the variant's outputs at valid positions.
        samples: samples compared.
    """

    cosine_min: float | None
    cosine_mean: float | None
    max_abs_err: float | None
    nonfinite_count: int
    samples: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _valid(x: np.ndarray, i: int, length: int) -> np.ndarray:
    """Sample i's values at its `length` valid positions ((batch, sequence, ...) or (batch, ...))."""
    return x[i, :length] if x.ndim >= 3 else x[i]


def compare(reference: Any, variant: Any, output_names: list[str],
            batches: Iterator[tuple[dict[str, np.ndarray], np.ndarray]]) -> Fidelity:
    """Run both sessions over `batches` and measure the variant against the reference.

    Args:
        reference, variant: ONNX Runtime sessions with the same inputs and outputs.
        output_names: outputs to check; the first gives cosine and max abs error.
        batches: (feeds, lengths) pairs, feeds of (batch, sequence) int64 arrays.
    """
    start = time.perf_counter()
    cosines, max_err, nonfinite = [], 0.0, 0
    for feeds, lengths in batches:
        ref = reference.run(output_names, feeds)
        got = variant.run(output_names, feeds)
        for i, length in enumerate(lengths):
            for k, (r, g) in enumerate(zip(ref, got)):
                gv = _valid(g, i, length).astype(np.float64)
                bad = int(np.size(gv) - np.count_nonzero(np.isfinite(gv)))
                nonfinite += bad
                if k:
                    continue
                rv = _valid(r, i, length).astype(np.float64).ravel()
                gv = gv.ravel()
                if bad:
                    cosines.append(np.nan)
                    max_err = np.nan
                    continue
                denom = np.linalg.norm(rv) * np.linalg.norm(gv)
                cosines.append(float(rv @ gv / denom) if denom else float(np.array_equal(rv, gv)))
                max_err = max(max_err, float(np.max(np.abs(rv - gv))))
    c = np.array(cosines)
    finite = not np.isnan(c).any()
    return Fidelity(
        cosine_min=float(c.min()) if finite else None,
        cosine_mean=float(c.mean()) if finite else None,
        max_abs_err=float(max_err) if finite else None,
        nonfinite_count=nonfinite,
        samples=len(cosines),
        seconds=round(time.perf_counter() - start, 2),
    )


def verify_variant(fp32_model: Any, variant_model: Any, output_names: list[str], tokens: Any,
                   batch_size: int, vocab_size: int, seed: int = 0) -> dict[str, Any]:
    """Fidelity of `variant_model` against `fp32_model` on real text and on random token ids.

    Args:
        fp32_model, variant_model: onnx.ModelProto with the same inputs/outputs.
        output_names: graph outputs; the first is the one cosine is measured on.
        tokens: a `calibration.TokenizedSet` of real text.
        batch_size: samples per batch (padded to the batch's longest sample).
        vocab_size: random ids are uniform in [0, vocab_size), at the real samples' shapes.
        seed: RNG seed of the random ids.

    Returns:
        {"real": Fidelity dict, "random": Fidelity dict, "reference": engine name}.
    """
    faithful = has_fp16(variant_model)
    reference = session(fp32_model, faithful_fp16=False)
    variant = session(fp16_emulation(variant_model), True) if faithful else session(variant_model, False)
    names = [i.name for i in reference.get_inputs()]
    real = compare(reference, variant, output_names, tokens.batches(batch_size, names))
    rng = np.random.default_rng(seed)
    rand = compare(reference, variant, output_names,
                   tokens.batches(batch_size, names, rng=rng, vocab_size=vocab_size))
    engine = REFERENCE_NAME if faithful else "onnxruntime CPU (FP32 graph)"
    return {"real": real.to_dict(), "random": rand.to_dict(), "reference": engine}
