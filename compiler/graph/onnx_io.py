"""Loading and crash-safe saving of ONNX models (external data above 2 GiB), light copies of
their graphs, and ONNX Runtime sessions over them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from compiler.errors import InvalidOnnxError

# protobuf's hard limit for one serialized message.
PROTOBUF_LIMIT = 2**31 - 1


def load_onnx(path: str | os.PathLike, check: bool = True):
    """Read an ONNX model (and its external data) and run `onnx.checker` on it.

    Raises:
        InvalidOnnxError: the file is missing, is not an ONNX protobuf, or fails the checker.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InvalidOnnxError(f"{path}: no such ONNX file. Run `python -m compiler export` first.")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError, missing external data, ...
        raise InvalidOnnxError(
            f"{path}: not a readable ONNX model ({type(e).__name__}: {e}). The file may be "
            "truncated or not ONNX; re-export it, and keep any .data file beside it."
        ) from e
    if check:
        check_model_file(path)
    return model


def check_model_file(path: str | os.PathLike) -> None:
    """`onnx.checker` on an ONNX file, by path: it works past protobuf's 2 GiB, and on a file
    whose weights are external data it reads only the graph (BERT-large: 0.03 s, against 2-5 s
    for the same graph with its 1.3 GB of weights inside the file).

    Raises:
        InvalidOnnxError: the model fails the checker (the message names the failure).
    """
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise InvalidOnnxError(f"{path}: fails onnx.checker: {e}") from e


def foreign_ops(model: Any) -> dict[str, int]:
    """{"domain.op_type": count} of the nodes outside the standard ONNX domain ("" / "ai.onnx")."""
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            counts[f"{n.domain}.{n.op_type}"] = counts.get(f"{n.domain}.{n.op_type}", 0) + 1
    return counts


def check_standard_ops(path: str | os.PathLike) -> None:
    """Refuse a graph with ops outside the standard ONNX domain (ONNX Runtime's `com.microsoft`
    fusions from its transformer optimizer) before a TensorRT build: its ONNX parser takes
    standard ops only. The graph is read without its weights.

    Raises:
        InvalidOnnxError: naming the foreign ops.
    """
    import onnx

    foreign = sorted(foreign_ops(onnx.load(str(path), load_external_data=False)))
    if foreign:
        raise InvalidOnnxError(f"{path}: ops outside the standard ONNX domain ({', '.join(foreign)}); TensorRT's ONNX "
                               "parser takes standard ops only. Build from the exporter's graph (`make onnx`), not "
                               "one fused by onnxruntime.transformers.optimizer")


