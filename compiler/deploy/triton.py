"""Triton model configurations (`config.pbtxt`), built and read with Triton's own protobuf schema.

Every config is a `tritonclient.grpc.model_config_pb2.ModelConfig` (the schema of
triton-inference-server/common `protobuf/model_config.proto`), written with protobuf's
`text_format` and parsed back against the same schema, so a field or enum Triton does not
know is an error here, not at server start. The rules followed, from Triton's
`docs/user_guide/model_configuration.md` (server repository):

- "Maximum Batch Size": when every input and output has the batch as its first dimension,
  `max_batch_size` >= 1 and each tensor's `dims` leave that axis out (the full shape is
  [-1] + dims); otherwise `max_batch_size` is 0 and `dims` is the full shape.
- "Inputs and Outputs": a variable-size dimension is -1.
- "Datatypes": TYPE_INT64 (kINT64 / int64), TYPE_FP32 (kFLOAT), TYPE_FP16 (kHALF), TYPE_BF16 ...
- "Instance Groups" and model_config.proto's `ModelInstanceGroup.profile`: for a TensorRT plan
  with several optimization profiles, the profiles an instance may use; Triton picks the best
  one for each request's shapes (without it, only profile 0).
- "CUDA Compute Capability": `cc_model_filenames` maps a GPU's compute capability ("8.6") to
  the plan built for it; a GPU not listed loads `default_model_filename`.
- "Dynamic Batcher": `dynamic_batching { max_queue_delay_microseconds }`.

The I/O lists (`io`) are the manifest's: {"inputs": [{"name", "dtype", "shape"}], "outputs": [...]},
dtype a NumPy name ("int64", "float32", "float16"), shape with -1 for a dynamic axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from compiler.artifacts import write_bytes
from compiler.errors import CompilerError

TENSORRT_PLATFORM = "tensorrt_plan"
ONNXRUNTIME_PLATFORM = "onnxruntime_onnx"
PLAN_FILENAME = "model.plan"
ONNX_FILENAME = "model.onnx"

# NumPy dtype name -> Triton model-config DataType name ("Datatypes" table of model_configuration.md).
TRITON_DTYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int16": "TYPE_INT16",
    "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32",
    "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16",
}


def schema() -> Any:
    """Triton's `model_config_pb2` module (from `tritonclient[grpc]`).

    Raises:
        CompilerError: tritonclient is not installed (names the extra that installs it).
    """
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise CompilerError(f"Triton's model-config schema is not importable ({e}); install it with "
                            "`pip install 'tritonclient[grpc]'` (the project's `deploy` extra)") from e
    return model_config_pb2


def triton_dtype(dtype: str) -> int:
    """The `DataType` enum value of a NumPy dtype name, e.g. "int64" -> TYPE_INT64.

    Raises:
        CompilerError: a dtype Triton has no type for.
    """
    pb = schema()
    if dtype not in TRITON_DTYPES:
        raise CompilerError(f"tensor dtype {dtype!r} has no Triton data type; known: {sorted(TRITON_DTYPES)}")
    return pb.DataType.Value(TRITON_DTYPES[dtype])


def numpy_dtype(data_type: int) -> str:
    """The NumPy dtype name of a Triton `DataType` enum value (inverse of `triton_dtype`)."""
    name = schema().DataType.Name(data_type)
    return {v: k for k, v in TRITON_DTYPES.items()}.get(name, name)


def batches_on_axis0(io: Mapping[str, Sequence[Mapping[str, Any]]]) -> bool:
    """Whether every input and output has a dynamic first axis (Triton can batch them)."""
    tensors = [*io["inputs"], *io["outputs"]]
    return bool(tensors) and all(len(t["shape"]) >= 1 and int(t["shape"][0]) < 0 for t in tensors)


def max_batch_size(io: Mapping[str, Any], profiles: Sequence[Mapping[str, Any]]) -> int:
    """Triton's `max_batch_size`: the largest batch of any optimization profile's max shape, or 0
    when some tensor has no dynamic batch axis (then `dims` carry the full shape).

    Args:
        io: the manifest's I/O lists.
        profiles: the manifest's profiles, [{input: {"min", "opt", "max": [batch, sequence]}}].
    """
    if not batches_on_axis0(io) or not profiles:
        return 0
    return max(int(shapes["max"][0]) for p in profiles for shapes in p.values())


def _tensors(pb: Any, tensors: Sequence[Mapping[str, Any]], batched: bool, cls: Any) -> list[Any]:
    out = []
    for t in tensors:
        shape = [int(d) if int(d) >= 0 else -1 for d in t["shape"]]
        dims = shape[1:] if batched else shape
        if not dims:  # Triton needs rank >= 1: a (batch,) tensor is dims [1] reshaped to []
            out.append(cls(name=t["name"], data_type=triton_dtype(t["dtype"]), dims=[1],
                           reshape=pb.ModelTensorReshape(shape=[])))
        else:
            out.append(cls(name=t["name"], data_type=triton_dtype(t["dtype"]), dims=dims))
    return out


def _base(name: str, platform: str, io: Mapping[str, Any], batch: int, queue_delay_us: int) -> Any:
    pb = schema()
    config = pb.ModelConfig(name=name, platform=platform, max_batch_size=batch)
    config.input.extend(_tensors(pb, io["inputs"], batch > 0, pb.ModelInput))
    config.output.extend(_tensors(pb, io["outputs"], batch > 0, pb.ModelOutput))
    if batch > 1:
        config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    return config


def tensorrt_config(name: str, io: Mapping[str, Any], profiles: Sequence[Mapping[str, Any]],
                    cc_model_filenames: Mapping[str, str] | None = None,
                    default_model_filename: str = PLAN_FILENAME, instances: int = 1,
                    queue_delay_us: int = 100) -> Any:
    """The `config.pbtxt` of the TensorRT model (`platform: "tensorrt_plan"`).

    Args:
        name: the Triton model name (its folder's name).
        io: the engine's I/O (or, before the build, the TensorRT-ready ONNX's).
        profiles: the optimization profiles, in the engine's order.
        cc_model_filenames: {"9.0": "model.sm90.plan", ...} when the bundle holds plans for several
            compute capabilities; None or empty for one `model.plan`.
        default_model_filename: the plan a GPU not in `cc_model_filenames` loads.
        instances: execution instances per GPU.
        queue_delay_us: the dynamic batcher's longest wait for a fuller batch, microseconds.

    Returns:
        A `ModelConfig`: max_batch_size and dims from the profiles (-1 where dynamic), the data
        types of `io`, `dynamic_batching` when batches above 1 are possible, one KIND_GPU
        instance group listing every profile ("0", "1", ...) when there are several.
    """
    pb = schema()
    config = _base(name, TENSORRT_PLATFORM, io, max_batch_size(io, profiles), queue_delay_us)
    group = pb.ModelInstanceGroup(kind=pb.ModelInstanceGroup.KIND_GPU, count=instances)
    if len(profiles) > 1:
        group.profile.extend(str(i) for i in range(len(profiles)))
    config.instance_group.append(group)
    config.default_model_filename = default_model_filename
    for cc, filename in sorted((cc_model_filenames or {}).items()):
        config.cc_model_filenames[cc] = filename
    return config


def onnxruntime_config(name: str, io: Mapping[str, Any], max_batch: int, kind: str = "KIND_CPU",
                       instances: int = 1, queue_delay_us: int = 100) -> Any:
    """The `config.pbtxt` of the ONNX Runtime model (`platform: "onnxruntime_onnx"`).

    Args:
        name: the Triton model name.
        io: the ONNX graph's I/O.
        max_batch: the largest batch (the bundle's profile max: the same contract as the plan);
            0 when some tensor has no batch axis.
        kind: "KIND_CPU" (a CPU-only host, the default) or "KIND_GPU" (onnxruntime's CUDA provider).
        instances: execution instances.
    """
    pb = schema()
    config = _base(name, ONNXRUNTIME_PLATFORM, io, max_batch if batches_on_axis0(io) else 0, queue_delay_us)
    config.instance_group.append(pb.ModelInstanceGroup(kind=pb.ModelInstanceGroup.Kind.Value(kind), count=instances))
    config.default_model_filename = ONNX_FILENAME
    return config


def set_label_file(config: Any, output: str, filename: str) -> None:
    """Name the label file of a classification output (`ModelOutput.label_filename`, relative to
    the model folder: one class name a line, in id order), so Triton's classification extension
    returns class names. An output `config` does not have is left alone."""
    for o in config.output:
        if o.name == output:
            o.label_filename = filename


def config_text(config: Any) -> str:
    """The protobuf text format of a `ModelConfig` (what `config.pbtxt` holds)."""
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def write_config(path: str | Path, config: Any) -> Path:
    """Write `config` as protobuf text to `path` atomically (`compiler.artifacts.write_bytes`)."""
    return write_bytes(path, config_text(config).encode())


def read_config(path: str | Path) -> Any:
    """Parse a `config.pbtxt` against Triton's `ModelConfig` schema.

    Raises:
        CompilerError: the file is missing, or is not a valid ModelConfig (an unknown field or
            enum value, a syntax error: protobuf's message with line and column).
    """
    from google.protobuf import text_format

    path = Path(path)
    if not path.is_file():
        raise CompilerError(f"{path}: no such Triton model configuration")
    try:
        return text_format.Parse(path.read_text(), schema().ModelConfig())
    except text_format.ParseError as e:
        raise CompilerError(f"{path}: not a valid Triton ModelConfig ({e}); regenerate the bundle with "
                            "`python -m compiler bundle`") from e


def io_mismatches(config: Any, io: Mapping[str, Any]) -> list[str]:
    """Where a parsed config disagrees with the graph's or engine's I/O (names, order, data types,
    dims under `max_batch_size`); [] when they agree. Used by the tests and by `inspect`."""
    problems = []
    batched = config.max_batch_size > 0
    for kind, declared, actual in (("input", config.input, io["inputs"]), ("output", config.output, io["outputs"])):
        if [t.name for t in declared] != [t["name"] for t in actual]:
            problems.append(f"{kind} names {[t.name for t in declared]} != {[t['name'] for t in actual]}")
            continue
        for d, a in zip(declared, actual):
            shape = [int(x) if int(x) >= 0 else -1 for x in a["shape"]]
            dims = list(d.dims) if d.dims != [1] or not d.HasField("reshape") else []
            want = shape[1:] if batched else shape
            if numpy_dtype(d.data_type) != a["dtype"]:
                problems.append(f"{kind} {d.name}: data_type {schema().DataType.Name(d.data_type)} != {a['dtype']}")
            if dims != want:
                problems.append(f"{kind} {d.name}: dims {dims} != {want} (shape {shape}, max_batch_size "
                                f"{config.max_batch_size})")
    return problems
