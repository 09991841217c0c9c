"""The export stage: PyTorch -> ONNX with dynamic `batch` and `sequence` axes, checked against PyTorch.

The graph is exported with the TorchScript-based exporter at opset >= 17 (native
LayerNormalization), constants folded, eager attention (explicit MatMul/Softmax, which the
precision pass can see). Parity is checked on real text at every (batch, sequence) of
`ExportSettings.parity_batches x parity_sequences`, every output, FP32 max abs difference.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.text import text_feeds
from compiler.artifacts import read_key, write_key
from compiler.errors import CompilerError, ExportParityError
from compiler.training.export_patches import exportable_ops
from compiler.training.heads import dummy_inputs, task_axes, task_module, task_output_names
from compiler.training.models import LoadedModel, max_positions
from compiler.graph.onnx_io import check_model_file, load_onnx, save_onnx
from compiler.settings import ExportSettings, settings_hash

log = logging.getLogger(__name__)

DYNAMIC_AXES = {0: "batch", 1: "sequence"}


@dataclass
class ParityResult:
    output: str
    batch: int
    sequence: int
    max_abs_diff: float


@dataclass
class ExportReport:
    """What the export stage did.

    Attributes:
        onnx_path: the FP32 ONNX file.
        reused: True when an export with the same content key was already on disk.
        parity: one entry per (output, batch, sequence).
    """

    onnx_path: str
    opset: int
    inputs: list[str]
    outputs: list[str]
    nodes: int
    seconds: float
    reused: bool
    parity: list[ParityResult] = field(default_factory=list)
    parity_atol: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Outputs:
    """Wraps a Hugging Face model so that it takes positional int64 inputs and returns a tuple."""

    def __new__(cls, module: Any, input_names: list[str]):
        import torch

        class ExportWrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = module

            def forward(self, *inputs: torch.Tensor):
                kwargs = dict(zip(input_names, inputs))
                if "use_cache" in _params(module):
                    kwargs["use_cache"] = False
                out = self.model(**kwargs, return_dict=True)
                # last_hidden_state first (the verifier's cosine uses the first output), then
                # every other tensor output the model returns (pooler_output for BERT).
                return tuple(v for k, v in out.items() if isinstance(v, torch.Tensor))

        return ExportWrapper().eval()


def _params(module: Any) -> set[str]:
    import inspect

    return set(inspect.signature(module.forward).parameters)


def output_names(loaded: LoadedModel) -> list[str]:
    """Names of the tensor outputs the model returns, in order."""
    import torch

    if getattr(loaded, "task", "feature-extraction") != "feature-extraction":
        return task_output_names(loaded)
    with torch.no_grad():
        kwargs = {n: torch.ones(1, 4, dtype=torch.long) for n in loaded.input_names}
        if "use_cache" in _params(loaded.module):
            kwargs["use_cache"] = False
        out = torch_forward(lambda: loaded.module(**kwargs, return_dict=True), 1, 4)
    return [k for k, v in out.items() if isinstance(v, torch.Tensor)]


def torch_forward(run: Any, batch: int, seq: int) -> Any:
    """`run()`, a forward of the PyTorch model at (batch, seq), with the model's own failure
    raised as a CompilerError: a model that does not run at every sequence length (Nystromformer's
    landmark segments) cannot be compiled with dynamic shapes."""
    try:
        return run()
    except (RuntimeError, ValueError, IndexError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), "")[:300]
        raise CompilerError(f"the PyTorch model itself fails at batch={batch} sequence={seq} ({type(e).__name__}: "
                            f"{first}); it must run in transformers at every batch and sequence length of the "
                            "optimization profile to be compiled with dynamic shapes") from e


def blame_the_model(loaded: LoadedModel, wrapper: Any, dummy: tuple) -> None:
    """After a failed trace: run `wrapper` on the export's example inputs `dummy` in plain
    PyTorch. Where that fails too, the model is to blame, not the exporter.

    Raises:
        CompilerError: the plain forward fails. With a KV cache (`text-generation-with-past`)
            where the model runs without one, the message names the cache (layers that keep
            another state: linear attention, state-space) and `--task text-generation`.
    """
    import torch

    def failure(run: Any) -> Exception | None:
        try:
            with torch.no_grad():
                run()
        except Exception as e:  # noqa: BLE001 - whatever the model raises is reported as its own
            return e
        return None

    def first_line(e: Exception) -> str:
        return type(e).__name__ + ": " + next((x for x in str(e).splitlines() if x.strip()), "")[:300]

    err = failure(lambda: wrapper(*dummy))
    if err is None:
        return
    ids = dummy[0]
    if loaded.task == "text-generation-with-past":
        alone = failure(lambda: loaded.module(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False))
        if alone is None:
            raise CompilerError(f"the PyTorch model fails with its KV cache given as past_key_values tensors "
                                f"({first_line(err)}) and runs without one: its layers keep a state other than "
                                "one key and value each (linear attention, state-space). Use --task "
                                "text-generation (the whole prefix every step)") from err
        err = alone
    raise CompilerError(f"the PyTorch model itself fails on the export's example inputs "
                        f"{tuple(ids.shape)} ({first_line(err)}); check that the checkpoint runs in "
                        "transformers (its config against its weights)") from err


def onnx_from_torch(loaded: LoadedModel, settings: ExportSettings, onnx_path: Path,
                    parity_texts: list[str]) -> tuple[Path, ExportReport]:
    """Export `loaded.module` to ONNX and check it against PyTorch.

    Args:
        loaded: the model, its tokenizer and input names (all inputs (batch, sequence) int64).
        settings: opset and parity tolerances/shapes.
        onnx_path: destination; reused as is when its recorded content key matches.
        parity_texts: real text, at least max(parity_batches) samples.

    Returns:
        (onnx_path, report). Outputs are FP32 with dims (batch, sequence, ...) or (batch, ...).

    Raises:
        ExportParityError: any output differs from PyTorch by more than `parity_atol`, or the
            graph fails to run in ONNX Runtime at a parity shape (a size the trace fixed).
        CompilerError: an opset above what this PyTorch's TorchScript exporter writes
            (`max_export_opset`).
    """
    import torch

    highest = max_export_opset()
    if settings.opset > highest:
        raise CompilerError(f"--opset {settings.opset}: this PyTorch ({torch.__version__}) exports ONNX opsets "
                            f"17..{highest} (TorchScript exporter); pass --opset {highest} or lower (default 17)")
    key = settings_hash("export-v3", loaded.key, settings, torch.__version__)
    start = time.perf_counter()
    names_out = output_names(loaded)
    reused = read_key(onnx_path) == key
    if not reused:
        wrapper = export_module(loaded)
        dummy, axes = export_inputs(loaded, names_out)
        with tempfile.TemporaryDirectory(dir=onnx_path.parent if onnx_path.parent.exists() else None) as tmp, \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic are expected
            try:
                model = traced_onnx(wrapper, dummy, Path(tmp) / "export.onnx", [str(n) for n in loaded.input_names],
                                    names_out, axes, settings.opset)
            except torch.onnx.errors.UnsupportedOperatorError as e:
                raise CompilerError(f"the ONNX exporter cannot write an operator this model runs: {e}. The "
                                    "architecture cannot be compiled as it is (e.g. mixture-of-experts routing "
                                    "counts tokens per expert with aten::histc)") from e
            except (RuntimeError, ValueError, IndexError, TypeError, AttributeError):
                blame_the_model(loaded, wrapper, dummy)  # a CompilerError where PyTorch alone fails too
                raise
            static_output_dims(model, wrapper, dummy, axes)
            # External data: later stages open the graph without loading the weights.
            save_onnx(model, onnx_path, external=True)
            del model
        check_model_file(onnx_path)  # the graph alone: its weights are external now
        write_key(onnx_path, key)
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    parity = check_parity(loaded, onnx_path, names_out, settings, parity_texts)
    report = ExportReport(str(onnx_path), settings.opset, loaded.input_names, names_out,
                          len(model.graph.node), round(time.perf_counter() - start, 2), reused,
                          parity, settings.parity_atol)
    failures = [(p.output, p.batch, p.sequence, p.max_abs_diff) for p in parity
                if not p.max_abs_diff <= settings.parity_atol]
    if failures:
        raise ExportParityError(failures, settings.parity_atol)
    log.info("export: %s (%d nodes, %s)", onnx_path, report.nodes, "reused" if reused else "new")
    return onnx_path, report


def export_inputs(loaded: LoadedModel, names_out: list[str]) -> tuple[tuple, dict[str, dict[int, str]]]:
    """The exporter's example inputs ((batch 2, sequence 16) int64 tensors, or a task's own,
    `heads.dummy_inputs`) and dynamic axes of every input and output (`names_out`)."""
    import torch

    if _is_task(loaded):
        return dummy_inputs(loaded), task_axes(loaded, names_out)
    dummy = tuple(torch.ones(2, 16, dtype=torch.long) for _ in loaded.input_names)
    axes = {n: DYNAMIC_AXES for n in loaded.input_names}
    axes.update({n: DYNAMIC_AXES if n == "last_hidden_state" or "hidden" in n else {0: "batch"} for n in names_out})
    return dummy, axes


def max_export_opset() -> int:
    """The newest opset this PyTorch's TorchScript exporter writes (20 for PyTorch 2.x; its
    `torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET`, 20 where that name is missing)."""
    try:
        from torch.onnx import _constants

        return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    except ImportError:
        return 20


def traced_onnx(wrapper: Any, dummy: tuple, tmp_file: Path, input_names: list[str], output_names: list[str],
                axes: dict[str, dict[int, str]], opset: int) -> Any:
    """`torch.onnx.export` of `wrapper` (TorchScript exporter, constants folded) as a ModelProto
    with its weights as initializers: the same graph, names and bytes as `export_params=True`.

    The exporter runs with `export_params=False`, and the weights it folded (its `params_dict`:
    the parameters, and e.g. each Linear's transposed weight) are taken from its
    `_model_to_graph` and put back as initializers in its order. PyTorch then does not copy
    every weight into a protobuf and a file that is parsed back (BERT-large, 1.3 GB: see
    docs/precision.md). Where that hook is missing (another PyTorch) or does not give every
    weight input, the plain export (`export_params=True`) runs instead. Tests:
    tests/training/test_export_trace.py (byte for byte against the plain export). Above 2 GiB
    the plain export writes external data itself and then also names each Constant node's
    attribute tensor; this does not (same weights, same nodes otherwise).

    Args:
        dummy: the example inputs, (batch, sequence) int64 tensors; `tmp_file`: a scratch path.

    Returns:
        onnx.ModelProto, weights in memory (`raw_data`).
    """
    import torch

    captured: dict[str, Any] = {}
    try:
        from torch.onnx._internal.torchscript_exporter import utils as exporter

        to_graph = exporter._model_to_graph
    except (ImportError, AttributeError):
        exporter = to_graph = None

    def capture(*args: Any, **kwargs: Any) -> Any:
        graph, params, out = to_graph(*args, **kwargs)
        captured.update(params)
        return graph, params, out

    def export(with_params: bool) -> None:
        with warnings.catch_warnings(), exportable_ops():
            warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic are expected
            torch.onnx.export(wrapper, dummy, str(tmp_file), input_names=input_names, output_names=output_names,
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False,
                              export_params=with_params)

    if exporter is not None:
        exporter._model_to_graph = capture
        try:
            export(False)
        finally:
            exporter._model_to_graph = to_graph
        model = load_onnx(tmp_file, check=False)
        if _weights_back(model, len(_tensors(dummy)), captured):
            return model
        log.info("export: the exporter's weights were not all captured; exporting them with the graph")
    export(True)
    return load_onnx(tmp_file, check=False)


def _tensors(item: Any) -> list[Any]:
    """The tensors in a nest of tuples, lists and dicts, in order (the exporter's inputs)."""
    if isinstance(item, dict):
        return [t for v in item.values() for t in _tensors(v)]
    if isinstance(item, (tuple, list)):
        return [t for v in item for t in _tensors(v)]
    return [item] if hasattr(item, "shape") else []


def _weights_back(model: Any, inputs: int, weights: dict[str, Any]) -> bool:
    """Move the graph inputs named in `weights` (name -> torch tensor) to initializers, in
    place and in order; False (model untouched) unless exactly `inputs` other inputs are left
    (the model's own) and every weight has a NumPy dtype."""
    import onnx
    from onnx import numpy_helper

    names = [i.name for i in model.graph.input if i.name in weights]
    if len(model.graph.input) - len(names) != inputs:
        return False
    arrays = {}
    for name in names:
        try:
            arrays[name] = weights[name].detach().cpu().contiguous().numpy()
        except (TypeError, RuntimeError):  # e.g. bfloat16, which NumPy lacks
            return False
    kept = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    for name in names:
        array, proto = arrays.pop(name), model.graph.initializer.add()
        if array.dtype.kind == "f":  # in place: no second copy of the weight through a message
            proto.name, proto.data_type = name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            proto.dims.extend(array.shape)
            proto.raw_data = array.tobytes()
        else:
            proto.CopyFrom(numpy_helper.from_array(array, name))
    return True


def static_output_dims(model: Any, wrapper: Any, dummy: tuple, axes: dict[str, dict[int, str]]) -> None:
    """Give each graph output its static size on every axis not declared dynamic, in place.

    The tracer can leave a symbolic name on an axis that is static (e.g. the hidden size after the
    L2 norm of a sentence-embedding head: `Divsentence_embedding_dim_1`); Triton's config and the
    bundle manifest then say -1 where the size is known. The sizes come from running `wrapper` on
    `dummy` (the export's own inputs).

    Args:
        model: the exported `onnx.ModelProto` (outputs edited in place).
        wrapper: the module that was exported; dummy: its example inputs.
        axes: the export's dynamic axes {tensor name: {axis: name}}.
    """
    import torch

    with torch.no_grad():
        outs = wrapper(*dummy)
    flat: list[Any] = []
    pending = [outs]
    while pending:  # depth-first, in order: the order torch.onnx.export names the outputs
        item = pending.pop(0)
        if isinstance(item, dict):
            pending[:0] = list(item.values())
        elif isinstance(item, (tuple, list)):
            pending[:0] = list(item)
        elif isinstance(item, torch.Tensor):
            flat.append(item)
    if len(flat) != len(model.graph.output):  # cannot pair them up: leave the graph as traced
        return
    for value, out in zip(model.graph.output, flat):
        dynamic = axes.get(value.name, {})
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if i < len(out.shape) and i not in dynamic and dim.HasField("dim_param"):
                dim.dim_value = int(out.shape[i])


def check_parity(loaded: LoadedModel, onnx_path: Path, names_out: list[str],
                 settings: ExportSettings, texts: list[str]) -> list[ParityResult]:
    """Max abs difference between ONNX Runtime (CPU, FP32) and PyTorch per output and shape.

    Each (batch, sequence) pair tokenizes the first `batch` texts padded/truncated to exactly
    `sequence` tokens, so shorter samples also exercise the attention-mask path. Sequences are
    capped at the model's position limit (`max_positions`); a KV-cache graph's decode step runs
    only where one more position fits.
    """
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    wrapper = export_module(loaded)
    results = []
    limit = max_positions(getattr(loaded.module, "config", None), loaded.module) or max(settings.parity_sequences) + 1
    for batch in settings.parity_batches:
        for seq in sorted({min(s, limit) for s in settings.parity_sequences}):
            enc = loaded.tokenizer(texts[:batch], padding="max_length", truncation=True,
                                   max_length=seq, return_tensors="np")
            feeds = text_feeds({n: enc[n].astype(np.int64) if n in enc else np.zeros_like(enc["input_ids"], np.int64)
                                for n in ("input_ids", "attention_mask", "token_type_ids")}, loaded.input_names)
            ort_out = _run_or_refuse(session, names_out, feeds, batch, seq, settings)
            with torch.no_grad():
                ref = torch_forward(lambda: wrapper(*(torch.from_numpy(feeds[n]) for n in loaded.input_names)),
                                    batch, seq)
            results += [ParityResult(name, batch, seq, _max_diff(got, r)) for name, got, r in zip(names_out, ort_out, ref)]
            if getattr(loaded, "cache", None) is not None and seq < limit:  # a decode step on the ONNX cache
                feeds = decode_feeds(feeds, dict(zip(names_out, ort_out)), loaded.input_names)
                with torch.no_grad():
                    ref = wrapper(*(torch.from_numpy(feeds[n]) for n in loaded.input_names))
                results += [ParityResult(f"{name} (decode, past {seq})", batch, 1, _max_diff(got, r))
                            for name, got, r in zip(names_out, _run_or_refuse(session, names_out, feeds, batch, 1,
                                                                              settings), ref)]
    return results


def _run_or_refuse(session: Any, names_out: list[str], feeds: dict[str, np.ndarray], batch: int, seq: int,
                   settings: ExportSettings) -> list[np.ndarray]:
    """`session.run`, with ONNX Runtime's failure at this shape raised as `ExportParityError`."""
    try:
        return session.run(names_out, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own pybind11 classes
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ExportParityError([("(all outputs)", batch, seq, float("inf"))], settings.parity_atol,
                                run_error=first[:400]) from None


def _max_diff(got: np.ndarray, ref: Any) -> float:
    """Max abs difference; inf where the shapes differ (a size the trace fixed)."""
    ref = ref.numpy()
    if got.shape != ref.shape:
        return float("inf")
    return float(np.max(np.abs(got - ref))) if got.size else 0.0


def decode_feeds(feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray], input_names: list[str]) -> dict[str, np.ndarray]:
    """The next step's feeds of a KV-cache graph: each row's greedy token (argmax of the last
    position's logits), the mask extended by one, `present.*` as `past_key_values.*`."""
    nxt = outputs["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
    mask = np.concatenate([feeds["attention_mask"], np.ones_like(nxt)], axis=1)
    new = {"input_ids": nxt, "attention_mask": mask}
    for n in input_names:
        if n.startswith("past_key_values."):
            new[n] = outputs[n.replace("past_key_values.", "present.")]
    return {n: new[n] for n in input_names}


def _is_task(loaded: LoadedModel) -> bool:
    return getattr(loaded, "task", "feature-extraction") != "feature-extraction"


def export_module(loaded: LoadedModel) -> Any:
    """The module that is exported: the task wrapper (`compiler.training.heads.task_module`), or
    for `feature-extraction` every tensor output of the base model (today's graph)."""
    return task_module(loaded) if _is_task(loaded) else _Outputs(loaded.module, loaded.input_names)