def check_onnx_file(path: str | os.PathLike) -> None:
    """Cheap check that `path` holds an ONNX graph, its external weights beside it, before work
    that would fail later (the TensorRT build): the graph is read without its weights.

    Raises:
        InvalidOnnxError: the file is missing, empty, truncated or not ONNX, or holds no node, or
            an external data file it names is missing.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InvalidOnnxError(f"{path}: no such ONNX file. Run `python -m compiler compile --no-build` "
                               "(or `make onnx`) first; it writes the TensorRT-ready ONNX.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError: truncated or not ONNX
        raise InvalidOnnxError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e}). The file may be "
                               "truncated or not ONNX; export it again.") from e
    if not model.graph.node:
        raise InvalidOnnxError(f"{path}: holds no ONNX graph ({path.stat().st_size} bytes); export it again.")
    missing = sorted({e.value for t in model.graph.initializer for e in t.external_data
                      if e.key == "location" and not (path.parent / e.value).is_file()})
    if missing:
        raise InvalidOnnxError(f"{path}: its external weights {missing} are not beside it; copy the .data "
                               "file with the .onnx, or export it again.")


def proto_nbytes(model) -> int:
    """Serialized size of the ModelProto `model`, bytes: an upper bound at most ~32 bytes per
    initializer over the exact `model.ByteSize()`, computed without encoding the weights.

    upb's `ByteSize()` encodes the whole message to measure it: 12.4 s for BERT-large's 1.3 GB
    of FP32 weights, on every save and every session built from a ModelProto (measured, cProfile
    of `compile --precision auto`: 48 s of a run). Here the graph without its weights is measured
    exactly and each large tensor as its header plus its data's length.
    """
    import onnx

    g = model.graph
    strings = (model.doc_string, model.producer_version, model.domain, g.doc_string)
    total = graph_copy(model).ByteSize() + sum(len(x.encode()) + 8 for x in strings) + 64
    total += sum(p.ByteSize() + 8 for p in [*model.metadata_props, *model.training_info, *g.sparse_initializer,
                                            *g.quantization_annotation])
    for t in g.initializer:
        if len(t.raw_data) < 1 << 16:
            total += t.ByteSize() + 16
        else:  # header (name, dims, type, location) + the bytes + their tag and length varint
            head = onnx.TensorProto(name=t.name, dims=t.dims, data_type=t.data_type, doc_string=t.doc_string,
                                    data_location=t.data_location, external_data=t.external_data)
            total += head.ByteSize() + len(t.raw_data) + 32
    return total


def save_onnx(model, path: str | os.PathLike, external: bool | None = None) -> Path:
    """Write `model` to `path` atomically; weights go to `<name>.data` when `external` (default:
    when over 2 GiB). Saving with external data moves the weights out of `model` (consumed).

    The model (and data file) are written into a temporary folder beside `path`
    (`compiler.artifacts.writing`: `.<name>.<pid>.<random>/`, whose leftovers from killed
    processes the next save of `path` removes), then renamed, so a crash leaves the previous
    artifact, never a half-written one.

    Raises:
        compiler.errors.CompilerError: the disk is full (naming the model's size and the free
            space) or the folder is not writable (`compiler.artifacts.write_error`).
    """
    import onnx

    from compiler.artifacts import umask, writing

    dest = Path(path)
    size = proto_nbytes(model)
    with writing(dest, nbytes=size, directory=True) as tmp_dir:
        if external is None:
            external = size > PROTOBUF_LIMIT
        data_name = f"{dest.name}.data"
        onnx.save_model(model, str(tmp_dir / dest.name), save_as_external_data=external,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        for written in tmp_dir.iterdir():  # onnx writes the .data file 0600: follow the umask
            os.chmod(written, 0o666 & ~umask())
        if external:
            os.replace(tmp_dir / data_name, dest.parent / data_name)
        elif (dest.parent / data_name).exists():
            (dest.parent / data_name).unlink()
        os.replace(tmp_dir / dest.name, dest)
    return dest


def onnx_mib(path: str | os.PathLike) -> float:
    """Size of an ONNX file and its `<name>.data` external weights, MiB (2 decimals)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return round((path.stat().st_size + (data.stat().st_size if data.is_file() else 0)) / 2**20, 2)


_SHA256_SEEN: dict[tuple, str] = {}  # onnx_sha256 of this process, by the files' identity
RACY_S = 2.0  # a file modified this recently is hashed again next time (`onnx_sha256`)


