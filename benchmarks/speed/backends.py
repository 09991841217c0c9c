"""The backends of `benchmarks.latency`: one adapter per runtime and graph, all on the same feeds.

Each `Backend` answers `available(ctx)` (None, or the reason it cannot run here: no GPU, a
library missing) and `open(ctx)`, a `Runner` whose `call(feeds)` returns a zero-argument
function doing one synchronized inference, and whose `outputs(feeds)` returns the first output
(`last_hidden_state`, (batch, sequence, hidden) float32) for the accuracy columns.

| backend | what runs |
|---|---|
| `torch-cpu-fp32` | PyTorch eager FP32 on the CPU: the baseline |
| `ort-cpu-fp32` | ONNX Runtime CPU, our FP32 export (`run_pipeline(until="export")`), ORT_ENABLE_ALL |
| `ort-cpu-fp32-fused` | the same graph through `onnxruntime.transformers.optimizer.optimize_model` |
| `ort-cpu-int8` | our INT8 graph: FP32 + Q/DQ (`model.qdq.onnx`, `run_pipeline(until="quantize")`) |
| `ort-cpu-int8-dynamic` | `onnxruntime.quantization.quantize_dynamic` (QInt8 weights) of the FP32 graph |
| `openvino-cpu` | OpenVINO CPU plugin reading our FP32 ONNX, inference precision f32 |
| `tensorrt` | the hybrid engine through `compiler.deploy.runtime.Bundle` |
| `torch-cuda-fp32`, `torch-cuda-fp16` | PyTorch on CUDA; fp16 = autocast (softmax, layer norm in FP32) |
| `ort-cuda` | ONNX Runtime's CUDA provider on the FP32 graph |

Our INT8 pipeline variant (`model.onnx`) is FP16 + Q/DQ for TensorRT; ONNX Runtime's CPU
provider has no FP16 GEMM kernels, so the CPU row runs the FP32 + Q/DQ graph the quantize
stage writes beside it (the same scales and placement).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np

from compiler.settings import BuildSettings, PrecisionSettings, settings_hash

log = logging.getLogger(__name__)
Feeds = dict[str, np.ndarray]


@dataclass
class Context:
    """What every backend shares: the settings of the model's pipeline runs, the thread count and
    the folder for the graphs made here (fused, dynamic INT8). Graphs are made on first use."""

    settings: BuildSettings
    threads: int
    graph_dir: Path

    @cached_property
    def loaded(self) -> Any:
        """`compiler.training.models.LoadedModel` of the model (PyTorch module, tokenizer)."""
        from compiler.training.models import load_model

        return load_model(self.settings.model)

    @cached_property
    def fp32_onnx(self) -> Path:
        """Our FP32 export (the pipeline's export stage; reused when unchanged)."""
        from compiler.pipeline import run_pipeline

        return run_pipeline(self.settings, until="export").fp32_onnx

    @cached_property
    def int8_qdq_onnx(self) -> Path:
        """Our INT8 graph for CPUs: FP32 + Q/DQ from the pipeline's quantize stage (precision int8)."""
        from compiler.pipeline import run_pipeline

        settings = dataclasses.replace(self.settings, precision=PrecisionSettings(mode="int8"))
        return run_pipeline(settings, until="quantize").qdq_onnx

    @cached_property
    def fused_onnx(self) -> Path:
        """`optimize_model` of the FP32 graph (fused attention, LayerNorm, GELU), model_type
        bert for encoders, gpt2 for decoders, heads and hidden size from the model's config."""
        from onnxruntime.transformers.optimizer import optimize_model

        from compiler.artifacts import cached
        from compiler.graph.onnx_io import onnx_sha256, save_onnx

        config = self.loaded.module.config
        kind = "bert" if self.loaded.family == "encoder" else "gpt2"
        heads, hidden = int(config.num_attention_heads), int(config.hidden_size)
        dest = self.graph_dir / "model.fp32.fused.onnx"
        key = settings_hash(onnx_sha256(self.fp32_onnx), "fused", kind, heads, hidden, _ort_version())

        def compute() -> None:
            opt = optimize_model(str(self.fp32_onnx), model_type=kind, num_heads=heads, hidden_size=hidden,
                                 use_gpu=False)
            log.info("fused graph: %s", opt.get_fused_operator_statistics())
            save_onnx(opt.model, dest)

        cached(key, [dest], compute, "ort optimize_model")
        return dest

    @cached_property
    def int8_dynamic_onnx(self) -> Path:
        """`quantize_dynamic` of the FP32 graph: INT8 weights (QInt8), activations quantized per
        run from their range (ONNX Runtime's own CPU INT8)."""
        import tempfile

        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from compiler.artifacts import cached
        from compiler.graph.onnx_io import onnx_sha256, save_onnx

        dest = self.graph_dir / "model.int8.dynamic.onnx"
        key = settings_hash(onnx_sha256(self.fp32_onnx), "quantize_dynamic", "QInt8", _ort_version())

        def compute() -> None:
            with tempfile.TemporaryDirectory(dir=self.graph_dir) as tmp:
                out = Path(tmp) / "model.onnx"
                quantize_dynamic(str(self.fp32_onnx), str(out), weight_type=QuantType.QInt8)
                save_onnx(onnx.load(str(out)), dest)

        self.graph_dir.mkdir(parents=True, exist_ok=True)
        cached(key, [dest], compute, "ort quantize_dynamic")
        return dest


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def _gpu_reason() -> str | None:
    from compiler.build.device import find_gpu

    found = find_gpu()
    return f"no CUDA GPU: {found}" if isinstance(found, str) else None


class Runner:
    """An opened backend. Subclasses define `infer(feeds)` (one inference, result ready on return)."""

    def infer(self, feeds: Feeds) -> Any:
        raise NotImplementedError

    def to_numpy(self, out: Any) -> np.ndarray:
        return np.asarray(out, np.float32)

    def call(self, feeds: Feeds) -> Callable[[], Any]:
        """A zero-argument function running one inference on `feeds` (inputs staged first)."""
        return lambda: self.infer(feeds)

    def outputs(self, feeds: Feeds) -> np.ndarray:
        """The first output for `feeds`: (batch, sequence, hidden) float32."""
        return self.to_numpy(self.infer(feeds))

    def gpu_memory_mib(self) -> float | None:
        return None


@dataclass(frozen=True)
class Backend:
    """One row label of the table: name, precision, device and how to open it."""

    name: str
    precision: str
    device: str
    library: str
    opener: Callable[[Context], Runner]
    needs: Callable[[], str | None] = lambda: None

    def available(self) -> str | None:
        """None when it can run here, else the reason (a row says it with status "skipped")."""
        return self.needs()

    def open(self, ctx: Context) -> Runner:
        return self.opener(ctx)

    def version(self) -> str:
        """`<library> <version>` of the runtime it uses ("not installed" where missing)."""
        import importlib.metadata as md

        for dist in ((self.library, "onnxruntime-gpu") if self.library == "onnxruntime" else (self.library,)):
            try:
                return f"{self.library} {md.version(dist)}"
            except md.PackageNotFoundError:
                continue
        return f"{self.library} not installed"


# ---------------------------------------------------------------------------------------------
# PyTorch


class TorchRunner(Runner):
    """PyTorch eager on `device`; `fp16` runs under CUDA autocast, whose float32 list keeps
    softmax, layer_norm and the reductions in FP32 (the hybrid rule)."""

    def __init__(self, ctx: Context, device: str, fp16: bool) -> None:
        import torch

        torch.set_num_threads(ctx.threads)
        self.torch, self.device, self.fp16 = torch, device, fp16
        self.module = ctx.loaded.module.to(device).eval()
        self.names = ctx.loaded.input_names

    def staged(self, feeds: Feeds) -> dict[str, Any]:
        return {n: self.torch.from_numpy(feeds[n]).to(self.device) for n in self.names}

    def forward(self, inputs: dict[str, Any]) -> Any:
        torch = self.torch
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.fp16):
            out = self.module(**inputs, return_dict=True)[0]
        if self.device != "cpu":
            torch.cuda.synchronize()
        return out

    def infer(self, feeds: Feeds) -> Any:
        return self.forward(self.staged(feeds))

    def call(self, feeds: Feeds) -> Callable[[], Any]:
        inputs = self.staged(feeds)
        return lambda: self.forward(inputs)

    def to_numpy(self, out: Any) -> np.ndarray:
        return out.float().cpu().numpy()

    def gpu_memory_mib(self) -> float | None:
        if self.device == "cpu":
            return None
        mib = self.torch.cuda.max_memory_allocated() / 2**20
        self.torch.cuda.reset_peak_memory_stats()
        return round(mib, 1)


