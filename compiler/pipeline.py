"""The pipeline: one ordered list of stages, each reading `BuildSettings` and a shared state.

    STAGES = export -> sparsity -> quantize -> precision -> verify -> build

`sparsity` (SPARSITY=2:4) and `quantize` (PRECISION=int8 / int8-qat) do nothing unless asked.

Artifacts: the dense FP32 export (the reference of every fidelity figure) is
`engines/<model>/<weights>/model.fp32.onnx` (`model.fp32.opset19.onnx` for INT8, whose Q/DQ
need opset 19) with `export_report.json`. A 2:4 sparse model gets its own FP32 export in
`engines/<model>/<weights>/sparse24/`. Under `settings.variant_dir()` (the base folder plus
the precision): `model.onnx` (TensorRT-ready, strongly typed), `precision_report.json`,
`report.json`, for INT8 `model.qdq.onnx` (FP32 + Q/DQ) and `quant_report.json`, and
`model.plan` with `manifest.json` (build stage).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from compiler.artifacts import read_key, release_freed_memory, write_json, write_key
from compiler.errors import CompilerError, DataError
from compiler.settings import BuildSettings, settings_hash

log = logging.getLogger(__name__)


@dataclass
class PipelineState:
    """What the stages hand each other."""

    loaded: Any = None  # compiler.training.models.LoadedModel
    texts: list[str] = field(default_factory=list)  # held-out real text
    reference_onnx: Path | None = None  # the dense FP32 export: every fidelity figure's reference
    fp32_onnx: Path | None = None  # the FP32 graph the variant derives from (dense or 2:4 sparse)
    student: Any = None  # the (sparse) PyTorch module QAT starts from; None: loaded.module
    masks: dict[str, Any] = field(default_factory=dict)  # 2:4 masks held during QAT
    output_names: list[str] = field(default_factory=list)
    qdq_onnx: Path | None = None  # FP32 + INT8 Q/DQ, before the precision pass
    variant_onnx: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)
    plan: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, int] = field(default_factory=dict)  # process peak after each stage


def _peak_rss_mib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux: KiB


def export_opset(settings: BuildSettings) -> int:
    """The opset of the FP32 export: INT8 Q/DQ with FP16 scales need opset 19."""
    from compiler.settings import INT8_MODES

    return max(settings.export.opset, 19) if settings.precision.mode in INT8_MODES else settings.export.opset


def fp32_name(settings: BuildSettings) -> str:
    opset = export_opset(settings)
    return "model.fp32.onnx" if opset == 17 else f"model.fp32.opset{opset}.onnx"


def calibration_texts(settings: BuildSettings) -> list[str]:
    """Calibration text: the first `calib_samples` samples of the text (see `DataSettings`)."""
    from calibration import load_texts

    return load_texts(settings.data, count=settings.data.calib_samples)


def training_texts(settings: BuildSettings) -> list[str]:
    """Fine-tuning text: up to `train_samples` from the `data.train_path` texts, or else from the
    verification text after its calibration and held-out samples (see `DataSettings`).

    With several texts each gives an even share of `train_samples` (the first ones one more when
    it does not divide), and their samples are interleaved: a, b, a, b, ... A text that is the
    verification text itself is read after its calibration and held-out samples.

    Returns:
        Stripped strings, at most `train_samples`.

    Raises:
        DataError: a text is missing, or gives fewer samples than one training batch in all.
    """
    from dataclasses import replace

    from calibration import load_texts

    data = settings.data
    held_out = data.calib_samples + data.samples
    if not data.train_path:
        sources = [(data, held_out, data.train_samples)]
    else:
        n = len(data.train_path)
        shares = [data.train_samples // n + (i < data.train_samples % n) for i in range(n)]
        sources = [(replace(data, path=p), held_out if _same_text(p, data.path) else 0, share)
                   for p, share in zip(data.train_path, shares)]
    parts = []
    for source, skip, share in sources:
        texts = load_texts(source, count=share, skip=skip, minimum=1)
        if len(texts) < share:
            log.warning("fine-tuning text %s: %d samples available, fewer than its share of %d (train_samples=%d)",
                        source.path or "default text", len(texts), share, data.train_samples)
        parts.append(texts)
    texts = [t for group in itertools.zip_longest(*parts) for t in group if t is not None]
    if len(texts) < settings.train.batch_size:
        raise DataError(f"fine-tuning text: {len(texts)} samples in all, need {settings.train.batch_size} (one "
                        "batch). Give a longer --train-text or a smaller --batch-size.")
    return texts


def _same_text(path: str, verification: str | None) -> bool:
    """Whether fine-tuning text `path` is the verification text (`None`: the default WikiText-2)."""
    from calibration.text import default_text_path

    ref = Path(verification) if verification is not None else default_text_path()
    return ref is not None and Path(path).resolve() == ref.resolve()


def _export(settings: BuildSettings) -> tuple[Any, list[str], Path, Any]:
    """Load the model and held-out text, export FP32 ONNX, check parity (see `stage_export`)."""
    from dataclasses import replace

    from calibration import load_texts
    from compiler.training.export import onnx_from_torch
    from compiler.training.models import load_model

    loaded = load_model(settings.model)
    # Held-out text (verification, the auto and INT8 budgets) comes after the calibration samples.
    texts = load_texts(settings.data, skip=settings.data.calib_samples)
    export = replace(settings.export, opset=export_opset(settings))
    path, report = onnx_from_torch(loaded, export, settings.model_dir() / fp32_name(settings), texts)
    return loaded, texts, path, report


def _export_in_child(settings: BuildSettings) -> tuple[Any, list[str], Path, Any]:
    from compiler.artifacts import fix_mmap_threshold

    # The exporter copies every weight several times (constant folding, serialization); with
    # glibc's adaptive threshold the freed copies stay resident and the next ones stack on them.
    fix_mmap_threshold()
    loaded, texts, path, report = _export(settings)
    loaded.module = None  # the weights stay in the child; the tokenizer travels back
    return loaded, texts, path, report


def stage_export(settings: BuildSettings, state: PipelineState) -> None:
    """Load the model and real text, export FP32 ONNX and check parity against PyTorch.

    Unless a later stage needs the PyTorch module (2:4 sparsity, QAT), this runs in a child
    process: PyTorch, the weights and the exporter's allocations (1.9 GB resident after the
    BERT-large export even with the module freed) leave with it, and the later stages' peak
    does not stack on them.
    """
    keep_module = settings.sparsity.pattern is not None or settings.precision.mode == "int8-qat"
    if keep_module:
        state.loaded, state.texts, path, report = _export(settings)
    else:
        from compiler.artifacts import run_in_child

        state.loaded, state.texts, path, report = run_in_child(_export_in_child, settings, what="export")
    write_json(settings.model_dir() / fp32_name(settings).replace("model.fp32", "export_report").replace(".onnx", ".json"),
               report.to_dict())
    state.reference_onnx = state.fp32_onnx = path
    state.output_names = report.outputs
    state.report["model"] = {"name": settings.model.name, "weights": settings.model.weights,
                             "source": state.loaded.source, "family": state.loaded.family,
                             "tokenizer_note": state.loaded.tokenizer_note}
    state.report["export"] = {"onnx": str(path), "opset": report.opset, "nodes": report.nodes,
                              "reused": report.reused, "parity_atol": report.parity_atol,
                              "parity": [vars(p) for p in report.parity]}


def _recover_from(path: str, weights_path: Path) -> tuple[Path, str]:
    """(resolved path, sha256) of `SparsitySettings.recover_from`.

    Raises:
        CompilerError: the file is missing, or is this run's own `student.safetensors` (it would
            be overwritten; use another `--engines` directory).
    """
    import hashlib

    src = Path(path).resolve()
    if not src.is_file():
        raise CompilerError(f"--recover-from {path}: no such file; pass the student.safetensors of an "
                            "earlier 2:4 run (engines/<model>/<weights>/sparse24/)")
    if weights_path.exists() and src == weights_path.resolve():
        raise CompilerError(f"--recover-from {path} is this run's own output; write to another --engines directory")
    return src, hashlib.sha256(src.read_bytes()).hexdigest()


def _start_from(student: Any, src: Path, names: list[str]) -> dict[str, Any]:
    """Load `src` into `student` (same architecture) and take the masks from its zeros.

    Raises:
        CompilerError: the file does not fit the model, or a chosen layer is not 2:4 in it.
    """
    from safetensors.torch import load_model

    from compiler.graph.sparsity import groups_check
    from compiler.training.prune import input_axis

    try:
        load_model(student, str(src))
    except (RuntimeError, KeyError) as e:
        raise CompilerError(f"--recover-from {src}: does not fit this model ({str(e)[:300]})") from e
    masks = {}
    for name in names:
        m = student.get_submodule(name)
        if reason := groups_check(m.weight.detach().numpy(), input_axis(m)):
            raise CompilerError(f"--recover-from {src}: layer {name} is not 2:4 along its input dimension "
                                f"({reason}); pass a student of a 2:4 run")
        masks[name] = m.weight.detach() != 0
    return masks


def stage_sparsity(settings: BuildSettings, state: PipelineState) -> None:
    """SPARSITY=2:4: prune the block linears, recover by distillation, export, check the pattern.

    The pruned and recovered weights are kept as `<base_dir>/student.safetensors` with
    `sparsity_report.json`, keyed by the model, sparsity, training and data settings: a later
    run (another precision, an INT8 QAT on top) starts from them instead of recovering again.
    With `sparsity.recover_from` the recovery starts from that earlier student (its zeros are
    the masks; keyed by its sha256) instead of the freshly pruned dense model.
    """
    if settings.sparsity.pattern is None:
        return
    import copy
    import json
    from dataclasses import replace

    from safetensors.torch import load_model, save_model

    from calibration import tokenized_set
    from compiler.artifacts import atomic_write
    from compiler.training.export import onnx_from_torch
    from compiler.graph.onnx_io import load_onnx
    from compiler.training.prune import prune_2_4, recover
    from compiler.graph.sparsity import require_2_4

    weights_path = settings.base_dir() / "student.safetensors"
    report_path = settings.base_dir() / "sparsity_report.json"
    sp, data = settings.sparsity, settings.data
    # an earlier student brings its own masks: no Wanda scoring, so no calibration text
    calib_texts = calibration_texts(settings) if sp.method == "wanda" and not sp.recover_from else []
    train_texts = training_texts(settings) if sp.recover_steps else []
    # keyed by the texts themselves, not only their path: an edited file prunes/recovers again
    start = _recover_from(sp.recover_from, weights_path) if sp.recover_from else None
    key = settings_hash("sparsity-v3", state.loaded.key, sp, settings.train, data, calib_texts, train_texts,
                        *([start[1]] if start else []))
    teacher = state.loaded.module
    student = copy.deepcopy(teacher)
    if read_key(weights_path) == key and report_path.is_file():
        load_model(student, str(weights_path))
        saved = json.loads(report_path.read_text())
        prune, recovery = saved["prune"], saved["recovery"]
        # the masks: what pruning zeroed (a kept weight that is exactly 0 stays 0: still 2:4)
        masks = {n: student.get_submodule(n).weight.detach() != 0 for n in prune["pruned"]}
        log.info("sparsity: pruned and recovered weights reused from %s", weights_path)
    else:
        tok = state.loaded.tokenizer
        calib = tokenized_set(calib_texts, tok, data.max_length, data.cache_dir) if calib_texts else None
        # with an earlier student, magnitude pruning only chooses the layers (no forward pass)
        masks, prune_report = prune_2_4(student, replace(sp, method="magnitude") if start else sp, calib,
                                        state.loaded.input_names)
        if start:  # weights and masks from the earlier student
            masks = _start_from(student, start[0], list(masks))
            prune_report.method = f"from {start[0]}"
        recovery = None
        if sp.recover_steps:
            tokens = tokenized_set(train_texts, tok, data.max_length, data.cache_dir)
            recovery = _as_dict(recover(student, teacher, masks, tokens, state.loaded.input_names,
                                        replace(settings.train, lr=sp.recover_lr, schedule=sp.recover_schedule),
                                        sp.recover_steps))
            recovery["train_samples"] = len(train_texts)
        prune = _as_dict(prune_report)
        atomic_write(weights_path, lambda p: save_model(student, str(p)))
        write_json(report_path, {"prune": prune, "recovery": recovery})
        write_key(weights_path, key)
    sparse = replace(state.loaded, module=student, key=settings_hash("sparse-v2", key))
    export = replace(settings.export, opset=export_opset(settings))
    path, report = onnx_from_torch(sparse, export, settings.base_dir() / fp32_name(settings), state.texts)
    light = load_onnx(path, check=False)
    check = require_2_4(light, names=prune["pruned"])  # raises when a pruned GEMM lost 2:4
    del light
    state.fp32_onnx = path
    state.student, state.masks = student, masks
    if settings.precision.mode != "int8-qat":
        state.loaded.module = state.student = None
    state.report["sparsity"] = {"pattern": settings.sparsity.pattern, "prune": prune, "recovery": recovery,
                                "check": check.to_dict(), "onnx": str(path), "weights": str(weights_path),
                                "export_parity_worst": max(p.max_abs_diff for p in report.parity)}


def _as_dict(obj: Any) -> Any:
    if obj is None or isinstance(obj, dict):
        return obj
    return obj.to_dict() if hasattr(obj, "to_dict") else vars(obj)


def stage_quantize(settings: BuildSettings, state: PipelineState) -> None:
    """PRECISION=int8 (PTQ) or int8-qat: an FP32 + INT8 Q/DQ graph (reused when unchanged)."""
    from compiler.settings import INT8_MODES

    mode = settings.precision.mode
    if mode not in INT8_MODES:
        return
    import json

    from compiler.graph.onnx_io import onnx_sha256, save_onnx

    out = settings.variant_dir() / "model.qdq.onnx"
    report_path = settings.variant_dir() / "quant_report.json"
    base_sha = onnx_sha256(state.fp32_onnx)
    ref_sha = base_sha if state.reference_onnx == state.fp32_onnx else onnx_sha256(state.reference_onnx)
    key = settings_hash("quantize-v1", base_sha, ref_sha,
                        mode, settings.quant, settings.data, settings.train if mode == "int8-qat" else None)
    if read_key(out) == key and report_path.is_file():
        log.info("quantize: %s reused", out)
        quant = json.loads(report_path.read_text())
    else:
        model, quant = _quantize(settings, state)
        save_onnx(model, out, external=True)
        del model
        write_json(report_path, quant)
        write_key(out, key)
    state.qdq_onnx = out
    state.loaded.module = state.student = None
    state.report["quantization"] = quant.get("summary", quant)


def _quantize(settings: BuildSettings, state: PipelineState) -> tuple[Any, dict[str, Any]]:
    import copy
    from dataclasses import replace

    from calibration import tokenized_set
    from compiler.quant.quantize import quantize_within_budget

    data, tok, loaded = settings.data, state.loaded.tokenizer, state.loaded
    calib = tokenized_set(calibration_texts(settings), tok, data.max_length, data.cache_dir)
    heldout = tokenized_set(state.texts, tok, data.max_length, data.cache_dir)
    float_precision = replace(settings.precision, mode=settings.quant.float_mode)
    if settings.precision.mode == "int8":
        model, rep = quantize_within_budget(state.fp32_onnx, calib, heldout, loaded.input_names, state.output_names,
                                            settings.quant, data.cache_dir, data.batch_size, precision=float_precision)
        summary = {**rep.summary(), "budget_min_cosine": settings.quant.min_cosine, "budget_met": rep.budget["met"],
                   "float_mode": float_precision.mode, "smoothquant_alpha": rep.smoothquant_alpha}
        return model, {"summary": summary, "ptq": rep.to_dict()}
    from compiler.training.qat import int8_qat

    student = state.student if state.student is not None else copy.deepcopy(loaded.module)
    after_step = None
    if state.masks:
        from compiler.training.prune import hold_masks

        after_step = hold_masks(state.masks, student)
    train_tokens = tokenized_set(training_texts(settings), tok, data.max_length, data.cache_dir)
    return int8_qat(student, loaded.module, loaded, state.fp32_onnx, state.reference_onnx, calib, heldout,
                    train_tokens, state.output_names, settings.quant, settings.train, float_precision,
                    replace(settings.export, opset=export_opset(settings)),
                    settings.variant_dir() / "model.qat.fp32.onnx", state.texts, data.cache_dir, data.batch_size,
                    after_step)


def stage_precision(settings: BuildSettings, state: PipelineState) -> None:
    """Rewrite the FP32 graph into the requested precision (reused when unchanged)."""
    from compiler.graph.onnx_io import load_onnx, onnx_sha256, save_onnx
    from compiler.passes.precision import convert_precision

    from dataclasses import replace

    out = settings.variant_dir() / "model.onnx"
    report_path = settings.variant_dir() / "precision_report.json"
    source = state.qdq_onnx or state.fp32_onnx
    graph_sha = onnx_sha256(source)
    prec = settings.precision
    if state.qdq_onnx is not None:  # INT8: what is not quantized runs in quant.float_mode
        prec = replace(prec, mode=settings.quant.float_mode)
    auto = prec.mode == "auto"
    key = settings_hash("precision-v1", graph_sha, prec, settings.data if auto else None)
    if read_key(out) == key and report_path.is_file():
        import json

        precision = json.loads(report_path.read_text())
        log.info("precision: %s reused", out)
    else:
        if auto:
            from calibration import tokenized_set
            from compiler.passes.auto_precision import auto_precision

            data, tok = settings.data, state.loaded.tokenizer
            calib = tokenized_set(calibration_texts(settings), tok, data.max_length, data.cache_dir)
            heldout = tokenized_set(state.texts, tok, data.max_length, data.cache_dir)
            # auto takes the path: it reads the weights through ONNX Runtime where it can.
            model, report = auto_precision(state.fp32_onnx, prec, calib, heldout, state.loaded.input_names,
                                           state.output_names, data.batch_size, state.loaded.vocab_size,
                                           graph_sha, data.cache_dir, settings.model.seed)
        else:
            model, report = convert_precision(load_onnx(source, check=False), prec)
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
    from compiler.graph.onnx_io import load_onnx
    from compiler.eval.verify import verify_variant

    tokens = tokenized_set(state.texts, state.loaded.tokenizer, settings.data.max_length,
                           settings.data.cache_dir)
    fidelity = verify_variant(state.reference_onnx, load_onnx(state.variant_onnx, check=False),
                              state.output_names, tokens, settings.data.batch_size,
                              state.loaded.vocab_size, settings.model.seed)
    fidelity["data"] = {"path": settings.data.path or "wikitext-2/test.txt (default)",
                        "samples": len(tokens), "max_length": settings.data.max_length,
                        "tokens": int(sum(len(x) for x in tokens.input_ids))}
    state.report["fidelity"] = fidelity
    if settings.sparsity.pattern is not None:  # FP16 and Q/DQ must keep the 2:4 pattern
        from compiler.build.engine import sparse_weights_flag

        flag, check = sparse_weights_flag(state.variant_onnx, settings.engine)
        state.report["sparsity"]["variant_check"] = {**check, "sparse_weights_flag": flag}
    write_json(settings.variant_dir() / "report.json", state.report)


def stage_build(settings: BuildSettings, state: PipelineState) -> None:
    """Build the TensorRT engine (stops with exit status 2 where TensorRT or a GPU is missing)."""
    from compiler.build.engine import engine_from_onnx

    state.plan, _manifest = engine_from_onnx(state.variant_onnx, settings, state.report)


STAGES: list[tuple[str, Callable[[BuildSettings, PipelineState], None]]] = [
    ("export", stage_export),
    ("sparsity", stage_sparsity),
    ("quantize", stage_quantize),
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