def _identity(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def onnx_sha256(path: str | os.PathLike) -> str:
    """sha256 over an ONNX file and, when present, its `<name>.data` external weights.

    Within one process a file hashed before is not read again while its identity (device,
    inode, size, modification time in ns) is unchanged, as git's index trusts a file's stat:
    BERT-large's FP32 graph (1.3 GB, ~1.3 s) is hashed once per run, not once per stage. As in
    git ("racy clean"), a file modified less than `RACY_S` before it was hashed is not
    remembered: a rewrite within the file system's timestamp tick could keep its stat.
    """
    import hashlib
    import time

    from compiler.artifacts import sha256_file

    path = Path(path)
    data = path.parent / f"{path.name}.data"
    files = [path] + ([data] if data.is_file() else [])
    ident = tuple(_identity(f) for f in files)
    if ident in _SHA256_SEEN:
        return _SHA256_SEEN[ident]
    digest = hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()
    if all(time.time_ns() - i[-1] > RACY_S * 1e9 for i in ident) and ident == tuple(_identity(f) for f in files):
        _SHA256_SEEN[ident] = digest
    return digest


def model_digest(model) -> str | None:
    """sha256 of what a ModelProto computes: its graph without weights (serialized) and each
    initializer's name, type, shape and bytes, without serializing the weights (~1 s for
    BERT-large). None when an initializer's data lives in an external file (not in the proto).

    Two protos with equal digests compute the same function; `metadata_props` and doc strings
    of the model are left out (`graph_copy`).
    """
    import hashlib

    import onnx

    h = hashlib.sha256(graph_copy(model).SerializeToString())
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        h.update(f"{t.name}:{t.data_type}:{list(t.dims)}:{len(t.raw_data)}:".encode())
        if t.raw_data:
            h.update(t.raw_data)
        else:  # typed fields (small tensors): their own serialization
            h.update(t.SerializeToString())
    for t in model.graph.sparse_initializer:
        h.update(t.SerializeToString())
    return h.hexdigest()


def graph_copy(model):
    """A copy of `model` without its initializers (cheap for a model of any size)."""
    import onnx

    light = onnx.ModelProto()
    light.CopyFrom(model.__class__(ir_version=model.ir_version, opset_import=model.opset_import,
                                   producer_name=model.producer_name, functions=model.functions))
    g = model.graph
    light.graph.CopyFrom(onnx.GraphProto(name=g.name, node=g.node, input=g.input, output=g.output,
                                         value_info=g.value_info))
    return light


def constants_to_initializers(model) -> None:
    """Turn the Constant nodes of `model` into initializers, in place (same tensor names).

    Handles `value` (any tensor), `value_float(s)` (float32) and `value_int(s)` (int64);
    Constants holding sparse tensors or strings, and Constants of other domains, stay nodes.
    The precision pass runs this first so that one code path converts every constant.
    """
    import numpy as np
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


def without_weights(model, min_bytes: int = 1024):
    """A light copy for shape/type inference: initializers of >= `min_bytes` become typed inputs.

    Shape inference serializes the model, which fails past protobuf's 2 GiB; weights are not
    needed for it (small initializers, which hold shape constants, are kept for data propagation).
    """
    import onnx

    light = graph_copy(model)
    for t in model.graph.initializer:  # copy small initializers only; big ones become typed inputs
        if len(t.raw_data) >= min_bytes or t.data_location == onnx.TensorProto.EXTERNAL:
            light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            light.graph.initializer.append(t)
    return light


IN_MEMORY = "<in-memory>"  # external-data location of a weight handed to ONNX Runtime as an array


def in_memory_initializer(name: str, array):
    """An initializer that names `array` without holding its bytes: a TensorProto with `array`'s
    type and dims whose external data is `IN_MEMORY`. `ort_session(..., weights={name: array})`
    gives ONNX Runtime the array itself (no serialization, no temporary file)."""
    import onnx
    from onnx import helper

    t = onnx.TensorProto(name=name, dims=list(array.shape), data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                         data_location=onnx.TensorProto.EXTERNAL)
    entry = t.external_data.add()
    entry.key, entry.value = "location", IN_MEMORY
    return t


def ort_session(model, options=None, consume: bool = False, weights=None):
    """An ONNX Runtime CPU session for `model`: a ModelProto, or a path that ORT reads itself.

    A ModelProto goes through a temporary file with external data when it is over protobuf's
    2 GiB, or over 64 MiB with `consume=True` (the weights then move out of `model` into the
    file instead of being serialized to a second in-memory copy; `model` is unusable after).

    Args:
        weights: {initializer name: numpy array} for the initializers of `model` made by
            `in_memory_initializer`: ONNX Runtime copies them at load
            (`SessionOptions.add_external_initializers`), so the arrays may be freed once this
            returns; they are added to `options` (given or new). Only with a ModelProto. The FP16
            reference hands its widened weights this way: BERT-large's 1.3 GB then skip a
            protobuf copy and a temporary file (one session 9.0 -> 4.6 s, measured).
    """
    import onnx
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), options, providers=providers)
    if weights:
        options = options or ort.SessionOptions()
        names = list(weights)
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(weights[n]) for n in names])
    size = proto_nbytes(model)
    if consume and size > 64 << 20:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(str(path), options, providers=providers)
    if size <= PROTOBUF_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(copy, str(path), save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(str(path), options, providers=providers)


def session_with_outputs(path: str | os.PathLike, names: list[str], options=None):
    """A session of the ONNX file at `path` with `names` added as outputs, without loading its
    weights into Python: a small copy of the graph is written beside `path` so that ONNX
    Runtime reads the weights from the same external data file."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    light = onnx.load(str(path), load_external_data=False)
    present = {o.name for o in light.graph.output}
    light.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in names if t not in present)
    from compiler.artifacts import remove_stale_temps, temp_beside

    marker = path.with_name(f"{path.name}.outputs")  # names the temporaries; never written itself
    remove_stale_temps(marker)  # left by a killed run
    tmp = temp_beside(marker)
    try:
        onnx.save_model(light, str(tmp))
        return ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
    finally:
        tmp.unlink()