def _cuda_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU for PyTorch (torch {torch.__version__}, torch.cuda.is_available() is False)"
    return None


# ---------------------------------------------------------------------------------------------
# ONNX Runtime


class OrtRunner(Runner):
    """An ONNX Runtime session: ORT_ENABLE_ALL, `ctx.threads` intra-op threads, one inter-op thread."""

    def __init__(self, ctx: Context, path: Path, provider: str = "CPUExecutionProvider") -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = ctx.threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=[provider])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.output = self.session.get_outputs()[0].name
        self.cuda = provider != "CPUExecutionProvider"

    def infer(self, feeds: Feeds) -> Any:
        return self.session.run([self.output], {n: feeds[n] for n in self.inputs})[0]


def _ort_cuda_reason() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                f"(providers {ort.get_available_providers()}; pip install onnxruntime-gpu)")
    return _gpu_reason()


# ---------------------------------------------------------------------------------------------
# OpenVINO


class OpenVinoRunner(Runner):
    """OpenVINO's CPU plugin on our FP32 ONNX (dynamic batch and sequence), `ctx.threads` threads,
    inference precision f32 (the plugin would otherwise pick bf16 on CPUs that have it)."""

    def __init__(self, ctx: Context) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(ctx.fp32_onnx))
        config = {"INFERENCE_NUM_THREADS": ctx.threads, "INFERENCE_PRECISION_HINT": "f32",
                  "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.inputs = [p.get_any_name() for p in self.compiled.inputs]

    def infer(self, feeds: Feeds) -> Any:
        self.request.infer({n: feeds[n] for n in self.inputs})
        return self.request.get_output_tensor(0).data

    def to_numpy(self, out: Any) -> np.ndarray:
        return np.array(out, np.float32)  # a copy: the request reuses its buffer


def _openvino_reason() -> str | None:
    try:
        importlib.import_module("openvino")
    except ImportError as e:
        return f"openvino not installed ({e}; pip install openvino, or the `bench` extra)"
    return None


# ---------------------------------------------------------------------------------------------
# TensorRT


class TensorRtRunner(Runner):
    """The hybrid engine through the deployment runtime: the pipeline up to verify (precision
    hybrid), its bundle (`compiler.deploy.bundle.prepare_bundle`), the plan built into it for this
    GPU (`build_into_bundle`, the default profile: up to batch 32 x sequence 512), then
    `compiler.deploy.runtime.Bundle.load(..., backend="tensorrt")`; `infer` returns host arrays."""

    def __init__(self, ctx: Context) -> None:
        from compiler.deploy.bundle import build_into_bundle, prepare_bundle
        from compiler.deploy.runtime import Bundle
        from compiler.pipeline import run_pipeline

        settings = dataclasses.replace(ctx.settings, precision=PrecisionSettings(mode="hybrid"))
        bundle_dir = prepare_bundle(settings, run_pipeline(settings, until="verify"))
        build_into_bundle(bundle_dir)
        self.bundle = Bundle.load(bundle_dir, backend="tensorrt")
        self.first = self.bundle.output_names[0]

    def infer(self, feeds: Feeds) -> Any:
        return self.bundle.infer(**feeds)[self.first]


def _tensorrt_reason() -> str | None:
    try:
        importlib.import_module("tensorrt")
    except ImportError as e:
        return f"TensorRT not importable ({e}); pip install -e '.[gpu]' on a host with a CUDA GPU"
    gpu = _gpu_reason()
    if gpu:
        return gpu
    try:
        runtime = importlib.import_module("compiler.deploy.runtime")
    except ImportError as e:
        return f"compiler.deploy.runtime not available ({e})"
    if not hasattr(runtime, "Bundle"):
        return "compiler.deploy.runtime has no Bundle"
    return None


def _cuda_torch(fp16: bool) -> Callable[[Context], Runner]:
    return lambda ctx: TorchRunner(ctx, "cuda", fp16)


BACKENDS: dict[str, Backend] = {b.name: b for b in [
    Backend("torch-cpu-fp32", "fp32", "cpu", "torch", lambda ctx: TorchRunner(ctx, "cpu", False)),
    Backend("ort-cpu-fp32", "fp32", "cpu", "onnxruntime", lambda ctx: OrtRunner(ctx, ctx.fp32_onnx)),
    Backend("ort-cpu-fp32-fused", "fp32", "cpu", "onnxruntime", lambda ctx: OrtRunner(ctx, ctx.fused_onnx)),
    Backend("ort-cpu-int8", "int8", "cpu", "onnxruntime", lambda ctx: OrtRunner(ctx, ctx.int8_qdq_onnx)),
    Backend("ort-cpu-int8-dynamic", "int8-dynamic", "cpu", "onnxruntime",
            lambda ctx: OrtRunner(ctx, ctx.int8_dynamic_onnx)),
    Backend("openvino-cpu", "fp32", "cpu", "openvino", OpenVinoRunner, _openvino_reason),
    Backend("tensorrt", "hybrid", "cuda", "tensorrt", TensorRtRunner, _tensorrt_reason),
    Backend("torch-cuda-fp32", "fp32", "cuda", "torch", _cuda_torch(False), _cuda_reason),
    Backend("torch-cuda-fp16", "fp16-autocast", "cuda", "torch", _cuda_torch(True), _cuda_reason),
    Backend("ort-cuda", "fp32", "cuda", "onnxruntime",
            lambda ctx: OrtRunner(ctx, ctx.fp32_onnx, "CUDAExecutionProvider"),
            _ort_cuda_reason),
]}
BASELINE = "torch-cpu-fp32"
CPU_BACKENDS = tuple(n for n, b in BACKENDS.items() if b.device == "cpu")
