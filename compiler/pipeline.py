"""The pipeline: one ordered list of stages, each reading `BuildSettings` and a shared state.

    STAGES = export -> precision -> verify -> build

Artifacts (under `settings.variant_dir()`, i.e. engines/<model>/<weights>/<precision>/):
`model.onnx` (TensorRT-ready, strongly typed), `precision_report.json`, `report.json`,
`model.plan` and `manifest.json` (build stage). The FP32 export lies one level up as
`model.fp32.onnx` with `export_report.json`, shared by all precision variants.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from compiler.artifacts import read_key, release_freed_memory, write_json, write_key
from compiler.settings import BuildSettings, settings_hash

log = logging.getLogger(__name__)


@dataclass
class PipelineState:
    """What the stages hand each other."""

    loaded: Any = None  # compiler.models.LoadedModel
    texts: list[str] = field(default_factory=list)
    fp32_onnx: Path | None = None
    output_names: list[str] = field(default_factory=list)
    variant_onnx: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)
    plan: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, int] = field(default_factory=dict)  # process peak after each stage


def _peak_rss_mib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux: KiB


def stage_export(settings: BuildSettings, state: PipelineState) -> None:
    """Load the model and real text, export FP32 ONNX and check parity against PyTorch."""
    from calibration import load_texts
    from compiler.export import onnx_from_torch
    from compiler.models import load_model

    state.loaded = load_model(settings.model)
    # Held-out text (verification, the auto budget) comes after the calibration samples.
    state.texts = load_texts(settings.data, skip=settings.data.calib_samples)
    path, report = onnx_from_torch(state.loaded, settings.export,
                                   settings.model_dir() / "model.fp32.onnx", state.texts)
    write_json(settings.model_dir() / "export_report.json", report.to_dict())
    state.fp32_onnx, state.output_names = path, report.outputs
    state.loaded.module = None  # later stages need the tokenizer only: free the weights
    state.report["model"] = {"name": settings.model.name, "weights": settings.model.weights,
                             "source": state.loaded.source, "family": state.loaded.family,
                             "tokenizer_note": state.loaded.tokenizer_note}
    state.report["export"] = {"onnx": str(path), "opset": report.opset, "nodes": report.nodes,
                              "reused": report.reused, "parity_atol": report.parity_atol,
                              "parity": [vars(p) for p in report.parity]}


def stage_precision(settings: BuildSettings, state: PipelineState) -> None:
    """Rewrite the FP32 graph into the requested precision (reused when unchanged)."""
    from compiler.onnx_io import load_onnx, onnx_sha256, save_onnx
    from compiler.precision import convert_precision

    out = settings.variant_dir() / "model.onnx"
    report_path = settings.variant_dir() / "precision_report.json"
    graph_sha = onnx_sha256(state.fp32_onnx)
    auto = settings.precision.mode == "auto"
    key = settings_hash("precision-v1", graph_sha, settings.precision, settings.data if auto else None)
    if read_key(out) == key and report_path.is_file():
        import json

        precision = json.loads(report_path.read_text())
        log.info("precision: %s reused", out)
    else:
        if auto:
            from calibration import load_texts, tokenized_set
            from compiler.auto_precision import auto_precision

            data, tok = settings.data, state.loaded.tokenizer
            calib = tokenized_set(load_texts(data, count=data.calib_samples), tok, data.max_length, data.cache_dir)
            heldout = tokenized_set(state.texts, tok, data.max_length, data.cache_dir)
            # auto takes the path: it reads the weights through ONNX Runtime where it can.
            model, report = auto_precision(state.fp32_onnx, settings.precision, calib, heldout, state.loaded.input_names,
                                           state.output_names, data.batch_size, state.loaded.vocab_size,
                                           graph_sha, data.cache_dir, settings.model.seed)
        else:
            model, report = convert_precision(load_onnx(state.fp32_onnx, check=False), settings.precision)
        save_onnx(model, out)
        precision = report.to_dict()
        write_json(report_path, precision)
        write_key(out, key)
    state.variant_onnx = out
    state.report["variant"] = settings.precision.mode
    state.report["onnx"] = str(out)
    state.report["precision"] = precision


def stage_verify(settings: BuildSettings, state: PipelineState) -> None:
    """Fidelity of the variant against FP32 on real text and random ids; writes report.json."""
    from calibration import tokenized_set
    from compiler.onnx_io import load_onnx
    from compiler.verify import verify_variant

    tokens = tokenized_set(state.texts, state.loaded.tokenizer, settings.data.max_length,
                           settings.data.cache_dir)
    fidelity = verify_variant(state.fp32_onnx, load_onnx(state.variant_onnx, check=False),
                              state.output_names, tokens, settings.data.batch_size,
                              state.loaded.vocab_size, settings.model.seed)
    fidelity["data"] = {"path": settings.data.path or "wikitext-2/test.txt (default)",
                        "samples": len(tokens), "max_length": settings.data.max_length,
                        "tokens": int(sum(len(x) for x in tokens.input_ids))}
    state.report["fidelity"] = fidelity
    write_json(settings.variant_dir() / "report.json", state.report)


def stage_build(settings: BuildSettings, state: PipelineState) -> None:
    """Build the TensorRT engine (stops with exit status 2 where TensorRT or a GPU is missing)."""
    from compiler.build import engine_from_onnx

    state.plan, _manifest = engine_from_onnx(state.variant_onnx, settings, state.report)


STAGES: list[tuple[str, Callable[[BuildSettings, PipelineState], None]]] = [
    ("export", stage_export),
    ("precision", stage_precision),
    ("verify", stage_verify),
    ("build", stage_build),
]


def run_pipeline(settings: BuildSettings, until: str = "build") -> PipelineState:
    """Run `STAGES` in order up to and including `until`.

    Raises:
        compiler.errors.CompilerError: from any stage; artifacts of finished stages remain.
    """
    names = [n for n, _ in STAGES]
    if until not in names:
        raise ValueError(f"until={until!r}: expected one of {names}")
    log.info("settings: %s", settings)
    state = PipelineState()
    for name, stage in STAGES[: names.index(until) + 1]:
        start = time.perf_counter()
        try:
            stage(settings, state)
        finally:
            release_freed_memory()
            state.seconds[name] = round(time.perf_counter() - start, 2)
            state.peak_rss_mib[name] = _peak_rss_mib()
            log.info("stage %s: %.1f s, peak RSS so far %d MiB", name, state.seconds[name],
                     state.peak_rss_mib[name])
    return state
