"""Optimization profile shapes: which input axes vary, and the min/opt/max shape of each input.

A TensorRT engine with dynamic input dims needs an optimization profile that bounds them
(TensorRT developer guide, "Working with Dynamic Shapes"). The exported transformers take
(batch, sequence) int64 inputs, so axis 0 takes a profile's batch sizes and axis 1 its sequence
lengths. A graph with a KV cache (`text-generation-with-past`) also has `past_key_values.*`
inputs (batch, heads, past, head_dim), whose axis 2 takes the profile's past lengths, and an
`attention_mask` whose axis 1 spans past + sequence. Any other dynamic axis is an error.
TensorRT-free: unit-tested on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from compiler.errors import EngineBuildError
from compiler.settings import ProfileSettings

# Axes of a transformer input that an optimization profile may vary.
PROFILE_AXES = ("batch", "sequence")

Dim = int | str | None
"""One input dimension: a static size, or dynamic (-1, None, or an ONNX `dim_param` name)."""

ProfileShapes = dict[str, dict[str, tuple[int, ...]]]
"""{input name: {"min" | "opt" | "max": shape}} for one optimization profile."""


def onnx_input_dims(model: Any) -> list[tuple[str, tuple[Dim, ...]]]:
    """The graph inputs of an `onnx.ModelProto` (initializers excluded) and their dims.

    Args:
        model: an `onnx.ModelProto`.

    Returns:
        (input name, dims) per input; a dim is its `dim_value` (int), its `dim_param` (str),
        or None when neither is set.
    """
    initializers = {init.name for init in model.graph.initializer}
    result = []
    for value_info in model.graph.input:
        if value_info.name in initializers:
            continue
        dims: list[Dim] = []
        for d in value_info.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        result.append((value_info.name, tuple(dims)))
    return result


def is_dynamic(dim: Dim) -> bool:
    """True for a dynamic dim: None, an ONNX `dim_param` name, or TensorRT's -1."""
    return dim is None or isinstance(dim, str) or dim < 0


def profile_shapes(
    network_inputs: Sequence[tuple[str, Sequence[Dim]]], profile: ProfileSettings
) -> ProfileShapes:
    """The min/opt/max shape of every input for one optimization profile.

    A dynamic axis 0 takes the profile's batch sizes, a dynamic axis 1 its sequence lengths
    (past + sequence for the `attention_mask` of a graph with a KV cache), axis 2 of a KV-cache
    input its past lengths; static dims are kept as they are.

    Args:
        network_inputs: (name, dims) per input, as TensorRT reports them (-1 = dynamic) or as
            `onnx_input_dims` returns them (dim_param name or None = dynamic).
        profile: the (batch, sequence) min/opt/max triples.

    Returns:
        {input name: {"min": shape, "opt": shape, "max": shape}}, shapes as int tuples.

    Raises:
        EngineBuildError: an input has a dynamic dim at an axis other than 0 or 1.
    """
    has_cache = any(is_cache_input(name, dims) for name, dims in network_inputs)
    pasts = {"min": profile.min_past, "opt": profile.opt_past, "max": profile.max_past}
    corners = {"min": profile.min_shape, "opt": profile.opt_shape, "max": profile.max_shape}
    shapes: ProfileShapes = {}
    for name, dims in network_inputs:
        cache = is_cache_input(name, dims)
        for axis, dim in enumerate(dims):
            if is_dynamic(dim) and axis >= len(PROFILE_AXES) and not (cache and axis == 2):
                raise EngineBuildError(
                    f"input {name!r} has a dynamic dimension {dim!r} at axis {axis} (shape "
                    f"{list(dims)}); only axis 0 (batch) and axis 1 (sequence) may be dynamic "
                    "(and axis 2, the past, of a KV-cache input past_key_values.*). "
                    "Export the model with a static size for that axis."
                )
        shapes[name] = {}
        for corner, values in corners.items():
            sizes = {0: values[0], 1: values[1]}
            if cache:
                sizes = {0: values[0], 2: pasts[corner]}
            elif has_cache and name == "attention_mask":
                sizes = {0: values[0], 1: values[1] + pasts[corner]}  # the mask spans past + sequence
            shapes[name][corner] = tuple(int(sizes[axis]) if is_dynamic(dim) else int(dim)  # type: ignore[arg-type]
                                         for axis, dim in enumerate(dims))
    return shapes


def is_cache_input(name: str, dims: Sequence[Dim]) -> bool:
    """True for a KV-cache input: `past_key_values.*` of rank 4 (batch, heads, past, head_dim)."""
    return name.startswith("past_key_values.") and len(dims) == 4
